"""Data files as published, read strictly: layouts, JSON lines, parquet rows, parts (no torch: shared by commands).

    python formats.py FILE.jsonl       # its layout, metadata columns, parts, and the first record as a Conversation
"""

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cli import UserError

CHUNK_BYTES = 1 << 20  # bytes of JSONL per part
PART_ROWS = 8192  # parquet rows per part: a row group is cut into slices of at most this
BATCH_ROWS = 1024  # records a worker encodes at once: bounds its Python objects


@dataclass
class Conversation:
    system: str                       # the system message the model sees
    turns: list[tuple[str, str]]      # (user, assistant) pairs; every assistant text is a teacher response
    original_system: str | None = None  # the teacher's own system message when it was replaced (prompt erasing)


FORMATS = {  # name -> (the keys that identify it, what a record looks like), in the order detection tries them
    "preference": ({"preferred_output"}, '{"input": {"messages": [system, user]}, "preferred_output": [assistant]}'),
    "sharegpt": ({"conversations"}, '{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}'),
    "messages": ({"messages"}, '{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}'),
    "openorca": ({"question", "response"}, '{"system_prompt": ..., "question": ..., "response": ...} (OpenOrca)'),
    "flan": ({"inputs", "targets"}, '{"inputs": ..., "targets": ...} (FLAN; empty system message)'),
    "qa": ({"question", "answer"}, '{"question": ..., "answer": ...} (GSM8K-style tasks; empty system message)')}
ROLES = dict(system="system", human="user", user="user", gpt="assistant", assistant="assistant", chatgpt="assistant")


def _json_type(value: object) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _short(value: object) -> str:
    return repr(value) if isinstance(value, str) and len(value) <= 40 else _json_type(value)


def read_json(line: bytes) -> object:
    """Strict JSON of one UTF-8 line: ValueError (never another exception) for bad UTF-8, NaN, syntax, depth, size."""
    def refuse(name: str):
        raise ValueError(f"{name} is not valid JSON (write null or a string)")

    def integer(text: str) -> int:
        if len(text) > 4000:  # Python's int() refuses over 4300 digits, with advice meant for programmers
            raise ValueError(f"a number of {len(text)} digits is too long to read")
        return int(text)

    hint = "; the file looks UTF-16 encoded: save it as UTF-8" if b"\x00" in line else ""  # NUL beside each ASCII byte
    try:
        return json.loads(line.decode("utf-8"), parse_constant=refuse, parse_int=integer)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte {e.start}){hint}") from None
    except json.JSONDecodeError as e:  # some messages end in " at" ("Unterminated string starting at")
        raise ValueError(f"not valid JSON: {e.msg.removesuffix(' at')} at column {e.colno}{hint}") from None


def _strings(obj: dict, keys: Iterable[str], need: str) -> None:
    for key in keys:
        if key not in obj:
            raise ValueError(f"{need}; this one has no {key!r}")
        if not isinstance(obj[key], str):
            raise ValueError(f"{need}; got {_json_type(obj[key])} for {key!r}")


def _messages(items: object, role_key: str, text_key: str, what: str) -> list[tuple[str, str]]:
    if not isinstance(items, list) or not items:
        raise ValueError(f"{what} must be a non-empty list, got {_short(items) if items != [] else 'an empty one'}")
    known = [r for r, role in ROLES.items() if role_key != "role" or r == role]  # the messages layout: exact names
    for k, m in enumerate(items):
        need = f"{what}[{k}] must be an object with strings {role_key!r} and {text_key!r}"
        if not isinstance(m, dict):
            raise ValueError(f"{need}, got {_short(m)}")
        _strings(m, (role_key, text_key), need)
        if m[role_key] not in known:
            raise ValueError(f"{what}[{k}] has unknown {role_key} {_short(m[role_key])}; known: {', '.join(known)}")
    return [(ROLES[m[role_key]], m[text_key]) for m in items]


def _conversation(messages: list[tuple[str, str]]) -> Conversation:
    system, rest = (messages[0][1], messages[1:]) if messages[0][0] == "system" else ("", messages)
    if not rest or [r for r, _ in rest] != ["user", "assistant"] * (len(rest) // 2):
        raise ValueError("expected [system], then alternating user/assistant ending with assistant, got roles "
                         f"{[r for r, _ in messages]}")
    if any(re.search("[\ud800-\udfff]", text) for _, text in messages):  # json.loads accepts lone \ud800 escapes
        raise ValueError("text holds an unpaired surrogate (a lone \\ud800-\\udfff escape)")
    turns = [(rest[k][1], rest[k + 1][1]) for k in range(0, len(rest), 2)]
    if any(not a.strip() for _, a in turns):
        raise ValueError("an assistant reply is empty: there is nothing to train on")
    return Conversation(system, turns)


def parse_record(record: dict, fmt: str) -> Conversation:
    """A record (from read_record) of a known format to a Conversation, or a ValueError (the caller adds where)."""
    if fmt in ("openorca", "flan", "qa"):
        keys = {"openorca": ("system_prompt", "question", "response"), "flan": (None, "inputs", "targets"),
                "qa": (None, "question", "answer")}[fmt]
        need = f"{fmt} records need string fields {', '.join(filter(None, keys))} (layout: {FORMATS[fmt][1]})"
        _strings(record, filter(None, keys), need)
        return _conversation(list(zip(("system", "user", "assistant"), [record[k] if k else "" for k in keys])))
    if fmt in ("sharegpt", "messages"):
        key, role, text = ("conversations", "from", "value") if fmt == "sharegpt" else ("messages", "role", "content")
        if key not in record:
            raise ValueError(f"{fmt} records need a {key!r} list; this one has none (layout: {FORMATS[fmt][1]})")
        return _conversation(_messages(record[key], role, text, key))
    inp = record.get("input")  # the preference layout
    if not isinstance(inp, dict) or "messages" not in inp:
        raise ValueError(f"'input' must be an object holding 'messages', got {_short(inp)} (layout: {FORMATS[fmt][1]})")
    prompt = _messages(inp["messages"], "role", "content", "input.messages")
    return _conversation(prompt + _messages(record.get("preferred_output"), "role", "content", "preferred_output"))


def detect_file_format(path: Path) -> tuple[str, list[str]]:
    """Format and metadata columns (other scalar columns: FLAN's task_name, ...) from a schema or first JSONL line."""
    if not path.is_file():
        raise UserError(f"{path}: {'a folder; pass a JSONL or parquet file' if path.is_dir() else 'no such data file'}")
    if path.suffix == ".parquet":
        try:
            schema = pq.ParquetFile(path).schema_arrow
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{path}: not a readable parquet file ({e})") from None
        where, names, scalar = str(path), schema.names, [f.name for f in schema if not pa.types.is_nested(f.type)]
    else:
        with open(path, "rb") as f:
            lineno, line = next(((k, s.removesuffix(b"\n")) for k, s in enumerate(f, 1) if s.strip()), (0, b""))
        if not lineno:
            raise UserError(f"{path}: no examples: {'only blank lines' if path.stat().st_size else 'an empty file'}")
        where = f"{path}:{lineno}"
        try:  # a UTF-8 BOM is fine; read_record requires a JSON object
            record = read_record(read_json(line.removeprefix(b"\xef\xbb\xbf") if lineno == 1 else line))
        except ValueError as e:
            raise UserError(f"{where}: {e}") from None
        names, scalar = list(record), [k for k, v in record.items() if not isinstance(v, (list, dict))]
    fmt = next((f for f, (keys, _) in FORMATS.items() if keys <= set(names)), None)
    if fmt is None:
        raise UserError(f"{where}: unknown column layout, found columns {names}; expected one of: " +
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
        try:
            batches = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20).iter_batches(
                BATCH_ROWS, row_groups=[group], use_threads=False)
            yield from (batch.to_pylist() for batch in islice(batches, first, end))
        except (pa.ArrowException, OSError) as e:  # damaged pages: the footer was fine, the data is not
            raise UserError(f"{path}: row group {group} cannot be read ({e}); the file is damaged") from None
        return
    with open(path, "rb") as f:
        f.seek(part[0])
        data = f.read(part[1] - part[0]).removesuffix(b"\n")  # ~1 MB of lines
    yield (data.removeprefix(b"\xef\xbb\xbf") if part[0] == 0 else data).split(b"\n")  # a UTF-8 byte order mark


def read_record(record: bytes | dict) -> dict | None:
    """A JSONL line (bytes) or a parquet row as a record; None for a blank line (a `null` line is an error)."""
    if isinstance(record, bytes) and not record.strip():
        return None
    record = read_json(record) if isinstance(record, bytes) else record
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {_json_type(record)}")
    return record


if __name__ == "__main__":
    import sys
    if sys.argv[1:2] in ([], ["-h"], ["--help"]):
        print(__doc__)
        raise SystemExit(0)
    path = Path(sys.argv[1])
    fmt, columns = detect_file_format(path)
    parts = file_parts(path)
    first = next(r for batch in read_part(path, parts[0]) for r in map(read_record, batch) if r is not None)
    print(f"{path}: layout {fmt}, metadata columns {columns}, {len(parts)} part(s)\n{parse_record(first, fmt)}")
