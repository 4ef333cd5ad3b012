"""The miniature: three small task types and a programmatic teacher whose accuracy depends on its strategy.

    python tasks.py                      # a few problems, and the teacher's answer under each strategy

Used by train.py's demo (the student learns to pick a strategy from the task alone), by repro.py (Orca 2's claim in
miniature) and, served as an OpenAI-compatible endpoint, by synth.py's tests and repro.py's data:
  arith    'Ann has 5 coins. Ann gets 3 more. Ann gives away 2. How many ...'   fits step-by-step (a running total)
  compare  'Box 3 is heavier than box 7. ... Which is heavier, box 3 or box 5?'  fits recall-then-generate (facts)
  easy     'What is 5 + 3?'                                                     fits direct
The teacher reads only the question text and the system instruction (orca2.STRATEGIES). Under the strategy that
fits a task it is always right; under the others it is sometimes wrong, as a real model is when it guesses a
multi-step answer at once: strategy selection must recover the fitting strategy from accuracy alone.
"""

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

from client import LocalServer, chat_response
from orca2 import STRATEGIES

NAMES = ["Ann", "Bob", "Cid", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lea", "Max", "Ned", "Oli",
         "Pam", "Ray", "Sue", "Tom", "Uma"]
THINGS = ["coins", "apples", "cards", "stamps", "books", "shells"]
ADJECTIVES = ["heavier", "bigger", "older", "taller"]
FITS = {"arith": "step-by-step", "compare": "recall-then-generate", "easy": "direct"}  # the designed strategies
OPENINGS = {"arith": "Running total:", "compare": "Recall the facts:", "easy": "Answer:"}  # their first words
# The teacher's accuracy when a strategy does not fit: (task, strategy) -> chance of the right answer.
MISFIT_ACCURACY = {("arith", "recall-then-generate"): 0.7, ("compare", "step-by-step"): 0.8}
GUESS_ACCURACY = {"arith": 0.5, "compare": 0.55}  # any other strategy: an answer guessed at once
EXAMPLE_PROMPT = "Ann has 5 coins. Ann gets 3 more. Ann gives away 2. How many coins does Ann have now?"


@dataclass
class Problem:
    kind: str        # "arith" | "compare" | "easy"
    question: str    # the user message
    answer: str      # the gold final answer (a number: the total, or the heavier box)
    steps: list      # the solution's lines: running-total steps (arith) or the recalled facts (compare)
    size: int        # difficulty: changes (arith) or boxes (compare)


def make_arith(rng: random.Random, n_changes: int) -> Problem:
    """A running total: 'Ann has 5 coins. Ann gets 3 more. Ann gives away 2. ...' (the total stays in 0-9)."""
    name, thing, total = rng.choice(NAMES), rng.choice(THINGS), rng.randint(2, 9)
    text = [f"{name} has {total} {thing}."]
    for _ in range(n_changes):
        k = rng.randint(1, 3)
        add = total - k < 0 or (total + k <= 9 and rng.random() < 0.5)
        text.append(f"{name} gets {k} more." if add else f"{name} gives away {k}.")
        total = total + k if add else total - k
    text.append(f"How many {thing} does {name} have now?")
    return solve(" ".join(text))


def make_compare(rng: random.Random, n_boxes: int) -> Problem:
    """A hidden order of boxes, given as shuffled 'Box 3 is heavier than box 7.' facts; which of two is heavier?
    At least two facts must be chained to answer."""
    adj = rng.choice(ADJECTIVES)
    order = rng.sample(range(1, 10), n_boxes)  # order[0] is the heaviest
    facts = [f"Box {a} is {adj} than box {b}." for a, b in zip(order, order[1:])]
    i, j = rng.sample(range(n_boxes), 2)
    while abs(i - j) < 2:
        i, j = rng.sample(range(n_boxes), 2)
    rng.shuffle(facts)
    return solve(" ".join(facts) + f" Which is {adj}, box {order[i]} or box {order[j]}?")


def make_easy(rng: random.Random) -> Problem:
    a, k = rng.randint(0, 9), rng.randint(1, 3)
    add = a - k < 0 or (a + k <= 9 and rng.random() < 0.5)
    return solve(f"What is {a} {'+' if add else '-'} {k}?")


def solve(question: str) -> Problem:
    """The problem a question states, solved from its text alone (the teacher reads nothing else)."""
    easy = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", question)
    if easy:
        a, op, b = int(easy[1]), easy[2], int(easy[3])
        return Problem("easy", question, str(a + b if op == "+" else a - b), [], 1)
    start = re.match(r"\w+ has (\d+) ", question)
    if start:
        total, steps = int(start[1]), []
        for verb, k in re.findall(r"(gets|gives away) (\d+)", question):
            new = total + int(k) if verb == "gets" else total - int(k)
            steps.append(f"{total} {'+' if verb == 'gets' else '-'} {k} = {new}")
            total = new
        return Problem("arith", question, str(total), steps, len(steps))
    facts = re.findall(r"Box (\d) is (\w+) than box (\d)\.", question)
    ask = re.search(r"Which is \w+, box (\d) or box (\d)\?", question)
    if not facts or not ask:
        raise ValueError(f"not a miniature problem: {question[:80]!r}")
    below, box, recalled = {a: (adj, b) for a, adj, b in facts}, ask[1], []
    while box in below and box != ask[2]:  # follow the facts down from the first box asked
        adj, nxt = below[box]
        recalled.append(f"Box {box} is {adj} than box {nxt}.")
        box = nxt
    if box != ask[2]:
        recalled.append(f"Box {box} is last.")
    return Problem("compare", question, ask[1] if box == ask[2] else ask[2], recalled, len(facts) + 1)


def teacher(question: str, strategy: str) -> str:
    """The teacher's response under a strategy: right under the fitting one, sometimes wrong under the others."""
    p = solve(question)
    answer = p.answer
    if strategy != FITS[p.kind] and p.kind != "easy":  # a guess or an ill-fitting method: sometimes wrong
        chance = MISFIT_ACCURACY.get((p.kind, strategy), GUESS_ACCURACY[p.kind])
        if random.Random(hashlib.sha256(f"{strategy}\n{question}".encode()).digest()).random() >= chance:
            answer = wrong_answer(p)
    sentences = [s.strip() for s in re.findall(r"[^.?]+[.?]", question)][:-1]  # the statements, not the question
    if strategy not in ("step-by-step", "recall-then-generate"):
        lines = []  # direct, or a strategy this teacher does not know: it answers at once
    elif p.kind == "easy":
        lines = [f"{question[8:-1]} = {answer}"]
    elif strategy == "step-by-step":
        lines = [OPENINGS["arith"], *p.steps] if p.kind == "arith" else ["Step by step:", *sentences]
    else:
        lines = [OPENINGS["compare"], *(p.steps if p.kind == "compare" else sentences)]
    return "\n".join(lines + [f"Answer: {answer}"])


def wrong_answer(p: Problem) -> str:
    """A plausible mistake: off by one (arith), the other box asked about (compare)."""
    if p.kind == "arith":
        return str(int(p.answer) + 1 if int(p.answer) < 9 else int(p.answer) - 1)
    asked = re.findall(r"box (\d)", p.question.split("Which")[-1])
    return next(b for b in asked if b != p.answer)


def strategy_of(system: str) -> str:
    """The library strategy whose instruction is `system`; anything else counts as 'direct'."""
    return next((name for name, text in STRATEGIES.items() if text == system), "direct")


def teacher_server(port: int = 0) -> LocalServer:
    """The programmatic teacher behind the OpenAI chat-completions wire protocol, on 127.0.0.1."""
    def respond(path: str, body: dict):
        messages = body["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        text = teacher(messages[-1]["content"], strategy_of(system))
        return 200, chat_response(text, prompt_tokens=len(json.dumps(messages)) // 4,
                                  completion_tokens=len(text) // 4), {}
    return LocalServer(respond, port)


# Difficulty of each split; the hard split is strictly beyond anything in training.
TRAIN_SIZES = {"arith": (2, 3), "compare": (4, 5)}
HARD_SIZES = {"arith": (4, 5), "compare": (6, 7)}  # changes (arith), boxes (compare)
TRAIN_MIX = {"arith": 0.49, "compare": 0.495, "easy": 0.015}  # only 48 distinct easy sums exist


def make_problem(rng: random.Random, kind: str, sizes: dict) -> Problem:
    if kind == "easy":
        return make_easy(rng)
    size = rng.choice(sizes[kind])
    return make_arith(rng, size) if kind == "arith" else make_compare(rng, size)


def make_splits(data_seed: int, n_train: int, n_test: int) -> dict[str, list[Problem]]:
    """train, and held-out test splits per task type (sizes as in training: '-test'; larger: '-hard').

    Test problems (and EXAMPLE_PROMPT) are drawn first; training problems are distinct and never a held-out one.
    The easy sums are too few to hold out: 'easy-seen' checks they are still answered directly and correctly."""
    rng = random.Random(data_seed)
    splits = {f"{kind}-{name}": [make_problem(rng, kind, sizes) for _ in range(n_test)]
              for kind in ("arith", "compare") for name, sizes in (("test", TRAIN_SIZES), ("hard", HARD_SIZES))}
    seen = {p.question for ps in splits.values() for p in ps} | {EXAMPLE_PROMPT}
    kinds = [kind for kind, share in TRAIN_MIX.items() for _ in range(round(share * n_train))]
    rng.shuffle(kinds)
    train = []
    for kind in kinds:
        p, tries = make_problem(rng, kind, TRAIN_SIZES), 0
        while p.question in seen:
            p, tries = make_problem(rng, kind, TRAIN_SIZES), tries + 1
            if tries > 10_000:
                raise ValueError(f"ran out of distinct {kind} problems; lower n_train or that kind's share")
        seen.add(p.question)
        train.append(p)
    easy = [p for p in train if p.kind == "easy"]
    splits["easy-seen"] = [easy[k % len(easy)] for k in range(min(n_test, len(easy)))]
    return {"train": train, **splits}


def write_data(problems: list[Problem], path: Path, strategy: dict[str, str] = FITS) -> Path:
    """OpenOrca layout (system_prompt = the strategy instruction, question, response), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for p in problems:
            s = strategy[p.kind]
            f.write(json.dumps({"system_prompt": STRATEGIES[s], "question": p.question,
                                "response": teacher(p.question, s)}) + "\n")
    os.replace(tmp, path)
    return path


if __name__ == "__main__":
    import sys
    if sys.argv[1:]:
        print(__doc__)
        raise SystemExit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    rng = random.Random(0)
    for p in (make_arith(rng, 3), make_compare(rng, 5), make_easy(rng)):
        print(f"\n[{p.kind}] {p.question}  (gold {p.answer})")
        for s in ("direct", "step-by-step", "recall-then-generate"):
            print(f"--- {s}:\n{teacher(p.question, s)}")
