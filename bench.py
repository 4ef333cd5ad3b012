"""Benchmarks, each a ratio measured within one run so the numbers survive a noisy machine.

Run it:
    python bench.py                         # every CPU section; writes out/bench/bench.md and bench.png
    python bench.py --only=attention,generate --repeats=5
    python bench.py --quick=true            # smaller sizes, for a first look

Sections:
    attention  packed per-document attention vs the dense block-diagonal mask, fwd+bwd, 4096 tokens, several document
               mixes; the same for a whole small model, with peak memory as T grows
    train      packed rows vs padded batches on the same examples: real and supervised tokens/s, peak memory
    packing    best-fit-decreasing vs sequential greedy packing efficiency on realistic length distributions
    data       100,000 Orca-style examples tokenized and packed, cold and from the cache
    scale      `python data.py FILE.parquet` on 200,000 OpenOrca-like rows (~300 MB): rows/s and tokens/s per core, and
               the peak memory of the whole process tree (workers included; must stay under 1.5 GB)
    generate   batched greedy generation tokens/s at batch 1, 8, 32, with and without the KV cache
    load       peak anonymous memory of loading a ~1 GB fp32 .bin release into bf16, and of converting it
    gpu        where CUDA is present: MFU of a LLaMA-2-7B-shaped training step (as many of its blocks as fit one
               device, packed 2 x 4096 rows, bf16 autocast, fp32 AdamW) and decode tokens/s at batch 1 and 8 as a
               share of the memory-bandwidth limit; without a GPU it says so in bench.md and measures nothing
Every timing runs in a fresh process (peak memory is that process's own), the two variants alternating A B A B.
"""

import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent


@dataclass
class BenchConfig:
    only: str = "attention,train,packing,data,scale,generate,load,gpu"  # comma-separated sections
    repeats: int = 3          # timed repetitions per variant (median reported), after one warm-up
    quick: bool = False       # smaller sizes
    threads: int = 2          # torch threads in each measuring process
    out: str = "out/bench"    # bench.md, bench.json and bench.png go here


# ---- measuring in a child process ----


THREADS = {"n": 2}  # set from BenchConfig.threads in main(); passed on to every child


def in_child(fn, *args):
    """Run fn(*args) in a fresh spawned process; returns its result dict plus that process's peak RSS in MB."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_child, (fn, args, THREADS["n"]))


def _child(fn, args, threads: int):
    torch.set_num_threads(threads)
    out = fn(*args)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def timed_pair(fa, fb, repeats: int) -> tuple[float, float]:
    """Median seconds of A and B, run alternately A B A B ... so drift in machine speed hits both alike."""
    fa(), fb()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for f, ts in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


# ---- attention ----


def doc_mixes(T: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(0)
    skewed = rng.lognormal(0, 0.8, 8)
    skewed = np.maximum(1, np.floor(skewed / skewed.sum() * T)).astype(int)
    skewed[-1] += T - skewed.sum()
    return {f"1 x {T} (no packing)": [T], f"2 x {T // 2}": [T // 2] * 2, f"8 x {T // 8}": [T // 8] * 8,
            "8 skewed (lognormal)": skewed.tolist(), f"32 x {T // 32}": [T // 32] * 32}


def attention_step(impl: str, lengths: list[int], nh: int = 8, hd: int = 64):
    """One fwd+bwd of the attention op alone on (1, nh, T, hd) inputs."""
    from model import DocLayout, block_diagonal_mask, packed_attention
    T = sum(lengths)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, nh, T, hd, generator=g).requires_grad_() for _ in range(3))

    def step():
        if impl == "packed":
            y = packed_attention(q, k, v, DocLayout(pos))  # the layout is part of the cost
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=block_diagonal_mask(pos))
        y.sum().backward()
    return step


def model_step(impl: str, T: int, n_docs: int):
    """One fwd+bwd of a small model (vocabulary 515, so attention rather than the output layer dominates)."""
    from model import ModelArgs, Transformer
    args = ModelArgs(dim=256, n_layers=4, n_heads=8, n_kv_heads=8, vocab_size=515, hidden_dim=688, max_seq_len=T)
    model = Transformer(args)
    model.init_weights(seed=0)
    model.attn_impl = impl
    ids = torch.randint(0, args.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(T).remainder(T // n_docs)[None]  # n_docs equal documents

    def step():
        model(ids, pos).float().square().mean().backward()
    return step


def pair_case(make, args: tuple, repeats: int) -> dict:
    packed, dense = timed_pair(make("packed", *args), make("dense", *args), repeats)
    return {"packed_s": packed, "dense_s": dense}


def memory_case(make, impl: str, args: tuple) -> dict:
    make(impl, *args)()
    return {}


def bench_attention(cfg: BenchConfig) -> list[dict]:
    T = 2048 if cfg.quick else 4096
    rows = []
    for name, lengths in doc_mixes(T).items():
        r = in_child(pair_case, attention_step, (lengths,), cfg.repeats)
        rows.append(dict(section="attention", case=f"attention op fwd+bwd, {T} tokens, {name}",
                         packed_ms=r["packed_s"] * 1e3, dense_ms=r["dense_s"] * 1e3, ratio=r["dense_s"] / r["packed_s"],
                         packed_mb=float("nan"), dense_mb=float("nan")))
    for t in ([1024, 2048] if cfg.quick else [2048, 4096, 8192]):
        r = in_child(pair_case, model_step, (t, 8), cfg.repeats)
        mem = {impl: in_child(memory_case, model_step, impl, (t, 8))["peak_rss_mb"] for impl in ("packed", "dense")}
        rows.append(dict(section="attention", case=f"model fwd+bwd (4 layers, dim 256), {t} tokens, 8 docs",
                         packed_ms=r["packed_s"] * 1e3, dense_ms=r["dense_s"] * 1e3, ratio=r["dense_s"] / r["packed_s"],
                         packed_mb=mem["packed"], dense_mb=mem["dense"]))
    return rows


# ---- training throughput: packed rows vs padded batches ----


def sample_documents(max_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The shipped Orca-style sample, tokenized by data.py: (ids, teacher flags) per example."""
    import data
    import orca2
    tok = data.Tokenizer.from_pretrained(data.DEFAULT_TOKENIZER)
    cfg = data.DataConfig(max_len=max_len, cache_dir=str(ROOT / "out" / "bench" / "cache"), num_workers=1)
    packed, _ = data.build_stage([orca2.Source("sample", str(data.SAMPLE_DATA), erase=True)], tok, cfg, log=None)
    return [d for p in range(len(packed)) for d in packed.documents(p)], packed


def train_case(mode: str, max_len: int, n_examples: int) -> dict:
    """One pass over the same n_examples, packed (rows of max_len) or padded (4 examples, padded to the longest)."""
    import data
    from model import ModelArgs, Transformer
    docs, packed = sample_documents(max_len)
    model = Transformer(ModelArgs.from_name("tiny"))
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = []
    if mode == "packed":  # the packs holding the first examples, 2 rows per step
        rows = list(range(len(packed)))[: max(1, n_examples * len(packed) // len(docs))]
        batches = [data.get_batch(packed, rows[i:i + 2], max_len, 32000) for i in range(0, len(rows), 2)]
    else:
        chosen = docs[: n_examples]
        for i in range(0, len(chosen), 4):
            group = chosen[i:i + 4]
            T = max(len(ids) for ids, _ in group)
            ids = torch.full((len(group), T), 32000)
            labels = torch.full((len(group), T), -100)
            for b, (x, sup) in enumerate(group):
                ids[b, :len(x)] = torch.from_numpy(x.astype(np.int64))
                labels[b, :len(x) - 1] = torch.from_numpy(np.where(sup[1:] != 0, x[1:].astype(np.int64), -100))
            batches.append(dict(input_ids=ids, labels=labels, position_ids=None,
                                num_tokens=sum(len(x) for x, _ in group), num_supervised=int((labels != -100).sum())))
    t = time.perf_counter()
    for b in batches:
        keep = b["labels"] != -100  # as train.py: logits at the teacher's tokens only
        logits = model(b["input_ids"], b["position_ids"], logits_at=keep)
        loss = F.cross_entropy(logits.float(), b["labels"][keep], reduction="sum")
        (loss / max(1, b["num_supervised"])).backward()
        opt.step()
        opt.zero_grad()
    dt = time.perf_counter() - t
    real = sum(b["num_tokens"] for b in batches)
    slots = sum(b["input_ids"].numel() for b in batches)
    return {"s": dt, "tok_s": real / dt, "sup_tok_s": sum(b["num_supervised"] for b in batches) / dt,
            "fill": real / slots, "examples": sum(1 for _ in batches)}


def bench_train(cfg: BenchConfig) -> list[dict]:
    n = 48 if cfg.quick else 128
    packed = in_child(train_case, "packed", 1024, n)
    padded = in_child(train_case, "padded", 1024, n)
    return [dict(section="train", case=f"tiny model, {n} sample examples, packed 2 x 1024 vs padded 4 per batch",
                 packed_tok_s=packed["tok_s"], padded_tok_s=padded["tok_s"], ratio=packed["tok_s"] / padded["tok_s"],
                 packed_sup_tok_s=packed["sup_tok_s"], padded_sup_tok_s=padded["sup_tok_s"],
                 packed_fill=packed["fill"], padded_fill=padded["fill"],
                 packed_mb=packed["peak_rss_mb"], padded_mb=padded["peak_rss_mb"])]


# ---- packing efficiency ----


def greedy_sequential(lengths: np.ndarray, capacity: int) -> int:
    """The naive baseline: fill the current row in input order, open a new one when the next example does not fit."""
    rows, room = 0, 0
    for n in lengths.tolist():
        if n > room:
            rows, room = rows + 1, capacity
        room -= n
    return rows


def bench_packing(cfg: BenchConfig) -> list[dict]:
    import data
    rng = np.random.default_rng(0)
    n = 20_000 if cfg.quick else 100_000
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
        rows.append(dict(section="packing", case=f"{name}, {n:,} examples into 4096", bfd_eff=total / (bfd * 4096),
                         greedy_eff=total / (seq * 4096), ratio=seq / bfd, bfd_s=dt))
    return rows


# ---- data pipeline ----


def data_timing(path: str, cache: str) -> dict:
    """Tokenize and pack one file cold, then from the cache, in this process (its tokenizer workers under it)."""
    import data
    import orca2
    tok = data.Tokenizer.from_pretrained(data.DEFAULT_TOKENIZER)
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
    code = f"import bench, json; print(json.dumps(bench.data_timing({str(path)!r}, {str(work / 'cache')!r})))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f"data_timing failed on {path}:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.splitlines()[-1]) | dict(mbytes=round(path.stat().st_size / 1e6, 1))


def bench_data(cfg: BenchConfig) -> list[dict]:
    n = 20_000 if cfg.quick else 100_000
    r = in_child(data_case, n)
    return [dict(section="data", case=f"{r['examples']:,} Orca-style examples ({r['mbytes']} MB JSONL, {r['tokens']:,} "
                 f"tokens), {os.cpu_count()} cores", cold_s=r["cold_s"], cached_s=r["cached_s"],
                 ex_s=r["examples"] / r["cold_s"], ratio=r["cold_s"] / max(r["cached_s"], 1e-9),
                 efficiency=r["efficiency"], mb=r["rss_mb"])]


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
    return dict(rows=meta["lines"], examples=meta["examples"], tokens=meta["tokens"], workers=meta["workers"],
                mbytes=path.stat().st_size / 1e6, wall_s=wall, tokenize_s=meta["seconds"], peak_rss_tree=peak_rss,
                peak_pss_tree=peak_pss, cpu_s=sum(cpu[p] for p in tree))


def bench_scale(cfg: BenchConfig) -> list[dict]:
    """Wall-clock rates on this machine, and per core as tokens per CPU-second of the whole tree (robust to other
    load on the machine): what a user multiplies by a node's cores to estimate a stage."""
    rows = 20_000 if cfg.quick else 200_000
    r = in_child(scale_case, rows)
    per_cpu_s = r["rows"] / r["cpu_s"]
    return [dict(section="scale", case=f"`python data.py` on {r['rows']:,} OpenOrca-like parquet rows "
                 f"({r['mbytes']:.0f} MB, {r['tokens'] / 1e6:.1f}M tokens), {r['workers']} worker processes",
                 wall_s=r["wall_s"], tokenize_s=r["tokenize_s"],
                 rows_s=r["rows"] / r["wall_s"], tok_s=r["tokens"] / r["wall_s"], cpu_s=r["cpu_s"],
                 rows_core=per_cpu_s, tok_core=r["tokens"] / r["cpu_s"], est_5m_64=5e6 / (per_cpu_s * 64) / 60,
                 pss_mb=r["peak_pss_tree"], rss_mb=r["peak_rss_tree"], ratio=1500 / r["peak_pss_tree"])]


# ---- generation ----


def generate_case(batch: int, use_cache: bool, new_tokens: int) -> dict:
    from model import ModelArgs, Transformer
    model = Transformer(ModelArgs.from_name("tiny"))
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (int(n),), generator=g).tolist() for n in torch.randint(48, 96, (batch,), generator=g)]
    s = timed(lambda: model.generate(prompts, new_tokens, stop_ids=(), use_cache=use_cache), 2)
    return {"tok_s": batch * new_tokens / s}


def bench_generate(cfg: BenchConfig) -> list[dict]:
    new = 16 if cfg.quick else 32
    rows = []
    for b in (1, 8, 32):
        cached = in_child(generate_case, b, True, new)
        plain = in_child(generate_case, b, False, new)
        rows.append(dict(section="generate", case=f"tiny model, batch {b}, prompts 48-95 tokens, {new} new tokens",
                         cache_tok_s=cached["tok_s"], nocache_tok_s=plain["tok_s"], ratio=cached["tok_s"] / plain["tok_s"]))
    return rows


# ---- loading the release layout: peak anonymous memory ----


def make_release(folder: Path, quick: bool) -> dict:
    """A ~1 GB fp32 checkpoint in the Orca 2 release layout: three .bin shards, an index, an old-style config."""
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


def peak_anon(fn) -> float:
    """Peak RssAnon (MB) while fn runs, sampled every 2 ms from /proc/self/status."""
    peak, done = [0], threading.Event()

    def poll():
        while not done.is_set():
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    peak[0] = max(peak[0], int(line.split()[1]) / 1024)
            time.sleep(0.002)
    base = [int(line.split()[1]) / 1024 for line in open("/proc/self/status") if line.startswith("RssAnon:")][0]
    t = threading.Thread(target=poll)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return peak[0] - base


def load_case(folder: str, what: str) -> dict:
    from model import Transformer, convert
    if what == "load":
        keep = []
        mb = peak_anon(lambda: keep.append(Transformer.from_pretrained(folder, dtype=torch.bfloat16)))
    else:
        mb = peak_anon(lambda: convert(folder, folder + "-bf16", dtype="bfloat16", max_shard_size="400MB"))
    return {"anon_mb": mb}


def bench_load(cfg: BenchConfig) -> list[dict]:
    folder = ROOT / "out" / "bench" / ("release-small" if cfg.quick else "release-1gb")
    sizes = make_release(folder, cfg.quick)
    load = in_child(load_case, str(folder), "load")
    conv = in_child(load_case, str(folder), "convert")
    return [dict(section="load", case=f"fp32 .bin release ({sizes['fp32_mb']:.0f} MB) -> {what}", anon_mb=r["anon_mb"],
                 bf16_mb=sizes["bf16_mb"], shard_mb=sizes["largest_shard_mb"], ratio=r["anon_mb"] / sizes["bf16_mb"])
            for what, r in (("bf16 model (from_pretrained)", load), ("bf16 safetensors (convert, 400MB shards)", conv))]


# ---- GPU: MFU of a 7B-shaped training step, decode speed against the memory-bandwidth limit (bench_gpu.py) ----


def bench_gpu(cfg: BenchConfig) -> list[dict]:
    from bench_gpu import gpu_decode_case, gpu_train_case
    if not torch.cuda.is_available():
        print("[bench] gpu: skipped, no CUDA device here (the section runs by itself where one is present)")
        return [dict(section="gpu-none", case="no CUDA device in this run: MFU and decode bandwidth not measured")]
    name = torch.cuda.get_device_name(0)
    seq, steps = (2048, 2) if cfg.quick else (4096, 5)
    tr = in_child(gpu_train_case, "llama2-7b", "cuda", seq, 2, steps)
    rows = [dict(section="gpu-train", case=f"{name}: LLaMA-2-7B shape, {tr['layers']} of 32 blocks, 2 x {seq} packed "
                 "tokens, bf16 autocast, fp32 AdamW, activation checkpointing", **tr)]
    for b in (1, 8):
        dec = in_child(gpu_decode_case, "llama2-7b", "cuda", b, 128, 32 if cfg.quick else 128)
        rows.append(dict(section="gpu-decode", case=f"{name}: LLaMA-2-7B shape, {dec['layers']} blocks, bf16, "
                         f"batch {b}, prompt 128", **dec))
    return rows


# ---- report ----

SECTIONS = {"attention": bench_attention, "train": bench_train, "packing": bench_packing, "data": bench_data,
            "scale": bench_scale, "generate": bench_generate, "load": bench_load, "gpu": bench_gpu}
COLUMNS = {  # section -> (header, [(column title, key, format)])
    "attention": ("Packed per-document attention vs dense block-diagonal mask (fwd+bwd)",
                  [("packed ms", "packed_ms", ".1f"), ("dense ms", "dense_ms", ".1f"), ("dense / packed", "ratio", ".2f"),
                   ("packed peak MB", "packed_mb", ".0f"), ("dense peak MB", "dense_mb", ".0f")]),
    "train": ("Training throughput: packed rows vs padded batches, same examples",
              [("packed tok/s", "packed_tok_s", ".0f"), ("padded tok/s", "padded_tok_s", ".0f"), ("packed / padded", "ratio", ".2f"),
               ("packed sup tok/s", "packed_sup_tok_s", ".0f"), ("padded sup tok/s", "padded_sup_tok_s", ".0f"),
               ("packed fill", "packed_fill", ".1%"), ("padded fill", "padded_fill", ".1%"),
               ("packed peak MB", "packed_mb", ".0f"), ("padded peak MB", "padded_mb", ".0f")]),
    "packing": ("Packing efficiency (real tokens / row slots)",
                [("best-fit decreasing", "bfd_eff", ".2%"), ("sequential greedy", "greedy_eff", ".2%"),
                 ("rows greedy / rows BFD", "ratio", ".3f"), ("BFD seconds", "bfd_s", ".2f")]),
    "data": ("Data pipeline: tokenize + pack", [("cold s", "cold_s", ".1f"), ("cached s", "cached_s", ".2f"),
             ("examples/s cold", "ex_s", ".0f"), ("cold / cached", "ratio", ".0f"), ("packing eff.", "efficiency", ".2%"),
             ("peak MB", "mb", ".0f")]),
    "scale": ("Scale: tokenize + pack an OpenOrca-like parquet (the whole command; per core = per CPU-second of its "
              "process tree)",
              [("seconds", "wall_s", ".0f"), ("of which tokenizing", "tokenize_s", ".0f"), ("rows/s", "rows_s", ".0f"),
               ("tokens/s", "tok_s", ".0f"), ("CPU s", "cpu_s", ".0f"), ("rows/s per core", "rows_core", ".0f"),
               ("tokens/s per core", "tok_core", ".0f"), ("5M rows on 64 cores, min", "est_5m_64", ".1f"),
               ("peak PSS MB (tree)", "pss_mb", ".0f"), ("peak RSS MB (tree sum)", "rss_mb", ".0f"),
               ("1500 MB / peak PSS", "ratio", ".2f")]),
    "generate": ("Batched greedy generation", [("KV cache tok/s", "cache_tok_s", ".0f"),
                 ("no cache tok/s", "nocache_tok_s", ".0f"), ("cache / no cache", "ratio", ".2f")]),
    "load": ("Loading the release layout: peak anonymous memory (RssAnon)",
             [("peak anon MB", "anon_mb", ".0f"), ("bf16 model MB", "bf16_mb", ".0f"),
              ("largest shard MB", "shard_mb", ".0f"), ("anon / bf16 model", "ratio", ".2f")]),
    "gpu-none": ("GPU", []),
    "gpu-train": ("GPU training step: model FLOPs utilisation (train.step_flops / time / bf16 peak)",
                  [("blocks", "layers", "d"), ("step s", "step_s", ".2f"), ("tokens/s", "tok_s", ".0f"),
                   ("TFLOP/s", "tflops", ".0f"), ("MFU", "mfu", ".1%"), ("bf16 matmul TFLOP/s", "matmul_tflops", ".0f"),
                   ("peak GB", "mem_gb", ".1f")]),
    "gpu-decode": ("GPU decoding against the memory-bandwidth limit (bytes read per step / measured copy bandwidth)",
                   [("tokens/s", "tok_s", ".0f"), ("limit tokens/s", "bound_tok_s", ".0f"),
                    ("of measured bandwidth", "frac_measured", ".1%"), ("of nominal bandwidth", "frac_nominal", ".1%"),
                    ("copy GB/s", "copy_gb_s", ".0f"), ("GB read per step", "gb_per_token", ".1f")]),
}


def markdown(rows: list[dict]) -> str:
    out = [f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, torch {torch.__version__}, "
           f"{THREADS['n']} threads per measuring process.\n"]
    for section, (title, cols) in COLUMNS.items():
        mine = [r for r in rows if r["section"] == section]
        if not mine:
            continue
        if not cols:  # a section that did not run says why in its case text
            out += [f"**{title}**: {r['case']}\n" for r in mine]
            continue
        out += [f"**{title}**\n", "| case | " + " | ".join(c[0] for c in cols) + " |",
                "| --- |" + " ---: |" * len(cols)]
        out += ["| " + r["case"] + " | " + " | ".join(format(r[k], f) for _, k, f in cols) + " |" for r in mine]
        out.append("")
    return "\n".join(out)


def chart(rows: list[dict], path: Path) -> bool:
    """A bar chart of every ratio; needs matplotlib (a bench-only extra, not a runtime dependency)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [r for r in rows if r["section"] != "packing" and "ratio" in r]
    labels = [f"{r['section']}: {r['case'][:60]}" for r in shown]
    values = [r["ratio"] for r in shown]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(values) + 1.5))
    ax.barh(range(len(values)), values, color="tab:blue")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ratio (see bench.md for what each ratio divides; > 1 = ours faster / leaner)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv: list[str]):
    known = {f.name: f.type for f in fields(BenchConfig)}
    values = {}
    for arg in argv:
        key, _, raw = arg.removeprefix("--").partition("=")
        if key not in known or not raw:
            raise SystemExit(f"options are --key=value with key in {list(known)}; got {arg!r}")
        values[key] = raw.lower() in ("1", "true") if known[key] is bool else known[key](raw)
    cfg = BenchConfig(**values)
    THREADS["n"] = cfg.threads
    unknown = set(cfg.only.split(",")) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}; choose from {list(SECTIONS)}")
    out = ROOT / cfg.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in cfg.only.split(","):
        t = time.perf_counter()
        rows += SECTIONS[name](cfg)
        print(f"[bench] {name} done in {time.perf_counter() - t:.0f}s", flush=True)
    text = markdown(rows)
    print(text)
    (out / "bench.md").write_text(text)
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out / 'bench.md'}" + (f" and {out / 'bench.png'}" if chart(rows, out / "bench.png") else
                                          " (no chart: pip install matplotlib)"))


if __name__ == "__main__":
    main(sys.argv[1:])
