"""The six benchmarks of Orca 2's evaluation (ORCA2.md 7) as published in ../shared/data/benchmarks: items and prompts.

    python benchmarks.py                      # how many items each benchmark has, and one prompt of each
    items = load_benchmark("gsm8k")           # list[Item]: id, benchmark, subset, text, prompt, gold, kind, choices
"""

import gzip
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import cli
from cli import UserError
from orca2 import BENCHMARKS, SHARED_DATA

DEFAULT_DATA_DIR = SHARED_DATA / "benchmarks"


AGIEVAL_TASKS = tuple("aqua-rat logiqa-en lsat-ar lsat-lr lsat-rc sat-math sat-en sat-en-without-passage".split())
BBH_BINARY = {"boolean_expressions": ("True", "False"), "causal_judgement": ("Yes", "No"),
              "formal_fallacies": ("valid", "invalid"), "navigate": ("Yes", "No"),
              "sports_understanding": ("yes", "no"), "web_of_lies": ("Yes", "No")}  # labels spelt as the golds
BBH_FREE_FORM = {"dyck_languages": "dyck", "word_sorting": "words", "multistep_arithmetic_two": "number",
                 "object_counting": "number"}
BBH_CHOICE = tuple("""date_understanding disambiguation_qa geometric_shapes hyperbaton logical_deduction_five_objects
    logical_deduction_seven_objects logical_deduction_three_objects movie_recommendation penguins_in_a_table
    reasoning_about_colored_objects ruin_names salient_translation_error_detection snarks temporal_sequences
    tracking_shuffled_objects_five_objects tracking_shuffled_objects_seven_objects
    tracking_shuffled_objects_three_objects""".split())
BBH_MC = tuple(sorted([*BBH_BINARY, *BBH_CHOICE]))  # the 23 the BBH score averages
# Zero-shot, no chain-of-thought trigger: one fixed sentence per answer format, naming the cue "Answer:" that
# extraction looks for first. The paper's own prompts are not published in readable form (ORCA2.md 7).
INSTRUCTIONS = {
    "choice": 'End your response with "Answer: (X)", where X is the letter of the correct option.',
    "binary": 'End your response with "Answer: {0}" or "Answer: {1}".',
    "number": 'End your response with "Answer:" followed by the final number.',
    "dyck": 'End your response with "Answer:" followed by the closing brackets, separated by spaces.',
    "words": 'End your response with "Answer:" followed by the sorted words, separated by spaces.',
    "drop": 'Answer the question using the passage. End your response with "Answer:" followed by the answer: '
            'a number, a date, or words from the passage (join several answers with "and").'}
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


def item_text(item: Item) -> str:
    """The text the model is shown for this item (question, passage, options), for decontamination."""
    return item.text


def make_item(item_id: str, benchmark: str, subset: str, text: str, gold, kind: str, choices=()) -> Item:
    instruction = INSTRUCTIONS[kind].format(*choices) if kind == "binary" else INSTRUCTIONS[kind]
    return Item(item_id, benchmark, subset, text, f"{text}\n\n{instruction}", gold, kind, list(choices))


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
    for task in sorted([*BBH_BINARY, *BBH_FREE_FORM, *BBH_CHOICE]):
        kind = "binary" if task in BBH_BINARY else BBH_FREE_FORM.get(task, "choice")
        for i, ex in enumerate(json.loads((d / f"bbh/{task}.json").read_text())["examples"]):
            text, gold, choices = ex["input"], ex["target"], BBH_BINARY.get(task, ())
            if kind == "choice":  # options are lines "(A) text" inside the input; 3 upstream targets are texts
                choices = list(dict(re.findall(r"^\(([A-R])\)\s*(.*)$", text, re.M)).values())
                gold = gold[1] if re.fullmatch(r"\([A-R]\)", gold) else gold
            items.append(make_item(f"bbh/{task}/{i}", "bbh", task, text, gold, kind, choices))
    return items


def load_drop(d: Path) -> list[Item]:
    items = []
    for i, r in enumerate(read_lines(d / "drop/drop_v0_dev.jsonl.gz")):
        text = r["context"].removesuffix("\nAnswer:")  # context: "Passage: <p>\nQuestion: <q>\nAnswer:"
        golds = list(dict.fromkeys(g for g in r["ref_text"].split("|") if g.strip()))  # "a|b"; 8 rows repeat one
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
    rows = read_lines(d / "gsm8k/test.jsonl")
    golds = [r["answer"].split("####")[-1].strip().replace(",", "") for r in rows]  # "... #### 1,000" -> "1000"
    return [make_item(f"gsm8k/{i}", "gsm8k", "test", r["question"], gold, "number")
            for i, (r, gold) in enumerate(zip(rows, golds))]


LOADERS = dict(agieval=load_agieval, bbh=load_bbh, drop=load_drop, crass=load_crass, race=load_race, gsm8k=load_gsm8k)


def load_benchmark(name: str, data_dir: str | Path = DEFAULT_DATA_DIR, limit: int = 0) -> list[Item]:
    """All items of one benchmark (the first `limit` of every subset when limit > 0), in file order."""
    if name not in LOADERS:
        raise UserError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
    try:
        items = LOADERS[name](Path(data_dir))
    except (FileNotFoundError, IsADirectoryError) as e:  # a data file the loader reads is not in data_dir
        raise UserError(f"{name}: no file {e.filename}; point --data_dir at the folder holding agieval/ bbh/ drop/ "
                        "crass/ race/ gsm8k/ (layout in ../shared/data/README.md)") from None
    if limit > 0:  # each loader gives a subset's items together, in file order
        subsets = itertools.groupby(items, key=lambda it: it.subset)
        items = [it for _, group in subsets for it in itertools.islice(group, limit)]
    return items


if __name__ == "__main__":
    cli.demo_args(__doc__)
    for name in BENCHMARKS:
        items = load_benchmark(name)
        print(f"{name}: {len(items):,} items; first prompt:\n{items[0].prompt[:400]}\n")
