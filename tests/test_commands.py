"""What a user sees at the command line (issue #18): every command's --help, one line `error: <where>: <what>` with
exit code 2 for bad options and hostile data files, a clean import graph, caches that follow the code, cli.py's rules.

    python -m pytest -q tests/test_commands.py

Commands run as subprocesses, as a user runs them, several at once (each one imports numpy, pyarrow or torch).
"""

import ast
import dataclasses
import importlib
import json
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cli
import data
import orca2
import train
from conftest import ROOT
from train import TrainConfig

PROGRESS = re.compile(r"tokenizing .*\d+%\|")  # data.py's tqdm bar, the one thing allowed beside an error


def run_all(commands: list[list[str]], cwd: Path = ROOT) -> list[subprocess.CompletedProcess]:
    """`python ARGS...` for every command, four at a time; results in the same order."""
    def run(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                              errors="replace", timeout=300)
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(run, commands))


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed command told its user: exit code 2, stderr a single `error: ` line, no traceback."""
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-4000:]
    lines = [s for s in re.split(r"[\r\n]+", result.stderr) if s.strip() and not PROGRESS.match(s)]
    assert result.returncode == 2, (result.returncode, result.stderr[-4000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-4000:]
    return lines[0]


# ---- 1. --help of every command ----

CONFIGS = {  # command -> (module, config class); its --help lists every field with its default
    "train.py": ("train", "TrainConfig"), "evaluate.py": ("evaluate", "EvalConfig"), "data.py": ("data", "ShowConfig"),
    "synth.py": ("synth", "SynthConfig"), "bench.py": ("bench", "BenchConfig"), "repro.py": ("repro", "ReproConfig"),
    "decontaminate.py": ("decontaminate", "DecontaminateConfig"), "model.py convert": ("model", "ConvertConfig"),
    "chat.py": ("chat", "ChatConfig"),
}
DEMOS = ["orca2.py", "tasks.py", "tokenizer.py", "benchmarks.py", "model.py", "answers.py"]  # --help: the docstring


@pytest.fixture(scope="module")
def helps() -> dict[str, subprocess.CompletedProcess]:
    commands = [*CONFIGS, *DEMOS]
    return dict(zip(commands, run_all([[*c.split(), "--help"] for c in commands])))


@pytest.mark.parametrize("command", CONFIGS)
def test_help_lists_every_option_with_its_default(helps, command):
    result = helps[command]
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    module, name = CONFIGS[command]
    for f in dataclasses.fields(getattr(importlib.import_module(module), name)):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        line = rf"^  --{f.name}  \({cli.type_name(f.type)}, default {re.escape(json.dumps(default))}\)$"
        assert re.search(line, result.stdout, re.M), f"{command} --help does not show --{f.name} = {default!r}"


@pytest.mark.parametrize("command", DEMOS)
def test_help_of_a_demo_shows_what_it_is(helps, command):
    result = helps[command]
    first_line = ast.get_docstring(ast.parse((ROOT / command).read_text())).splitlines()[0]
    assert result.returncode == 0 and "Traceback" not in result.stderr, (result.returncode, result.stderr[-3000:])
    assert first_line in result.stdout


# ---- 2. a user's mistake is one line, never a traceback ----

OPTION_ERRORS = {  # name -> (command, what the line must say); {tmp} is a scratch folder
    "value not a number": ("train.py --lr=fast", r"command line: --lr takes a number, got 'fast'"),
    "bool not a bool": ("train.py --resume=maybe", r"--resume takes true/false/1/0/yes/no, got 'maybe'"),
    "NaN learning rate": ("train.py --lr nan", r"--lr takes a finite number"),
    "unknown option": ("train.py --nope=1", r"unknown option --nope; known options: --max_len, .*--lr, "),
    "missing config": ("train.py --config=missing.json", r"--config missing.json: cannot read it"),
    "config unknown key": ("train.py --config={tmp}/unknown.json", r"unknown key 'nope'; known keys: .*\blr\b"),
    "config bad JSON": ("data.py x.jsonl --config={tmp}/bad.json", r"bad.json: not valid JSON"),
    "config wrong type": ("data.py x.jsonl --config={tmp}/types.json", r"types.json: max_len takes an integer"),
    "missing data file": ("data.py /no/such.jsonl", r"/no/such.jsonl: no such data file"),
    "missing model": ("evaluate.py --model=/no/dir --benchmarks=gsm8k", r"/no/dir"),
    "tokenizer not a model": ("data.py {tmp}/ok.jsonl --tokenizer={tmp}/ok.jsonl", r"not a SentencePiece model"),
    "cache dir is a file": ("data.py {tmp}/ok.jsonl --cache_dir={tmp}/ok.jsonl", r"--cache_dir .*cannot create it"),
    "checkpoint not one": ("model.py convert {tmp}/ok.jsonl {tmp}/out", r"ok.jsonl: not a llama2.c .*checkpoint"),
    "negative max_steps": ("train.py --max_steps=-5 --out_dir={tmp}/neg", r"--max_steps must be at least 0, got -5"),
    "stage value wrong type": ("train.py --config={tmp}/stage.json --out_dir={tmp}/st",
                               r"--stages\[0\]\.sources\[0\]: weight takes a number, got 'x'"),
    "stage unknown key": ("train.py --config={tmp}/stage2.json --out_dir={tmp}/st",
                          r"--stages\[0\]: unknown key 'epoch'; known keys: name, sources, epochs"),
    "deeply nested config": ("train.py --config={tmp}/deep.json", r"deep.json: not valid JSON \(RecursionError"),
    "value swallowing an option": ("train.py --out_dir --resume=false", r"--out_dir needs a value"),
}
STAGE = {"name": "s", "epochs": 1, "lr": 0.001, "sources": [{"name": "a", "path": "ok.jsonl", "weight": "x"}]}
OO = b'{"system_prompt": "s", "question": "What is 2+2?", "response": "4"}'
MS = b'{"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}'


@pytest.fixture(scope="module")
def option_errors(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("options")
    for name, text in (("unknown.json", '{"lr": 0.1, "nope": 1}'), ("bad.json", '{"max_len": 8,'),
                       ("types.json", '{"max_len": "long"}'), ("ok.jsonl", OO.decode() + "\n"),
                       ("stage.json", json.dumps({"stages": [STAGE]})), ("deep.json", "[" * 100_000),
                       ("stage2.json", json.dumps({"stages": [{**STAGE, "epoch": 1}]}))):
        (tmp / name).write_text(text)
    commands = [command.format(tmp=tmp).split() for command, _ in OPTION_ERRORS.values()]
    return dict(zip(OPTION_ERRORS, run_all(commands)))


@pytest.mark.parametrize("name", OPTION_ERRORS)
def test_bad_option_is_one_line(option_errors, name):
    assert re.search(OPTION_ERRORS[name][1], error_line(option_errors[name]))


def oo(**fields) -> bytes:
    return json.dumps({"system_prompt": "s", "question": "q", "response": "4"} | fields).encode()


def ms(*roles: str) -> bytes:
    return json.dumps({"messages": [{"role": r, "content": f"{r} text"} for r in roles]}).encode()


DEEP = 100_000
BAD_LINES = {  # name -> (a good line of the same layout, the bad line, what the error must say)
    "invalid UTF-8": (OO, b'{"system_prompt": "s", "question": "caf\xe9", "response": "4"}', r"not valid UTF-8"),
    "NaN literal": (OO, oo()[:-1] + b', "score": NaN}', r"NaN is not valid JSON"),
    "Infinity literal": (OO, oo()[:-1] + b', "score": -Infinity}', r"-Infinity is not valid JSON"),
    "deep arrays": (OO, b"[" * DEEP + b"]" * DEEP, r"nested too deeply"),
    "deep objects": (OO, b'{"a":' * DEEP + b"1" + b"}" * DEEP, r"nested too deeply"),
    "deep field": (OO, oo()[:-1] + b', "x": ' + b"[" * DEEP + b"]" * DEEP + b"}", r"nested too deeply"),
    "array line": (OO, b"[1, 2]", r"expected a JSON object, got list"),
    "string line": (OO, b'"hello"', r"expected a JSON object, got string"),
    "number line": (OO, b"42", r"expected a JSON object, got number"),
    "null line": (OO, b"null", r"expected a JSON object, got null"),
    "5000-digit number": (OO, oo()[:-1] + b', "n": ' + b"7" * 5000 + b"}", r"5000 digits is too long"),
    "question a number": (OO, oo(question=7), r"need string fields system_prompt, .*; got number for 'question'"),
    "response a list": (OO, oo(response=["4"]), r"need string fields .*; got list for 'response'"),
    "messages a string": (MS, b'{"messages": "hi"}', r"messages must be a non-empty list, got 'hi'"),
    "unknown role": (MS, ms("user", "bot"), r"messages\[1\] has unknown role 'bot'; known: system, user, assistant"),
    "no assistant turn": (MS, ms("system", "user"), r"ending with assistant, got roles \['system', 'user'\]"),
    "empty reply": (OO, oo(response=" \n"), r"an assistant reply is empty"),
    "roles not alternating": (MS, ms("user", "user", "assistant"), r"alternating user/assistant .*'user', 'user'"),
    "system only": (MS, ms("system"), r"got roles \['system'\]"),
    "unpaired surrogate": (OO, oo(question="\ud800"), r"unpaired surrogate"),
    "truncated line": (OO, OO[:40], r"not valid JSON: Unterminated string starting at column"),
    "trailing garbage": (OO, OO + b" xyz", r"not valid JSON: Extra data at column 69"),
    "unknown layout": (OO, b'{"prompt": "q", "completion": "a"}', r"unknown column layout|has no 'system_prompt'"),
}


FILES = {  # name -> (file, where the error points after the file name, what it must say)
    "UTF-16 file": ("utf16.jsonl", ":1: ", r"looks UTF-16 encoded"),
    "empty file": ("empty.jsonl", ": ", r"no examples: an empty file"),
    "blank lines": ("blank.jsonl", ": ", r"no examples: only blank lines"),
    "folder": ("folder.jsonl", ": ", r"a folder; pass a JSONL or parquet file"),
    "no such file": ("missing.jsonl", ": ", r"no such data file"),
    "not parquet": ("fake.parquet", ": ", r"not a readable parquet file"),
    "parquet null field": ("null.parquet", " row 1: ", r"got null for 'question'"),
    "parquet without rows": ("no_rows.parquet", ": ", r"no examples"),
    "damaged parquet": ("damaged.parquet", ": ", r"row group 0 cannot be read.*damaged"),
}


def write_bad_files(folder: Path) -> dict[str, tuple[Path, str, str]]:
    """name -> (file, where the error must point, what it must say): each bad line first, and after a good line;
    then the FILES that are wrong as a whole."""
    cases = {}
    for name, (good, bad, says) in BAD_LINES.items():
        stem = re.sub(r"\W", "_", name)
        first, later = folder / f"{stem}-1st.jsonl", folder / f"{stem}-later.jsonl"
        first.write_bytes(bad + b"\n" + good + b"\n")
        later.write_bytes(good + b"\n" + bad + b"\n" + good.replace(b"4", b"5") + b"\n")
        cases[f"{name}, 1st line"], cases[f"{name}, later line"] = (first, ":1: ", says), (later, ":2: ", says)
    (folder / "utf16.jsonl").write_bytes((OO + b"\n").decode().encode("utf-16"))
    (folder / "empty.jsonl").write_bytes(b"")
    (folder / "blank.jsonl").write_bytes(b"\n  \n\r\n")
    (folder / "folder.jsonl").mkdir()
    (folder / "fake.parquet").write_bytes(OO)
    rows = {"system_prompt": ["s"] * 3, "question": ["q1", None, "q3"], "response": ["a", "b", "c"]}
    pq.write_table(pa.table(rows), folder / "null.parquet")
    pq.write_table(pa.table(rows).slice(0, 0), folder / "no_rows.parquet")
    n = 3000  # a parquet file whose footer is fine and whose data pages are not
    table = pa.table({"question": [f"question {i} " * 20 for i in range(n)], "answer": [str(i) for i in range(n)]})
    pq.write_table(table, folder / "damaged.parquet")
    damaged = bytearray((folder / "damaged.parquet").read_bytes())
    damaged[200:4000] = bytes(b ^ 0x5A for b in damaged[200:4000])
    (folder / "damaged.parquet").write_bytes(bytes(damaged))
    return cases | {name: (folder / file, where, says) for name, (file, where, says) in FILES.items()}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict:
    """Every bad file through `python data.py FILE`; the later-line files again with --skip_bad_lines=true; and
    files that are fine however odd (a 5 MB line, CRLF, a byte order mark, blank lines between examples)."""
    folder = tmp_path_factory.mktemp("hostile")
    cases = write_bad_files(folder)
    huge = oo(response="word " * 1_000_000)  # 5 MB, a million tokens: longer than max_len, dropped and counted
    (folder / "huge.jsonl").write_bytes(b"\n".join([OO, huge, b""]))
    (folder / "odd.jsonl").write_bytes(b"\xef\xbb\xbf" + OO + b"\r\n\r\n\n" + OO.replace(b"4", b"5") + b"\r\n")
    skips = {name: file for name, (file, _, _) in cases.items() if name.endswith("later line")}
    options = ["--cache_dir", folder / "cache", "--num_workers=1"]
    commands = [["data.py", file, *options] for file, _, _ in cases.values()]
    commands += [["data.py", file, *options, "--skip_bad_lines=true"] for file in skips.values()]
    commands += [["data.py", folder / name, *options] for name in ("huge.jsonl", "odd.jsonl")]
    results = run_all(commands)
    return dict(cases=cases, results=dict(zip(cases, results)), skipped=dict(zip(skips, results[len(cases):])),
                fine=results[-2:])


HOSTILE_NAMES = [f"{n}, {k}" for n in BAD_LINES for k in ("1st line", "later line")] + list(FILES)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_data_is_one_line_naming_file_and_line(hostile, name):
    file, where, says = hostile["cases"][name]
    line = error_line(hostile["results"][name])
    assert line.startswith(f"error: {file}{where}"), line
    assert re.search(says, line), line


@pytest.mark.parametrize("name", [n for n in HOSTILE_NAMES if n.endswith("later line")])
def test_skip_bad_lines_skips_and_counts_them(hostile, name):
    result = hostile["skipped"][name]
    file = hostile["cases"][name][0]
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "2 examples" in result.stdout and "1 bad lines skipped" in result.stdout, result.stdout[-2000:]
    assert f"skipped {file}:2: " in result.stdout  # the log says which line and why


def test_odd_but_valid_files_work(hostile):
    huge, odd = hostile["fine"]
    for result in (huge, odd):
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "1 examples" in huge.stdout and "1 longer than 4096 dropped" in huge.stdout, huge.stdout[-2000:]
    assert "2 examples" in odd.stdout and "0 bad lines skipped" in odd.stdout, odd.stdout[-2000:]


# ---- 3. the import graph ----

MODULES = {p.stem: p for p in sorted(ROOT.glob("*.py"))}


def is_main_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"


def imported(node: ast.AST, at_import: bool = False) -> set[str]:
    """Top-level names of the modules imported anywhere under node (inside functions too); at_import: only what runs
    when the module is imported (not function bodies, not the `if __name__ == "__main__":` block)."""
    names = set()
    for child in ast.iter_child_nodes(node):
        deferred = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or is_main_block(child)
        if at_import and deferred:
            continue
        if isinstance(child, ast.Import):
            names |= {alias.name.split(".")[0] for alias in child.names}
        elif isinstance(child, ast.ImportFrom) and child.level == 0:
            names.add(child.module.split(".")[0])
        names |= imported(child, at_import)
    return names


TREES = {name: ast.parse(path.read_text()) for name, path in MODULES.items()}
GRAPH = {name: sorted(imported(tree) & set(MODULES) - {name}) for name, tree in TREES.items()}  # every import
AT_IMPORT = {name: imported(tree, at_import=True) for name, tree in TREES.items()}


def find_cycle(graph: dict[str, list[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state, path = {}, []  # module -> "open" (on the current path) or "done"

    def visit(m: str) -> list[str]:
        state[m] = "open"
        path.append(m)
        for n in graph[m]:
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            cycle = visit(n) if n not in state else []
            if cycle:
                return cycle
        state[m] = "done"
        path.pop()
        return []
    cycles = (visit(m) for m in graph if m not in state)
    return next((cycle for cycle in cycles if cycle), [])


def test_import_graph_has_no_cycle():
    assert len(GRAPH) > 10 and GRAPH["train"] and "data" in GRAPH["train"]  # the parser sees the project
    cycle = find_cycle(GRAPH)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_orca2_imports_only_the_standard_library():
    names = imported(TREES["orca2"])
    assert names and names <= set(sys.stdlib_module_names), sorted(names - set(sys.stdlib_module_names))


def reachable(module: str, graph: dict) -> dict[str, list[str]]:
    """Every project module that `module` imports, directly or not -> the chain of imports that gets there."""
    via, todo = {module: [module]}, [module]
    while todo:
        m = todo.pop()
        for n in sorted(set(graph[m]) & set(MODULES)):
            if n not in via:
                via[n], todo = via[m] + [n], todo + [n]
    return via


@pytest.mark.parametrize("module", ["answers", "benchmarks", "client", "cli", "decontaminate", "formats", "synth"])
def test_module_does_not_import_torch(module):
    """Not directly, nor through the project modules it imports (what runs at import time: data.py imports torch
    inside get_batch only, for the commands that make batches)."""
    for m, chain in reachable(module, AT_IMPORT).items():
        assert "torch" not in AT_IMPORT[m], f"{' -> '.join(chain)} imports torch"


def test_bench_gpu_does_not_import_bench():
    chain = reachable("bench_gpu", GRAPH).get("bench", [])
    assert not chain, f"{' -> '.join(chain)}: bench_gpu.py imports bench.py"


# ---- 4. caches follow the code ----


def test_cache_rebuilds_after_a_mask_or_template_edit_and_not_after_an_unrelated_one(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    for f in MODULES.values():
        shutil.copy(f, proj)
    (tmp_path / "shared").symlink_to(ROOT.parent / "shared")  # the copy finds ../shared/data as the project does
    lines = [json.dumps({"system_prompt": "You are a helpful assistant.", "question": f"What is {k} + {k}?",
                         "response": f"{k} + {k} = {2 * k}. Answer: {2 * k}"}) for k in range(1, 6)]
    (proj / "examples.jsonl").write_text("\n".join(lines) + "\n")

    def run() -> dict:
        """data.py on the copy: its log, the first example's counts, and the whole file's from the new cache."""
        before = set((proj / "cache").glob("tokens-*"))
        result = run_all([["data.py", "examples.jsonl", "--cache_dir=cache", "--num_workers=1"]], cwd=proj)[0]
        assert result.returncode == 0, result.stderr[-3000:]
        tokens, supervised = map(int, re.search(r"==== (\d+) tokens, (\d+) supervised ====", result.stdout).groups())
        new = [f for f in set((proj / "cache").glob("tokens-*")) - before if (f / "meta.json").is_file()]
        meta = json.loads((new[0] / "meta.json").read_text()) if new else {}
        return dict(log=result.stdout, tokens=tokens, supervised=supervised, new=new, meta=meta)

    def edit(file: str, old: str, new: str, within: str = "") -> str:
        """Replace old by new (only inside the function `within`); returns the file's text before."""
        text = (proj / file).read_text()
        start = text.index(within) if within else 0
        end = text.index("\n\n\n", start) if within else len(text)
        assert old in text[start:end], f"{file} no longer has {old!r}: update this test"
        (proj / file).write_text(text[:start] + text[start:end].replace(old, new) + text[end:])
        return text

    base = run()
    assert "[data] tokenized" in base["log"] and len(base["new"]) == 1
    assert 0 < base["supervised"] < base["tokens"] and base["meta"]["supervised_tokens"] > 0

    edit("data.py", "# ---- command line ----", "# ---- command line ----\n# an unrelated comment")
    same = run()
    assert not same["new"] and "[data] tokenized" not in same["log"] and "code changed" not in same["log"]
    assert (same["tokens"], same["supervised"]) == (base["tokens"], base["supervised"])

    masked = edit("data.py", "supervised=False", "supervised=True", within="def render_segments")  # prompts learned
    mask = run()
    assert "code changed (rendering, masking or tokenization)" in mask["log"] and len(mask["new"]) == 1
    assert mask["tokens"] == base["tokens"] and mask["supervised"] > base["supervised"]
    assert mask["meta"]["supervised_tokens"] > base["meta"]["supervised_tokens"]
    (proj / "data.py").write_text(masked)  # back as it was: the template edit alone comes next

    edit("orca2.py", 'TARGET = ("\\n", "{response}", IM_END)', 'TARGET = ("\\n\\n", "{response}", IM_END)')
    template = run()
    assert "code changed (rendering, masking or tokenization)" in template["log"] and len(template["new"]) == 1
    assert template["tokens"] > base["tokens"] and template["supervised"] > base["supervised"]
    assert template["meta"]["tokens"] > base["meta"]["tokens"]
    print(*[(r["tokens"], r["supervised"], r["meta"]["tokens"], r["meta"]["supervised_tokens"])
            for r in (base, mask, template)])  # first example's tokens and supervised; the file's (pytest -s)


# ---- 5. cli.py's rules, in-process ----


def test_key_value_and_key_space_value():
    cfg = cli.parse(TrainConfig, ["--lr", "0.1", "--epochs=3", "--dtype", "float32", "--seed=-1"])
    assert (cfg.lr, cfg.epochs, cfg.dtype, cfg.seed) == (0.1, 3, "float32", -1)
    assert cfg.max_steps == TrainConfig().max_steps  # the rest keep their defaults


def test_config_file_then_overrides_left_to_right(tmp_path):
    stages = [{"name": "s1", "sources": [{"name": "a", "path": "a.jsonl"}], "epochs": 1}]
    (tmp_path / "c.json").write_text(json.dumps({"lr": 0.5, "epochs": 4, "stages": stages, "resume": "no"}))
    cfg = cli.parse(TrainConfig, ["--config", str(tmp_path / "c.json"), "--lr=0.2"])
    assert (cfg.lr, cfg.epochs, cfg.stages, cfg.resume) == (0.2, 4, stages, False)  # a list straight from JSON
    assert cli.parse(TrainConfig, ["--lr=0.2", f"--config={tmp_path / 'c.json'}"]).lr == 0.5  # the later one wins
    assert cli.parse(TrainConfig, ["--stages", json.dumps(stages)]).stages == stages


@pytest.mark.parametrize("text,value", [("yes", True), ("no", False), ("1", True), ("0", False), ("True", True),
                                        ("FALSE", False)])
def test_booleans(text, value):
    assert cli.parse(TrainConfig, [f"--resume={text}"]).resume is value


@pytest.mark.parametrize("argv,says", [
    (["--nope=1"], r"unknown option --nope; known options: --max_len, --on_too_long, "),
    (["--nope"], r"unknown option --nope"),  # said before asking for its value
    (["--epochs=2.5"], r"--epochs takes an integer, got '2.5'"),
    (["--lr=inf"], r"--lr takes a finite number"),
    (["--stages={}"], r"--stages takes a JSON list"),
    (["--resume=maybe"], r"--resume takes true/false/1/0/yes/no, got 'maybe'"),
    (["--lr"], r"--lr needs a value"),
    (["extra"], r"unexpected argument 'extra'"),
])
def test_mistakes_say_what_to_do(argv, says):
    with pytest.raises(cli.UserError, match=says) as e:
        cli.parse(TrainConfig, argv)
    if "unknown" in says:  # every known option is listed
        assert all(f"--{f.name}" in str(e.value) for f in dataclasses.fields(TrainConfig))


def test_stage_values_take_their_types_and_a_positional_may_be_named():
    stage = {"name": "s", "epochs": "1", "lr": 1, "sources": [{"name": "a", "path": "f", "erase": "no", "system": ""}]}
    with pytest.raises(cli.UserError, match=r"data file f does not exist"):  # typed first, then the file is checked
        train.curriculum(cli.parse(TrainConfig, ["--stages", json.dumps([stage])]), 0, None)
    source = cli.check_keys(stage["sources"][0], {f.name: f.type for f in dataclasses.fields(orca2.Source)}, "here")
    assert source["erase"] is False and source["system"] == ""  # "no" is false; "" stays a string (str | None)
    assert cli.parse(data.ShowConfig, ["--file=x.jsonl"], positional=("file",)).file == "x.jsonl"


def test_list_elements_are_checked():
    @dataclasses.dataclass
    class Files:
        train: list[str] = dataclasses.field(default_factory=list)  # training files
    assert cli.parse(Files, ['--train=["a.jsonl", "b.jsonl"]']).train == ["a.jsonl", "b.jsonl"]
    with pytest.raises(cli.UserError, match=r"--train takes a JSON list of str values"):
        cli.parse(Files, ['--train=["a.jsonl", 2]'])


@dataclasses.dataclass
class Headed:
    a: int = 0  # its own comment
    # a heading
    b: int = 0


def test_help_text_shows_types_defaults_comments_and_inherited_fields():
    text = cli.help_text(TrainConfig, "Train a model.")

    def entry(name: str) -> str:  # "--name  (type, default value)" and the comment line below it
        return re.search(rf"^  --{name}  (\(.*\))\n      (.*)$", text, re.M).group(1, 2)
    assert text.startswith("Train a model.")
    assert entry("lr") == ("(float, default 0.005)", "that one stage's peak learning rate")
    assert entry("resume")[0] == "(bool, default true)" and entry("stages")[0] == "(list, default [])"
    # inherited from data.DataConfig: its comment, and TrainConfig's own default where it sets one
    assert entry("skip_bad_lines") == ("(bool, default false)", cli.field_comments(data.DataConfig)["skip_bad_lines"])
    assert entry("max_len")[0] == "(int, default 1024)" and data.DataConfig().max_len == 4096
    assert entry("cache_dir")[1].endswith("on a filesystem all nodes see")
    assert entry("stages")[1].endswith("empty = one stage on `data`")  # a comment continued on the next line
    assert entry("beta1")[1] == "AdamW's first-moment decay"
    assert cli.field_comments(Headed) == {"a": "its own comment", "b": ""}  # a heading belongs to no field
    assert "precision and speed" not in entry("grad_clip")[1]  # a heading is not the previous field's comment


def test_chat_fits_its_answers_to_a_small_context(tmp_path):
    """A stories260K-shaped model (a 512-token context) with the default --max_new_tokens=1024: an answer gets what the
    context has left, a full context starts over, and /reset, /exit end cleanly."""
    from model import Transformer
    shared = ROOT.parent / "shared" / "data" / "tiny-llama"
    Transformer.from_pretrained(shared / "stories260K.bin").save_pretrained(tmp_path / "m")
    shutil.copy(shared / "tok512.model", tmp_path / "m" / "tokenizer.model")
    refused = subprocess.run([sys.executable, "chat.py", f"--model={tmp_path / 'm'}"], cwd=ROOT, input="Hi\n",
                             capture_output=True, text=True, timeout=120)  # 512 rows, 515 ids with Orca 2's three
    assert "the tokenizer has 515 ids" in error_line(refused)
    model = Transformer(dataclasses.replace(Transformer.from_pretrained(tmp_path / "m").args, vocab_size=515))
    model.init_weights(seed=0)
    model.save_pretrained(tmp_path / "m")  # the demo's export has the three rows (train.py grows the vocabulary)
    turns = "Once upon a time\nThen what?\nAnd then?\n/reset\nHello\n/exit\n"
    done = subprocess.run([sys.executable, "chat.py", f"--model={tmp_path / 'm'}", "--temperature=0"], cwd=ROOT,
                          input=turns, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    turns = done.stdout.split("user> ")[1:]  # what follows each prompt: this random model never stops by itself
    assert len(turns) == 6 and done.stdout.count("orca> ") == 4, done.stdout[-2000:]
    assert "starting over" not in turns[0]  # the first answer gets what the context leaves (was: start over at once)
    assert "starting over" in turns[1]  # the first answer filled the context

