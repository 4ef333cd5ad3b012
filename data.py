"""Orca 2 training data: tokenizer, chat rendering, loss masks, input files, packing, batches and the on-disk cache.

    python data.py ../shared/data/orca-samples/orca_dpo_pairs_validation.jsonl        # one example + statistics
    python data.py data/1M-GPT4-Augmented.parquet --erase --max_len 2048 --on_too_long truncate --skip_bad_lines
    python data.py decontaminate --train FILE [FILE ...] --out report.json              # see decontaminate.py

Label contract (what train.py relies on). A packed row holds whole documents back to back, each starting at
position 0. `labels[t]` is the target of the logits at position t, i.e. the NEXT token, already shifted:
labels[t] = input_ids[t + 1] when token t + 1 is a teacher token of the same document, else -100. So the last token
of every document is -100 (no label ever points at the next document's first token), and train.py computes
`cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100, reduction="sum")` with no shifting of its own.
Teacher tokens are exactly `"\\n" + response + "<|im_end|>"` of every assistant turn (ORCA2.md 5.1).

Pipeline: JSONL or parquet file as published (OpenOrca, FLAN) -> parts (byte ranges, row-group slices) -> workers:
Conversation (format detected per file) -> orca2's template -> ids + teacher flags -> parent: exact duplicates dropped
-> memory-mapped cache (other scalar columns, e.g. FLAN's task_name: columns.parquet) -> best-fit packs -> get_batch.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import time
from bisect import bisect_left, insort
from collections import Counter
from dataclasses import dataclass, fields, replace
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import sentencepiece as spm
import torch
from tqdm import tqdm

from orca2 import (ERASED_SYSTEM_MESSAGE, IM_END, IM_START, PAD, PAD_ID, SPECIAL_IDS, SYSTEM_MESSAGES, Source,
                   render_followup, render_prompt, render_target)

ROOT = Path(__file__).resolve().parent
DEFAULT_TOKENIZER = ROOT.parent / "shared/data/llama2-tokenizer/tokenizer.model"
SAMPLE_DATA = ROOT.parent / "shared/data/orca-samples/orca_dpo_pairs_validation.jsonl"
CACHE_VERSION = 2  # bump whenever rendering, tokenization or the cache layout changes
CHUNK_BYTES = 1 << 20  # bytes of JSONL per tokenizer job
PART_ROWS = 8192  # parquet rows per tokenizer job: a row group is cut into slices of at most this
BATCH_ROWS = 1024  # records a worker encodes at once: bounds its Python objects


@dataclass
class DataConfig:
    max_len: int = 4096            # tokens per packed row; also the longest example kept (published: 4096)
    on_too_long: str = "drop"      # "drop" or "truncate" examples longer than max_len; counted either way
    skip_bad_lines: bool = False   # skip malformed records (JSONL lines, parquet rows; counted) instead of raising
    seed: int = 0                  # seeds the mixture sampling of sources with weight != 1
    num_workers: int = 0           # tokenizer processes; 0 = one per available CPU core
    cache_dir: str = str(ROOT / "cache")  # memory-mapped tokens and packs, keyed by inputs and settings


# ---- tokenizer ----

# sentencepiece has no switch for the dummy prefix, so we append a second NormalizerSpec (ModelProto field 3) holding
# only add_dummy_prefix = false (field 3, varint 0). Protobuf merges repeated message fields: only that flag changes.
NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


class Segment(NamedTuple):
    text: str          # a marker string when marker is True, else ordinary text
    supervised: bool   # teacher tokens (get labels)
    marker: bool       # placed by the template: becomes one control id


class Tokenizer:
    """LLaMA-2 SentencePiece plus the Orca 2 added tokens, encoding by the exact rule of ORCA2.md 6.4."""

    def __init__(self, model_proto: bytes, added_tokens: dict[str, int] | None = None, pad: str = PAD):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.sp_raw = spm.SentencePieceProcessor(model_proto=model_proto + NO_DUMMY_PREFIX)
        n = self.sp.vocab_size()
        # marker -> id; default: orca2's added tokens right after the SentencePiece vocabulary (32000-32002 for LLaMA-2)
        self.added = dict(added_tokens or {s: n + SPECIAL_IDS[s] - PAD_ID for s in (PAD, IM_START, IM_END)})
        ids = list(self.added.values())
        if {IM_START, IM_END} - set(self.added) or min(ids) < n or len(set(ids)) != len(ids):
            raise ValueError(f"added tokens {self.added} need {IM_START} and {IM_END}, with distinct ids >= {n} "
                             "(the SentencePiece vocabulary size)")
        self.marker_of = {i: s for s, i in self.added.items()}
        self.vocab_size = max(n, max(self.added.values()) + 1)
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.im_start_id, self.im_end_id = self.added[IM_START], self.added[IM_END]
        # The tokenizer is authoritative for padding (the 13b config.json's pad_token_id 0 is not).
        self.pad_token = pad
        self.pad_id = self.added[pad] if pad in self.added else self.sp.piece_to_id(pad)
        self.stop_ids = (self.eos_id, self.im_end_id)
        digest = hashlib.sha256(model_proto + json.dumps(self.added, sort_keys=True).encode()).hexdigest()
        self.identity = f"{digest[:16]}-pad{self.pad_id}"  # part of every cache key

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """A tokenizer.model file, or a folder with tokenizer.model (+ added_tokens.json / tokenizer_config.json)."""
        path = Path(path)
        model_file = path / "tokenizer.model" if path.is_dir() else path
        if not model_file.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {model_file}; pass a tokenizer.model or a model folder")
        added_file, config_file = model_file.parent / "added_tokens.json", model_file.parent / "tokenizer_config.json"
        added = json.loads(added_file.read_text()) if added_file.is_file() else None
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        pad = config.get("pad_token") or PAD
        pad = pad.get("content", PAD) if isinstance(pad, dict) else pad
        decoder = {t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()}
        if added is None and IM_START in decoder:  # newer releases list added tokens only in tokenizer_config.json
            added = {s: decoder[s] for s in (PAD, IM_START, IM_END) if s in decoder}
        return cls(model_file.read_bytes(), added, pad)

    def encode_docs(self, docs: list[list[Segment]], bos: bool = True,
                    start: bool = True) -> tuple[list[int], list[int], list[int]]:
        """Encode many segment lists at once: flat ids, flat teacher flags (0/1), per-document lengths.

        ORCA2.md 6.4: replace '▁' in text by a space, prepend one '▁' to the whole text (start=True), markers become
        their ids, every other piece goes through SentencePiece with the dummy prefix disabled, BOS in front. Only
        segments with marker=True become control ids, so '<|im_end|>' typed by a user stays text."""
        pieces = []  # per document: (text or marker id, supervised)
        for segs in docs:
            # A text that starts with a marker gets its prepended '▁' as a piece of its own.
            doc = [(self.bos_id, False)] * bos + [("▁", False)] * (start and bool(segs) and segs[0].marker)
            for k, s in enumerate(segs):
                text = ("▁" if start and k == 0 else "") + s.text.replace("▁", " ")
                if s.marker or text:
                    doc.append((self.added[s.text] if s.marker else text, s.supervised))
            pieces.append(doc)
        # One SentencePiece call per batch; repeated pieces (system messages, template text) are encoded once.
        unique = list(dict.fromkeys(p for doc in pieces for p, _ in doc if isinstance(p, str)))
        encoded = dict(zip(unique, self.sp_raw.encode(unique, num_threads=1)))
        ids, sup, lengths = [], [], []
        for doc in pieces:
            n0 = len(ids)
            for p, s in doc:
                piece_ids = encoded[p] if isinstance(p, str) else [p]
                ids.extend(piece_ids)
                sup.extend([int(s)] * len(piece_ids))
            lengths.append(len(ids) - n0)
        return ids, sup, lengths

    def encode(self, text: str) -> list[int]:
        """Plain text to ids, no BOS; marker strings inside the text stay ordinary text."""
        return self.encode_docs([[Segment(text, False, False)]], bos=False)[0] if text else []

    def encode_prompt(self, system: str, user: str) -> list[int]:
        """BOS + the model card's prompt (ends after 'assistant'); equals the release tokenizer's ids."""
        return self.encode_docs([fill(PROMPT, {"system": system, "user": user}, False)])[0]

    def encode_followup(self, user: str) -> list[int]:
        """A later user turn, to append after the previous answer and its <|im_end|> (no BOS, no leading '▁')."""
        return self.encode_docs([fill(FOLLOWUP, {"user": user}, False)], bos=False, start=False)[0]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Ids to text; added ids become their marker strings (dropped with skip_special), BOS/EOS are dropped."""
        out, run, at_start = [], [], True
        for i in [*map(int, ids), None]:  # None flushes the last run of text
            if i is not None and not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (0..{self.vocab_size - 1})")
            if i is None or i in self.marker_of:
                if run:  # only text at the very start carries the prepended '▁' that decoding removes
                    out.append((self.sp if at_start else self.sp_raw).decode(run))
                    run = []
                at_start = False
                out.append("" if i is None or skip_special else self.marker_of[i])
            elif i < self.sp.vocab_size():
                run.append(i)
        return "".join(out)


# ---- rendering: conversations, orca2's template, prompt erasing ----


@dataclass
class Conversation:
    system: str                       # the system message the model sees
    turns: list[tuple[str, str]]      # (user, assistant) pairs; every assistant text is a teacher response
    original_system: str | None = None  # the teacher's own system message when it was replaced (prompt erasing)


def _template(render: Callable[..., str], *names: str) -> list:
    """Split one of orca2's render functions into markers and text parts, so the template lives only in orca2.py."""
    text = render(*(f"\x00{n}\x00" for n in names))  # \x00 never occurs in the template itself
    pieces = re.split(f"({re.escape(IM_START)}|{re.escape(IM_END)})", text)
    # a marker stays a string; text becomes (literal, field name, literal, field name, ..., literal)
    return [p if p in (IM_START, IM_END) else tuple(p.split("\x00")) for p in pieces if p]


PROMPT = _template(render_prompt, "system", "user")
FOLLOWUP = _template(render_followup, "user")
TARGET = _template(render_target, "response")


def fill(template: list, values: dict[str, str], supervised: bool) -> list[Segment]:
    """Put values into a template's fields; field text is never split on markers."""
    return [Segment(p, supervised, True) if isinstance(p, str) else
            Segment("".join(values[x] if k % 2 else x for k, x in enumerate(p)), supervised, False) for p in template]


def render_segments(conv: Conversation) -> list[Segment]:
    """System + first user turn + teacher response, then every later turn; all assistant turns are supervised."""
    segs = fill(PROMPT, {"system": conv.system, "user": conv.turns[0][0]}, False)
    for k, (user, response) in enumerate(conv.turns):
        if k:
            segs += fill(FOLLOWUP, {"user": user}, False)
        segs += fill(TARGET, {"response": response}, True)
    return segs


def render_text(conv: Conversation, mark: tuple[str, str] | None = None) -> str:
    """The training string; with mark=(open, close) the supervised text is wrapped for display."""
    out, inside = [], False
    for s in render_segments(conv) + [Segment("", False, False)]:  # the empty sentinel closes a last open run
        if mark and s.supervised != inside:
            out.append(mark[0] if s.supervised else mark[1])
            inside = s.supervised
        out.append(s.text)
    return "".join(out)


def override_system(conv: Conversation, system: str | None) -> Conversation:
    """Prompt erasing: put `system` in place of the teacher's message, keeping the original for inspection."""
    return conv if system is None else replace(conv, system=system, original_system=conv.system)


def source_system(source: Source) -> str | None:
    """The system message a source forces: its own `system`, else the generic one when erasing, else None (keep)."""
    return source.system if source.system is not None else (ERASED_SYSTEM_MESSAGE if source.erase else None)


# ---- input formats: JSONL and parquet ----

FORMATS = {  # name -> (the keys that identify it, what a record looks like), in the order detection tries them
    "preference": ({"preferred_output"}, '{"input": {"messages": [system, user]}, "preferred_output": [assistant]}'),
    "sharegpt": ({"conversations"}, '{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}'),
    "messages": ({"messages"}, '{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}'),
    "openorca": ({"question", "response"}, '{"system_prompt": ..., "question": ..., "response": ...} (OpenOrca)'),
    "flan": ({"inputs", "targets"}, '{"inputs": ..., "targets": ...} (FLAN collection; empty system message)'),
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant"}


def _messages(items: object, role_key: str, text_key: str, what: str) -> list[tuple[str, str]]:
    if not isinstance(items, list) or not items:
        raise ValueError(f"{what} must be a non-empty list")
    out = []
    for k, m in enumerate(items):
        if not isinstance(m, dict) or not isinstance(m.get(text_key), str) or role_key not in m:
            raise ValueError(f"{what}[{k}] must be an object with {role_key!r} and a string {text_key!r}")
        role = SHAREGPT_ROLES.get(m[role_key]) if role_key == "from" else m[role_key]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"{what}[{k}] has unknown {role_key} {m[role_key]!r}")
        out.append((role, m[text_key]))
    return out


def _conversation(messages: list[tuple[str, str]]) -> Conversation:
    """Optional system message, then user/assistant pairs, ending with an assistant reply."""
    system = messages[0][1] if messages[0][0] == "system" else ""
    rest = messages[1:] if messages[0][0] == "system" else messages
    roles = [r for r, _ in rest]
    if not rest or roles != ["user", "assistant"] * (len(rest) // 2):
        raise ValueError(f"expected [system], then alternating user/assistant ending with assistant, got roles {roles}")
    turns = [(rest[k][1], rest[k + 1][1]) for k in range(0, len(rest), 2)]
    if any(not a.strip() for _, a in turns):
        raise ValueError("an assistant reply is empty: there is nothing to train on")
    return Conversation(system, turns)


def parse_record(record: object, fmt: str) -> Conversation:
    """One record (a JSONL line's value, a parquet row) of a known format to a Conversation; ValueError says why not."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if fmt in ("openorca", "flan"):
        keys = ("system_prompt", "question", "response") if fmt == "openorca" else (None, "inputs", "targets")
        values = [record.get(k) if k else "" for k in keys]
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"{fmt} records need string fields {', '.join(filter(None, keys))}: {FORMATS[fmt][1]}")
        return _conversation(list(zip(("system", "user", "assistant"), values)))
    if fmt in ("sharegpt", "messages"):
        key, role, text = ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
        return _conversation(_messages(record.get(key), role, text, key))
    if fmt == "preference":
        inp = record.get("input")
        prompt = _messages(inp.get("messages") if isinstance(inp, dict) else None, "role", "content", "input.messages")
        reply = _messages(record.get("preferred_output"), "role", "content", "preferred_output")
        return _conversation(prompt + reply)
    raise ValueError(f"unknown format {fmt!r}; known: {sorted(FORMATS)}")


def detect_file_format(path: Path) -> tuple[str, list[str]]:
    """Format and metadata columns (other scalar columns: FLAN's task_name, ...) from a schema or first JSONL line."""
    if path.suffix == ".parquet":
        schema = pq.ParquetFile(path).schema_arrow
        where, names, scalar = str(path), schema.names, [f.name for f in schema if not pa.types.is_nested(f.type)]
    else:
        with open(path, "rb") as f:
            lineno, line = next(((k, s) for k, s in enumerate(f, 1) if s.strip()), (0, b"{}"))
        where = f"{path}:{lineno}" if lineno else f"{path} (no examples)"
        try:
            record = json.loads(line)
        except ValueError as e:  # includes UTF-8 errors
            raise ValueError(f"{where}: {e}") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {record!r:.200}")
        names, scalar = list(record), [k for k, v in record.items() if not isinstance(v, (list, dict))]
    fmt = next((f for f, (keys, _) in FORMATS.items() if keys <= set(names)), None)
    if fmt is None:
        raise ValueError(f"{where}: unknown column layout, found columns {names}; expected one of: " +
                         "; ".join(line for _, line in FORMATS.values()))
    return fmt, [c for c in scalar if c not in FORMATS[fmt][0] | {"system_prompt"}]


def file_parts(path: Path, chunk_bytes: int = CHUNK_BYTES, part_rows: int = PART_ROWS) -> list[tuple[int, ...]]:
    """Jobs: JSONL byte ranges ending after a newline; parquet (row group, first, end) record batches of BATCH_ROWS."""
    if path.suffix == ".parquet":
        meta, step = pq.ParquetFile(path).metadata, max(part_rows // BATCH_ROWS, 1)
        batches = [-(-meta.row_group(g).num_rows // BATCH_ROWS) for g in range(meta.num_row_groups)]
        return [(g, b, min(b + step, n)) for g, n in enumerate(batches) for b in range(0, n, step)]
    size, bounds = path.stat().st_size, [0]
    with open(path, "rb") as f:
        while bounds[-1] < size:
            f.seek(min(bounds[-1] + chunk_bytes, size))
            f.readline()
            bounds.append(min(f.tell(), size))
    return list(zip(bounds[:-1], bounds[1:]))


def read_part(path: Path, part: tuple[int, ...]) -> Iterator[list]:
    """A part's records in lists: parquet rows as dicts, BATCH_ROWS at a time; JSONL lines as bytes (parsed later)."""
    if path.suffix == ".parquet":  # streamed; a part that starts inside a row group decodes the batches before it
        group, first, end = part  # no pre-buffering of the whole row group, no arrow threads inside a worker
        batches = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20).iter_batches(
            BATCH_ROWS, row_groups=[group], use_threads=False)
        yield from (batch.to_pylist() for batch in islice(batches, first, end))
        return
    with open(path, "rb") as f:
        f.seek(part[0])
        yield f.read(part[1] - part[0]).removesuffix(b"\n").split(b"\n")  # ~1 MB of lines; the last newline ends one


# ---- tokenizing a file into the cache (several processes), dropping exact duplicates ----


@dataclass
class TokenizedData:
    """One source, tokenized: all documents back to back in memory-mapped arrays."""
    folder: Path             # its cache folder
    ids: np.ndarray          # (tokens,) uint16 (int32 for vocabularies over 65536)
    sup: np.ndarray          # (tokens,) uint8, 1 where the token is a teacher token
    offsets: np.ndarray      # (docs + 1,) int64: document i is ids[offsets[i]:offsets[i + 1]]
    sup_counts: np.ndarray   # (docs,) int32 teacher tokens per document
    meta: dict               # counts and settings, see tokenize_source; metadata columns: folder / columns.parquet


def _read(path: Path, dtype: str) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


def load_tokenized(folder: Path) -> TokenizedData:
    meta = json.loads((folder / "meta.json").read_text())
    arrays = dict(ids=meta["dtype"], sup="uint8", offsets="int64", sup_counts="int32")
    return TokenizedData(folder, *(_read(folder / f"{name}.bin", dtype) for name, dtype in arrays.items()), meta)


def _cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest()[:20]


def _commit(tmp: Path, folder: Path, meta: dict) -> None:
    """Write meta.json last, then move the folder into place: a cache folder with meta.json is complete."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(folder)
    except OSError:  # another process (rank) finished the same cache first; theirs is identical
        shutil.rmtree(tmp)


def _tokenize_part(tok: Tokenizer, job: tuple) -> dict:
    """Per document of one part: ids, teacher flags, length, hash, metadata; per bad record: (number, error)."""
    path, part, fmt, columns, system = job
    out = dict(ids=[], sup=[], lengths=[], hashes=[], columns=[], errors=[], records=0)
    for batch in read_part(path, part):
        convs = []
        for k, record in enumerate(batch, out["records"]):
            if isinstance(record, bytes) and not record.strip():
                continue  # a blank JSONL line holds no example
            try:
                record = json.loads(record) if isinstance(record, bytes) else record  # JSON and UTF-8 errors too
                convs.append(override_system(parse_record(record, fmt), system))
                out["columns"].append({c: v if isinstance(v, str) else json.dumps(v)
                                       for c, v in zip(columns, map(record.get, columns))})
            except ValueError as e:
                out["errors"].append((k, str(e)))
        out["records"] += len(batch)
        ids, sup, lengths = tok.encode_docs([render_segments(c) for c in convs])  # Python lists of one batch only
        out["ids"].append(np.array(ids, dtype=np.uint16 if tok.vocab_size <= 1 << 16 else np.int32))
        out["sup"].append(np.array(sup, np.uint8))
        out["lengths"].append(np.array(lengths, np.int64))
        digests = (hashlib.blake2b(json.dumps([c.system, c.turns]).encode(), digest_size=8).digest() for c in convs)
        out["hashes"].append(np.frombuffer(b"".join(digests), np.uint64))  # exact duplicates: same (system, turns)
    return out | {k: np.concatenate(out[k]) for k in ("ids", "sup", "lengths", "hashes")}


_WORKER: dict = {}  # per tokenizer process: its Tokenizer (loaded once) and the shared abort flag


def _init_worker(model_proto: bytes, added: dict[str, int], pad: str, abort) -> None:
    _WORKER.update(tok=Tokenizer(model_proto, added, pad), abort=abort)


def _worker_part(job: tuple) -> dict | None:
    return None if _WORKER["abort"].is_set() else _tokenize_part(_WORKER["tok"], job)


def tokenize_source(source: Source, tok: Tokenizer, cfg: DataConfig, chunk_bytes: int = CHUNK_BYTES,
                    part_rows: int = PART_ROWS, log: Callable[[str], None] | None = print) -> TokenizedData:
    """Tokenize a JSONL or parquet file into the cache (or open it); duplicates dropped, bad records raise or skip."""
    path = Path(source.path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} of source {source.name!r} does not exist")
    if cfg.on_too_long not in ("drop", "truncate"):
        raise ValueError(f"on_too_long must be 'drop' or 'truncate', got {cfg.on_too_long!r}")
    (fmt, columns), system = detect_file_format(path), source_system(source)
    with open(path, "rb") as f:  # a content hash: the cache follows the bytes, not names or timestamps (~1 GB/s)
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    key = _cache_key("tokens", digest, tok.identity, fmt, system, cfg.max_len, cfg.on_too_long, cfg.skip_bad_lines)
    folder = Path(cfg.cache_dir) / f"tokens-{re.sub(r'[^A-Za-z0-9_.-]', '_', source.name)}-{key}"
    if (folder / "meta.json").is_file():
        return load_tokenized(folder)
    jobs = [(path, part, fmt, columns, system) for part in file_parts(path, chunk_bytes, part_rows)]
    if not jobs:
        raise ValueError(f"{path} has no rows")
    workers = cfg.num_workers or len(os.sched_getaffinity(0))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # forkserver, not fork: forking a process that runs torch or gloo threads can deadlock the child
    ctx = get_context("forkserver")
    abort = ctx.Event()
    pool = ctx.Pool(workers, _init_worker, (tok.model_proto, tok.added, tok.pad_token, abort)) \
        if workers > 1 and len(jobs) > 1 else None
    results = pool.imap(_worker_part, jobs) if pool else (_tokenize_part(tok, job) for job in jobs)
    where = (lambda n: f"{path} row {n}") if path.suffix == ".parquet" else (lambda n: f"{path}:{n + 1}")  # n from 0
    counts, bad, seen, docs = Counter(lines=0, skipped_bad_lines=0, too_long=0, duplicates=0), [], set(), []
    truncate, schema, t0 = cfg.on_too_long == "truncate", pa.schema([(c, pa.string()) for c in columns]), time.time()
    try:
        with open(tmp / "ids.bin", "wb") as f_ids, open(tmp / "sup.bin", "wb") as f_sup, \
                pq.ParquetWriter(tmp / "columns.parquet", schema) as f_columns:
            for r in tqdm(results, total=len(jobs), unit="part", desc=f"tokenizing {path.name}", disable=log is None):
                for k, message in r["errors"]:  # results come in file order, so record numbers add up
                    if not cfg.skip_bad_lines:
                        raise ValueError(f"{where(counts['lines'] + k)}: {message} (--skip_bad_lines skips and "
                                         "counts bad records)")
                    bad += [f"{where(counts['lines'] + k)}: {message}"][:5 - len(bad)]
                # an exact duplicate of an earlier example of the file is dropped (a set of ints: ~70 bytes an example)
                new = np.array([h not in seen and not seen.add(h) for h in r["hashes"].tolist()], bool)
                fits = r["lengths"] <= cfg.max_len  # else dropped, or truncated to its first max_len tokens
                keep, lengths = new & (fits | truncate), r["lengths"]
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
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tofile(tmp / "offsets.bin")
        sup_counts.astype(np.int32).tofile(tmp / "sup_counts.bin")
        meta = dict(counts, source=source.name, path=str(path), format=fmt, system=system, examples=len(lengths),
                    tokens=int(lengths.sum()), supervised_tokens=int(sup_counts.sum()), max_len=cfg.max_len,
                    dropped_too_long=0 if truncate else counts["too_long"], bad_line_examples=bad, columns=columns,
                    truncated=counts["too_long"] if truncate else 0, workers=workers if pool else 1,
                    dtype="uint16" if tok.vocab_size <= 1 << 16 else "int32", seconds=round(time.time() - t0, 2))
        _commit(tmp, folder, meta)
    finally:
        # No pool.terminate(): a worker killed while writing its result can deadlock the pool. After an error the
        # workers skip what is left instead, and close/join returns once the parts in flight are done.
        if pool is not None:
            abort.set()
            pool.close()
            pool.join()
        shutil.rmtree(tmp, ignore_errors=True)
    return load_tokenized(folder)


# ---- packing: best-fit decreasing ----


def pack_best_fit(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit decreasing: each item, longest first, goes to the open pack with the least room that still fits.
    Returns (order, offsets): pack p holds the items order[offsets[p]:offsets[p + 1]]. Open packs are kept in lists
    by free room (an integer <= capacity) and the distinct room values in a sorted list, so a lookup is one bisect."""
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
    order = np.argsort(assign, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(assign, minlength=n_packs))]).astype(np.int64)
    return order, offsets


def mixture_indices(n: int, weight: float, seed: int, source_index: int) -> np.ndarray:
    """Documents kept from one source: weight w keeps round(w * n) of them, floor(w) full copies plus a seeded
    sample without replacement for the rest; drawn once per stage (the same subset every epoch)."""
    if weight < 0:
        raise ValueError(f"mixture weight must be >= 0, got {weight}")
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


def build_stage(sources: list[Source], tok: Tokenizer, cfg: DataConfig | None = None,
                log: Callable[[str], None] | None = print) -> tuple[PackedDataset, dict]:
    """Tokenize, mix and pack one curriculum stage (cached); returns the packs and a stats dict. In a distributed
    job call it on rank 0 first, then barrier, then on the other ranks (they hit the cache)."""
    cfg = cfg or DataConfig()
    if not sources:
        raise ValueError("a stage needs at least one data source")
    datas = [tokenize_source(s, tok, cfg, log=log) for s in sources]
    key = _cache_key("packs", [d.folder.name for d in datas], [s.weight for s in sources], cfg.seed, cfg.max_len)
    folder = Path(cfg.cache_dir) / f"packs-{key}"
    if not (folder / "meta.json").is_file():
        picks = [mixture_indices(len(d.sup_counts), s.weight, cfg.seed, k)
                 for k, (s, d) in enumerate(zip(sources, datas))]
        doc_source = np.concatenate([np.full(len(ix), k, np.int32) for k, ix in enumerate(picks)])
        doc_index = np.concatenate(picks)
        lengths = np.concatenate([np.diff(d.offsets)[ix] for d, ix in zip(datas, picks)])
        if not len(lengths):
            raise ValueError(f"no examples left to train on in {[s.path for s in sources]}")
        order, pack_offsets = pack_best_fit(lengths, cfg.max_len)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, array in (("doc_source", doc_source[order]), ("doc_index", doc_index[order]),
                            ("pack_offsets", pack_offsets)):
            array.tofile(tmp / f"{name}.bin")
        n_packs, n_tokens = len(pack_offsets) - 1, int(lengths.sum())
        meta = dict(max_len=cfg.max_len, examples=len(lengths), tokens=n_tokens, packs=n_packs,
                    supervised_tokens=sum(int(d.sup_counts[ix].sum()) for d, ix in zip(datas, picks)),
                    efficiency=n_tokens / (n_packs * cfg.max_len),
                    per_source=[dict(name=s.name, kept=len(ix), weight=s.weight) for s, ix in zip(sources, picks)])
        _commit(tmp, folder, meta)
    packed = PackedDataset(folder, datas)
    stats = {k: packed.meta[k] for k in ("examples", "tokens", "supervised_tokens", "packs", "efficiency")}
    stats |= {k: sum(d.meta[k] for d in datas) for k in ("dropped_too_long", "truncated", "skipped_bad_lines",
                                                         "duplicates")}
    if log:  # nothing is dropped silently
        for m in (d.meta for d in datas):
            log(f"[data] {m['source']}: {m['examples']:,} examples, {m['tokens']:,} tokens ({m['format']}, "
                f"{m['path']}, {m['seconds']} s by {m['workers']} process(es)); system message "
                f"{'kept' if m['system'] is None else 'replaced'}; {m['skipped_bad_lines']} bad lines skipped; "
                f"{m['too_long']} longer than {cfg.max_len} {'truncated' if m['truncated'] else 'dropped'}; dropped "
                f"{m['duplicates']:,} exact duplicates; metadata columns {m['columns']}")
            for e in m["bad_line_examples"][:3]:
                log(f"[data]   skipped {e}")
        log(f"[data] packed {stats['examples']:,} examples into {stats['packs']:,} rows of {cfg.max_len} (fewest "
            f"possible {-(-stats['tokens'] // cfg.max_len):,}): efficiency {stats['efficiency']:.2%}, supervised "
            f"{stats['supervised_tokens'] / stats['tokens']:.1%}")
    return packed, stats


# ---- batches, epochs, ranks ----


def get_batch(packed: PackedDataset, pack_indices: list[int], seq_len: int, pad_id: int) -> dict:
    """(B, T) long tensors input_ids, labels (already shifted, see the module docstring), position_ids; plus
    num_tokens and num_supervised (ints). The padding tail is one extra document (positions 0, 1, ...), so it
    never attends to real tokens, and its labels are -100."""
    B, T = len(pack_indices), seq_len
    input_ids = np.full((B, T), pad_id, np.int64)
    labels = np.full((B, T), -100, np.int64)
    position_ids = np.zeros((B, T), np.int64)
    arange, num_tokens = np.arange(T), 0
    for b, p in enumerate(pack_indices):
        t = 0
        for ids, sup in packed.documents(p):
            n = len(ids)
            assert t + n <= T, f"pack {p} holds more than seq_len={T} tokens"
            input_ids[b, t:t + n] = ids
            # ids may be uint16: widen before -100 goes in. The document's last label stays -100.
            labels[b, t:t + n - 1] = np.where(sup[1:] != 0, ids[1:].astype(np.int64), -100)
            position_ids[b, t:t + n] = arange[:n]
            t += n
        position_ids[b, t:] = arange[:T - t]
        num_tokens += t
    return dict(input_ids=torch.from_numpy(input_ids), labels=torch.from_numpy(labels),
                position_ids=torch.from_numpy(position_ids), num_tokens=num_tokens,
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


def main() -> None:
    if sys.argv[1:2] == ["decontaminate"]:  # python data.py decontaminate --train ...: see decontaminate.py
        import decontaminate
        return decontaminate.main(sys.argv[2:])
    parser = argparse.ArgumentParser(description="Show one rendered example of a data file and its statistics.")
    parser.add_argument("file", help="JSONL or parquet data file (OpenOrca, FLAN, ShareGPT, messages or preference)")
    parser.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer.model or a model folder")
    parser.add_argument("--erase", action="store_true", help="prompt erasing: use the generic system message")
    parser.add_argument("--system", default=None, help="force a system message: 'cautious', 'empty' or literal text")
    for f in fields(DataConfig):  # every DataConfig field is an option, with its default from the dataclass
        kind = argparse.BooleanOptionalAction if f.type is bool else None
        parser.add_argument(f"--{f.name}", type=None if kind else type(f.default), action=kind, default=f.default)
    args = parser.parse_args()
    cfg = DataConfig(**{f.name: getattr(args, f.name) for f in fields(DataConfig)})
    path = Path(args.file)
    source = Source(path.stem, str(path), erase=args.erase, system=SYSTEM_MESSAGES.get(args.system, args.system))
    tok = Tokenizer.from_pretrained(args.tokenizer)
    # The first example exactly as trained on, with the supervised (teacher) text inside ⟦ ⟧.
    fmt, _ = detect_file_format(path)
    first = next(r for batch in read_part(path, file_parts(path)[0]) for r in batch  # a row, or a non-blank line
                 if not isinstance(r, bytes) or r.strip())
    conv = override_system(parse_record(json.loads(first) if isinstance(first, bytes) else first, fmt),
                           source_system(source))
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
    main()
