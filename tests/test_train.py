"""train.py: exact loss normalisation across accumulation and ranks (FSDP2, HSDP, multi-node on gloo), exact and
elastic resume, export, overfitting, config errors; bfloat16 on CPU; preemption (SIGTERM / SIGUSR1: checkpoint, exit
75, exact resume); data preparation shared by the ranks outlasting the collective timeout. Each run trains a small
LLaMA from an HF folder with the tiny 512-piece tokenizer, so the vocabulary grows 512 -> 515 on load just as
LLaMA-2's grows 32000 -> 32003."""

import filecmp
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cli
from conftest import ROOT, SHARED_DATA, free_port
from model import ModelArgs, Transformer

TOK512 = SHARED_DATA / "tiny-llama" / "tok512.model"
WORDS = "the a cat dog sat ran on under big small red blue one two three four five because so then".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A base model folder and an OpenOrca-layout data file of examples of unequal length."""
    root = tmp_path_factory.mktemp("train")
    base = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, hidden_dim=64,
                                 max_seq_len=256))
    base.init_weights(seed=1, std=0.05)
    base.save_pretrained(root / "base")
    rng = random.Random(0)
    with open(root / "data.jsonl", "w") as f:
        for i in range(48):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
            r = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 16)))
            record = {"id": str(i), "system_prompt": "Think step by step.", "question": q, "response": r}
            f.write(json.dumps(record) + "\n")
    return root


def args_for(setup, out, **over) -> dict:
    """A run's options: TrainConfig fields, for train.main in-process or `--key=value` on a command line."""
    opts = dict(model=setup / "base", tokenizer=TOK512, data=setup / "data.jsonl", max_len=256, global_batch=4,
                micro_batch=1, epochs=2, max_steps=6, lr=3e-3, export_dtype="float32", num_workers=1,
                cache_dir=setup / "cache", out_dir=out, prompt="the cat", max_new_tokens=4)
    opts.update(over)
    return {k: str(v) if isinstance(v, Path) else v for k, v in opts.items()}


def argv_of(opts: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in opts.items()]


def command(opts: dict, nproc=0):
    """`python train.py ...` (nproc=0) or torchrun with nproc processes on one node."""
    if nproc == 0:
        return [sys.executable, "train.py", *argv_of(opts)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + ["train.py", *argv_of(opts)]


def run(opts: dict, nproc=0, extra_env=None, nnodes=0) -> str:
    """Run train.main(TrainConfig) in-process (nproc=0) or torchrun with nproc processes on gloo; torchrun's output."""
    if nproc == 0:
        import train
        train.main(train.TrainConfig(**opts))
        return ""
    argv = argv_of(opts)
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    cmds = [command(opts, nproc)]
    if nnodes:  # several launchers on 127.0.0.1, one per "node", meeting at a c10d rendezvous
        cmds = [[sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
                 "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test", "train.py", *argv]
                for _ in range(nnodes)]
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        if p.returncode:
            save_log(p.pid, "\n".join(outs))
        assert p.returncode == 0, o[-3000:]
    return "\n".join(outs)


def save_log(pid: int, text: str):
    (ROOT / "out").mkdir(exist_ok=True)
    (ROOT / "out" / f"failed-run-{pid}.log").write_text(text)


def start(opts: dict, nproc, log):
    """train.py in the background, its output to the file `log`."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(command(opts, nproc), cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def wait_until(condition, proc, what, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def losses(out):
    return [json.loads(line)["loss"] for line in open(out / "metrics.jsonl")]


def weights(out):
    folder = out / "export" / "final"
    index = folder / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    return {k: v for f in files for k, v in load_file(str(folder / f)).items()}


def assert_same_training(a, b, rtol=1e-5):
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) and len(la) > 0
    for x, y in zip(la, lb):
        assert abs(x - y) <= rtol * abs(x), (la, lb)
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-5, msg=k)


@pytest.fixture(scope="module")
def reference(setup):
    """6 steps, one process, micro-batch 1 with 4 accumulation steps: the run the others must reproduce."""
    out = setup / "ref"
    run(args_for(setup, out))
    return out


def test_resuming_under_other_settings_is_refused_before_any_work(setup, reference):
    with pytest.raises(cli.UserError, match=r"ckpt-\d+ was made with other lr, max_steps: rerun with its settings"):
        run(args_for(setup, reference, lr=1e-3, max_steps=8))


def test_accumulation_equals_one_big_batch(setup, reference):
    out = setup / "big"
    run(args_for(setup, out, micro_batch=4))  # batch 4, no accumulation, same unequal-length examples
    assert_same_training(reference, out)


def test_fsdp_two_ranks_equal_one_process(setup, reference):
    out = setup / "fsdp2"
    run(args_for(setup, out), nproc=2)
    assert_same_training(reference, out)


def test_two_node_launch_equals_one_process(setup, reference):
    out = setup / "nodes2"
    run(args_for(setup, out), nproc=1, nnodes=2)
    assert_same_training(reference, out)


def test_hsdp_four_ranks_with_accumulation_equal_one_process(setup):
    """2 replicas x 2 shards, micro-batch 1, global batch 8: 2 accumulation steps, one cross-replica all-reduce."""
    one, hsdp = setup / "one-batch8", setup / "hsdp"
    run(args_for(setup, one, global_batch=8, micro_batch=8))
    run(args_for(setup, hsdp, global_batch=8, dp_replicate=2), nproc=4)
    assert_same_training(one, hsdp)


def test_resume_is_exact(setup, reference):
    out = setup / "resumed"
    run(args_for(setup, out, stop_at_step=3))
    assert len(losses(out)) == 3 and not (out / "export" / "final").exists()
    run(args_for(setup, out))  # same command: picks up the checkpoint
    assert_same_training(reference, out)


def test_elastic_resume_on_fewer_ranks(setup):
    full, split = setup / "two-ranks", setup / "two-then-one"
    run(args_for(setup, full, micro_batch=2), nproc=2)
    run(args_for(setup, split, micro_batch=2, stop_at_step=3), nproc=2)
    run(args_for(setup, split, micro_batch=2))  # one rank now, same global batch: accumulation 2 instead of 1
    assert_same_training(full, split)


def test_checkpoints_are_atomic_and_pruned(setup, reference):
    ckpts = sorted(p.name for p in (reference / "checkpoints").iterdir())
    assert ckpts == ["ckpt-00000006"]  # keep_last=2, but the stage-end checkpoint shares step 6 and replaced it
    state = json.loads((reference / "checkpoints" / "ckpt-00000006" / "train_state.json").read_text())
    assert state["stage"] == 1 and state["config"]["global_batch"] == 4


def test_overfits_one_batch_and_export_loads_back(setup):
    out = setup / "overfit"
    (setup / "one.jsonl").write_text(json.dumps({"system_prompt": "", "question": "two plus two",
                                                  "response": "four because two and two make four"}) + "\n")
    run(args_for(setup, out, data=setup / "one.jsonl", epochs=60, max_steps=60, lr=1e-2, global_batch=1))
    assert losses(out)[-1] < 0.05 < losses(out)[0]
    back = Transformer.from_pretrained(out / "export" / "final")
    w = weights(out)
    assert back.args.vocab_size == 515
    for k, v in back.state_dict().items():
        assert torch.equal(v, w[k]), k


def test_nan_loss_stops_with_last_checkpoint_intact(setup):
    out = setup / "nan"
    with pytest.raises(cli.UserError, match=r"loss is nan .*Last good checkpoint: .*ckpt-00000001"):
        run(args_for(setup, out, lr=1e30, grad_clip=0.0, save_every=1, max_steps=5))
    assert (out / "checkpoints" / "ckpt-00000001" / "train_state.json").is_file()


@pytest.mark.parametrize("argv, message", [
    (["--nope=1"], "unknown option --nope"),
    (["--lr=fast"], "--lr takes a number, got 'fast'"),
    (["--global_batch=6", "--micro_batch=4"], "micro_batch values that work with 1 ranks: \\[1, 2, 3, 6\\]"),
    (["--data=/no/such.jsonl",
      '--stages=[{"name": "s", "epochs": 1, "lr": 1e-5, "sources": [{"name": "x", "path": "/no/such.jsonl"}]}]'],
     "stage 's', source 'x': data file /no/such.jsonl does not exist"),
])
def test_config_errors_are_clear(argv, message):
    import train
    with pytest.raises(cli.UserError, match=message):
        train.main(cli.parse(train.TrainConfig, argv))


def test_a_dead_rank_ends_the_job_with_a_clear_message(setup):
    """SIGKILL one of two ranks mid-run: torchrun must stop the job promptly and name the failed rank."""
    import signal
    import time
    out = setup / "dead"
    opts = args_for(setup, out, max_steps=10_000, epochs=10_000, timeout_s=60)
    cmd = command(opts, nproc=2)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
        assert time.time() < deadline and proc.poll() is None, "training never started"
        time.sleep(0.2)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    os.kill(int(workers[-1]), signal.SIGKILL)
    start = time.time()
    output = proc.communicate(timeout=90)[0]
    assert proc.returncode != 0
    assert time.time() - start < 60  # ended by the launcher, not by waiting out a collective timeout
    assert "Signal 9 (SIGKILL)" in output and "train.py FAILED" in output


def test_a_fresh_run_refuses_an_out_dir_with_checkpoints(setup, reference):
    with pytest.raises(cli.UserError, match="holds checkpoints of an earlier run"):
        run(args_for(setup, reference, resume=False))


# ---- bfloat16 on CPU: the GPU code path (autocast in one process, FSDP's MixedPrecisionPolicy under torchrun) ----


@pytest.fixture(scope="module")
def bf16_run(setup):
    out = setup / "bf16"
    run(args_for(setup, out, dtype="bfloat16"))
    return out


def test_bfloat16_on_cpu_trains_close_to_float32(setup, reference, bf16_run):
    fp32, bf16 = losses(reference), losses(bf16_run)
    assert bf16[-1] < bf16[0] - 0.3  # it trains
    diffs = [abs(a - b) / a for a, b in zip(fp32, bf16)]
    assert max(diffs) < 0.02, diffs  # close to float32 ...
    assert max(diffs) > 0, "bfloat16 gave float32's losses bit for bit: it did not compute in bfloat16"  # ... not it
    assert all(w.dtype == torch.float32 for w in weights(bf16_run).values())  # float32 master weights


def test_bfloat16_two_ranks_equal_one_rank_and_sample_in_step(setup, bf16_run):
    """FSDP2 casts the parameters to bfloat16 and reduces gradients in float32; one process autocasts. The held-out
    answer is sampled (temperature > 0) with rank 0's token choices broadcast, so the ranks cannot fall out of step."""
    out = setup / "bf16-fsdp2"
    output = run(args_for(setup, out, dtype="bfloat16", temperature=0.8, top_p=0.9), nproc=2)
    one, two = losses(bf16_run), losses(out)
    assert abs(one[0] - two[0]) <= 5e-3 * one[0], (one, two)
    assert all(abs(a - b) <= 2e-2 * a for a, b in zip(one, two)), (one, two)
    assert "computing in torch.bfloat16" in output
    assert re.search(r"held-out prompt \(cautious system message\): the cat\nanswer:\n\S", output), output[-2000:]


def test_peak_flops_by_full_device_name(monkeypatch, capsys):
    """MFU's denominator: dense bf16 peaks by the exact name torch reports; a name missing from the table (or only
    a prefix of one) reports no MFU, and says so once."""
    import train
    cuda = torch.device("cuda", 0)
    table = {"NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA H100 80GB HBM3": 989e12,
             "NVIDIA H100 PCIe": 756e12, "NVIDIA H100 NVL": 835e12, "NVIDIA H200": 989e12}
    for name, peak in table.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert train.peak_flops(cuda) == peak, name
    assert capsys.readouterr().out == ""
    for name in ("NVIDIA H100", "NVIDIA GeForce RTX 4090"):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert train.peak_flops(cuda) is None
        assert capsys.readouterr().out == f"unknown device {name!r}, MFU not reported (add its dense bf16 peak to " \
                                          "train.PEAK_BF16_FLOPS)\n"
    assert train.peak_flops(torch.device("cpu")) is None


# ---- preemption: SIGTERM / SIGUSR1 -> finish the step, checkpoint, exit 75; the same command resumes exactly ----


@pytest.fixture(scope="module")
def long_reference(setup):
    """80 steps uninterrupted: long enough to signal a run in the middle."""
    out = setup / "ref80"
    run(args_for(setup, out, epochs=10, max_steps=80))
    return out


def preempt_and_resume(setup, out, nproc, sig=signal.SIGTERM) -> str:
    """Start the run, signal it (torchrun forwards) once metrics.jsonl has 3 lines, rerun the same command."""
    opts = args_for(setup, out, epochs=10, max_steps=80)
    log = setup / f"{out.name}.log"
    proc = start(opts, nproc, log)
    wait_until(lambda: (out / "metrics.jsonl").exists() and len(losses(out)) >= 3, proc, "3 training steps")
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    output = log.read_text()
    done = len(losses(out))
    if nproc == 0:
        assert code == 75, output[-3000:]
    for rank in range(max(nproc, 1)):  # every worker checkpointed and left with the documented code
        assert f"[rank {rank}] preempted: checkpoint at step {done} written, exiting with code 75" in output, output
    assert 3 <= done < 80 and (out / "checkpoints" / f"ckpt-{done:08d}" / "train_state.json").is_file()
    assert not (out / "export" / "final").exists()
    again = start(opts, nproc, log.with_suffix(".rerun.log"))  # the same command again
    assert again.wait(timeout=300) == 0, log.with_suffix(".rerun.log").read_text()[-3000:]
    return output


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_one_process_checkpoints_and_resumes_exactly(setup, long_reference, sig):
    out = setup / f"preempt-{sig.name}"
    preempt_and_resume(setup, out, nproc=0, sig=sig)
    assert_same_training(long_reference, out)


def test_sigterm_to_torchrun_checkpoints_every_rank_and_resumes_exactly(setup, long_reference):
    out = setup / "preempt-2ranks"
    output = preempt_and_resume(setup, out, nproc=2)
    assert "Received Signals.SIGTERM death signal" in output or "Received 15 death signal" in output, output
    assert_same_training(long_reference, out)


# ---- data preparation: shared by the ranks, no collective timeout, interruptible, byte-identical caches ----


@pytest.fixture(scope="module")
def big_data(setup):
    """~32 MB of short OpenOrca-layout records (short records cost the most per byte), 2% exact duplicates, some
    too long for max_len: 2 ranks tokenize and merge it in ~10 s on 2 CPU cores, twice timeout_s=5."""
    rng = random.Random(1)
    vocab = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(3000)]
    lines, size = [], 0
    while size < 32e6:
        if lines and rng.random() < 0.02:
            line = rng.choice(lines)
        else:
            record = {"id": str(len(lines)), "system_prompt": rng.choice(["", "Think step by step."]),
                      "question": " ".join(rng.choices(vocab, k=rng.randint(1, 6))).capitalize() + "?",
                      "response": " ".join(rng.choices(vocab, k=rng.randint(1, 8))) + "."}
            line = json.dumps(record)
        lines.append(line)
        size += len(line) + 1
    path = setup / "big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def data_args(setup, big_data, cache, out):
    # num_workers is per node: 2 ranks get 1 tokenizer each, one process a pool of 2
    return args_for(setup, out, data=big_data, cache_dir=cache, num_workers=2, max_steps=2)


@pytest.fixture(scope="module")
def two_rank_prep(setup, big_data):
    """2 ranks with a 5 s collective timeout: each tokenizes half the parts, rank 0 merges, rank 1 polls for it."""
    cache = setup / "cache-2ranks"
    output = run(data_args(setup, big_data, cache, setup / "prep-2ranks") | {"timeout_s": 5}, nproc=2)
    return cache, output


def test_data_preparation_outlasts_the_collective_timeout(two_rank_prep):
    cache, output = two_rank_prep
    seconds = float(re.search(r"\[data\] tokenized \S+ in ([\d.]+) s", output).group(1))
    assert seconds > 5, f"preparation took {seconds} s: make big_data bigger for this machine"
    assert "stage 1/1 'orca2'" in output and "answer:" in output  # then it trained, exported and answered


def same_tree(a, b) -> list[str]:
    """Relative paths of every file under a and b; asserts the two trees hold the same bytes."""
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert not mismatch and not errors, (mismatch, errors)
    return files


def test_sigterm_during_data_preparation_keeps_the_cache_usable(setup, big_data, two_rank_prep):
    """One process with 2 tokenizer workers, signalled once a part is done: it exits 75 at once, and the same command
    then finishes the cache from the parts kept, byte-identical to the 2-rank build; temporary folders of killed
    runs are removed."""
    cache, out = setup / "cache-1process", setup / "prep-1process"
    opts = data_args(setup, big_data, cache, out)
    proc = start(opts, 0, setup / "prep-1process.log")
    wait_until(lambda: any(cache.glob("*.parts/*.npz")), proc, "the first finished part")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    assert "during data preparation: stopped, exiting with code 75" in (setup / "prep-1process.log").read_text()
    tokens = next(cache.glob("tokens-*.parts")).with_suffix("")
    assert not (tokens / "meta.json").exists()
    # what a kill -9 leaves during a merge, a packing, a part's write
    packs = next(two_rank_prep[0].glob("packs-*")).name
    stale = [tokens.with_name(tokens.name + ".tmp99999"), cache / f"{packs}.tmp99999"]
    for folder in stale:
        folder.mkdir()
    (tokens.with_name(tokens.name + ".parts") / "0-1.npz.tmp99999.npz").write_bytes(b"half a part")
    proc = start(opts, 0, setup / "prep-1process-again.log")
    assert proc.wait(timeout=300) == 0, (setup / "prep-1process-again.log").read_text()[-3000:]
    assert not any(p.exists() for p in stale) and not list(cache.glob("*.parts"))
    files = same_tree(two_rank_prep[0], cache)
    assert any(f.endswith("ids.bin") for f in files) and any(f.endswith("pack_offsets.bin") for f in files)
