"""answers.py: answer extraction and scoring (GSM8K numbers, letters, labels, free-form BBH, DROP)."""

import itertools
import json
import random

import pytest
from conftest import SHARED_DATA

import answers as A
from benchmarks import load_benchmark
from orca2 import BENCHMARKS

BENCH = SHARED_DATA / "benchmarks"


@pytest.fixture(scope="module")
def items():
    return {b: load_benchmark(b, BENCH) for b in BENCHMARKS}


def by_id(items, benchmark: str):
    return {it.id: it for it in items[benchmark]}


# ---- answer extraction ----

OPTIONS = ["Paris", "London", "Rome", "Berlin"]


@pytest.mark.parametrize("output, expected", [
    ("The capital is on the Seine.\nAnswer: (A)", "A"),
    ("Final answer: **(C)**", "C"),
    ("The correct option is D.", "D"),
    ("Therefore, the best answer is option B.", "B"),
    ("The answer is: B", "B"),
    ("Answer:\n(C)", "C"),
    ("(A) is tempting, so the answer is (A).\nAnswer: (D)", "D"),  # the last cue wins
    ("(B) London", "B"),                                           # a leading option
    ("C.", "C"),
    ("Only (C) fits the description.", "C"),                       # the only option letter quoted
    ("It is Rome, of course.", "C"),                               # the only option text quoted
    ("A city on the Seine.", None),                                # "A" the article is not an answer
    ("Paris or Rome, hard to say.", None),                         # two option texts: no answer
    ("Both (A) and (B) are wrong.", None),
    ("Answer: (E)", None),                                         # not one of the four letters
    ("I cannot answer that.", None),
])
def test_extract_choice(output, expected):
    assert A.extract_choice(output, OPTIONS) == expected


@pytest.mark.parametrize("output, labels, expected", [
    ("not ( True ) is False.\nAnswer: False", ("True", "False"), "False"),
    ("true", ("True", "False"), "True"),                           # returned in the gold's spelling
    ('So the answer is "No".', ("Yes", "No"), "No"),
    ("Yes, the sentence is plausible.", ("yes", "no"), "yes"),
    ("The argument is invalid.", ("valid", "invalid"), "invalid"),  # "valid" inside "invalid" does not count
    ("It could be True or False.", ("True", "False"), None),
])
def test_extract_label(output, labels, expected):
    assert A.extract_label(output, labels) == expected


@pytest.mark.parametrize("output, expected", [
    ("She sells 9 eggs at $2 each.\nAnswer: $18", "18"),
    ("The answer is $1,234.50.", "1234.5"),
    ("Answer: 18 dollars per day", "18"),
    ("so 16 - 3 - 4 = 9 eggs and 9 * 2 = 18", "18"),               # no cue: the last number
    ("The total is 5 apples.\n#### 1,000", "1000"),
    ("The answer is: -5 degrees", "-5"),
    ("Final answer: 7.00 meters, found in 3 steps", "7"),
    ("I am not sure.", None),
])
def test_extract_number_gsm8k(output, expected):
    assert A.extract_number(output) == expected


def test_gsm8k_scoring_ignores_commas_units_and_dollars(items):
    gsm = by_id(items, "gsm8k")
    item = next(it for it in items["gsm8k"] if it.gold == "2125")  # "#### 2,125" in the file
    assert A.score_answer(item, A.extract_answer(item, "Answer: $2,125.00"))["correct"]
    assert not A.score_answer(item, A.extract_answer(item, "Answer: 2,126"))["correct"]
    janet = gsm["gsm8k/0"]
    assert A.score_answer(janet, A.extract_answer(janet, "She makes $18 every day."))["correct"]
    assert A.score_answer(janet, None) == {"correct": False}


def test_extract_free_form_bbh_and_drop(items):
    bbh = by_id(items, "bbh")
    dyck, words = bbh["bbh/dyck_languages/0"], bbh["bbh/word_sorting/0"]
    assert A.extract_answer(dyck, "We must close both.\nAnswer: ] ]") == "] ]"
    assert A.score_answer(dyck, A.extract_answer(dyck, "Answer: ]]"))["correct"]
    assert A.score_answer(words, A.extract_answer(words, "Answer: Syndrome, therefrom."))["correct"]
    assert A.extract_answer(words, "Let me think.\nThe words are many.") is None  # several lines, no cue
    count = bbh["bbh/object_counting/0"]
    assert A.score_answer(count, A.extract_answer(count, "Counting each one... Answer: 8 instruments"))["correct"]
    drop = items["drop"][0]
    assert A.extract_answer(drop, "Answer: **1,000 yards**.") == "1000 yards"
    assert A.extract_answer(drop, "The answer is $3,500.5") == "3500.5"
    assert A.extract_answer(drop, "25 to 44") == "25 to 44"             # a one-line answer is the answer
    assert A.extract_answer(drop, "First, look.\nThen count.") is None
    assert A.extract_answer(drop, "Let me answer step by step.\nThe Bears won.") is None  # the verb is no cue
    assert A.extract_answer(drop, "Two field goals.\nThe answer to this question is 2.") == "2"


def test_score_answer_on_real_items(items):
    crass = by_id(items, "crass")["crass/1"]
    out = "If she had not opened it, it would still be shut.\nAnswer: (C) The treasure chest would have remained closed."
    assert A.score_answer(crass, A.extract_answer(crass, out)) == {"correct": True}
    quirk = next(it for it in items["bbh"] if it.gold == "Monsters, Inc")
    assert not A.score_answer(quirk, A.extract_answer(quirk, "Answer: (A)"))["correct"]
    drop = by_id(items, "drop")["drop/1"]
    assert A.score_answer(drop, "Filipinos, Pakistanis") == {"correct": True, "em": 1.0, "f1": 1.0}
    assert A.score_answer(drop, None) == {"correct": False, "em": 0.0, "f1": 0.0}


# ---- DROP metric ----


def test_drop_normalisation():
    assert A.drop_normalize("The  Bears!") == "bears"
    assert A.drop_normalize("a well-known   answer.") == "well known answer"
    assert A.drop_normalize("1,000") == A.drop_normalize("1000") == "1000.0"
    assert A.drop_normalize("3") == A.drop_normalize("3.0") == A.drop_normalize("3.00") == "3.0"
    assert A.drop_normalize("$5") == "5.0" and A.drop_normalize("18%") == "18.0"


@pytest.mark.parametrize("pred, golds, em, f1", [
    ("the Chicago Bears", ["Chicago Bears"], 1.0, 1.0),                    # articles
    ("Chicago Bears.", ["chicago bears"], 1.0, 1.0),                       # punctuation and case
    ("1,000", ["1000"], 1.0, 1.0),                                         # numbers written differently
    ("3.0", ["3"], 1.0, 1.0),
    ("Filipinos and Pakistanis", ["Pakistanis and Filipinos"], 1.0, 1.0),  # spans in another order
    ("Filipinos, Pakistanis", ["Pakistanis and Filipinos"], 1.0, 1.0),     # comma-separated spans
    ("Guyanese, Irish", ["Guyanese and Irish"], 1.0, 1.0),
    ("Pakistanis, Indians and Filipinos", ["Pakistanis and Filipinos"], 0.0, 0.67),  # 2 matched / 3 spans
    ("Pakistanis", ["Pakistanis and Filipinos"], 0.0, 0.5),
    ("4 touchdowns", ["3 touchdowns"], 0.0, 0.0),                          # a wrong number earns nothing
    ("3", ["3 touchdowns"], 0.0, 0.67),
    ("Kris Brown", ["Brown"], 0.0, 0.67),
    ("2", ["3", "2"], 1.0, 1.0),                                           # best over gold alternatives
    ("October 1985", ["  1985"], 0.0, 0.67),                               # date golds: "day month year"
])
def test_drop_metrics(pred, golds, em, f1):
    assert A.drop_metrics(pred, golds) == (em, f1)


def test_drop_alignment_is_optimal_not_greedy():
    # greedy would pair row 0 with column 0 (0.9) and leave 0.0; the best matching is 0.8 + 0.85
    assert A.best_assignment([[0.9, 0.8], [0.85, 0.0]]) == pytest.approx(1.65)
    rng = random.Random(0)
    for _ in range(200):
        n, m = rng.randint(1, 5), rng.randint(1, 6)
        s = [[rng.choice([0.0, rng.random()]) for _ in range(m)] for _ in range(n)]
        k = min(n, m)
        brute = max(sum(s[i][j] for i, j in zip(rows, cols))
                    for rows in itertools.combinations(range(n), k) for cols in itertools.permutations(range(m), k))
        assert A.best_assignment(s) == pytest.approx(brute)


def test_drop_official_sample_answers_score_full_marks(items):
    """Every official-format answer of the 73-question sample, written as text, is an exact match on our item."""
    sample = json.loads((BENCH / "drop" / "drop_dataset_dev_sample.json").read_text())
    index = {}
    for it in items["drop"]:
        index.setdefault(it.text.split("\nQuestion: ")[-1].strip(), []).append(it)
    n, multi = 0, 0
    for passage in sample.values():
        for qa in passage["qa_pairs"]:
            [item] = [it for it in index[qa["question"].strip()] if passage["passage"].strip()[:200] in it.text]
            for ans in [qa["answer"], *qa["validated_answers"]]:
                if ans["number"]:
                    text = ans["number"]
                elif ans["spans"]:
                    text = ", ".join(reversed(ans["spans"]))  # the model may list spans in any order
                    multi += len(ans["spans"]) > 1
                else:
                    text = "{day} {month} {year}".format(**ans["date"])
                assert A.drop_metrics(text, item.gold) == (1.0, 1.0), (qa["question"], text, item.gold)
            n += 1
    assert n == 73


