"""One command-line parser for every command, and one way to report a user's mistake.

    python train.py --help                               # every option: type, default, meaning
    python train.py --config=configs/orca2-7b.json --micro_batch 1 --activation_checkpointing=yes

A command is a config dataclass (its field defaults and comments are the options and --help) and main(cfg), which
Python callers use directly. parse(): defaults < --config FILE.json < --key=value (or --key value), left to right;
booleans true/false/1/0/yes/no, lists and dicts JSON, unknown keys an error naming the known ones. A mistake in what
the user gave raises UserError; run() prints it as one line `error: <where>: <what to do>` and exits 2.
"""

import dataclasses
import io
import inspect
import json
import math
import sys
import tokenize
from pathlib import Path

class UserError(ValueError):
    """Something the user supplied is wrong; the message says where and what to do. Printed without a traceback."""


def field_comments(cls: type) -> dict[str, str]:
    """field name -> what the class source says of it: the comment beside it and the comment lines indented below
    that; a field without one gets the heading above it (a comment line at the fields' indentation, "# optimizer")."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # a subclass's comment wins over its parent's
        if not dataclasses.is_dataclass(klass):
            continue
        own: dict[str, list[str]] = {}
        headed: dict[str, str] = {}
        heading, field, body, line_start, after_heading = [], None, None, True, False
        for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(klass)).readline):
            if tok.type == tokenize.INDENT and body is None:
                body = tok.end[1]  # the class body's indentation: where field names start
            elif tok.type == tokenize.COMMENT:
                text = tok.string.lstrip("#").strip()
                if field and (not line_start or tok.start[1] > body):  # beside the field, or a continuation line
                    own[field].append(text)
                elif line_start and tok.start[1] == body:  # a heading for the fields below it
                    heading = heading + [text] if after_heading else [text]
                    field, after_heading = None, True
            elif line_start and tok.start[1] == body and tok.type in (tokenize.NAME, tokenize.OP, tokenize.STRING):
                field = tok.string if tok.string in klass.__dataclass_fields__ else None  # a field, a def, ...
                after_heading = False
                if field:
                    own[field], headed[field] = [], " ".join(heading)
            line_start = tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT)
        for name in own:
            text = " ".join(own[name]) or headed[name]
            if text or name not in comments:
                comments[name] = text
    return comments


def type_name(t) -> str:
    return getattr(t, "__name__", str(t))


KINDS = {"int": "an integer", "float": "a number", "str": "a string", "list": "a JSON list", "dict": "a JSON object"}


def convert(key: str, value, t, where: str):
    """A command-line string or a JSON value as the field's type; UserError when it is not one."""
    base = getattr(t, "__origin__", t)  # list[str] -> list
    if isinstance(value, str) and base is not str:
        text = value.strip().lower()
        if base is bool:
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise UserError(f"{where}: {key} takes true/false/1/0/yes/no, got {value!r}")
            return text in ("true", "1", "yes")
        try:
            value = json.loads(value) if base in (list, dict) else base(value)
        except ValueError:
            raise UserError(f"{where}: {key} takes {KINDS[type_name(base)]}, got {value!r}") from None
    ok = isinstance(value, base) and (base is bool or not isinstance(value, bool))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise UserError(f"{where}: {key} takes {KINDS.get(type_name(base), type_name(t))}, got {value!r}")
    if base is float and not math.isfinite(value):  # float("nan") parses, and a NaN learning rate trains on silently
        raise UserError(f"{where}: {key} takes a finite number, got {value!r}")
    item = getattr(t, "__args__", (object,))[0]  # list[str]: every element a str
    if base is list and not all(isinstance(v, item) for v in value):
        raise UserError(f"{where}: {key} takes a JSON list of {type_name(item)} values, got {value!r}")
    return value


def help_text(cls: type, doc: str) -> str:
    comments = field_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        option = f"  --{f.name}  ({type_name(f.type)}, default {json.dumps(default)})"
        rows.append(f"{option}\n      {comments.get(f.name, '')}")
    return (doc or "").strip() + "\n\nOptions (--key=value or --key value; --config FILE.json sets many):\n" + \
        "\n".join(rows) + "\n"


def parse(cls: type, argv: list[str], doc: str = "", positional: tuple[str, ...] = ()):
    """A `cls` instance from argv: defaults, then --config files and --key=value in order; positional arguments fill
    the fields named in `positional`. --help prints `doc` and every field, then exits 0."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, doc))
        raise SystemExit(0)
    values, free, i = {}, list(positional), 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            if not free:
                raise UserError(f"unexpected argument {arg!r}; options are --key=value (see --help)")
            values[free.pop(0)] = arg
            continue
        key, eq, raw = arg[2:].partition("=")
        if key != "config" and key not in types:
            raise UserError(f"unknown option --{key}; known options: {', '.join('--' + k for k in types)}")
        if not eq:
            if i >= len(argv):
                raise UserError(f"--{key} needs a value")
            raw, i = argv[i], i + 1
        if key == "config":
            values.update(read_config_file(raw, types))
        else:
            values[key] = convert(f"--{key}", raw, types[key], "command line")
    if free:
        raise UserError(f"missing argument(s): {', '.join(free)} (see --help)")
    return cls(**values)


def read_config_file(path: str, types: dict) -> dict:
    try:
        loaded = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"--config {path}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"--config {path}: expected a JSON object of option: value")
    for key in loaded:
        if key not in types:
            raise UserError(f"{path}: unknown key {key!r}; known keys: {', '.join(types)}")
    return {k: convert(k, v, types[k], path) for k, v in loaded.items()}


def run(main, cls: type, doc: str, argv: list[str] | None = None, positional: tuple[str, ...] = ()):
    """The command-line door of a command: parse, call main(cfg), turn UserError and Ctrl-C into one line."""
    try:
        return main(parse(cls, sys.argv[1:] if argv is None else argv, doc, positional))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
