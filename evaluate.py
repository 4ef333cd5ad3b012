"""Zero-shot evaluation of a checkpoint on the Orca 2 benchmarks (ORCA2.md section 7), scored by rules.

Six benchmarks (AGIEval, BBH, DROP, CRASS, RACE, GSM8K), each run with the empty and the cautious system message,
rendered with the model card's template, decoded greedily; answers are pulled out of the free-form outputs by
cue phrases and regular expressions, and the share of outputs that yielded an answer (format-OK) is reported
beside every score. Writes predictions.jsonl (one line per example and system message), summary.json and
summary.md (our rows beside the paper's Orca-2-7B/13B rows) into --out.

Run it:
    python evaluate.py --model DIR                                           # everything, both system messages
    python evaluate.py --model DIR --benchmarks gsm8k,drop --system cautious --limit 50 --batch_size 32 --out out/eval
    python evaluate.py --model DIR --max_new_tokens 256 --max_new_tokens_per gsm8k=512 --data_dir /data/benchmarks
    python evaluate.py --help                                                # every option with its default

Import it (no model is loaded): `load_benchmark(name, data_dir) -> list[Item]`, `item_text(item)`,
`extract_answer(item, output)`, `score_answer(item, extracted)`, `drop_metrics(prediction, golds)`.

Choices where the paper is silent (all documented at the rule that makes them):
- --limit N keeps the first N items of every subset (each AGIEval set, BBH task and RACE level).
- AGIEval: the 8 English multiple-choice sets; headline = mean of per-set accuracies (pooled also reported).
- BBH: 27 files = 23 tasks; the 23 multiple-choice/binary files are scored and averaged (the paper's "23 tasks"
  count each logical_deduction / tracking_shuffled_objects size separately); the 4 free-form tasks
  (dyck_languages, word_sorting, multistep_arithmetic_two, object_counting) are scored and reported apart.
- RACE: headline = accuracy pooled over high and middle (4,934 questions); each level is reported too.
- DROP: official answer normalisation and multi-span alignment, F1 headline. The full dev file flattens
  multi-span golds with " and ", so gold and prediction are both split into spans by one rule (drop_spans):
  reproducing any gold string scores EM = F1 = 1, and listing the spans in another order does too.
- Prompts longer than the context minus the new tokens are cut in the middle (counted in the summary).
"""

import gzip
import json
import math
import re
import string
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch
from tqdm import tqdm

from orca2 import BENCHMARKS, BOS_ID, PAPER_RESULTS, STOP_IDS, SYSTEM_MESSAGES, render_prompt

# ---- configuration ----

DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "shared" / "data" / "benchmarks"


@dataclass
class EvalConfig:
    model: str = ""               # checkpoint folder (config.json + safetensors/.bin + tokenizer.model); required
    tokenizer: str = ""           # tokenizer.model file or folder holding it; "" = the model folder
    benchmarks: str = ",".join(BENCHMARKS)  # comma-separated subset of agieval,bbh,drop,crass,race,gsm8k
    system: str = "empty,cautious"  # comma-separated system messages (orca2.SYSTEM_MESSAGES keys)
    data_dir: str = str(DEFAULT_DATA_DIR)  # folder holding agieval/ bbh/ drop/ crass/ race/ gsm8k/
    limit: int = 0                # first N items of every subset; 0 = all
    batch_size: int = 16          # prompts per generate() call
    max_new_tokens: int = 1024    # new tokens per answer, every benchmark (ORCA2.md 7 default)
    max_new_tokens_per: str = ""  # per-benchmark overrides of max_new_tokens, e.g. "gsm8k=512,drop=256"
    out: str = "out/eval"         # output folder: predictions.jsonl, summary.json, summary.md
    device: str = ""              # "" = cuda if available, else cpu
    dtype: str = ""               # "" = bfloat16 on cuda, float32 on cpu
    progress: bool = True         # show a tqdm progress bar


def parse_args(argv: list[str]) -> EvalConfig:
    """Map --key=value / --key value onto EvalConfig; unknown keys and ill-typed values are errors."""
    cfg, types = EvalConfig(), {f.name: f.type for f in fields(EvalConfig)}
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__ + "\nOptions (defaults):\n" + "\n".join(f"  --{k}={v!r}" for k, v in asdict(cfg).items()))
        raise SystemExit(0)
    i = 0
    while i < len(argv):
        if not argv[i].startswith("--"):
            raise ValueError(f"expected --key=value or --key value, got {argv[i]!r}")
        key, eq, value = argv[i][2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ValueError(f"--{key} needs a value")
            value, i = argv[i + 1], i + 1
        i += 1
        if key not in types:
            raise ValueError(f"unknown option --{key}; valid options: {', '.join('--' + k for k in types)}")
        typ = types[key]
        if typ is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--{key} takes true or false, got {value!r}")
            setattr(cfg, key, value.lower() in ("true", "1"))
        else:
            try:
                setattr(cfg, key, typ(value))
            except ValueError:
                raise ValueError(f"--{key} takes a {typ.__name__}, got {value!r}") from None
    return cfg


def max_new_tokens_for(cfg: EvalConfig) -> dict[str, int]:
    """Benchmark -> max new tokens: max_new_tokens, with max_new_tokens_per entries on top."""
    out = {b: cfg.max_new_tokens for b in BENCHMARKS}
    for entry in filter(None, cfg.max_new_tokens_per.split(",")):
        name, _, n = entry.partition("=")
        if name not in out or not n.isdigit():
            raise ValueError(f"--max_new_tokens_per entries look like gsm8k=512 (benchmarks {BENCHMARKS}); got {entry!r}")
        out[name] = int(n)
    return out


# ---- benchmarks: files, prompts, loading ----

AGIEVAL_TASKS = ("aqua-rat", "logiqa-en", "lsat-ar", "lsat-lr", "lsat-rc", "sat-math", "sat-en", "sat-en-without-passage")
# BBH answer formats: binary tasks (labels in the gold's spelling), free-form tasks, lettered multiple choice.
BBH_BINARY = {"boolean_expressions": ("True", "False"), "causal_judgement": ("Yes", "No"),
              "formal_fallacies": ("valid", "invalid"), "navigate": ("Yes", "No"),
              "sports_understanding": ("yes", "no"), "web_of_lies": ("Yes", "No")}
BBH_FREE_FORM = {"dyck_languages": "dyck", "word_sorting": "words", "multistep_arithmetic_two": "number",
                 "object_counting": "number"}
BBH_CHOICE = ("date_understanding", "disambiguation_qa", "geometric_shapes", "hyperbaton",
              "logical_deduction_five_objects", "logical_deduction_seven_objects", "logical_deduction_three_objects",
              "movie_recommendation", "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
              "salient_translation_error_detection", "snarks", "temporal_sequences",
              "tracking_shuffled_objects_five_objects", "tracking_shuffled_objects_seven_objects",
              "tracking_shuffled_objects_three_objects")
BBH_TASKS = tuple(sorted([*BBH_BINARY, *BBH_FREE_FORM, *BBH_CHOICE]))
BBH_MC = tuple(sorted([*BBH_BINARY, *BBH_CHOICE]))  # the 23 the BBH score averages
BENCHMARK_FILES = {
    "agieval": [f"agieval/{t}.jsonl" for t in AGIEVAL_TASKS],
    "bbh": [f"bbh/{t}.json" for t in BBH_TASKS],
    "drop": ["drop/drop_v0_dev.jsonl.gz"],
    "crass": ["crass/CR-C_CRASS_EN.json", "crass/CR-C_CRASS_EN_gt_label.json"],
    "race": ["race/test_high.jsonl", "race/test_middle.jsonl"],
    "gsm8k": ["gsm8k/test.jsonl"],
}
# Zero-shot, no chain-of-thought trigger: one fixed sentence per answer format, naming the cue "Answer:" that
# extraction looks for first. The paper's own prompts are not published in readable form (ORCA2.md 7).
INSTRUCTIONS = {
    "choice": 'End your response with "Answer: (X)", where X is the letter of the correct option.',
    "binary": 'End your response with "Answer: {0}" or "Answer: {1}".',
    "number": 'End your response with "Answer:" followed by the final number.',
    "dyck": 'End your response with "Answer:" followed by the closing brackets, separated by spaces.',
    "words": 'End your response with "Answer:" followed by the sorted words, separated by spaces.',
    "drop": 'Answer the question using the passage. End your response with "Answer:" followed by the answer: '
            'a number, a date, or words from the passage (separate several answers with commas).',
}
LETTERS = "ABCDEFGHIJKLMNOPQR"  # up to (R): reasoning_about_colored_objects


@dataclass
class Item:
    id: str                # stable id, e.g. "gsm8k/17", "agieval/lsat-ar/3", "race/high/high73.txt/0"
    benchmark: str         # one of orca2.BENCHMARKS
    subset: str            # AGIEval set, BBH task, RACE level; "test"/"dev"/"all" for single-subset sets
    text: str              # the task as shown to the model: passage, question, options (no format instruction)
    prompt: str            # the user message: text + the format instruction
    gold: str | list[str]  # letter, label, number or string; DROP: the list of gold alternatives
    kind: str              # answer format: choice, binary, number, dyck, words, drop
    choices: list[str] = field(default_factory=list)  # option texts (choice) or labels (binary)
    meta: dict = field(default_factory=dict)  # source fields worth keeping (upstream target, ...)


def item_text(item: Item) -> str:
    """The text the model is shown for this item (question, passage, options), for decontamination."""
    return item.text


def make_item(item_id: str, benchmark: str, subset: str, text: str, gold, kind: str, choices=(), **meta) -> Item:
    instruction = INSTRUCTIONS[kind].format(*choices) if kind == "binary" else INSTRUCTIONS[kind]
    return Item(item_id, benchmark, subset, text, f"{text}\n\n{instruction}", gold, kind, list(choices), meta)


def mc_text(context: str | None, question: str, options: list[str]) -> str:
    lines = "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(options))
    return (f"{context}\n\n" if context else "") + f"{question}\nOptions:\n{lines}"


def read_lines(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_agieval(d: Path) -> list[Item]:
    items = []
    for task in AGIEVAL_TASKS:
        for i, r in enumerate(read_lines(d / f"agieval/{task}.jsonl")):
            # options carry their letter, "(A)text"; 24 logiqa-en options are written "A text"
            opts = [re.sub(r"^\s*\(?[A-E]\)?\s*", "", o, count=1) for o in r["options"]]
            items.append(make_item(f"agieval/{task}/{i}", "agieval", task, mc_text(r["passage"], r["question"], opts),
                                   r["label"], "choice", opts))
    return items


def load_bbh(d: Path) -> list[Item]:
    items = []
    for task in BBH_TASKS:
        for i, ex in enumerate(json.loads((d / f"bbh/{task}.json").read_text())["examples"]):
            text, target = ex["input"], ex["target"]
            if task in BBH_BINARY:
                assert target in BBH_BINARY[task], f"bbh/{task}/{i}: target {target!r} not in {BBH_BINARY[task]}"
                item = make_item(f"bbh/{task}/{i}", "bbh", task, text, target, "binary", BBH_BINARY[task])
            elif task in BBH_FREE_FORM:
                item = make_item(f"bbh/{task}/{i}", "bbh", task, text, target, BBH_FREE_FORM[task])
            else:  # options are lines "(A) text" inside the input; 3 upstream targets are texts, never matched
                opts = dict(re.findall(r"^\(([A-R])\)\s*(.*)$", text, re.M))
                gold = target[1] if re.fullmatch(r"\([A-R]\)", target) else target
                item = make_item(f"bbh/{task}/{i}", "bbh", task, text, gold, "choice", list(opts.values()))
            item.meta["target"] = target
            items.append(item)
    return items


def load_drop(d: Path) -> list[Item]:
    items = []
    for i, r in enumerate(read_lines(d / "drop/drop_v0_dev.jsonl.gz")):
        # context = "Passage: <p>\nQuestion: <q>\nAnswer:"; ref_text = gold alternatives joined by "|"
        text = r["context"].removesuffix("\nAnswer:")
        golds = list(dict.fromkeys(g for g in r["ref_text"].split("|") if g.strip()))  # 8 rows repeat one
        items.append(make_item(f"drop/{i}", "drop", "dev", text, golds, "drop"))
    return items


def load_crass(d: Path) -> list[Item]:
    labels = {r["index"]: r["gt_answer"] for r in read_lines(d / "crass/CR-C_CRASS_EN_gt_label.json")}
    items = []
    for r in read_lines(d / "crass/CR-C_CRASS_EN.json"):
        slots = [k for k in ("Answer1", "Answer2", "Answer3", "Answer4") if r[k].strip()]  # 230 items have 3
        gold = LETTERS[slots.index(f"Answer{labels[r['index']]}")]
        opts = [r[k] for k in slots]
        items.append(make_item(f"crass/{r['index']}", "crass", "all", mc_text(None, f"{r['premise']} {r['QCC']}", opts),
                               gold, "choice", opts))
    return items


def load_race(d: Path) -> list[Item]:
    items = []
    for level in ("high", "middle"):
        for art in read_lines(d / f"race/test_{level}.jsonl"):
            for j, (q, opts, ans) in enumerate(zip(art["questions"], art["options"], art["answers"])):
                items.append(make_item(f"race/{level}/{art['id']}/{j}", "race", level,
                                       mc_text(f"Article:\n{art['article']}", q, opts), ans, "choice", opts))
    return items


def load_gsm8k(d: Path) -> list[Item]:
    return [make_item(f"gsm8k/{i}", "gsm8k", "test", r["question"], r["answer"].split("####")[-1].strip().replace(",", ""),
                      "number", solution=r["answer"]) for i, r in enumerate(read_lines(d / "gsm8k/test.jsonl"))]


LOADERS = {"agieval": load_agieval, "bbh": load_bbh, "drop": load_drop, "crass": load_crass, "race": load_race,
           "gsm8k": load_gsm8k}


def load_benchmark(name: str, data_dir: str | Path = DEFAULT_DATA_DIR, limit: int = 0) -> list[Item]:
    """All items of one benchmark (the first `limit` of every subset when limit > 0), in file order."""
    if name not in LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    d = Path(data_dir)
    for rel in BENCHMARK_FILES[name]:
        if not (d / rel).is_file():
            raise FileNotFoundError(f"{name}: expected the file {rel} under {d} (missing: {d / rel}); point "
                                    "--data_dir at the folder holding agieval/ bbh/ drop/ crass/ race/ gsm8k/ "
                                    "(layout in ../shared/data/README.md)")
    items = LOADERS[name](d)
    if limit > 0:
        kept: dict[str, list[Item]] = {}
        for it in items:
            kept.setdefault(it.subset, [])
            if len(kept[it.subset]) < limit:
                kept[it.subset].append(it)
        items = [it for group in kept.values() for it in group]
    return items


# ---- answer extraction ----
# Rules, tried in order; the first that finds an answer wins, None means "format not OK". A cue is "answer" or
# "correct/best/right/final answer/option/choice", then "is", "would be", "should be" or a colon; "answer" alone
# (the verb) is not a cue. The LAST cue in the output counts.

CUE = (r"\b(?i:(?:final\s+)?answer(?:\s+to\s+(?:the|this)\s+question)?|(?:correct|best|right|final)\s+(?:answer|option|choice))"
       r"\s*(?i:(?:is|would\s+be|should\s+be)\b|[:=])")
SEP = r"\s*[:=]?\s*"
CHOICE_CUE = re.compile(CUE + SEP + r"(?:(?i:option|choice)\s*)?(?:\(([A-R])\)|\b([A-R])(?=[.,:;)\]'\"]|[ \t]*$|\s+[-–(]|\s+because\b))", re.M)
LEADING_LETTER = re.compile(r"\s*(?:\(([A-R])\)|([A-R])(?:[.):]|\s*$))")
TEXT_CUE = re.compile(CUE + SEP + r"(.+)")
NUMBER = r"-?\$?\d(?:[\d,]*\d)?(?:\.\d+)?"
NUMBER_CUE = re.compile(r"(?:####|" + CUE + r")" + SEP + r"[^\n\d-]{0,40}?(" + NUMBER + ")")


def clean(output: str) -> str:
    return output.replace("**", "").strip()  # markdown bold around answers


def after_last_cue(text: str) -> str | None:
    """The rest of the line after the last cue (the next line when the cue ends its line)."""
    hits = [m.group(1).strip() for m in TEXT_CUE.finditer(text) if m.group(1).strip()]
    return hits[-1] if hits else None


def extract_choice(output: str, options: list[str]) -> str | None:
    """A letter: cue + letter, a leading "(B)"/"B.", the only "(X)" mentioned, or the only option text quoted."""
    text, letters = clean(output), LETTERS[:len(options)]
    hits = [a or b for a, b in CHOICE_CUE.findall(text) if (a or b) in letters]
    if hits:
        return hits[-1]
    m = LEADING_LETTER.match(text)
    if m and (m.group(1) or m.group(2)) in letters:
        return m.group(1) or m.group(2)
    quoted = {x for x in re.findall(r"\(([A-R])\)", text) if x in letters}
    if len(quoted) == 1:
        return quoted.pop()
    for span in (after_last_cue(text), text):  # option text after the cue first, then anywhere
        if span:
            found = {letters[i] for i, o in enumerate(options) if o.strip() and
                     re.search(r"(?<!\w)" + re.escape(" ".join(o.split())) + r"(?!\w)", " ".join(span.split()), re.I)}
            if len(found) == 1:
                return found.pop()
    return None


def extract_label(output: str, labels: tuple[str, ...]) -> str | None:
    """One of the labels (case-insensitive): after the last cue, as the first word, or the only one mentioned."""
    text, words = clean(output), "(?i:(" + "|".join(labels) + r"))\b"
    spelling = {label.lower(): label for label in labels}
    hits = re.findall(CUE + SEP + r"[\"'(]*" + words, text)
    if hits:
        return spelling[hits[-1].lower()]
    first = re.match(r"\s*[\"'(]*" + words, text)
    if first:
        return spelling[first.group(1).lower()]
    found = {w.lower() for w in re.findall(r"\b" + words, text)}
    return spelling[found.pop()] if len(found) == 1 else None


def canon_number(s: str) -> str | None:
    """'$1,234.50' -> '1234.5', '18.00' -> '18'; None when s is not a number."""
    try:
        d = Decimal(s.replace("$", "").replace(",", "").strip())
    except InvalidOperation:
        return None
    return str(int(d)) if d == d.to_integral_value() else str(d.normalize())


def extract_number(output: str) -> str | None:
    """The first number after the last cue ("####" counts), else the last number in the output; canonical."""
    text = clean(output)
    hits = NUMBER_CUE.findall(text) or re.findall(NUMBER, text)
    return canon_number(hits[-1]) if hits else None


def extract_tail(output: str) -> str | None:
    """Free text after the last cue, else the output itself when it is a single line."""
    text = clean(output)
    tail = after_last_cue(text)
    if tail is None:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) != 1:
            return None
        tail = lines[0]
    return tail.strip().strip("*\"'`").removesuffix(".").strip() or None


def extract_answer(item: Item, output: str) -> str | None:
    """The answer found in a model output by the item's format rules, or None (format not OK)."""
    if item.kind == "choice":
        return extract_choice(output, item.choices)
    if item.kind == "binary":
        return extract_label(output, tuple(item.choices))
    if item.kind == "number":
        return extract_number(output)
    tail = extract_tail(output)  # drop, dyck, words
    if tail is None:
        return None
    if item.kind == "dyck":  # the bracket characters only, space-separated like the gold
        return " ".join(re.findall(r"[()\[\]{}<>]", tail)) or None
    if item.kind == "words":
        return " ".join(w for w in (w.strip(".;:\"`*()[]") for w in re.split(r"[\s,]+", tail.lower())) if w) or None
    # DROP: currency signs and thousands separators off numbers (the official metric would read "1,000.5" as 10005)
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", re.sub(r"[$€£](?=\d)", "", tail))


# ---- metrics: DROP (official normalisation and span alignment) ----


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def drop_normalize(text: str) -> str:
    """The official DROP normalisation, token by token: lower, punctuation (not in numbers), numbers, articles."""
    out = []
    for tok in re.split(" |-", text):  # the official tokeniser splits on spaces and hyphens
        tok = tok.lower()
        tok = tok if _is_number(tok) else "".join(c for c in tok if c not in set(string.punctuation))
        tok = str(float(tok)) if _is_number(tok) else tok
        tok = " ".join(re.sub(r"\b(a|an|the)\b", " ", tok).split())
        if tok.strip():
            out.append(tok)
    return " ".join(out).strip()


def drop_spans(answer: str) -> list[str]:
    """Split an answer into spans on ", " / ", and " / " and ": the full dev file joins multi-span golds with " and "."""
    spans = [s for s in re.split(r"\s*,\s+(?:and\s+)?|\s+and\s+", answer.strip()) if s.strip()]
    return spans or [answer]


def _bag_f1(pred: set[str], gold: set[str]) -> float:
    common = len(pred & gold)
    p = common / len(pred) if pred else 1.0
    r = common / len(gold) if gold else 1.0
    return 0.0 if p == 0.0 and r == 0.0 else 2 * p * r / (p + r)


def _numbers_match(gold: set[str], pred: set[str]) -> bool:
    """Official rule: a gold span with numbers scores only against a predicted span sharing one of them."""
    gold_nums = {w for w in gold if _is_number(w)}
    return not gold_nums or bool(gold_nums & {w for w in pred if _is_number(w)})


def best_assignment(scores: list[list[float]]) -> float:
    """Largest total of a one-to-one matching of rows to columns (Kuhn-Munkres with potentials, exact, O(n^2 m))."""
    if not scores or not scores[0]:
        return 0.0
    if len(scores) > len(scores[0]):
        scores = [list(col) for col in zip(*scores)]
    n, m = len(scores), len(scores[0])
    cost = [[-s for s in row] for row in scores]  # maximise the score = minimise its negative
    u, v, match, way = [0.0] * (n + 1), [0.0] * (m + 1), [0] * (m + 1), [0] * (m + 1)  # 1-based; match[col] = row
    for i in range(1, n + 1):  # add row i, then grow an alternating path to a free column
        match[0], j0 = i, 0
        minv, used = [math.inf] * (m + 1), [False] * (m + 1)
        while match[j0]:
            used[j0], i0, delta, j1 = True, match[j0], math.inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
        while j0:  # flip the path
            j1 = way[j0]
            match[j0], j0 = match[j1], j1
    return sum(scores[match[j] - 1][j - 1] for j in range(1, m + 1) if match[j])


def drop_em_f1(pred_spans: list[str], gold_spans: list[str]) -> tuple[float, float]:
    """Official get_metrics: EM on the set of normalised spans; F1 = optimal span alignment / max(#spans), rounded."""
    pred = [drop_normalize(s) for s in pred_spans]
    gold = [drop_normalize(s) for s in gold_spans]
    em = float(set(pred) == set(gold) and len(pred) == len(gold))
    pb, gb = [set(s.split()) for s in pred], [set(s.split()) for s in gold]
    scores = [[_bag_f1(p, g) if _numbers_match(g, p) else 0.0 for p in pb] for g in gb]
    return em, round(best_assignment(scores) / max(len(pb), len(gb)), 2)


def drop_metrics(prediction: str | None, golds: list[str]) -> tuple[float, float]:
    """(EM, F1) of a predicted answer string: the best over the gold alternatives, as the official scorer."""
    if prediction is None:
        return 0.0, 0.0
    pairs = [drop_em_f1(drop_spans(prediction), drop_spans(g)) for g in golds]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


# ---- scoring and summary ----


def score_answer(item: Item, extracted: str | None) -> dict:
    """{'correct': bool} (+ 'em', 'f1' for DROP) for an extracted answer against the item's gold."""
    if item.kind == "drop":
        em, f1 = drop_metrics(extracted, item.gold)
        return {"correct": em == 1.0, "em": em, "f1": f1}
    if extracted is None:
        return {"correct": False}
    if item.kind == "number":
        return {"correct": extracted == canon_number(item.gold)}
    gold = " ".join(item.gold.lower().split()) if item.kind == "words" else item.gold
    return {"correct": extracted == gold}


def avg(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def score_row(label: str, recs: list[dict], key: str = "correct") -> list:
    """[label, n, score %, format-OK %] over some records."""
    return [label, len(recs), 100 * avg(r[key] for r in recs), 100 * avg(r["extracted"] is not None for r in recs)]


def macro_row(label: str, rows: list[list]) -> list:
    """[label, n, mean of the rows' scores, mean of their format-OK rates]: a macro-average over subsets."""
    return [label, sum(r[1] for r in rows), avg(r[2] for r in rows), avg(r[3] for r in rows)]


def benchmark_rows(benchmark: str, recs: list[dict]) -> tuple[float, list[list]]:
    """(headline score %, table rows) of one benchmark; the headline choices are in the module docstring."""
    subsets = {s: [r for r in recs if r["subset"] == s] for s in dict.fromkeys(r["subset"] for r in recs)}
    rows = [score_row(s, rs) for s, rs in subsets.items()]
    if benchmark == "agieval":
        rows += [macro_row("mean over sets", rows), score_row("pooled", recs)]
        return rows[-2][2], rows
    if benchmark == "bbh":
        mc, free = [r for r in rows if r[0] in BBH_MC], [r for r in rows if r[0] in BBH_FREE_FORM]
        rows += [macro_row(f"mean over {len(mc)} MC tasks", mc), macro_row(f"mean over {len(free)} free-form tasks", free)]
        return rows[-2][2], rows
    if benchmark == "drop":
        rows = [score_row("EM", recs, "em"), score_row("F1", recs, "f1")]
        return rows[1][2], rows
    if benchmark == "race":
        rows.append(score_row("pooled", recs))
    return rows[-1][2], rows


def summarize(records: list[dict]) -> dict:
    """system -> benchmark -> {score, format_ok, n, rows: [[label, n, score %, format-OK %], ...]}, plus "avg"."""
    out: dict = {}
    for system in dict.fromkeys(r["system"] for r in records):
        res = out[system] = {}
        for b in BENCHMARKS:
            recs = [r for r in records if r["benchmark"] == b and r["system"] == system]
            if recs:
                score, rows = benchmark_rows(b, recs)
                res[b] = {"score": score, "format_ok": 100 * avg(r["extracted"] is not None for r in recs),
                          "n": len(recs), "rows": rows}
        # the paper's avg is the macro-average of the six headline scores (only meaningful with all six)
        res["avg"] = avg(res[b]["score"] for b in BENCHMARKS) if all(b in res for b in BENCHMARKS) else None
    return out


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def summary_markdown(summary: dict, stats: dict) -> str:
    """Our rows beside the paper's Orca 2 rows, then format-OK rates, then every subset."""
    names = {"agieval": "AGIEval", "bbh": "BBH", "drop": "DROP", "crass": "CRASS", "race": "RACE", "gsm8k": "GSM8K"}
    head = "| model | " + " | ".join(names[b] for b in BENCHMARKS)
    lines = ["## Zero-shot results (%)", "", head + " | avg |", "|---" * (len(BENCHMARKS) + 2) + "|"]
    for system, res in summary.items():
        lines.append(f"| ours ({system} sm) | " + " | ".join(fmt(res.get(b, {}).get("score")) for b in BENCHMARKS)
                     + f" | {fmt(res['avg'])} |")
    for name in ("Orca-2-7B", "Orca-2-7B w/ cautious sm", "Orca-2-13B", "Orca-2-13B w/ cautious sm"):
        paper = PAPER_RESULTS[name]
        lines.append(f"| paper: {name} | " + " | ".join(fmt(paper[b]) for b in BENCHMARKS) + f" | {fmt(paper['avg'])} |")
    lines += ["", "## Format-OK rate (% of outputs with an extractable answer)", "", head.replace("model", "system") + " |",
              "|---" * (len(BENCHMARKS) + 1) + "|"]
    for system, res in summary.items():
        lines.append(f"| {system} | " + " | ".join(fmt(res.get(b, {}).get("format_ok")) for b in BENCHMARKS) + " |")
    systems = list(summary)
    lines += ["", "## Per subset (score %, format-OK %)", "",
              "| benchmark | subset | n | " + " | ".join(f"{s} | {s} fmt-OK" for s in systems) + " |",
              "|---" * (3 + 2 * len(systems)) + "|"]
    for b in BENCHMARKS:
        per_system = [{r[0]: r for r in summary[s][b]["rows"]} if b in summary[s] else {} for s in systems]
        for label in dict.fromkeys(k for p in per_system for k in p):
            n = next(p[label][1] for p in per_system if label in p)
            cells = [f"{fmt(p[label][2])} | {fmt(p[label][3])}" if label in p else "- | -" for p in per_system]
            lines.append(f"| {names[b]} | {label} | {n} | " + " | ".join(cells) + " |")
    lines += ["", f"Generated {stats['new_tokens']:,} tokens for {stats['examples']:,} prompts in {stats['seconds']:.1f} s: "
              f"{stats['tokens_per_s']:.1f} tokens/s, {stats['examples_per_s']:.2f} examples/s; "
              f"{stats['truncated']} prompts cut to fit the context."]
    return "\n".join(lines) + "\n"


# ---- generation ----


def fit_context(ids: list[int], max_new: int, ctx: int) -> tuple[list[int], bool]:
    """Cut a prompt in the middle so that prompt + max_new tokens fit the context (keeps template start and end)."""
    budget = ctx - max_new
    if len(ids) <= budget:
        return ids, False
    head = budget // 4
    return ids[:head] + ids[len(ids) - (budget - head):], True


def generate_all(model, prompts: list[list[int]], max_new: list[int], batch_size: int, progress: bool) -> tuple[list[list[int]], dict]:
    """Greedy outputs for every prompt: batches of one max_new value, longest prompts first (little padding)."""
    order = sorted(range(len(prompts)), key=lambda i: (max_new[i], -len(prompts[i])))
    outputs: list[list[int]] = [[] for _ in prompts]
    new_tokens, t0 = 0, time.perf_counter()
    bar = tqdm(total=len(prompts), unit="ex", disable=not progress, dynamic_ncols=True)
    start = 0
    while start < len(order):
        batch = [i for i in order[start:start + batch_size] if max_new[i] == max_new[order[start]]]
        with torch.inference_mode():
            outs = model.generate([prompts[i] for i in batch], max_new[batch[0]], stop_ids=STOP_IDS, temperature=0.0)
        for i, out in zip(batch, outs):
            outputs[i] = out
            new_tokens += len(out)
        start += len(batch)
        bar.update(len(batch))
        bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.1f}")
    bar.close()
    seconds = time.perf_counter() - t0
    return outputs, {"examples": len(prompts), "new_tokens": new_tokens, "seconds": seconds,
                     "tokens_per_s": new_tokens / max(seconds, 1e-9), "examples_per_s": len(prompts) / max(seconds, 1e-9)}


def load_model(cfg: EvalConfig):
    """The checkpoint and its tokenizer on the chosen device and dtype."""
    # Imported here: data.py imports this module (load_benchmark for decontamination), so no import at the top.
    from data import Tokenizer
    from model import Transformer
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32"), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"--dtype must be a floating-point torch dtype (bfloat16, float16, float32); got {cfg.dtype!r}")
    model = Transformer.from_pretrained(cfg.model, device=device, dtype=dtype).eval()
    return model, Tokenizer.from_pretrained(cfg.tokenizer or cfg.model)


# ---- main ----


def main(argv: list[str]) -> dict:
    cfg = parse_args(argv)
    print("evaluate config:", json.dumps(asdict(cfg)))
    if not cfg.model:
        raise ValueError("--model DIR is required (a folder with config.json, the weights and tokenizer.model)")
    benchmarks, systems = cfg.benchmarks.split(","), cfg.system.split(",")
    for s in systems:
        if s not in SYSTEM_MESSAGES:
            raise ValueError(f"unknown system message {s!r}; choose from {', '.join(SYSTEM_MESSAGES)}")
    new_per_benchmark = max_new_tokens_for(cfg)
    items = [it for b in benchmarks for it in load_benchmark(b, cfg.data_dir, cfg.limit)]  # fail before the model loads
    print(f"loaded {len(items):,} items: " + ", ".join(f"{b} {sum(it.benchmark == b for it in items):,}" for b in benchmarks))
    model, tok = load_model(cfg)
    ctx = model.args.max_seq_len
    jobs = [(it, s) for s in systems for it in items]
    prompts, max_new, cut = [], [], []
    for it, s in jobs:
        n = new_per_benchmark[it.benchmark]
        if n >= ctx:
            raise ValueError(f"max new tokens for {it.benchmark} ({n}) must be below the model's context ({ctx})")
        ids, was_cut = fit_context(tok.encode_prompt(SYSTEM_MESSAGES[s], it.prompt), n, ctx)
        assert ids[0] == BOS_ID, f"encode_prompt must start with BOS, got {ids[:3]}"
        prompts.append(ids)
        max_new.append(n)
        cut.append(was_cut)
    outputs, stats = generate_all(model, prompts, max_new, cfg.batch_size, cfg.progress)
    stats["truncated"] = sum(cut)
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    with open(out_dir / "predictions.jsonl", "w", encoding="utf-8") as f:
        for (it, s), ids, out, was_cut in zip(jobs, prompts, outputs, cut):
            text = tok.decode(out)
            extracted = extract_answer(it, text)
            rec = {"benchmark": it.benchmark, "subset": it.subset, "id": it.id, "system": s,
                   "prompt": render_prompt(SYSTEM_MESSAGES[s], it.prompt), "output": text, "extracted": extracted,
                   "gold": it.gold, **score_answer(it, extracted), "prompt_tokens": len(ids), "prompt_cut": was_cut, "new_tokens": len(out)}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            records.append(rec)
    summary = summarize(records)
    md = summary_markdown(summary, stats)
    (out_dir / "summary.md").write_text(md, encoding="utf-8")
    (out_dir / "summary.json").write_text(json.dumps({"config": asdict(cfg), "stats": stats, "results": summary}, indent=2))
    print(md)
    print(f"wrote {out_dir / 'predictions.jsonl'} ({len(records):,} lines), {out_dir / 'summary.md'}, {out_dir / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
