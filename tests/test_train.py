"""train.py: exact loss normalisation across accumulation and ranks (FSDP2, HSDP, multi-node on gloo), exact and
elastic resume, export, overfitting, config errors. Each run trains a small LLaMA from an HF folder with the
tiny 512-piece tokenizer, so the vocabulary grows 512 -> 515 on load just as LLaMA-2's grows 32000 -> 32003."""

import json
import os
import random
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import cli
from conftest import ROOT, SHARED_DATA
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
            f.write(json.dumps({"id": str(i), "system_prompt": "Think step by step.", "question": q, "response": r}) + "\n")
    return root


def args_for(setup, out, **over):
    opts = dict(model=setup / "base", tokenizer=TOK512, data=setup / "data.jsonl", max_len=256, global_batch=4,
                micro_batch=1, epochs=2, max_steps=6, lr=3e-3, export_dtype="float32", num_workers=1,
                cache_dir=setup / "cache", out_dir=out, prompt="the cat", max_new_tokens=4)
    opts.update(over)
    return [f"--{k}={v}" for k, v in opts.items()]


def run(argv, nproc=0, extra_env=None, nnodes=0):
    """Run train.py in-process (nproc=0) or under torchrun with nproc processes on gloo."""
    if nproc == 0:
        import train
        train.main(cli.parse(train.TrainConfig, argv))
        return
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", **(extra_env or {}))
    if nnodes:  # several launchers on 127.0.0.1, one per "node", meeting at a c10d rendezvous
        cmds = [[sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", f"--nproc_per_node={nproc}",
                 "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=test", "train.py", *argv]
                for _ in range(nnodes)]
    else:
        cmds = [[sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                 "train.py", *argv]]
    procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, o in zip(procs, outs):
        if p.returncode:
            (ROOT / "out").mkdir(exist_ok=True)
            (ROOT / "out" / f"failed-run-{p.pid}.log").write_text("\n".join(outs))
        assert p.returncode == 0, o[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_hsdp_four_ranks_equal_one_process(setup, reference):
    out = setup / "hsdp"
    run(args_for(setup, out, dp_replicate=2), nproc=4)
    assert_same_training(reference, out)


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
    (["--data=/no/such.jsonl", "--stages=[{\"name\": \"s\", \"sources\": [{\"name\": \"x\", \"path\": \"/no/such.jsonl\"}]}]"],
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
    argv = args_for(setup, out, max_steps=10_000, epochs=10_000, timeout_s=60)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *argv]
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
