"""One command-line parser for every command, and one way to report a user's mistake.

    python train.py --help                               # every option: type, default, meaning
    python train.py --config=configs/orca2-7b.json --micro_batch 1 --activation_checkpointing=yes

A command is a config dataclass (its fields' defaults and comments are the options and --help) and main(cfg), which
Python callers use directly. run() prints a UserError as one line `error: <where>: <what to do>` and exits 2.
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
    """field name -> the comment beside it plus comment lines indented below it (a heading belongs to no field)."""
    comments: dict[str, str] = {}
    for klass in filter(dataclasses.is_dataclass, reversed(cls.__mro__)):  # parents first: a subclass's comment wins
        own, field, body = {}, None, None
        for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(klass)).readline):
            if tok.type == tokenize.INDENT and body is None:
                body = tok.end[1]  # the class body's indentation: where field names start
            elif tok.type == tokenize.COMMENT and field and tok.start[1] > body:
                own[field].append(tok.string.lstrip("#").strip())  # beside the field, or indented below it
            elif tok.start[1] == body and tok.type in (tokenize.NAME, tokenize.OP, tokenize.STRING, tokenize.COMMENT):
                field = tok.string if tok.string in klass.__dataclass_fields__ else ""  # "": a heading, a def, ...
                if field:
                    own[field] = []
        comments |= {name: " ".join(parts) for name, parts in own.items() if parts or name not in comments}
    return comments


def type_name(t) -> str:
    return getattr(t, "__name__", str(t))


KINDS = {"int": "an integer", "float": "a number", "str": "a string", "list": "a JSON list", "dict": "a JSON object"}


def convert(key: str, value, t, where: str):
    """A command-line string or a JSON value as the field's type; UserError when it is not one."""
    base = getattr(t, "__origin__", t)  # list[str] -> list
    if isinstance(value, str) and not isinstance(value, base):  # a string field (also str | None) takes it as it is
        text = value.strip().lower()
        if base is bool:
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise UserError(f"{where}: {key} takes true/false/1/0/yes/no, got {value!r}")
            return text in ("true", "1", "yes")
        try:
            value = json.loads(value) if base in (list, dict) else base(value)
        except (ValueError, RecursionError):  # RecursionError: JSON nested deeper than the parser goes
            raise UserError(f"{where}: {key} takes {KINDS[type_name(base)]}, got {value!r}") from None
    if base is float and type(value) is int:  # JSON's 2 for a float field
        value = float(value)
    if not isinstance(value, base) or (isinstance(value, bool) and base is not bool):
        raise UserError(f"{where}: {key} takes {KINDS.get(type_name(base), type_name(t))}, got {value!r}")
    if base is float and not math.isfinite(value):  # float("nan") parses, and a NaN learning rate trains on silently
        raise UserError(f"{where}: {key} takes a finite number, got {value!r}")
    item = getattr(t, "__args__", (object,))[0]  # list[str]: every element a str
    if base is list and not all(isinstance(v, item) for v in value):
        raise UserError(f"{where}: {key} takes a JSON list of {type_name(item)} values, got {value!r}")
    return value


def help_text(cls: type, doc: str) -> str:
    comments = field_comments(cls)
    rows = [(doc or "").strip(), "", "Options (--key=value or --key value; --config FILE.json sets many):"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        option = f"  --{f.name}  ({type_name(f.type)}, default {json.dumps(default)})"
        rows += [option, f"      {comments.get(f.name, '')}"]
    return "\n".join(rows) + "\n"


def parse(cls: type, argv: list[str], doc: str = "", positional: tuple[str, ...] = ()):
    """A `cls` from argv: defaults, then --config files and --key=value in order; bare arguments fill `positional`."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    if "-h" in argv or "--help" in argv:
        print(help_text(cls, doc))
        raise SystemExit(0)
    values, free, args = {}, list(positional), iter(argv)
    for arg in args:
        if not arg.startswith("--"):
            if not free:
                raise UserError(f"unexpected argument {arg!r}; options are --key=value (see --help)")
            values[free.pop(0)] = arg
            continue
        key, eq, raw = arg[2:].partition("=")
        if key != "config" and key not in types:
            raise UserError(f"unknown option --{key}; known options: {', '.join('--' + k for k in types)}")
        raw = raw if eq else next(args, None)
        if raw is None or (not eq and raw.startswith("--")):
            raise UserError(f"command line: --{key} needs a value (--{key}=VALUE or --{key} VALUE)")
        if key == "config":
            values.update(check_keys(read_json(raw, "--config "), types, raw))
        else:
            values[key] = convert(f"--{key}", raw, types[key], "command line")
    if [name for name in free if name not in values]:  # a positional may also come as --name=VALUE
        raise UserError(f"command line: missing argument(s): {', '.join(free)} (see --help)")
    return cls(**values)


def read_json(path: str | Path, where: str = "") -> dict:
    """A JSON object from a file (config files, config.json, tokenizer files); UserError naming the file otherwise."""
    try:
        loaded = json.loads(Path(path).read_text())
    except OSError as e:
        raise UserError(f"{where}{path}: cannot read it ({e.strerror})") from None
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise UserError(f"{where}{path}: not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{where}{path}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def check_keys(loaded, types: dict, where: str) -> dict:
    """A JSON object's values as the fields' types; UserError naming `where` for an unknown key or a wrong type."""
    if not isinstance(loaded, dict):
        raise UserError(f"{where}: expected a JSON object of key: value, got {str(loaded)[:80]}")
    if unknown := [key for key in loaded if key not in types]:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(types)}")
    return {k: convert(k, v, types[k], where) for k, v in loaded.items()}


def demo_args(doc: str, n: int = 0) -> list[str]:
    """The n bare arguments of a command without options; anything else shows doc (exit 0 for --help, else 2)."""
    if len(sys.argv) != n + 1:
        print(doc)
        raise SystemExit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    return sys.argv[1:]


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
