"""Benchmarks, each a ratio or a goal measured within one run so the numbers survive a noisy machine.

    python bench.py                         # every section; writes out/bench/bench.md, bench.json and bench.png
    python bench.py --help                  # the options
    python bench.py --only=attention,generate --repeats=5
    python bench.py --only=client,eval_loop
    python bench.py --quick=true            # smaller sizes, for a first look

Sections:
    attention  packed per-document attention vs the dense block-diagonal mask, fwd+bwd, 4096 tokens, several document
               mixes; the same for a whole small model, with peak memory as T grows
    train      packed rows vs padded batches on the same examples through train.train_step (train.py's own step):
               real and supervised tokens/s, peak memory
    packing    best-fit-decreasing vs sequential greedy packing efficiency on realistic length distributions
    data       100,000 Orca-style examples tokenized and packed, cold and from the cache
    scale      `python data.py FILE.parquet` on 200,000 OpenOrca-like rows (~300 MB): rows/s and tokens/s per core, and
               the peak memory of the whole process tree (workers included; must stay under 1.5 GB)
    generate   batched greedy generation tokens/s at batch 1, 8, 32, with and without the KV cache
    eval_loop  issue #17: evaluation's decoding loop, model.generate (one scalar read per step) against a copy of the
               loop before it (2B+1 scalar reads per step), alternating in one process, batch 8 and 32
    client     issue #16's goals: client.Endpoint's request rate against a zero-latency local teacher at concurrency 64
               (goal: 150 requests/s), and synth.py over 10,000 miniature items, cold and then entirely from its cache
               (goal: under 15 s)
    load       peak anonymous memory of loading a ~1 GB fp32 .bin release into bf16, and of converting it
    gpu        where CUDA is present: MFU of a LLaMA-2-7B-shaped training step (train.train_step; as many of its blocks
               as fit one device, packed 2 x 4096 rows, bf16 autocast, fp32 AdamW) and decode tokens/s at batch 1 and 8
               as a share of the memory-bandwidth limit; without a GPU it says so in bench.md and measures nothing
Every timing runs in a fresh process (peak memory is that process's own), the two variants alternating A B A B.
The cases of packing, data, scale, load and client live in bench_data.py, those of gpu in bench_gpu.py; neither
imports this file.
"""

import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import bench_data
import cli
from bench_data import timed
from cli import UserError

ROOT = Path(__file__).resolve().parent


@dataclass
class BenchConfig:
    only: str = "attention,train,packing,data,scale,generate,eval_loop,client,load,gpu"  # sections to run, in order
    repeats: int = 3          # timed repetitions per variant (median reported), after one warm-up
    quick: bool = False       # smaller sizes, for a first look
    threads: int = 2          # torch threads in each measuring process
    out: str = "out/bench"    # bench.md, bench.json and bench.png go here (relative to this file's folder)


# ---- measuring in a child process ----


THREADS = {"n": 2}  # set from BenchConfig.threads in main(); passed on to every child


def in_child(fn, *args):
    """Run fn(*args) in a fresh spawned process; returns its result dict plus that process's peak RSS in MB."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        result = pool.apply(_child, (fn, args, THREADS["n"]))
        pool.close()  # let the child exit by itself: a terminated one leaves its semaphores to the resource tracker
        pool.join()
    return result


def _child(fn, args, threads: int):
    torch.set_num_threads(threads)
    out = fn(*args)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


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


def section_attention(cfg: BenchConfig) -> list[dict]:
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


def train_case(mode: str, max_len: int, n_examples: int) -> dict:
    """One pass over the same n_examples through train.train_step, then clipping and AdamW as train.py does: packed
    (rows of max_len, 2 per step) or padded (4 examples per step, padded to the longest)."""
    import data
    import train
    from model import ModelArgs, Transformer
    from tokenizer import Tokenizer
    docs, packed = bench_data.sample_documents(max_len)
    pad_id = Tokenizer.from_pretrained(data.LLAMA2_TOKENIZER).pad_id
    model = Transformer(ModelArgs.from_name("tiny"))
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batches = []
    if mode == "packed":  # the packs holding the first examples, 2 rows per step
        rows = list(range(len(packed)))[: max(1, n_examples * len(packed) // len(docs))]
        batches = [data.get_batch(packed, rows[i:i + 2], max_len, pad_id) for i in range(0, len(rows), 2)]
    else:
        chosen = docs[: n_examples]
        for i in range(0, len(chosen), 4):
            group = chosen[i:i + 4]
            T = max(len(ids) for ids, _ in group)
            ids = torch.full((len(group), T), pad_id)
            labels = torch.full((len(group), T), -100)  # data.py's label contract, already shifted
            for b, (x, sup) in enumerate(group):
                ids[b, :len(x)] = torch.from_numpy(x.astype(np.int64))
                labels[b, :len(x) - 1] = torch.from_numpy(np.where(sup[1:] != 0, x[1:].astype(np.int64), -100))
            batches.append(dict(input_ids=ids, labels=labels, position_ids=None,
                                num_tokens=sum(len(x) for x, _ in group), num_supervised=int((labels != -100).sum())))
    cpu = torch.device("cpu")
    autocast = torch.autocast("cpu", enabled=False)  # train.py on a CPU computes in float32
    t = time.perf_counter()
    for b in batches:
        train.train_step(model, b, cpu, 1 / max(1, b["num_supervised"]), autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t
    real = sum(b["num_tokens"] for b in batches)
    slots = sum(b["input_ids"].numel() for b in batches)
    return {"s": dt, "tok_s": real / dt, "sup_tok_s": sum(b["num_supervised"] for b in batches) / dt,
            "fill": real / slots, "steps": len(batches)}


def section_train(cfg: BenchConfig) -> list[dict]:
    n = 48 if cfg.quick else 128
    packed = in_child(train_case, "packed", 1024, n)
    padded = in_child(train_case, "padded", 1024, n)
    return [dict(section="train", case=f"tiny model, {n} sample examples, packed 2 x 1024 vs padded 4 per batch",
                 packed_tok_s=packed["tok_s"], padded_tok_s=padded["tok_s"], ratio=packed["tok_s"] / padded["tok_s"],
                 packed_sup_tok_s=packed["sup_tok_s"], padded_sup_tok_s=padded["sup_tok_s"],
                 packed_fill=packed["fill"], padded_fill=padded["fill"],
                 packed_mb=packed["peak_rss_mb"], padded_mb=padded["peak_rss_mb"])]


# ---- data side: packing, the data pipeline, scale (cases in bench_data.py) ----


def section_packing(cfg: BenchConfig) -> list[dict]:
    n = 20_000 if cfg.quick else 100_000
    return [dict(r, section="packing", case=f"{r['name']}, {n:,} examples into 4096")
            for r in in_child(bench_data.packing_case, n)["rows"]]


def section_data(cfg: BenchConfig) -> list[dict]:
    n = 20_000 if cfg.quick else 100_000
    r = in_child(bench_data.data_case, n)
    return [dict(section="data", case=f"{r['examples']:,} Orca-style examples ({r['mbytes']} MB JSONL, "
                 f"{r['tokens']:,} tokens), {os.cpu_count()} cores", cold_s=r["cold_s"], cached_s=r["cached_s"],
                 ex_s=r["examples"] / r["cold_s"], ratio=r["cold_s"] / max(r["cached_s"], 1e-9),
                 efficiency=r["efficiency"], mb=r["rss_mb"])]


def section_scale(cfg: BenchConfig) -> list[dict]:
    """Wall-clock rates on this machine, and per core as tokens per CPU-second of the whole tree (robust to other
    load on the machine): what a user multiplies by a node's cores to estimate a stage."""
    rows = 20_000 if cfg.quick else 200_000
    r = in_child(bench_data.scale_case, rows)
    per_cpu_s = r["rows"] / r["cpu_s"]
    return [dict(section="scale", case=f"`python data.py` on {r['rows']:,} OpenOrca-like parquet rows "
                 f"({r['mbytes']:.0f} MB, {r['tokens'] / 1e6:.1f}M tokens), {r['workers']} worker processes",
                 wall_s=r["wall_s"], tokenize_s=r["tokenize_s"],
                 rows_s=r["rows"] / r["wall_s"], tok_s=r["tokens"] / r["wall_s"], cpu_s=r["cpu_s"],
                 rows_core=per_cpu_s, tok_core=r["tokens"] / r["cpu_s"], est_5m_64=5e6 / (per_cpu_s * 64) / 60,
                 pss_mb=r["peak_pss_tree"], rss_mb=r["peak_rss_tree"], ratio=1500 / r["peak_pss_tree"])]


# ---- generation ----


def tiny_model_and_prompts(batch: int):
    """The tiny preset (random weights, seed 0) and batch prompts of 48-95 random tokens."""
    from model import ModelArgs, Transformer
    model = Transformer(ModelArgs.from_name("tiny"))
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(48, 96, (batch,), generator=g).tolist()
    return model, [torch.randint(3, 32000, (n,), generator=g).tolist() for n in lengths]


def generate_case(batch: int, use_cache: bool, new_tokens: int) -> dict:
    model, prompts = tiny_model_and_prompts(batch)
    s = timed(lambda: model.generate(prompts, new_tokens, stop_ids=(), use_cache=use_cache), 2)
    return {"tok_s": batch * new_tokens / s}


def section_generate(cfg: BenchConfig) -> list[dict]:
    new = 16 if cfg.quick else 32
    rows = []
    for b in (1, 8, 32):
        cached = in_child(generate_case, b, True, new)
        plain = in_child(generate_case, b, False, new)
        rows.append(dict(section="generate", case=f"tiny model, batch {b}, prompts 48-95 tokens, {new} new tokens",
                         cache_tok_s=cached["tok_s"], nocache_tok_s=plain["tok_s"],
                         ratio=cached["tok_s"] / plain["tok_s"]))
    return rows


# ---- eval_loop: evaluation's decoding loop before and after issue #17 ----


@torch.no_grad()
def generate_before_17(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: tuple[int, ...] = (2, 32002),
                       temperature: float = 0.0, top_p: float = 1.0, pad_id: int = 0, use_cache: bool = True,
                       generator: torch.Generator | None = None, on_token=None) -> list[list[int]]:
    """THE BASELINE BEING MEASURED AGAINST, not project code: Transformer.generate as it was before issue #17
    (`git show 89c2fec:model.py`), as it was but for self -> model, no prompt checks and one line split. Each step
    copies the new tokens to the host, then reads done[i] and finished_now[i] one scalar at a time: 2B+1 device-to-host
    reads per step (plus done.all()), where model.generate reads one."""
    from model import KVCache, sample
    device = model.lm_head.weight.device
    B, P = len(prompts), max(len(p) for p in prompts)
    S = min(P + max_new_tokens, model.args.max_seq_len)
    pad = torch.tensor([P - len(p) for p in prompts], device=device)  # left padding per row
    tokens = torch.full((B, S), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, P - len(p):P] = torch.tensor(p, device=device)
    col = torch.arange(S, device=device)
    positions = (col[None, :] - pad[:, None]).clamp(min=0)  # (B, S)
    real = col[None, :] >= pad[:, None]  # (B, S)
    full_mask = (col[None, :, None] >= col[None, None, :]) & \
        (real[:, None, :] | torch.eye(S, dtype=torch.bool, device=device))  # (B, S, S)
    caches = [KVCache(B, model.args.n_kv_heads, S, model.args.head_dim, device) for _ in model.model.layers] \
        if use_cache else None
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    stops = torch.tensor(stop_ids, device=device)
    pos = 0
    last = torch.zeros(B, S, dtype=torch.bool, device=device)
    last[:, -1] = True  # logits_at: the last position of whatever slice is fed
    for t in range(P, S):
        if use_cache:  # prefill the prompt once, then one token per step
            sl = slice(pos, t)
            logits = model(tokens[:, sl], positions[:, sl], last[:, pos - t:], full_mask[:, None, sl, :t], caches, pos)
            pos = t
        else:
            logits = model(tokens[:, :t], positions[:, :t], last[:, -t:], full_mask[:, None, :t, :t])
        nxt = sample(logits.float(), temperature, top_p, generator)  # (B,)
        nxt = torch.where(done, pad_id, nxt)
        tokens[:, t] = nxt
        finished_now = torch.isin(nxt, stops) & ~done
        step = []
        for i, tok in enumerate(nxt.tolist()):  # the per-row scalar reads issue #17 removed
            keep = not done[i] and not finished_now[i]
            if keep:
                out[i].append(tok)
            step.append(tok if keep else None)
        done |= finished_now
        if on_token is not None:
            on_token(step)
        if done.all() or t + 1 - P >= max_new_tokens:
            break
    return out


def eval_loop_case(batch: int, new_tokens: int, repeats: int, device: str) -> dict:
    """Both loops on the same tiny model and prompts, no stop ids (every row decodes new_tokens), alternating."""
    model, prompts = tiny_model_and_prompts(batch)
    model.to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    old = lambda: (generate_before_17(model, prompts, new_tokens, stop_ids=()), sync())  # noqa: E731
    new = lambda: (model.generate(prompts, new_tokens, stop_ids=()), sync())  # noqa: E731
    assert old()[0] == new()[0], "the two loops chose different tokens: the timing would compare different work"
    t_old, t_new = timed_pair(old, new, repeats)
    return {"old_tok_s": batch * new_tokens / t_old, "new_tok_s": batch * new_tokens / t_new}


def section_eval_loop(cfg: BenchConfig) -> list[dict]:
    new = 32 if cfg.quick else 64
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        for b in (8, 32):
            r = in_child(eval_loop_case, b, new, cfg.repeats, device)
            rows.append(dict(section="eval_loop", case=f"{device}: tiny model, batch {b}, prompts 48-95 tokens, "
                             f"{new} new tokens, no stop", old_tok_s=r["old_tok_s"], new_tok_s=r["new_tok_s"],
                             ratio=r["new_tok_s"] / r["old_tok_s"]))
    return rows


# ---- client: issue #16's goals for client.py and synth.py (cases in bench_data.py) ----

CLIENT_GOAL_REQ_S = 150  # issue #16: requests/s the client sustains against a teacher that answers at once
CACHED_GOAL_S = 15  # issue #16: seconds for synth.py to answer 10,000 items entirely from its cache


def section_client(cfg: BenchConfig) -> list[dict]:
    n_requests, n_items = (1000, 2000) if cfg.quick else (3000, 10_000)
    with bench_data.server_process(bench_data.fixed_teacher) as url:
        a = in_child(bench_data.client_rate_case, url, n_requests, 64)
    with bench_data.server_process(bench_data.miniature_teacher) as url:
        b = in_child(bench_data.synth_case, url, n_items, 64)
    goal_s = CACHED_GOAL_S * b["items"] / 10_000  # scaled to the items run (only --quick runs fewer)
    return [
        dict(section="client", case=f"client.Endpoint, zero-latency local teacher (own process), concurrency 64, "
             f"{a['requests']:,} distinct requests, fresh cache", req_s=a["req_s"],
             figure=f"{a['req_s']:.0f} requests/s", goal=f">= {CLIENT_GOAL_REQ_S} requests/s",
             met="yes" if a["req_s"] >= CLIENT_GOAL_REQ_S else "NO", ratio=a["req_s"] / CLIENT_GOAL_REQ_S),
        dict(section="client", case=f"synth.py rerun answered entirely from its cache, {b['items']:,} miniature items "
             f"({b['written']:,} written to data.jsonl)", seconds=b["cached_s"], items_s=b["items"] / b["cached_s"],
             figure=f"{b['cached_s']:.1f} s ({b['items'] / b['cached_s']:.0f} items/s)", goal=f"< {goal_s:g} s",
             met="yes" if b["cached_s"] < goal_s else "NO", ratio=goal_s / b["cached_s"]),
        dict(section="client", case=f"synth.py cold run, the same items against servers.teacher_server() (own "
             f"process), concurrency 64: {b['requests']:,} requests (selection included)", seconds=b["cold_s"],
             items_s=b["items"] / b["cold_s"], figure=f"{b['cold_s']:.1f} s ({b['items'] / b['cold_s']:.0f} items/s)",
             goal="none (the teacher's speed)", met="-"),
    ]


# ---- loading the release layout: peak anonymous memory (cases in bench_data.py) ----


def section_load(cfg: BenchConfig) -> list[dict]:
    folder = ROOT / "out" / "bench" / ("release-small" if cfg.quick else "release-1gb")
    sizes = bench_data.make_release(folder, cfg.quick)
    load = in_child(bench_data.load_case, str(folder), "load")
    conv = in_child(bench_data.load_case, str(folder), "convert")
    return [dict(section="load", case=f"fp32 .bin release ({sizes['fp32_mb']:.0f} MB) -> {what}", anon_mb=r["anon_mb"],
                 bf16_mb=sizes["bf16_mb"], shard_mb=sizes["largest_shard_mb"], ratio=r["anon_mb"] / sizes["bf16_mb"])
            for what, r in (("bf16 model (from_pretrained)", load), ("bf16 safetensors (convert, 400MB shards)", conv))]


# ---- GPU: MFU of a 7B-shaped training step, decode speed against the memory-bandwidth limit (bench_gpu.py) ----


def section_gpu(cfg: BenchConfig) -> list[dict]:
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

SECTIONS = {"attention": section_attention, "train": section_train, "packing": section_packing, "data": section_data,
            "scale": section_scale, "generate": section_generate, "eval_loop": section_eval_loop,
            "client": section_client, "load": section_load, "gpu": section_gpu}
COLUMNS = {  # section -> (header, [(column title, key, format)])
    "attention": ("Packed per-document attention vs dense block-diagonal mask (fwd+bwd)",
                  [("packed ms", "packed_ms", ".1f"), ("dense ms", "dense_ms", ".1f"),
                   ("dense / packed", "ratio", ".2f"), ("packed peak MB", "packed_mb", ".0f"),
                   ("dense peak MB", "dense_mb", ".0f")]),
    "train": ("Training throughput (train.train_step): packed rows vs padded batches, same examples",
              [("packed tok/s", "packed_tok_s", ".0f"), ("padded tok/s", "padded_tok_s", ".0f"),
               ("packed / padded", "ratio", ".2f"), ("packed sup tok/s", "packed_sup_tok_s", ".0f"),
               ("padded sup tok/s", "padded_sup_tok_s", ".0f"), ("packed fill", "packed_fill", ".1%"),
               ("padded fill", "padded_fill", ".1%"), ("packed peak MB", "packed_mb", ".0f"),
               ("padded peak MB", "padded_mb", ".0f")]),
    "packing": ("Packing efficiency (real tokens / row slots)",
                [("best-fit decreasing", "bfd_eff", ".2%"), ("sequential greedy", "greedy_eff", ".2%"),
                 ("rows greedy / rows BFD", "ratio", ".3f"), ("BFD seconds", "bfd_s", ".2f")]),
    "data": ("Data pipeline: tokenize + pack",
             [("cold s", "cold_s", ".1f"), ("cached s", "cached_s", ".2f"), ("examples/s cold", "ex_s", ".0f"),
              ("cold / cached", "ratio", ".0f"), ("packing eff.", "efficiency", ".2%"), ("peak MB", "mb", ".0f")]),
    "scale": ("Scale: tokenize + pack an OpenOrca-like parquet (the whole command; per core = per CPU-second of its "
              "process tree)",
              [("seconds", "wall_s", ".0f"), ("of which tokenizing", "tokenize_s", ".0f"), ("rows/s", "rows_s", ".0f"),
               ("tokens/s", "tok_s", ".0f"), ("CPU s", "cpu_s", ".0f"), ("rows/s per core", "rows_core", ".0f"),
               ("tokens/s per core", "tok_core", ".0f"), ("5M rows on 64 cores, min", "est_5m_64", ".1f"),
               ("peak PSS MB (tree)", "pss_mb", ".0f"), ("peak RSS MB (tree sum)", "rss_mb", ".0f"),
               ("1500 MB / peak PSS", "ratio", ".2f")]),
    "generate": ("Batched greedy generation",
                 [("KV cache tok/s", "cache_tok_s", ".0f"), ("no cache tok/s", "nocache_tok_s", ".0f"),
                  ("cache / no cache", "ratio", ".2f")]),
    "eval_loop": ("Evaluation's decoding loop (issue #17): model.generate, one scalar read per step, against the loop "
                  "before it (the baseline, bench.generate_before_17: 2B+1 reads per step), alternating in one process",
                  [("old loop tok/s", "old_tok_s", ".0f"), ("model.generate tok/s", "new_tok_s", ".0f"),
                   ("new / old", "ratio", ".2f")]),
    "client": ("Teacher client and synth.py (issue #16's goals)",
               [("figure", "figure", "s"), ("goal", "goal", "s"), ("met?", "met", "s")]),
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


def markdown(rows: list[dict], load: tuple[float, float]) -> str:
    out = [f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores, torch {torch.__version__}, "
           f"{THREADS['n']} threads per measuring process; load average (1 min) {load[0]:.1f} at the start, "
           f"{load[1]:.1f} at the end.\n"]
    for section, (title, cols) in COLUMNS.items():
        mine = [r for r in rows if r["section"] == section]
        if not mine:
            continue
        if not cols:  # a section that did not run says why in its case text
            out += [f"**{title}**: {r['case']}\n" for r in mine]
            continue
        out += [f"**{title}**\n", "| case | " + " | ".join(c[0] for c in cols) + " |",
                "| --- |" + " ---: |" * len(cols)]
        cell = lambda v, f: "–" if v != v else format(v, f)  # noqa: E731  (NaN = not measured in this case)
        out += ["| " + r["case"] + " | " + " | ".join(cell(r[k], f) for _, k, f in cols) + " |" for r in mine]
        out.append("")
    return "\n".join(out)


def chart(rows: list[dict], path: Path) -> None:
    """A bar chart of every ratio (log scale; > 1 = ours faster, leaner or within its goal)."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    shown = [r for r in rows if "ratio" in r]
    labels = [f"{r['section']}: {r['case'][:60]}" for r in shown]
    values = [r["ratio"] for r in shown]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(values) + 1.5))
    ax.barh(range(len(values)), values, color="tab:blue")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    if values:
        ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no ratios in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("ratio, > 1 = ours faster / leaner / within the goal (bench.md: what each divides)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the long labels included
    plt.close(fig)


def main(cfg: BenchConfig) -> list[dict]:
    """Run the chosen sections in order; write bench.md, bench.json and bench.png; return the rows."""
    names = [s.strip() for s in cfg.only.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown or not names:
        raise UserError(f"--only: unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    if cfg.repeats < 1 or cfg.threads < 1:
        raise UserError(f"--repeats and --threads must be at least 1, got {cfg.repeats} and {cfg.threads}")
    print(f"[bench] {cfg}", flush=True)
    THREADS["n"] = cfg.threads
    out = ROOT / cfg.out
    out.mkdir(parents=True, exist_ok=True)
    load_start, rows = os.getloadavg()[0], []
    for name in names:
        t = time.perf_counter()
        rows += SECTIONS[name](cfg)
        print(f"[bench] {name} done in {time.perf_counter() - t:.0f}s", flush=True)
    text = markdown(rows, (load_start, os.getloadavg()[0]))
    print(text)
    (out / "bench.md").write_text(text)
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    chart(rows, out / "bench.png")
    print(f"wrote {out / 'bench.md'}, bench.json and bench.png")
    return rows


if __name__ == "__main__":
    cli.run(main, BenchConfig, __doc__)
