"""The miniature: three small task types, each with the strategy that fits it and its worked solution.

    python tasks.py                      # a problem of each type and its solution

  arith    'Ann has 5 coins. Ann gets 3 more. Ann gives away 2. How many ...'   fits step-by-step (a running total)
  compare  'Box 3 is heavier than box 7. ... Which is heavier, box 3 or box 5?'  fits recall-then-generate (facts)
  easy     'What is 5 + 3?'                                                     fits direct
train.py's demo trains on these solutions with the instruction erased; servers.py's teacher also answers under the
strategies that do not fit (sometimes wrongly), for synth.py's strategy selection in repro.py.
"""

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import cli
from orca2 import STRATEGIES

NAMES = "Ann Bob Cid Dan Eve Fay Gus Hal Ivy Jon Kim Lea Max Ned Oli Pam Ray Sue Tom Uma".split()
THINGS = ["coins", "apples", "cards", "stamps", "books", "shells"]
ADJECTIVES = ["heavier", "bigger", "older", "taller"]
FITS = {"arith": "step-by-step", "compare": "recall-then-generate", "easy": "direct"}  # the designed strategies
OPENINGS = {"arith": "Running total:", "compare": "Recall the facts:", "easy": "Answer:"}  # their first words
EXAMPLE_PROMPT = "Ann has 5 coins. Ann gets 3 more. Ann gives away 2. How many coins does Ann have now?"


@dataclass
class Problem:
    kind: str        # "arith" | "compare" | "easy"
    question: str    # the user message
    answer: str      # the gold final answer (a number: the total, or the heavier box)
    steps: list      # the solution's lines: running-total steps (arith) or the recalled facts (compare)
    size: int        # difficulty: changes (arith) or boxes (compare)


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
    facts = re.findall(r"(Box (\d) is \w+ than box (\d)\.)", question)
    ask = re.search(r"Which is \w+, box (\d) or box (\d)\?", question)
    if not facts or not ask:
        raise ValueError(f"not a miniature problem: {question[:80]!r}")
    below, box, recalled = {a: (fact, b) for fact, a, b in facts}, ask[1], []
    while box in below and box != ask[2]:  # follow the facts down from the first box asked
        recalled.append(below[box][0])
        box = below[box][1]
    if box != ask[2]:
        recalled.append(f"Box {box} is last.")
    return Problem("compare", question, ask[1] if box == ask[2] else ask[2], recalled, len(facts) + 1)


def solution(p: Problem) -> str:
    """The worked answer under the strategy that fits: a running total, the facts recalled, or the answer at once."""
    return "\n".join(([OPENINGS[p.kind]] if p.steps else []) + p.steps + [f"Answer: {p.answer}"])


def judge(question: str, output: str) -> str:
    """For train.py's demo: is a student's output to a miniature problem right, and did it use the fitting strategy?"""
    try:
        p = solve(question)
    except ValueError:
        return ""  # not a miniature problem
    right = "Answer:" in output and output.rsplit("Answer:", 1)[1].strip() == p.answer
    used = output.startswith(OPENINGS[p.kind])  # each strategy's answers open with its own words
    return (f"(the right answer is {p.answer}: {'correct' if right else 'wrong'}; strategy {FITS[p.kind]!r} fits "
            f"this task, the student {'used it' if used else 'did not'})")


TRAIN_SIZES = {"arith": (2, 3), "compare": (4, 5)}  # changes (arith), boxes (compare)
TRAIN_MIX = {"arith": 0.49, "compare": 0.495, "easy": 0.015}  # only 48 distinct easy sums exist


def make_problem(rng: random.Random, kind: str, sizes: dict) -> Problem:
    """A random problem of a kind, its size drawn from sizes[kind]: changes (arith) or boxes (compare)."""
    if kind == "easy":  # one change of 1-3, asked as a sum
        a, k = rng.randint(0, 9), rng.randint(1, 3)
        add = a - k < 0 or (a + k <= 9 and rng.random() < 0.5)
        return solve(f"What is {a} {'+' if add else '-'} {k}?")
    size = rng.choice(sizes[kind])
    if kind == "compare":  # shuffled facts of a hidden order; which of two boxes, two facts apart, is heavier?
        adj = rng.choice(ADJECTIVES)
        order = rng.sample(range(1, 10), size)  # order[0] is the heaviest
        facts = [f"Box {a} is {adj} than box {b}." for a, b in zip(order, order[1:])]
        i, j = rng.sample(range(size), 2)
        while abs(i - j) < 2:
            i, j = rng.sample(range(size), 2)
        rng.shuffle(facts)
        return solve(" ".join(facts) + f" Which is {adj}, box {order[i]} or box {order[j]}?")
    name, thing, total = rng.choice(NAMES), rng.choice(THINGS), rng.randint(2, 9)  # arith: a running total in 0-9
    text = [f"{name} has {total} {thing}."]
    for _ in range(size):
        k = rng.randint(1, 3)
        add = total - k < 0 or (total + k <= 9 and rng.random() < 0.5)
        text.append(f"{name} gets {k} more." if add else f"{name} gives away {k}.")
        total = total + k if add else total - k
    text.append(f"How many {thing} does {name} have now?")
    return solve(" ".join(text))


def make_problems(rng: random.Random, n: int, seen: set[str]) -> list[Problem]:
    """n distinct training problems in TRAIN_MIX's shares and TRAIN_SIZES, none of them in `seen` (held out)."""
    kinds = [kind for kind, share in TRAIN_MIX.items() for _ in range(round(share * n))]
    rng.shuffle(kinds)
    seen, problems = set(seen), []
    for kind in kinds:
        p, tries = make_problem(rng, kind, TRAIN_SIZES), 0
        while p.question in seen:
            p, tries = make_problem(rng, kind, TRAIN_SIZES), tries + 1
            if tries > 10_000:
                raise ValueError(f"ran out of distinct {kind} problems; lower n or that kind's share")
        seen.add(p.question)
        problems.append(p)
    return problems


def write_data(problems: list[Problem], path: Path) -> None:
    """OpenOrca layout (system_prompt = the fitting strategy's instruction, question, response), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        for p in problems:
            row = {"system_prompt": STRATEGIES[FITS[p.kind]], "question": p.question, "response": solution(p)}
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    cli.demo_args(__doc__)
    rng = random.Random(0)
    for p in [make_problem(rng, kind, TRAIN_SIZES) for kind in FITS]:
        print(f"\n[{p.kind}] {p.question}  (gold {p.answer}; {FITS[p.kind]})\n{solution(p)}")
