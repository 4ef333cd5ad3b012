"""Orca 2 training data: tokenizer, chat rendering, loss masks, packing, batches and the on-disk cache.

    python data.py ../shared/data/orca-samples/orca_dpo_pairs_validation.jsonl        # one example + statistics
    python data.py FILE --erase --max_len 2048 --on_too_long truncate --skip_bad_lines
    python -c "import data; print(data.benchmark())"                                    # 100k examples, cold and cached

Label contract (what train.py relies on). A packed row holds whole documents back to back, each starting at
position 0. `labels[t]` is the target of the logits at position t, i.e. the NEXT token, already shifted:
labels[t] = input_ids[t + 1] when token t + 1 is a teacher token of the same document, else -100. So the last token
of every document is -100 (no label ever points at the next document's first token), and train.py computes
`cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100, reduction="sum")` with no shifting of its own.
Teacher tokens are exactly `"\\n" + response + "<|im_end|>"` of every assistant turn (ORCA2.md 5.1).

Pipeline: JSONL file -> Conversation (format detected per file) -> segments of orca2's template -> token ids plus a
"teacher token" flag per token -> memory-mapped arrays in the cache -> best-fit-decreasing packs -> get_batch.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import time
from bisect import bisect_left, insort
from dataclasses import dataclass, fields, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Callable, Iterable, NamedTuple

import numpy as np
import sentencepiece as spm
import torch
from tqdm import tqdm

from orca2 import (ERASED_SYSTEM_MESSAGE, IM_END, IM_START, PAD, PAD_ID, SPECIAL_IDS, SYSTEM_MESSAGES, Source,
                   render_followup, render_prompt, render_target)

ROOT = Path(__file__).resolve().parent
DEFAULT_TOKENIZER = ROOT.parent / "shared/data/llama2-tokenizer/tokenizer.model"
SAMPLE_DATA = ROOT.parent / "shared/data/orca-samples/orca_dpo_pairs_validation.jsonl"
CACHE_VERSION = 1  # bump whenever rendering, tokenization or the cache layout changes
CHUNK_BYTES = 1 << 20  # bytes of JSONL per tokenizer job


@dataclass
class DataConfig:
    max_len: int = 4096            # tokens per packed row; also the longest example kept (published: 4096)
    on_too_long: str = "drop"      # "drop" or "truncate" examples longer than max_len; counted either way
    skip_bad_lines: bool = False   # skip malformed JSONL lines (counted, reported) instead of raising
    seed: int = 0                  # seeds the mixture sampling of sources with weight != 1
    num_workers: int = 0           # tokenizer processes; 0 = one per available CPU core
    cache_dir: str = str(ROOT / "cache")  # memory-mapped tokens and packs, keyed by inputs and settings


# ---- tokenizer ----

# sentencepiece has no switch for the dummy prefix, so we append a second NormalizerSpec (ModelProto field 3) holding
# only add_dummy_prefix = false (field 3, varint 0). Protobuf merges repeated message fields: only that flag changes.
NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


def default_added_tokens(sp_vocab_size: int) -> dict[str, int]:
    """The release's added tokens in orca2's order ([PAD], <|im_start|>, <|im_end|>) right after the SentencePiece
    vocabulary: 32000-32002 for LLaMA-2 (= orca2.SPECIAL_IDS), 512-514 for the tiny tok512 model."""
    return {s: sp_vocab_size + SPECIAL_IDS[s] - PAD_ID for s in (PAD, IM_START, IM_END)}


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
        self.added = dict(added_tokens) if added_tokens else default_added_tokens(n)  # marker string -> id
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
    parts = []
    for piece in re.split(f"({re.escape(IM_START)}|{re.escape(IM_END)})", text):
        if piece in (IM_START, IM_END):
            parts.append(piece)
        elif piece:
            parts.append(tuple(piece.split("\x00")))  # literal, field name, literal, field name, ..., literal
    return parts


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


# ---- input formats ----

FORMATS = {  # name -> (the keys that identify it, what a line looks like), in the order detection tries them
    "preference": ({"preferred_output"}, '{"input": {"messages": [system, user]}, "preferred_output": [assistant]}'),
    "sharegpt": ({"conversations"}, '{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}'),
    "messages": ({"messages"}, '{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}'),
    "openorca": ({"question", "response"}, '{"system_prompt": ..., "question": ..., "response": ...}'),
}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant"}


def detect_format(record: object) -> str:
    """The format of one parsed JSONL record (a file's format is that of its first record)."""
    for fmt, (keys, _) in FORMATS.items():
        if isinstance(record, dict) and keys <= set(record):
            return fmt
    raise ValueError("unknown record layout; expected one of: " + "; ".join(line for _, line in FORMATS.values()))


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
    """One parsed JSONL record of a known format to a Conversation; ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if fmt == "openorca":
        values = [record.get(k) for k in ("system_prompt", "question", "response")]
        if not all(isinstance(v, str) for v in values):
            raise ValueError(f"openorca lines need string fields system_prompt, question, response: {FORMATS[fmt][1]}")
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


def detect_file_format(path: Path) -> str:
    """A file's format, from its first non-blank line."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    return detect_format(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{path}:{lineno}: {e}") from None
    raise ValueError(f"{path} has no examples")


# ---- tokenizing a file into the cache (several processes) ----


@dataclass
class TokenizedData:
    """One source, tokenized: all documents back to back in memory-mapped arrays."""
    folder: Path             # its cache folder
    ids: np.ndarray          # (tokens,) uint16 (int32 for vocabularies over 65536)
    sup: np.ndarray          # (tokens,) uint8, 1 where the token is a teacher token
    offsets: np.ndarray      # (docs + 1,) int64: document i is ids[offsets[i]:offsets[i + 1]]
    sup_counts: np.ndarray   # (docs,) int32 teacher tokens per document
    meta: dict               # counts and settings, see tokenize_source


def _read(path: Path, dtype: str) -> np.ndarray:
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


def load_tokenized(folder: Path) -> TokenizedData:
    meta = json.loads((folder / "meta.json").read_text())
    return TokenizedData(folder, _read(folder / "ids.bin", meta["dtype"]), _read(folder / "sup.bin", "uint8"),
                         _read(folder / "offsets.bin", "int64"), _read(folder / "sup_counts.bin", "int32"), meta)


def _cache_key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts]).encode()).hexdigest()[:20]


def _commit(tmp: Path, folder: Path, meta: dict) -> None:
    """Write meta.json last, then move the folder into place: a cache folder with meta.json is complete."""
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        tmp.rename(folder)
    except OSError:  # another process (rank) finished the same cache first; theirs is identical
        shutil.rmtree(tmp)


def _tokenize_chunk(tok: Tokenizer, job: tuple) -> dict:
    """Parse, render and tokenize the lines in one byte range of a file."""
    path, begin, end, fmt, system, max_len, truncate = job
    with open(path, "rb") as f:
        f.seek(begin)
        data = f.read(end - begin)
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()  # a final newline ends the last line; it does not start another
    convs, errors = [], []
    for k, line in enumerate(lines):
        if not line.strip():
            continue  # blank lines hold no example
        try:
            convs.append(override_system(parse_record(json.loads(line), fmt), system))
        except ValueError as e:  # includes JSON and UTF-8 errors
            errors.append((k, str(e)))
    ids, sup, lengths = tok.encode_docs([render_segments(c) for c in convs])
    ids = np.array(ids, dtype=np.uint16 if tok.vocab_size <= 1 << 16 else np.int32)
    sup, lengths = np.array(sup, np.uint8), np.array(lengths, np.int64)
    too_long = int((lengths > max_len).sum())
    if too_long:  # keep the first max_len tokens of each document, or only the documents that fit
        pos = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = pos < max_len if truncate else np.repeat(lengths <= max_len, lengths)
        ids, sup = ids[keep], sup[keep]
        lengths = np.minimum(lengths, max_len) if truncate else lengths[lengths <= max_len]
    starts = np.cumsum(lengths) - lengths
    sup_counts = np.add.reduceat(sup, starts, dtype=np.int32) if len(lengths) else np.zeros(0, np.int32)
    return dict(ids=ids, sup=sup, lengths=lengths, sup_counts=sup_counts, lines=len(lines), errors=errors,
                too_long=too_long)


_WORKER: dict = {}  # per tokenizer process: its Tokenizer (loaded once) and the shared abort flag


def _init_worker(model_proto: bytes, added: dict[str, int], pad: str, abort) -> None:
    _WORKER.update(tok=Tokenizer(model_proto, added, pad), abort=abort)


def _worker_chunk(job: tuple) -> dict | None:
    return None if _WORKER["abort"].is_set() else _tokenize_chunk(_WORKER["tok"], job)


def _byte_ranges(path: Path, chunk_bytes: int) -> list[tuple[int, int]]:
    """Split a file into ranges of about chunk_bytes that end right after a newline."""
    size, bounds = path.stat().st_size, [0]
    with open(path, "rb") as f:
        while bounds[-1] < size:
            f.seek(min(bounds[-1] + chunk_bytes, size))
            f.readline()
            bounds.append(min(f.tell(), size))
    return list(zip(bounds[:-1], bounds[1:]))


def tokenize_source(source: Source, tok: Tokenizer, cfg: DataConfig, chunk_bytes: int = CHUNK_BYTES,
                    log: Callable[[str], None] | None = print) -> TokenizedData:
    """Tokenize one source file into the cache (or open the cached copy); bad lines raise unless skipped."""
    path = Path(source.path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} of source {source.name!r} does not exist")
    if cfg.on_too_long not in ("drop", "truncate"):
        raise ValueError(f"on_too_long must be 'drop' or 'truncate', got {cfg.on_too_long!r}")
    fmt, system = detect_file_format(path), source_system(source)
    with open(path, "rb") as f:  # a content hash: the cache follows the bytes, not names or timestamps (~1 GB/s)
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    key = _cache_key("tokens", digest, tok.identity, fmt, system, cfg.max_len, cfg.on_too_long,
                     cfg.skip_bad_lines)
    folder = Path(cfg.cache_dir) / f"tokens-{re.sub(r'[^A-Za-z0-9_.-]', '_', source.name)}-{key}"
    if (folder / "meta.json").is_file():
        return load_tokenized(folder)
    jobs = [(str(path), a, b, fmt, system, cfg.max_len, cfg.on_too_long == "truncate")
            for a, b in _byte_ranges(path, chunk_bytes)]
    workers = cfg.num_workers or len(os.sched_getaffinity(0))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    # forkserver, not fork: forking a process that runs torch or gloo threads can deadlock the child
    ctx = get_context("forkserver")
    abort = ctx.Event()
    pool = ctx.Pool(workers, _init_worker, (tok.model_proto, tok.added, tok.pad_token, abort)) \
        if workers > 1 and len(jobs) > 1 else None
    results = pool.imap(_worker_chunk, jobs) if pool else (_tokenize_chunk(tok, job) for job in jobs)
    line0, skipped, too_long, bad, lengths, sup_counts, t0 = 1, 0, 0, [], [], [], time.time()
    try:
        with open(tmp / "ids.bin", "wb") as f_ids, open(tmp / "sup.bin", "wb") as f_sup:
            for r in tqdm(results, total=len(jobs), unit="chunk", desc=f"tokenizing {path.name}", disable=log is None):
                for k, message in r["errors"]:  # results come in file order, so line numbers add up
                    if not cfg.skip_bad_lines:
                        raise ValueError(f"{path}:{line0 + k}: {message} (--skip_bad_lines skips and counts bad lines)")
                    skipped += 1
                    bad += [f"{path}:{line0 + k}: {message}"] if len(bad) < 5 else []
                line0, too_long = line0 + r["lines"], too_long + r["too_long"]
                f_ids.write(r["ids"].tobytes())
                f_sup.write(r["sup"].tobytes())
                lengths.append(r["lengths"])
                sup_counts.append(r["sup_counts"])
        lengths, sup_counts = np.concatenate(lengths), np.concatenate(sup_counts)
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tofile(tmp / "offsets.bin")
        sup_counts.astype(np.int32).tofile(tmp / "sup_counts.bin")
        meta = dict(source=source.name, path=str(path), format=fmt, system=system, lines=line0 - 1,
                    examples=len(lengths), tokens=int(lengths.sum()), supervised_tokens=int(sup_counts.sum()),
                    skipped_bad_lines=skipped, bad_line_examples=bad, too_long=too_long,
                    dropped_too_long=0 if cfg.on_too_long == "truncate" else too_long,
                    truncated=too_long if cfg.on_too_long == "truncate" else 0, max_len=cfg.max_len,
                    dtype="uint16" if tok.vocab_size <= 1 << 16 else "int32", seconds=round(time.time() - t0, 2))
        _commit(tmp, folder, meta)
    finally:
        # No pool.terminate(): a worker killed while writing its result can deadlock the pool. After an error the
        # workers skip what is left instead, and close/join returns once the chunks in flight are done.
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
    by free room (an integer <= capacity) and the distinct room values in a sorted list, so a lookup is one bisect.
    """
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
    stats |= {k: sum(d.meta[k] for d in datas) for k in ("dropped_too_long", "truncated", "skipped_bad_lines")}
    if log:  # nothing is dropped silently
        for m in (d.meta for d in datas):
            log(f"[data] {m['source']}: {m['examples']:,} examples, {m['tokens']:,} tokens ({m['format']}, "
                f"{m['path']}); system message {'kept' if m['system'] is None else 'replaced'}; "
                f"{m['skipped_bad_lines']} bad lines skipped; {m['too_long']} longer than {cfg.max_len} "
                f"{'truncated' if m['truncated'] else 'dropped'}")
            for e in m["bad_line_examples"][:3]:
                log(f"[data]   skipped {e}")
        log(f"[data] packed {stats['examples']:,} examples into {stats['packs']:,} rows of {cfg.max_len}: "
            f"efficiency {stats['efficiency']:.2%}, supervised {stats['supervised_tokens'] / stats['tokens']:.1%}")
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


# ---- benchmark and command line ----


def benchmark(num_examples: int = 100_000, workdir: str = "/tmp/orca2-data-bench", num_workers: int = 0) -> dict:
    """Seconds to tokenize and pack num_examples Orca-style examples (the shipped sample's lines, each made unique
    so nothing is encoded only once), cold and then from the cache."""
    work, lines = Path(workdir), [line for line in SAMPLE_DATA.read_text().splitlines() if line.strip()]
    shutil.rmtree(work / "cache", ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"orca-{num_examples}.jsonl"
    with open(path, "w") as f:
        for k in range(num_examples):
            r = json.loads(lines[k % len(lines)])
            r["input"]["messages"][-1]["content"] = f"({k}) " + r["input"]["messages"][-1]["content"]
            r["preferred_output"][0]["content"] += f" ({k})"
            f.write(json.dumps(r) + "\n")
    tok = Tokenizer.from_pretrained(DEFAULT_TOKENIZER)
    cfg = DataConfig(cache_dir=str(work / "cache"), num_workers=num_workers)
    times = [time.time()]
    for _ in range(2):  # cold, then cached
        _, stats = build_stage([Source("bench", str(path), erase=True)], tok, cfg, log=None)
        times.append(time.time())
    return dict(examples=stats["examples"], tokens=stats["tokens"], mbytes=round(path.stat().st_size / 1e6, 1),
                cold_s=round(times[1] - times[0], 2), cached_s=round(times[2] - times[1], 2),
                efficiency=round(stats["efficiency"], 5))


def main() -> None:
    parser = argparse.ArgumentParser(description="Show one rendered example of a data file and its statistics.")
    parser.add_argument("file", help="JSONL data file (OpenOrca, ShareGPT, messages or preference layout)")
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
    fmt = detect_file_format(path)
    with open(path, "rb") as f:
        first = next(line for line in f if line.strip())
    conv = override_system(parse_record(json.loads(first), fmt), source_system(source))
    ids, sup, _ = tok.encode_docs([render_segments(conv)])
    print(f"==== first example of {path} (format {fmt}); supervised text inside ⟦ ⟧ ====")
    if conv.original_system is not None:
        print(f"[system message replaced; the teacher saw: {conv.original_system!r}]")
    print(render_text(conv, mark=("⟦", "⟧")))
    print(f"==== {len(ids)} tokens, {sum(sup)} supervised ====\n")

    packed, stats = build_stage([source], tok, cfg)
    lengths = np.diff(packed.sources[0].offsets)
    print(f"\nexamples {stats['examples']:,} (dropped too long {stats['dropped_too_long']}, truncated "
          f"{stats['truncated']}, skipped bad lines {stats['skipped_bad_lines']})\ntokens {stats['tokens']:,} (mean "
          f"{lengths.mean():.0f}, max {lengths.max()}), supervised fraction "
          f"{stats['supervised_tokens'] / stats['tokens']:.3f}")
    print(f"packing: {stats['packs']:,} rows of {cfg.max_len}, efficiency {stats['efficiency']:.2%} "
          f"(fewest possible rows: {-(-stats['tokens'] // cfg.max_len):,})")
    edges = [0] + [2 ** k for k in range(6, 16) if 2 ** k < cfg.max_len] + [cfg.max_len]
    counts, _ = np.histogram(lengths, bins=edges)
    print("length histogram (tokens per example):")
    for a, b, c in zip(edges[:-1], edges[1:], counts):
        print(f"  {a + 1:>5}-{b:<5} {c:>8,}  {'#' * round(40 * c / max(counts.max(), 1))}")


if __name__ == "__main__":
    main()
