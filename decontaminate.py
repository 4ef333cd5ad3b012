"""Contamination report: which test items of the Orca 2 benchmarks occur in training files, and clean copies.

    python decontaminate.py --train=data/flan_v2.jsonl,data/1M-GPT4-Augmented.parquet --out=report.json
    python decontaminate.py --train=FILE[,FILE...] --benchmarks=agieval,bbh,drop,crass,race,gsm8k \\
        --out=report.json --ngram=13 --write_clean=data/clean
    python data.py decontaminate --train=FILE ...                 # the same; --help lists every option

Several of the six benchmarks are in-domain for Orca 2 (their training splits are in FLAN), so test items may have
leaked into a training file. The method:
- Text is lowercased, punctuation is removed (every character that is not a letter, digit or whitespace; "_" too)
  and the rest is split on whitespace into words.
- A benchmark item's text is what evaluate.py shows the model (`item_text`: passage, question, options; not the
  answer-format instruction). Its n-grams are its runs of n consecutive words (n = 13 by default); an item shorter
  than n words counts as one n-gram of its whole text (BBH's boolean expressions are 3-12 words).
- A training example is any record data.py reads (every layout it detects, JSONL or parquet). Its system message,
  each user turn and each response are separate texts: an n-gram never spans two of them. An item is contaminated
  when any of its n-grams occurs in one of those texts, and that training example is flagged.
- Hashing, so that millions of training rows against ~20,000 items run in minutes with bounded memory: a word's
  hash is its bytes times fixed random 64-bit numbers (one per position in the word), summed and mixed (splitmix64);
  an n-gram's hash is the sum of its word hashes times fixed random numbers per position in the n-gram. The
  benchmark n-grams (~4.4M for all six) are a sorted uint64 array, with the item of each, plus a 2^28-bit filter
  (32 MB) indexed by the top bits. Worker processes hash training texts a batch at a time in numpy, keep the hashes
  that pass the filter (~2%) and look those up by binary search. A false match needs a 64-bit hash collision.

report.json: {"ngram", "train_examples", "train_examples_flagged", "train_files": {path: {"examples", "flagged",
"skipped_bad_records", "written"?}}, "benchmarks": {name: {"items", "contaminated", "ids", "short_items",
"where"}}}. An id is the one evaluate.py writes in predictions.jsonl; "where" gives, per contaminated id, the first
training example that matched it (path:line for JSONL, "path row N" for parquet); "short_items" counts the items under
n words (their whole text is the n-gram, so they match more easily). Records that are not valid examples are counted
as skipped and not checked. --write_clean DIR writes every training file under its own name into DIR without its
flagged examples (every other line or row unchanged), and says how many were removed from each.
"""

import json
import os
import re
import tempfile
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

import cli
import formats
from benchmarks import DEFAULT_DATA_DIR, item_text, load_benchmark
from cli import UserError
from orca2 import BENCHMARKS


@dataclass
class DecontaminateConfig:
    train: str = ""            # training files, comma-separated: JSONL or parquet, any layout data.py reads
    benchmarks: str = ",".join(BENCHMARKS)  # comma-separated names from orca2.BENCHMARKS
    out: str = "report.json"   # where the report goes
    ngram: int = 13            # words per n-gram; items shorter than this are one n-gram of their whole text
    write_clean: str = ""      # folder for copies of the training files without the flagged examples ("" = none)
    data_dir: str = str(DEFAULT_DATA_DIR)  # folder holding agieval/ bbh/ drop/ crass/ race/ gsm8k/
    num_workers: int = 0       # processes hashing training files; 0 = one per available CPU core


# ---- normalising and hashing text ----

PUNCT = re.compile(r"[^\w\s]|_")  # not a letter, digit or whitespace: removed
SEP = "X"  # joins texts into one string; never a word of lowercased text, so it marks where a text ends
FILTER_BITS = 28  # the filter has 2^28 bits (32 MB)
ITEMS_AT_ONCE = 1000  # benchmark items hashed together
_rng = np.random.default_rng(2311_11045)  # fixed: the hashes must agree across processes and runs
BYTE_MULT = _rng.integers(0, 2**63, 64, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # per byte position in a word
POS_MULT = _rng.integers(0, 2**63, 256, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # per word position, n-gram
LEN_SALT = _rng.integers(0, 2**63, 257, dtype=np.uint64)  # per n-gram length: an L-gram never equals an M-gram


def normalize(text: str) -> list[str]:
    """The words of a text as the method sees them (for reading; hashing does the same on bytes)."""
    return PUNCT.sub("", text.lower()).split()


def mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit affects every output bit (uint64 arithmetic wraps around)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def word_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(words,) uint64 hashes of the normalised words of many texts, and (words,) the index of each one's text."""
    joined = " ".join(PUNCT.sub("", f" {SEP} ".join(t.lower() for t in texts)).split())  # single spaces
    if not joined:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    b = np.frombuffer(joined.encode(), np.uint8)
    space = b == 32
    starts = np.flatnonzero(np.concatenate([[True], space[:-1]]))  # first byte of every word
    pos = np.arange(len(b)) - starts[np.minimum(np.cumsum(space), len(starts) - 1)]  # byte's position in its word
    contrib = b.astype(np.uint64) * BYTE_MULT[pos % 64] * (~space).astype(np.uint64)  # spaces add nothing
    length = np.diff(np.append(starts, len(b) + 1)) - 1
    h = mix(np.add.reduceat(contrib, starts) + length.astype(np.uint64))
    sep = (length == 1) & (b[starts] == ord(SEP))
    return h[~sep], np.cumsum(sep)[~sep]


def ngram_hashes(h: np.ndarray, text: np.ndarray, lengths: list[int]):
    """For each L in lengths: (L, hashes of all L-word windows that lie inside one text, their first words)."""
    acc = np.zeros(len(h), np.uint64)
    for k in range(max(lengths)):
        m = max(len(h) - k, 0)  # windows of k + 1 words
        acc[:m] += h[k:] * POS_MULT[k]  # acc[i] = sum of h[i + j] * POS_MULT[j] for j <= k
        if k + 1 in lengths:
            first = np.flatnonzero(text[:m] == text[k:])  # the window's first and last word are in one text
            yield k + 1, acc[first] + LEN_SALT[k + 1], first


# ---- the benchmark side: a table of n-gram hashes ----


def benchmark_table(items: list, n: int) -> dict[str, np.ndarray]:
    """keys: sorted n-gram hashes of all items; item: the item of each key; lengths: the n-gram lengths used (n,
    and the word counts of items shorter than n); filter: bit k set when some key's top bits equal k; words: the
    word count of every item."""
    keys, owner, words, lengths = [], [], [], {n}
    for a in range(0, len(items), ITEMS_AT_ONCE):  # a slice of items at a time: numpy temporaries stay small
        h, text = word_hashes([item_text(it) for it in items[a:a + ITEMS_AT_ONCE]])
        counts = np.bincount(text, minlength=len(items[a:a + ITEMS_AT_ONCE]))
        mine = {n} | set(counts[(counts > 0) & (counts < n)].tolist())
        for length, hashes, first in ngram_hashes(h, text, sorted(mine)):
            # an item's own length: n for long items; its whole text for short ones (one window, from its first word)
            want = np.minimum(counts[text[first]], n) == length
            keys.append(hashes[want])
            owner.append((text[first][want] + a).astype(np.int32))
        words.append(counts)
        lengths |= mine
    keys, owner = np.concatenate(keys), np.concatenate(owner)
    order = np.argsort(keys, kind="stable")
    keys, owner = keys[order], owner[order]
    top = (keys >> np.uint64(64 - FILTER_BITS)).astype(np.uint32)  # sorted too: OR each filter byte's bits together
    byte, first = np.unique(top >> 3, return_index=True)
    bits = np.zeros(1 << (FILTER_BITS - 3), np.uint8)
    bits[byte] = np.bitwise_or.reduceat(np.left_shift(1, top & 7).astype(np.uint8), first) if len(keys) else []
    return dict(keys=keys, item=owner, lengths=np.array(sorted(lengths)), filter=bits, words=np.concatenate(words))


def lookup(table: dict[str, np.ndarray], hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions in hashes, items) of every hash that is a benchmark n-gram: filter first, then binary search."""
    top = hashes >> np.uint64(64 - FILTER_BITS)
    maybe = np.flatnonzero((table["filter"][top >> np.uint64(3)] >> (top & np.uint64(7)).astype(np.uint8)) & 1)
    keys = table["keys"]
    lo = np.searchsorted(keys, hashes[maybe], "left")
    hi = np.searchsorted(keys, hashes[maybe], "right")
    hit = hi > lo
    maybe, lo, hi = maybe[hit], lo[hit], hi[hit]  # a hash shared by several items (a DROP passage) hits them all
    per = hi - lo
    at = np.repeat(lo - np.cumsum(per) + per, per) + np.arange(per.sum())
    return np.repeat(maybe, per), table["item"][at]


# ---- the training side: parts of files, checked in parallel ----


def check_part(table: dict, job: tuple) -> dict:
    """The flagged examples (record numbers within the part) and matched items of one part of a training file."""
    path, part, fmt = job
    items, records, n, examples, errors = [np.zeros(0, np.int32)], [np.zeros(0, np.int64)], 0, 0, 0
    for batch in formats.read_part(path, part):
        texts, owner = [], []  # system, user and response texts; the record each is from
        for k, raw in enumerate(batch, n):
            try:
                record = formats.read_record(raw)
                if record is None:
                    continue  # a blank JSONL line holds no example
                conv = formats.parse_record(record, fmt)
                texts += [conv.system] + [t for turn in conv.turns for t in turn]
                owner += [k] * (1 + 2 * len(conv.turns))
                examples += 1
            except ValueError:  # not an example: counted, not checked (training rejects or skips it too)
                errors += 1
        n += len(batch)
        h, text = word_hashes(texts)
        for _, hashes, first in ngram_hashes(h, text, table["lengths"].tolist()):
            at, hit_items = lookup(table, hashes)
            items.append(hit_items)
            records.append(np.asarray(owner, np.int64)[text[first[at]]])
    items, records = np.concatenate(items), np.concatenate(records)
    matched, first = np.unique(items, return_index=True)  # per matched item, the first record found for it
    return dict(flagged=np.unique(records), items=matched, item_records=records[first], records=n,
                examples=examples, errors=errors)


_TABLE: dict = {}


def _init_worker(folder: str) -> None:
    # memory-mapped: every worker shares the one copy in the page cache
    _TABLE.update({k: np.load(f, mmap_mode="r") for k, f in ((f.stem, f) for f in Path(folder).glob("*.npy"))})


def _worker_part(job: tuple) -> dict:
    return check_part(_TABLE, job)


def check_files(paths: list[str], table: dict, num_workers: int = 0) -> dict[str, dict]:
    """Per training file: examples, flagged (record numbers, 0-based: JSONL lines or parquet rows), skipped bad
    records, and (item, first record) of every matched item."""
    jobs = []
    for p in paths:
        layout = formats.detect_file_format(Path(p))[0]
        jobs += [(Path(p), part, layout) for part in formats.file_parts(Path(p))]
    workers = num_workers or len(os.sched_getaffinity(0))
    out = {p: dict(records=0, examples=0, errors=0, flagged=[], items={}) for p in paths}
    with tempfile.TemporaryDirectory() as folder:
        pool = None
        if workers > 1 and len(jobs) > 1:
            for k, v in table.items():
                np.save(Path(folder) / f"{k}.npy", v)
            # forkserver, as in data.py: forking a process that runs torch threads can deadlock the child
            pool = get_context("forkserver").Pool(workers, _init_worker, (folder,))
        try:
            results = pool.imap(_worker_part, jobs) if pool else (check_part(table, job) for job in jobs)
            for (path, _, _), r in zip(jobs, results):  # in file order: record numbers add up
                f = out[str(path)]
                f["flagged"].append(r["flagged"] + f["records"])
                for item, record in zip(r["items"].tolist(), (r["item_records"] + f["records"]).tolist()):
                    f["items"].setdefault(item, record)
                for key in ("records", "examples", "errors"):
                    f[key] += r[key]
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    for f in out.values():
        f["flagged"] = np.concatenate(f["flagged"]) if f["flagged"] else np.zeros(0, np.int64)
    return out


def write_clean(path: str, flagged: np.ndarray, folder: Path) -> Path:
    """A copy of a training file without the flagged records (0-based JSONL lines or parquet rows)."""
    out = folder / Path(path).name
    if out.resolve() == Path(path).resolve():
        raise UserError(f"--write_clean {folder} would overwrite the training file {path}; choose another folder")
    if Path(path).suffix == ".parquet":
        reader, row = pq.ParquetFile(path), 0
        with pq.ParquetWriter(out, reader.schema_arrow) as writer:
            for batch in reader.iter_batches(65536):
                writer.write_batch(batch.filter(~np.isin(np.arange(row, row + len(batch)), flagged)))
                row += len(batch)
    else:
        drop = set(flagged.tolist())
        with open(path, "rb") as src, open(out, "wb") as dst:
            dst.writelines(line for k, line in enumerate(src) if k not in drop)
    return out


# ---- the report ----


def report(cfg: DecontaminateConfig, log=print) -> dict:
    """Check cfg.train against cfg.benchmarks; write cfg.out (and the clean copies); returns the report."""
    names = [b for b in cfg.benchmarks.split(",") if b]
    train = [p for p in cfg.train.split(",") if p]
    if not train or not names or set(names) - set(BENCHMARKS) or not 1 <= cfg.ngram <= 255:
        raise UserError(f"need --train=FILE[,FILE...], --benchmarks from {','.join(BENCHMARKS)} (got "
                         f"{cfg.benchmarks!r}) and 1 <= --ngram <= 255 (got {cfg.ngram})")
    for p in train:
        if not Path(p).is_file():
            raise UserError(f"training file {p} does not exist")
    if cfg.write_clean and len({Path(p).name for p in train}) < len(train):
        raise UserError(f"--write_clean keeps file names, and two of {train} share one")
    items = [it for name in names for it in load_benchmark(name, cfg.data_dir)]
    table = benchmark_table(items, cfg.ngram)
    files = check_files(train, table, cfg.num_workers)
    where = {p: ((lambda r, p=p: f"{p} row {r}") if Path(p).suffix == ".parquet" else (lambda r, p=p: f"{p}:{r + 1}"))
             for p in train}
    found: dict[int, str] = {}
    for p, f in files.items():
        for item, record in f["items"].items():
            found.setdefault(item, where[p](record))
    rep = dict(ngram=cfg.ngram, train_examples=sum(f["examples"] for f in files.values()),
               train_examples_flagged=sum(len(f["flagged"]) for f in files.values()),
               train_files={p: dict(examples=f["examples"], flagged=len(f["flagged"]), skipped_bad_records=f["errors"])
                            for p, f in files.items()}, benchmarks={})
    for name in names:
        mine = [k for k, it in enumerate(items) if it.benchmark == name]
        hit = [k for k in mine if k in found]
        rep["benchmarks"][name] = dict(items=len(mine), contaminated=len(hit), ids=[items[k].id for k in hit],
                                       short_items=int((table["words"][mine] < cfg.ngram).sum()),
                                       where={items[k].id: found[k] for k in hit})
    if cfg.write_clean:
        Path(cfg.write_clean).mkdir(parents=True, exist_ok=True)
        for p, f in files.items():
            out = write_clean(p, f["flagged"], Path(cfg.write_clean))
            rep["train_files"][p]["written"] = str(out)
            log(f"wrote {out}: {len(f['flagged']):,} of {f['examples']:,} examples removed")
    Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.out).write_text(json.dumps(rep, indent=1))
    log(summary(rep))
    log(f"wrote {cfg.out}")
    return rep


def summary(rep: dict) -> str:
    lines = [f"{'benchmark':10s} {'items':>7s} {'contaminated':>13s} {'share':>7s}  (n = {rep['ngram']} words)"]
    for name, b in rep["benchmarks"].items():
        share = b["contaminated"] / max(b["items"], 1)
        lines.append(f"{name:10s} {b['items']:>7,} {b['contaminated']:>13,} {share:>7.2%}")
    for p, f in rep["train_files"].items():
        lines.append(f"training file {p}: {f['examples']:,} examples, {f['flagged']:,} flagged, "
                     f"{f['skipped_bad_records']:,} bad records skipped")
    lines.append(f"training examples flagged: {rep['train_examples_flagged']:,} of {rep['train_examples']:,}")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run(report, DecontaminateConfig, __doc__)
