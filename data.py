"""Orca 2 training data: the template and loss mask, prompt erasing, the token cache, packing and batches.

    python data.py ../shared/data/orca-samples/orca_dpo_pairs_validation.jsonl       # one example + statistics
    python data.py data/1M-GPT4-Augmented.parquet --erase=true --max_len=2048 --on_too_long=truncate
    python data.py decontaminate --train=FILE[,FILE...] --out=report.json              # runs decontaminate.py

Label contract (train.py relies on it): a packed row holds whole documents back to back, each from position 0;
labels[t] = input_ids[t + 1] (already shifted) when token t + 1 is a teacher token of the same document, else -100,
so a document's last label is -100 and train.py takes `cross_entropy(logits, labels)` with no shift of its own.
Teacher tokens are exactly orca2.TARGET, `"\\n" + response + "<|im_end|>"`, of every assistant turn (ORCA2.md 5.1).

Pipeline: file (formats.py) -> parts -> worker processes on every rank -> ids + teacher flags, one .npz per part ->
merged, duplicates dropped -> memory-mapped cache -> best-fit packs -> get_batch. Cache keys include CODE_TOKENS/PACKS.
"""

import hashlib
import inspect
import json
import os
import re
import shutil
import signal
import time
from bisect import bisect_left, insort
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

import formats
from cli import UserError
from formats import Conversation, detect_file_format, file_parts, parse_record, read_part, read_record
from orca2 import ERASED_SYSTEM_MESSAGE, FOLLOWUP, PROMPT, SHARED_DATA, SYSTEM_MESSAGES, TARGET, Source
from tokenizer import NO_DUMMY_PREFIX, Segment, Tokenizer, fill

LLAMA2_TOKENIZER = SHARED_DATA / "llama2-tokenizer" / "tokenizer.model"
SAMPLE_DATA = SHARED_DATA / "orca-samples" / "orca_dpo_pairs_validation.jsonl"


@dataclass
class DataConfig:
    max_len: int = 4096            # tokens per packed row; also the longest example kept (published: 4096)
    on_too_long: str = "drop"      # "drop" or "truncate" examples longer than max_len; counted either way
    skip_bad_lines: bool = False   # skip malformed records (JSONL lines, parquet rows; counted) instead of stopping
    seed: int = 0                  # seeds the mixture sampling of sources with weight != 1 (and train.py's init/order)
    num_workers: int = 0           # tokenizer processes (per node under torchrun); 0 = one per available CPU core
    cache_dir: str = "cache"       # tokens and packs, keyed by inputs, settings and code; on a filesystem all nodes see


# ---- rendering: conversations, orca2's template, prompt erasing ----


def render_segments(conv: Conversation) -> list[Segment]:
    """The training document, in segments. This is the loss mask: edit `supervised=` here to change what is learned."""
    segs = fill(PROMPT, {"system": conv.system, "user": conv.turns[0][0]}, supervised=False)
    for k, (user, response) in enumerate(conv.turns):
        if k:
            segs += fill(FOLLOWUP, {"user": user}, supervised=False)
        segs += fill(TARGET, {"response": response}, supervised=True)
    return segs


def render_text(conv: Conversation, mark: tuple[str, str] = ("", "")) -> str:
    """The training string; mark=(open, close) wraps each run of supervised text, for display."""
    out, inside = [], False
    for s in render_segments(conv):
        if s.supervised != inside:
            out.append(mark[0] if s.supervised else mark[1])
            inside = s.supervised
        out.append(s.text)
    return "".join(out) + (mark[1] if inside else "")


def override_system(conv: Conversation, system: str | None) -> Conversation:
    """Prompt erasing: put `system` in place of the teacher's message, keeping the original for inspection."""
    return conv if system is None else replace(conv, system=system, original_system=conv.system)


def source_system(source: Source) -> str | None:
    """The system message a source forces: its own `system`, else the generic one when erasing, else None (keep)."""
    return source.system if source.system is not None else ERASED_SYSTEM_MESSAGE if source.erase else None


# ---- tokenizing a file into the cache (several processes and ranks) ----


@dataclass
class TokenizedData:  # one source, tokenized: its documents back to back in memory-mapped arrays
    folder: Path             # its cache folder
    ids: np.ndarray          # (tokens,) uint16 (int32 for vocabularies over 65536)
    sup: np.ndarray          # (tokens,) uint8, 1 where the token is a teacher token
    offsets: np.ndarray      # (docs + 1,) int64: document i is ids[offsets[i]:offsets[i + 1]]
    sup_counts: np.ndarray   # (docs,) int32 teacher tokens per document
    meta: dict               # counts and settings, see merge_parts; metadata columns: folder / columns.parquet


def _read(path: Path, dtype: str) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


def cache_key(*objects) -> str:
    """A hash of what makes a cache's bytes: the source of functions and modules, the value of anything else."""
    text = [inspect.getsource(o) if callable(o) or inspect.ismodule(o) else repr(o) for o in objects]
    return hashlib.sha256("\n".join(text).encode()).hexdigest()[:12]


def _tokenize_part(tok: Tokenizer, plan: dict, part: tuple, file: Path) -> None:
    out = dict(ids=[], sup=[], lengths=[], hashes=[], columns=[], errors=[], records=0)
    for batch in read_part(Path(plan["path"]), part):
        convs = []
        for k, raw in enumerate(batch, out["records"]):
            try:
                record = read_record(raw)
                if record is None:
                    continue  # a blank JSONL line holds no example
                convs.append(override_system(parse_record(record, plan["format"]), plan["system"]))
                out["columns"].append({c: v if isinstance(v, str) else json.dumps(v)
                                       for c, v in zip(plan["columns"], map(record.get, plan["columns"]))})
            except ValueError as e:
                out["errors"].append((k, str(e)))
        out["records"] += len(batch)
        ids, sup, lengths = tok.encode_docs([render_segments(c) for c in convs])  # Python lists of one batch only
        out["ids"].append(np.array(ids, dtype=plan["dtype"]))
        out["sup"].append(np.array(sup, np.uint8))
        out["lengths"].append(np.array(lengths, np.int64))
        digests = (hashlib.blake2b(json.dumps([c.system, c.turns]).encode(), digest_size=8).digest() for c in convs)
        out["hashes"].append(np.frombuffer(b"".join(digests), np.uint64))  # exact duplicates: same (system, turns)
    arrays = {k: np.concatenate(out[k]) for k in ("ids", "sup", "lengths", "hashes")}
    text = json.dumps({k: out[k] for k in ("columns", "errors", "records")})
    file.parent.mkdir(parents=True, exist_ok=True)  # not before: rank 0 may have merged and removed it already
    tmp = file.with_name(f"{file.name}.tmp{os.getpid()}.npz")
    np.savez(tmp, **arrays, text=np.frombuffer(text.encode(), np.uint8))
    os.replace(tmp, file)  # atomic: a part file is complete or absent


_WORKER: dict = {}  # per tokenizer process: its Tokenizer (loaded once) and the shared abort flag


def _init_worker(model_proto: bytes, added: dict[str, int], pad: str, abort) -> None:
    # Ctrl-C/scancel signal the whole tree, and a worker killed mid-part hangs Pool.join(): the parent sets `abort`.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    _WORKER.update(tok=Tokenizer(model_proto, added, pad), abort=abort)


def _worker_part(job: tuple) -> None:
    if not _WORKER["abort"].is_set():
        _tokenize_part(_WORKER["tok"], *job)


def tokenize_parts(jobs: list[tuple], tok: Tokenizer, workers: int, desc: str, log) -> None:
    """Tokenize every (plan, part, part file) job into its part file, in worker processes."""
    ctx = get_context("forkserver")  # not fork: forking a process that runs torch or gloo threads can deadlock it
    abort = ctx.Event()
    pool = ctx.Pool(workers, _init_worker, (tok.model_proto, tok.added, tok.pad_token, abort)) \
        if workers > 1 and len(jobs) > 1 else None
    try:
        done = pool.imap_unordered(_worker_part, jobs) if pool else (_tokenize_part(tok, *job) for job in jobs)
        for _ in tqdm(done, total=len(jobs), unit="part", desc=desc, disable=log is None or not jobs):
            pass
    finally:
        # No pool.terminate(), which can deadlock on a worker killed mid-write: the workers skip what is left instead.
        if pool is not None:
            abort.set()
            pool.close()
            pool.join()


def merge_parts(plan: dict, part_files: list[Path], cfg: DataConfig, folder: Path) -> None:
    """The part files, in file order, into one cache folder: what is dropped, truncated or skipped is counted."""
    path, truncate = Path(plan["path"]), cfg.on_too_long == "truncate"
    counts, bad, seen, docs = Counter(lines=0, skipped_bad_lines=0, too_long=0, duplicates=0), [], set(), []
    schema = pa.schema([(c, pa.string()) for c in plan["columns"]])
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with open(tmp / "ids.bin", "wb") as f_ids, open(tmp / "sup.bin", "wb") as f_sup, \
            pq.ParquetWriter(tmp / "columns.parquet", schema) as f_columns:
        for file in part_files:
            with np.load(file) as z:
                r = dict(z) | json.loads(z["text"].tobytes())
            for n, message in r["errors"]:  # in file order, so record numbers add up
                error = _bad_record(path, counts["lines"] + n, message)
                if not cfg.skip_bad_lines:
                    raise UserError(f"{error} (--skip_bad_lines=true skips and counts them)")
                bad += [error][:5 - len(bad)]
            # an exact duplicate of an earlier example of the file is dropped (a set of ints: ~70 bytes an example)
            new = np.zeros(len(r["hashes"]), bool)
            for k, h in enumerate(r["hashes"].tolist()):
                new[k] = h not in seen
                seen.add(h)
            lengths = r["lengths"]
            fits = lengths <= cfg.max_len  # else dropped, or truncated to its first max_len tokens
            keep = new & (fits | truncate)
            counts.update(lines=r["records"], skipped_bad_lines=len(r["errors"]), duplicates=int((~new).sum()),
                          too_long=int((new & ~fits).sum()))
            pos = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # in its document
            tokens = np.repeat(keep, lengths) & (pos < cfg.max_len)
            f_ids.write(r["ids"][tokens].tobytes())
            f_sup.write(r["sup"][tokens].tobytes())
            lengths = np.minimum(lengths[keep], cfg.max_len)
            sums = np.concatenate([[0], np.cumsum(r["sup"][tokens], dtype=np.int64)])  # teacher tokens so far
            docs.append((lengths, sums[np.cumsum(lengths)] - sums[np.cumsum(lengths) - lengths]))
            f_columns.write_table(pa.Table.from_pylist([c for c, k in zip(r["columns"], keep) if k], schema))
    lengths, sup_counts = (np.concatenate(a) for a in zip(*docs))
    meta = dict(counts, source=plan["source"], path=str(path), format=plan["format"], system=plan["system"],
                columns=plan["columns"], dtype=plan["dtype"], examples=len(lengths), tokens=int(lengths.sum()),
                supervised_tokens=int(sup_counts.sum()), max_len=cfg.max_len, bad_line_examples=bad,
                dropped_too_long=0 if truncate else counts["too_long"], truncated=counts["too_long"] if truncate else 0)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    _commit(tmp, folder, meta, offsets=offsets, sup_counts=sup_counts.astype(np.int32))


def _bad_record(path: Path, n: int, error: object) -> str:
    return f"{path} row {n}: {error}" if path.suffix == ".parquet" else f"{path}:{n + 1}: {error}"  # n from 0


def _commit(tmp: Path, folder: Path, meta: dict, **arrays: np.ndarray) -> None:
    """Write the arrays, meta.json last, then move the folder into place: a cache folder with meta.json is complete."""
    for name, array in arrays.items():
        array.tofile(tmp / f"{name}.bin")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same cache first; theirs is identical
        shutil.rmtree(tmp)


def wait_for(file: Path, what: str, log) -> None:
    """Poll for a file another rank writes: no collective, so no timeout however long the work takes."""
    t0, said = time.time(), 0
    while not file.is_file():
        time.sleep(0.2)
        if log and time.time() - t0 > 60 * (said + 1):
            said += 1
            log(f"[data] still waiting for {what} ({said} min)")


# What makes a token cache's bytes (formats.py, which reads the records, as a whole): an edit rebuilds the cache.
CODE_TOKENS = (Tokenizer.encode_docs, fill, NO_DUMMY_PREFIX, PROMPT, FOLLOWUP, TARGET, ERASED_SYSTEM_MESSAGE,
               render_segments, override_system, source_system, formats, _tokenize_part, merge_parts)


def plan_source(source: Source, tok: Tokenizer, cfg: DataConfig, log=print) -> dict:
    """What one source's cache is made of and where it lives; computed once (rank 0) and shared with the ranks."""
    path = Path(source.path)
    if cfg.on_too_long not in ("drop", "truncate"):
        raise UserError(f"on_too_long must be 'drop' or 'truncate', got {cfg.on_too_long!r}")
    fmt, columns = detect_file_format(path)
    with open(path, "rb") as f:  # a content hash: the cache follows the bytes, not names or timestamps (~1 GB/s)
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    inputs = [digest, tok.identity, fmt, source_system(source), cfg.max_len, cfg.on_too_long, cfg.skip_bad_lines]
    name = f"tokens-{re.sub(r'[^A-Za-z0-9_.-]', '_', source.name)}-{cache_key(*inputs)}"
    folder = Path(cfg.cache_dir) / f"{name}-{cache_key(*CODE_TOKENS)}"
    if not (folder / "meta.json").is_file():
        older = [p for p in folder.parent.glob(f"{name}-*") if (p / "meta.json").is_file()]
        if older and log:
            log(f"[data] {source.name}: code changed (rendering, masking or tokenization) since {older[0].name} was "
                "made; tokenizing again")
        for stale in folder.parent.glob(f"{name}-*.tmp*"):  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
    else:  # parts a late rank made again after rank 0 had merged them (harmless, but not kept)
        shutil.rmtree(folder.with_name(folder.name + ".parts"), ignore_errors=True)
    return dict(source=source.name, path=str(path), format=fmt, columns=columns, system=source_system(source),
                folder=str(folder), dtype="uint16" if tok.vocab_size <= 1 << 16 else "int32")


def tokenize_source(source: Source, tok: Tokenizer, cfg: DataConfig, chunk_bytes: int = formats.CHUNK_BYTES,
                    part_rows: int = formats.PART_ROWS, log: Callable[[str], None] | None = print,
                    plan: dict | None = None, rank: int = 0, world: int = 1) -> TokenizedData:
    """Tokenize a file into the cache (or open it). Under torchrun each rank does every world-th part, rank 0 merges."""
    plan = plan or plan_source(source, tok, cfg, log)
    folder, path = Path(plan["folder"]), Path(plan["path"])
    if not (folder / "meta.json").is_file():
        t0 = time.time()
        parts = folder.with_name(folder.name + ".parts")  # finished parts survive a kill: a rerun goes on from them
        layout = file_parts(path, chunk_bytes, part_rows)
        if not layout:
            raise UserError(f"{path}: the file has no rows")
        files = [parts / f"{'-'.join(map(str, part))}.npz" for part in layout]  # by range: chunk sizes never mix
        jobs = [(plan, part, file) for k, (part, file) in enumerate(zip(layout, files))
                if k % world == rank and not file.is_file()]
        workers = cfg.num_workers or len(os.sched_getaffinity(0))
        tokenize_parts(jobs, tok, workers, f"tokenizing {path.name}" + (f" (rank {rank})" if world > 1 else ""), log)
        if rank == 0:
            for k, file in enumerate(files):
                wait_for(file, f"part {k} of {path.name} from rank {k % world}", log)
            merge_parts(plan, files, cfg, folder)
            shutil.rmtree(parts, ignore_errors=True)
            if log:
                log(f"[data] tokenized {path} in {time.time() - t0:.1f} s by {workers} process(es) x {world} rank(s)")
        wait_for(folder / "meta.json", f"rank 0 to merge {path.name}", log)
    meta = json.loads((folder / "meta.json").read_text())
    arrays = dict(ids=meta["dtype"], sup="uint8", offsets="int64", sup_counts="int32")
    return TokenizedData(folder, *(_read(folder / f"{name}.bin", dtype) for name, dtype in arrays.items()), meta)


# ---- packing: best-fit decreasing ----


def pack_best_fit(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: each item, longest first, goes to the open pack with the least room that still fits.
    Returns (order, offsets): pack p holds the items order[offsets[p]:offsets[p + 1]]; a lookup is one bisect."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 1 or lengths.max() > capacity):
        raise ValueError(f"item lengths must be in 1..{capacity}, got {lengths.min()}..{lengths.max()}")
    by_length = np.argsort(-lengths, kind="stable")  # ties keep input order: deterministic
    packs_with_room = [[] for _ in range(capacity + 1)]  # room -> open packs with exactly that room
    rooms: list[int] = []  # sorted room values that have at least one open pack
    assign, n_packs = [0] * len(lengths), 0
    for i, n in zip(by_length.tolist(), lengths[by_length].tolist()):
        k = bisect_left(rooms, n)
        if k == len(rooms):  # nothing fits: open a new pack
            p, left, n_packs = n_packs, capacity - n, n_packs + 1
        else:
            room = rooms[k]
            p, left = packs_with_room[room].pop(), room - n
            if not packs_with_room[room]:
                del rooms[k]
        assign[i] = p
        if left:
            if not packs_with_room[left]:
                insort(rooms, left)
            packs_with_room[left].append(p)
    assign = np.array(assign, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=n_packs))]).astype(np.int64)
    return np.argsort(assign, kind="stable"), offsets


def mixture_indices(n: int, weight: float, seed: int, source_index: int) -> np.ndarray:
    """Indices of the documents kept: round(weight * n), as whole copies plus a seeded sample; the same every epoch."""
    if weight < 0:
        raise UserError(f"mixture weight must be >= 0, got {weight}")
    copies, rest = divmod(round(weight * n), n) if n else (0, 0)
    sample = np.random.default_rng([seed, source_index]).permutation(n)[:rest]
    return np.concatenate([np.tile(np.arange(n), copies), np.sort(sample)]).astype(np.int64)


class PackedDataset:
    """One stage's packs: which (source, document) pairs each pack holds, over memory-mapped token arrays."""

    def __init__(self, folder: Path, sources: list[TokenizedData]):
        self.folder, self.sources = folder, sources
        self.meta = json.loads((folder / "meta.json").read_text())
        self.doc_source = _read(folder / "doc_source.bin", "int32")  # per packed document, in pack order
        self.doc_index = _read(folder / "doc_index.bin", "int64")    # its index within its source
        self.pack_offsets = _read(folder / "pack_offsets.bin", "int64")  # (packs + 1,)

    def __len__(self) -> int:
        return len(self.pack_offsets) - 1

    def documents(self, p: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, teacher flags) of every document in pack p."""
        a, b = self.pack_offsets[p], self.pack_offsets[p + 1]
        docs = [(self.sources[s], i) for s, i in zip(self.doc_source[a:b].tolist(), self.doc_index[a:b].tolist())]
        return [(d.ids[d.offsets[i]:d.offsets[i + 1]], d.sup[d.offsets[i]:d.offsets[i + 1]]) for d, i in docs]


def make_packs(sources: list[Source], datas: list[TokenizedData], cfg: DataConfig, folder: Path) -> None:
    """Mix the sources by weight, pack best-fit, and commit the packs' index arrays to `folder`."""
    picks = [mixture_indices(len(d.sup_counts), s.weight, cfg.seed, k) for k, (s, d) in enumerate(zip(sources, datas))]
    doc_source = np.concatenate([np.full(len(ix), k, np.int32) for k, ix in enumerate(picks)])
    doc_index = np.concatenate(picks)
    lengths = np.concatenate([np.diff(d.offsets)[ix] for d, ix in zip(datas, picks)])
    if not len(lengths):
        raise UserError(f"no examples left to train on in {[s.path for s in sources]}")
    order, offsets = pack_best_fit(lengths, cfg.max_len)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    n_packs, n_tokens = len(offsets) - 1, int(lengths.sum())
    meta = dict(max_len=cfg.max_len, examples=len(lengths), tokens=n_tokens, packs=n_packs, longest=int(lengths.max()),
                supervised_tokens=sum(int(d.sup_counts[ix].sum()) for d, ix in zip(datas, picks)),
                efficiency=n_tokens / (n_packs * cfg.max_len),
                per_source=[dict(name=s.name, kept=len(ix), weight=s.weight) for s, ix in zip(sources, picks)])
    _commit(tmp, folder, meta, doc_source=doc_source[order], doc_index=doc_index[order], pack_offsets=offsets)


CODE_PACKS = (mixture_indices, pack_best_fit, make_packs)


def plan_stage(sources: list[Source], tok: Tokenizer, cfg: DataConfig, log=print) -> dict:
    """Every cache folder of a stage (file hashes, formats, code): computed once, broadcast to the ranks."""
    try:  # an unusable cache folder is the user's to fix, before any work is done
        Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--cache_dir {cfg.cache_dir}: cannot create it ({e.strerror})") from None
    if not sources:
        raise UserError("a stage needs at least one data source")
    plans = [plan_source(s, tok, cfg, log) for s in sources]
    key = cache_key(*[Path(p["folder"]).name for p in plans], [s.weight for s in sources], cfg.seed, cfg.max_len)
    folder = Path(cfg.cache_dir) / f"packs-{key}-{cache_key(*CODE_PACKS)}"
    for stale in folder.parent.glob(f"{folder.name}.tmp*"):  # left by a run killed while packing
        shutil.rmtree(stale, ignore_errors=True)
    return dict(sources=plans, packs=str(folder))


def build_stage(sources: list[Source], tok: Tokenizer, cfg: DataConfig, log: Callable[[str], None] | None = print,
                plan: dict | None = None, rank: int = 0, world: int = 1) -> tuple[PackedDataset, dict]:
    """Tokenize, mix and pack one curriculum stage (cached); returns the packs and a stats dict. Under torchrun every
    rank calls it with the same plan (from plan_stage on rank 0): they share the work, rank 0 packs."""
    plan = plan or plan_stage(sources, tok, cfg, log)
    datas = [tokenize_source(s, tok, cfg, log=log, plan=p, rank=rank, world=world)
             for s, p in zip(sources, plan["sources"])]
    folder = Path(plan["packs"])
    if rank == 0 and not (folder / "meta.json").is_file():
        make_packs(sources, datas, cfg, folder)
    wait_for(folder / "meta.json", "rank 0 to pack the stage", log)
    packed = PackedDataset(folder, datas)
    stats = {k: packed.meta[k] for k in ("examples", "tokens", "supervised_tokens", "packs", "efficiency")}
    for k in ("dropped_too_long", "truncated", "skipped_bad_lines", "duplicates"):
        stats[k] = sum(d.meta[k] for d in datas)
    if log:  # nothing is dropped silently
        for m in (d.meta for d in datas):
            log(f"[data] {m['source']}: {m['examples']:,} examples, {m['tokens']:,} tokens ({m['format']}, "
                f"{m['path']}); system message {'kept' if m['system'] is None else 'replaced'}; "
                f"{m['skipped_bad_lines']} bad lines skipped; {m['too_long']} longer than {cfg.max_len} "
                f"{'truncated' if m['truncated'] else 'dropped'}; dropped {m['duplicates']:,} exact duplicates; "
                f"metadata columns {m['columns']}")
            for e in m["bad_line_examples"][:3]:
                log(f"[data]   skipped {e}")
        log(f"[data] packed {stats['examples']:,} examples into {stats['packs']:,} rows of {cfg.max_len} (fewest "
            f"possible {-(-stats['tokens'] // cfg.max_len):,}): efficiency {stats['efficiency']:.2%}, supervised "
            f"{stats['supervised_tokens'] / stats['tokens']:.1%}")
    return packed, stats


# ---- batches, epochs, ranks ----


def get_batch(packed: PackedDataset, pack_indices: list[int], seq_len: int, pad_id: int) -> dict:
    """(B, T) long tensors input_ids, labels (shifted, see the module docstring), position_ids, T the fullest row (at
    most seq_len); num_tokens, num_supervised. Padding is cut into documents no longer than the row's longest: they
    attend to no real token, fit the model's context wherever the data does, and their labels are -100."""
    import torch  # here only: `python data.py` needs no torch
    B, T = len(pack_indices), seq_len
    input_ids = np.full((B, T), pad_id, np.int64)
    labels = np.full((B, T), -100, np.int64)
    position_ids = np.zeros((B, T), np.int64)
    arange, num_tokens, width = np.arange(T), 0, 1
    for b, p in enumerate(pack_indices):
        t, longest = 0, 1
        for ids, sup in packed.documents(p):
            n = len(ids)
            assert t + n <= T, f"pack {p} holds more than seq_len={T} tokens"
            input_ids[b, t:t + n] = ids
            labels[b, t:t + n - 1] = np.where(sup[1:] != 0, ids[1:].astype(np.int64), -100)  # widen uint16 ids first
            position_ids[b, t:t + n] = arange[:n]
            t, longest = t + n, max(longest, n)
        position_ids[b, t:] = arange[:T - t] % longest
        num_tokens, width = num_tokens + t, max(width, t)
    return dict(input_ids=torch.from_numpy(input_ids[:, :width]), labels=torch.from_numpy(labels[:, :width]),
                position_ids=torch.from_numpy(position_ids[:, :width]), num_tokens=num_tokens,
                num_supervised=int((labels != -100).sum()))


def epoch_order(num_packs: int, epoch: int, seed: int) -> np.ndarray:
    """The packs' order in one epoch: a permutation fixed by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_packs)


def steps_per_epoch(num_packs: int, global_batch: int) -> int:
    """Optimizer steps per epoch; the last step wraps around to the epoch's first packs instead of dropping any."""
    return -(-num_packs // global_batch)


def rank_packs(order: np.ndarray, step: int, global_batch: int, rank: int, world_size: int) -> list[int]:
    """Rank r's disjoint share of step `step`'s global batch: order[step * global_batch + r * per_rank ...]."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} must be a multiple of the world size {world_size}")
    per_rank = global_batch // world_size
    first = step * global_batch + rank * per_rank
    return [int(order[(first + j) % len(order)]) for j in range(per_rank)]


# ---- command line ----


@dataclass
class ShowConfig(DataConfig):
    file: str = ""                 # JSONL or parquet data file (OpenOrca, FLAN, ShareGPT, messages, preference, qa)
    tokenizer: str = str(LLAMA2_TOKENIZER)  # tokenizer.model or a model folder
    erase: bool = False            # prompt erasing: use the generic system message
    system: str = ""               # force a system message: "cautious", "empty" or literal text; "" keeps the file's


def first_example(path: Path, fmt: str, skip_bad: bool) -> Conversation:
    """The file's first example, to show; a malformed record is a UserError naming its line (or row), or skipped."""
    for n, raw in enumerate(r for part in file_parts(path) for batch in read_part(path, part) for r in batch):
        try:
            record = read_record(raw)
            if record is not None:
                return parse_record(record, fmt)
        except ValueError as e:
            if not skip_bad:
                raise UserError(f"{_bad_record(path, n, e)} (--skip_bad_lines=true skips and counts them)") from None
    raise UserError(f"{path}: no examples in the file" + (" that can be read" if skip_bad else ""))


def main(cfg: ShowConfig) -> None:
    """Show the first example as trained on (the supervised text inside ⟦ ⟧), then tokenize and pack the file."""
    path = Path(cfg.file)
    forced = SYSTEM_MESSAGES.get(cfg.system, cfg.system) if cfg.system else None
    source = Source(path.stem, str(path), erase=cfg.erase, system=forced)
    tok = Tokenizer.from_pretrained(cfg.tokenizer)
    fmt, _ = detect_file_format(path)
    conv = override_system(first_example(path, fmt, cfg.skip_bad_lines), source_system(source))
    ids, sup, _ = tok.encode_docs([render_segments(conv)])
    print(f"==== first example of {path} (format {fmt}); supervised text inside ⟦ ⟧ ====")
    if conv.original_system is not None:
        print(f"[system message replaced; the teacher saw: {conv.original_system!r}]")
    print(f"{render_text(conv, mark=('⟦', '⟧'))}\n==== {len(ids)} tokens, {sum(sup)} supervised ====\n")
    packed, _ = build_stage([source], tok, cfg)  # it logs what was kept, dropped and packed
    d = packed.sources[0]
    lengths = np.diff(d.offsets)
    print(f"tokens per example: mean {lengths.mean():.0f}, " + ", ".join(
        f"p{q} {np.percentile(lengths, q):.0f}" for q in (10, 50, 90, 99)) + f", max {lengths.max()}")
    for name in d.meta["columns"]:  # metadata columns: how many values, the most common ones
        counts = pq.read_table(d.folder / "columns.parquet", columns=[name]).column(0).value_counts()
        top = [counts[i].as_py() for i in np.argsort(-counts.field("counts").to_numpy(), kind="stable")[:5]]
        print(f"column {name}: {len(counts):,} values; most common", *(f"{c['values']} {c['counts']:,}" for c in top))


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] == ["decontaminate"]:  # a command of its own; data.py only hands over (no import back)
        script = str(Path(__file__).resolve().parent / "decontaminate.py")
        os.execv(sys.executable, [sys.executable, script, *sys.argv[2:]])
    import cli
    cli.run(main, ShowConfig, __doc__, positional=("file",))
