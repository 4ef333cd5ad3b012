"""bench.py's data-side measurements: packing efficiency, the tokenize + pack pipeline, `python data.py` at scale, the
memory of loading and converting a release, and making data through a teacher (client.py's request rate, synth.py
cold and cached). bench.py runs each case here in a fresh process and reports it.

    python bench.py --only=packing,data,scale,load,client    # the sections built on these cases
    python bench_data.py                                  # one quick packing case, printed

This module never imports bench.py (bench.py imports it); the cases return plain dicts. `timed` is the median
timing both bench.py and bench_gpu.py use.
"""

import contextlib
import io
import json
import multiprocessing as mp
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

import cli

ROOT = Path(__file__).resolve().parent


def timed(fn, repeats: int) -> float:
    """Median seconds of fn over repeats calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sample_documents(max_len: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], object]:
    """The shipped Orca-style sample, tokenized and packed by data.py: ((ids, teacher flags) per example, the packs)."""
    import data
    import orca2
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(data.LLAMA2_TOKENIZER)
    cfg = data.DataConfig(max_len=max_len, cache_dir=str(ROOT / "out" / "bench" / "cache"), num_workers=1)
    packed, _ = data.build_stage([orca2.Source("sample", str(data.SAMPLE_DATA), erase=True)], tok, cfg, log=None)
    return [d for p in range(len(packed)) for d in packed.documents(p)], packed


# ---- packing efficiency ----


def greedy_sequential(lengths: np.ndarray, capacity: int) -> int:
    """The naive baseline: fill the current row in input order, open a new one when the next example does not fit."""
    rows, room = 0, 0
    for n in lengths.tolist():
        if n > room:
            rows, room = rows + 1, capacity
        room -= n
    return rows


def packing_case(n: int) -> dict:
    """Best-fit decreasing (data.pack_best_fit) vs sequential greedy on four length distributions of n examples."""
    import data
    rng = np.random.default_rng(0)
    docs, _ = sample_documents(4096)
    sample = np.array([len(ids) for ids, _ in docs])
    dists = {
        "Orca sample lengths (resampled)": rng.choice(sample, n),
        "lognormal, median 350 tokens": np.clip(rng.lognormal(np.log(350), 0.9, n), 16, 4096).astype(int),
        "FLAN-like short, median 120": np.clip(rng.lognormal(np.log(120), 0.7, n), 8, 4096).astype(int),
        "long-tailed, 5% near 4096": np.concatenate([np.clip(rng.lognormal(np.log(500), 0.8, n - n // 20), 16, 4096),
                                                     rng.integers(3000, 4097, n // 20)]).astype(int),
    }
    rows = []
    for name, lengths in dists.items():
        t = time.perf_counter()
        _, offsets = data.pack_best_fit(lengths, 4096)
        dt = time.perf_counter() - t
        bfd, seq = len(offsets) - 1, greedy_sequential(lengths, 4096)
        total = lengths.sum()
        rows.append(dict(name=name, bfd_eff=total / (bfd * 4096), greedy_eff=total / (seq * 4096), ratio=seq / bfd,
                         bfd_s=dt))
    return {"rows": rows}


# ---- data pipeline: tokenize + pack, cold and cached ----


def data_timing(path: str, cache: str) -> dict:
    """Tokenize and pack one file cold, then from the cache, in this process (its tokenizer workers under it)."""
    import data
    import orca2
    from tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained(data.LLAMA2_TOKENIZER)
    cfg = data.DataConfig(cache_dir=cache)
    times = [time.time()]
    for _ in range(2):  # cold, then cached
        _, stats = data.build_stage([orca2.Source("bench", path, erase=True)], tok, cfg, log=None)
        times.append(time.time())
    return dict(examples=stats["examples"], tokens=stats["tokens"], cold_s=times[1] - times[0],
                cached_s=times[2] - times[1], efficiency=stats["efficiency"],
                rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def data_case(n: int) -> dict:
    """n Orca-style examples (the shipped sample's lines, each made unique so nothing is encoded only once), timed by
    data_timing in a fresh interpreter: in_child's daemonic process may not start the tokenizer's worker processes."""
    import data
    work, lines = ROOT / "out" / "bench" / "data", [line for line in data.SAMPLE_DATA.read_text().splitlines() if line]
    shutil.rmtree(work / "cache", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"orca-{n}.jsonl"
    with open(path, "w") as f:
        for k in range(n):
            r = json.loads(lines[k % len(lines)])
            r["input"]["messages"][-1]["content"] = f"({k}) " + r["input"]["messages"][-1]["content"]
            r["preferred_output"][0]["content"] += f" ({k})"
            f.write(json.dumps(r) + "\n")
    code = (f"import bench_data, json; "
            f"print(json.dumps(bench_data.data_timing({str(path)!r}, {str(work / 'cache')!r})))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"data_timing failed on {path}:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.splitlines()[-1]) | dict(mbytes=round(path.stat().st_size / 1e6, 1))


# ---- scale: an OpenOrca-like parquet through `python data.py FILE.parquet` ----

# Orca 1-style system messages, as in OpenOrca's system_prompt column (the empty one included).
OPENORCA_SYSTEMS = [
    "",
    "You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully as you "
    "can. While performing the task think step-by-step and justify your steps.",
    "You are a helpful assistant, who always provide explanation. Think like you are answering to a five year old.",
    "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
    "You are an AI assistant that helps people find information. Provide a detailed answer so user don't need to "
    "search outside to understand the answer.",
    "You should describe the task and explain your answer. While answering a multiple choice question, first output "
    "the correct answer(s). Then explain why other answers are wrong. Think like you are answering to a five year old.",
    "You are an AI assistant that follows instruction extremely well. Help as much as you can.",
    "You are a teacher. Given a task, you explain in simple steps what the task is asking, any guidelines it provides "
    "and how to use those guidelines to find the answer.",
]


def make_openorca_parquet(path: Path, rows: int, group_rows: int = 10_000) -> None:
    """OpenOrca's columns (id, system_prompt, question, response) from the shipped sample's questions and answers
    under random Orca 1 system messages, every row made unique; written one row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import data
    pairs = [(r["input"]["messages"][-1]["content"], r["preferred_output"][0]["content"])
             for r in map(json.loads, data.SAMPLE_DATA.read_text().splitlines())]
    rng = np.random.default_rng(0)
    schema = pa.schema([(c, pa.string()) for c in ("id", "system_prompt", "question", "response")])
    tmp = path.with_name(path.name + ".tmp")
    with pq.ParquetWriter(tmp, schema) as writer:
        for a in range(0, rows, group_rows):
            ks, pick = range(a, min(a + group_rows, rows)), rng.integers(0, len(pairs), min(group_rows, rows - a))
            writer.write_table(pa.table({
                "id": [f"flan.{k}" for k in ks],
                "system_prompt": [OPENORCA_SYSTEMS[i] for i in rng.integers(0, len(OPENORCA_SYSTEMS), len(ks))],
                "question": [f"({k}) {pairs[i][0]}" for k, i in zip(ks, pick)],
                "response": [f"{pairs[i][1]} ({k})" for k, i in zip(ks, pick)]}, schema=schema))
    tmp.rename(path)


def tree_sample(pid: int, cpu: dict[int, float]) -> tuple[float, float, list[int]]:
    """(RSS MB, PSS MB, pids) summed over a process and all its descendants; each one's CPU seconds so far into cpu.
    PSS splits shared pages between the processes that map them, so its sum is the tree's real footprint (RSS counts
    shared library pages once per process)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            after_name = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, ...; utime, stime at 11, 12
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(after_name[1]), []).append(int(stat.parent.name))
        cpu[int(stat.parent.name)] = (int(after_name[11]) + int(after_name[12])) / os.sysconf("SC_CLK_TCK")
    todo, rss, pss, tree = [pid], 0.0, 0.0, []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
        try:
            for line in open(f"/proc/{p}/smaps_rollup"):
                key, value = line.split()[:2]
                rss += int(value) / 1024 if key == "Rss:" else 0
                pss += int(value) / 1024 if key == "Pss:" else 0
        except (OSError, ValueError):  # ended, or the header line of the file
            continue
    return rss, pss, tree


def scale_case(rows: int) -> dict:
    """`python data.py FILE.parquet` on a fresh cache; its process tree's memory and CPU time sampled every 0.2 s."""
    work = ROOT / "out" / "bench" / "scale"
    path = work / f"openorca-{rows}.parquet"
    work.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        make_openorca_parquet(path, rows)
    shutil.rmtree(work / "cache", ignore_errors=True)
    t, log = time.perf_counter(), open(work / "data.py.log", "w")  # a file, not a pipe: a full pipe would block
    proc = subprocess.Popen([sys.executable, str(ROOT / "data.py"), str(path), "--cache_dir", str(work / "cache")],
                            stdout=log, stderr=subprocess.STDOUT)
    peak_rss = peak_pss = 0.0
    cpu, tree = {}, set()
    while proc.poll() is None:
        rss, pss, pids = tree_sample(proc.pid, cpu)
        peak_rss, peak_pss, tree = max(peak_rss, rss), max(peak_pss, pss), tree | set(pids)
        time.sleep(0.2)
    wall = time.perf_counter() - t
    log.close()
    if proc.returncode:
        raise RuntimeError(f"data.py failed on {path}:\n{(work / 'data.py.log').read_text()[-3000:]}")
    (meta,) = [json.loads(m.read_text()) for m in (work / "cache").glob("tokens-*/meta.json")]
    said = re.search(r"\[data\] tokenized .* in ([0-9.]+) s by (\d+) process", (work / "data.py.log").read_text())
    assert said, f"data.py no longer logs its tokenizing time; see {work / 'data.py.log'}"
    return dict(rows=meta["lines"], examples=meta["examples"], tokens=meta["tokens"], workers=int(said[2]),
                mbytes=path.stat().st_size / 1e6, wall_s=wall, tokenize_s=float(said[1]), peak_rss_tree=peak_rss,
                peak_pss_tree=peak_pss, cpu_s=sum(cpu[p] for p in tree))


# ---- loading the release layout: peak anonymous memory ----


def make_release(folder: Path, quick: bool) -> dict:
    """A ~1 GB fp32 checkpoint in the Orca 2 release layout: three .bin shards, an index, an old-style config."""
    import torch

    from model import ModelArgs, Transformer
    args = ModelArgs(dim=1024, n_layers=4 if quick else 16, n_heads=16, n_kv_heads=16, vocab_size=32003,
                     hidden_dim=2816, max_seq_len=4096)
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        model = Transformer(args)
        model.init_weights(seed=0)
        sd, weight_map = model.state_dict(), {}
        names = list(sd)
        for i in range(3):
            fname = f"pytorch_model-{i + 1:05d}-of-00003.bin"
            part = {k: sd[k] for k in names[i * len(names) // 3:(i + 1) * len(names) // 3]}
            torch.save(part, folder / fname)
            weight_map.update({k: fname for k in part})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
        (folder / "config.json").write_text(json.dumps(dict(args.to_hf_config(torch.float32), pad_token_id=0)))
    with torch.device("meta"):
        n_params = sum(p.numel() for p in Transformer(args).parameters())
    largest = max(f.stat().st_size for f in folder.glob("*.bin"))
    return {"fp32_mb": n_params * 4 / 1e6, "bf16_mb": n_params * 2 / 1e6, "largest_shard_mb": largest / 1e6}


def rss_anon_mb() -> float:
    return [int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("RssAnon:")][0]


def peak_anon(fn) -> float:
    """Peak RssAnon (MB) above the starting level while fn runs, sampled every 2 ms from /proc/self/status."""
    peak, done = [0.0], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon_mb())
            time.sleep(0.002)
    base = rss_anon_mb()
    t = threading.Thread(target=poll)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return peak[0] - base


def load_case(folder: str, what: str) -> dict:
    """Peak anonymous memory of from_pretrained into bf16 ("load") or of `python model.py convert` to bf16."""
    import torch

    from model import ConvertConfig, Transformer, convert
    if what == "load":
        keep = []
        mb = peak_anon(lambda: keep.append(Transformer.from_pretrained(folder, dtype=torch.bfloat16)))
    else:
        shutil.rmtree(folder + "-bf16", ignore_errors=True)
        mb = peak_anon(lambda: convert(ConvertConfig(folder, folder + "-bf16", "bfloat16", "400MB")))
    return {"anon_mb": mb}


# ---- synthetic data: the teacher client and synth.py (issue #16) ----

FIXED_REPLY = "Answer: 4"


def fixed_teacher(conn) -> None:
    """A zero-latency teacher: every request gets the same chat reply at once. Sends its URL, then serves."""
    from servers import LocalServer, chat_response
    reply = (200, chat_response(FIXED_REPLY, prompt_tokens=9, completion_tokens=3), {})
    server = LocalServer(lambda path, body: reply)
    conn.send(server.base_url)
    server.serve_forever()


def miniature_teacher(conn) -> None:
    """servers.py's programmatic teacher of the miniature. Sends its URL, then serves."""
    import servers
    server = servers.teacher_server()
    conn.send(server.base_url)
    server.serve_forever()


@contextlib.contextmanager
def server_process(serve):
    """Run serve(conn) in a process of its own, as a real teacher runs beside the client (its own core and GIL, so
    the server's Python does not slow the client being measured); yields the server's base URL."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(theirs,), daemon=True)
    proc.start()
    try:
        if not ours.poll(120):
            raise RuntimeError(f"{serve.__name__} did not start within 120 s")
        yield ours.recv()
    finally:
        proc.terminate()
        proc.join()


def client_rate_case(base_url: str, n: int, concurrency: int) -> dict:
    """n distinct chat requests through client.Endpoint with a fresh cache file: requests/s, every reply stored."""
    from client import Endpoint, Reply
    requests = [("chat", {"messages": [{"role": "user", "content": f"What is {i} + 0?"}], "max_tokens": 16})
                for i in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        ep = Endpoint(base_url, "bench", Path(tmp) / "cache.sqlite", concurrency=concurrency, progress=False)
        ep.check()
        t = time.perf_counter()
        replies = ep.run(requests)
        dt = time.perf_counter() - t
    bad = [r for r in replies if not isinstance(r, Reply) or r.text != FIXED_REPLY]
    assert not bad, f"{len(bad)} of {n} requests did not get the teacher's reply, e.g. {bad[0]}"
    return {"requests": ep.stats["requests"], "seconds": dt, "req_s": n / dt}


def synth_case(base_url: str, n_items: int, concurrency: int) -> dict:
    """synth.main over n_items miniature problems (question/answer layout), cold against the teacher, then again
    with every answer in its cache: the seconds of each whole run."""
    import repro
    import synth
    splits = repro.make_splits(data_seed=0, n_train=n_items // 5, n_test=n_items // 5)  # distinct problems
    problems = splits["train"] + [p for k in ("arith-test", "arith-hard", "compare-test", "compare-hard")
                                  for p in splits[k]]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "miniature.jsonl"
        path.write_text("".join(json.dumps({"question": p.question, "answer": p.answer, "task": p.kind}) + "\n"
                                for p in problems[:n_items]))
        cfg = synth.SynthConfig(tasks=str(path), base_url=base_url, teacher="miniature", out=str(Path(tmp) / "out"),
                                concurrency=concurrency, progress=False)
        runs = []
        for _ in ("cold", "cached"):
            t = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):  # its config line and report.md
                result = synth.main(cfg)
            runs.append((time.perf_counter() - t, result))
    (cold_s, cold), (cached_s, cached) = runs
    assert cold["failed"] == 0 and cached["requests"] == 0, f"cold {cold}, cached {cached}"
    written = sum(c["written"] for c in cached["counts"].values())
    return dict(items=min(n_items, len(problems)), cold_s=cold_s, cached_s=cached_s, requests=cold["requests"],
                written=written)


if __name__ == "__main__":
    cli.demo_args(__doc__)
    for row in packing_case(20_000)["rows"]:
        print(f"{row['name']}: best-fit decreasing {row['bfd_eff']:.2%}, sequential greedy {row['greedy_eff']:.2%}")
