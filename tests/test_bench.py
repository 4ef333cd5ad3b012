"""bench.py and the FLOP accounting behind MFU: the numerator counts what the trainer computes, the GPU section's
code runs (on the CPU here, with a tiny shape) and says plainly when no GPU was there to measure, the eval_loop
baseline decodes exactly what model.generate decodes, and the client section measures real replies.

    python -m pytest -q tests/test_bench.py
"""

import json
import math
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import bench
import bench_data
import bench_gpu
import train
from cli import UserError
from conftest import ROOT
from model import ModelArgs, Transformer


def test_step_flops_match_the_flop_counter():
    """train.step_flops against PyTorch's own count of one forward + backward as train.py runs it: two packed
    documents, logits only at the teacher tokens, grouped-query attention."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=300, max_seq_len=256)
    model = Transformer(args)
    model.init_weights(seed=0)
    position_ids = torch.cat([torch.arange(40), torch.arange(60)])[None]
    teacher = torch.zeros(1, 100, dtype=torch.bool)
    teacher[0, 30:40] = teacher[0, 70:] = True
    # The math kernel spells attention out as batched matmuls the counter sees; it also multiplies the masked half.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 300, (1, 100)), position_ids, logits_at=teacher).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    pairs = int((2 * position_ids + 1).sum())  # train.attention_pairs: 40^2 + 60^2
    assert pairs == 40 ** 2 + 60 ** 2
    matmuls = train.step_flops(args, n_tok=100, n_sup=40, pairs=0)
    assert counts["aten.mm"] == matmuls  # every weight, the output layer at the 40 teacher tokens only
    assert counts["aten.bmm"] == 2 * (train.step_flops(args, n_tok=100, n_sup=40, pairs=pairs) - matmuls)


def test_gpu_cases_run_on_cpu_with_a_tiny_shape():
    """The GPU section's two measurements, on the CPU: every field a number, the block count the shape's own (no
    memory limit off the GPU), and the decode limit the bytes of the weights and cache actually read."""
    tr = bench_gpu.gpu_train_case("tiny", "cpu", seq_len=256, micro_batch=2, steps=1)
    assert tr["layers"] == ModelArgs.from_name("tiny").n_layers
    assert tr["tok_s"] > 0 and tr["tflops"] > 0 and math.isnan(tr["mfu"])  # no nominal peak for a CPU
    dec = bench_gpu.gpu_decode_case("tiny", "cpu", batch=2, prompt_len=16, new_tokens=8)
    args = ModelArgs.from_name("tiny")
    weights = 2 * (args.n_layers * (train.block_params(args) + 2 * args.dim) + args.dim + 32003 * args.dim + args.dim)
    assert abs(dec["gb_per_token"] * 1e9 - weights) / weights < 0.05  # bf16 weights (one embedding row) + small cache
    assert dec["tok_s"] > 0 and 0 < dec["frac_measured"] and math.isnan(dec["frac_nominal"])


def test_the_old_generation_loop_decodes_what_model_generate_decodes():
    """eval_loop times the same work both ways: ragged prompts (left padding), with no stop id and with a stop id
    the model actually emits, give the same tokens from the copied old loop and from model.generate."""
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=300, max_seq_len=256)
    model = Transformer(args)
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (5, 17, 9)]
    new = model.generate(prompts, 12, stop_ids=())
    assert [len(row) for row in new] == [12, 12, 12]
    assert bench.generate_before_17(model, prompts, 12, stop_ids=()) == new
    stop = new[1][6]  # a token row 1 emits: that row ends there (or earlier), the others may too
    cut = model.generate(prompts, 12, stop_ids=(stop,))
    assert len(cut[1]) <= 6 and stop not in sum(cut, [])
    assert bench.generate_before_17(model, prompts, 12, stop_ids=(stop,)) == cut


def test_client_rate_case_sends_every_request_to_a_separate_server():
    """The client section's request-rate measurement, small: every request sent (fresh cache), every reply the
    teacher's, a positive rate. (Its 150 requests/s goal is reported by bench.py, not asserted on a busy machine.)"""
    with bench_data.server_process(bench_data.fixed_teacher) as url:
        r = bench_data.client_rate_case(url, 300, 64)
    assert r["requests"] == 300 and r["req_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the section measures instead of saying it cannot")
def test_bench_says_when_no_gpu_was_measured(tmp_path):
    out = tmp_path / "bench"
    run = subprocess.run([sys.executable, "bench.py", "--only=gpu", f"--out={out}"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "no CUDA device" in (out / "bench.md").read_text()
    assert json.loads((out / "bench.json").read_text())[0]["section"] == "gpu-none"


def test_a_quick_packing_run_writes_the_report_and_the_chart(tmp_path):
    out = tmp_path / "bench"
    run = subprocess.run([sys.executable, "bench.py", "--only=packing", "--quick=true", f"--out={out}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    report = (out / "bench.md").read_text()
    assert "Packing efficiency" in report and report.count("20,000 examples into 4096") == 4
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_unknown_section_is_a_user_error_before_anything_runs(tmp_path):
    with pytest.raises(UserError, match=r"--only: unknown sections \['nope'\]"):
        bench.main(bench.BenchConfig(only="packing,nope", out=str(tmp_path)))
    assert not list(tmp_path.iterdir())
