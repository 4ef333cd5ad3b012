"""answers.py: extraction against a careful human grader, simple-evals' DROP metric, and the API for synth.py."""

import json

import pytest
from conftest import FIXTURES, SHARED_DATA

import answers as A
from benchmarks import Item, load_benchmark

BENCH = SHARED_DATA / "benchmarks"
CASES = [json.loads(line) for line in (FIXTURES / "extraction_cases.jsonl").read_text().splitlines() if line.strip()]
DROP_CASES = json.loads((FIXTURES / "drop_official_cases.json").read_text())
# Fixture cases whose verdict (ours vs the grader's) still differs, with why. Kept true both ways: a listed case
# that starts to agree fails the test, and so does a new disagreement.
DISAGREEMENTS: dict[str, str] = {}
# Cases where our answer differs from the grader's although the verdicts agree.
ANSWER_DIFFERENCES = {"gsm8k-32": "cut off before an answer: the grader reads none, we read the last number (1)"}


@pytest.fixture(scope="module")
def items():
    return {b: {it.id: it for it in load_benchmark(b, BENCH)} for b in ("gsm8k", "bbh", "drop", "crass")}


def make_item(kind: str, gold="", choices=(), text="") -> Item:
    return Item("test", "test", "", text, "", gold, kind, list(choices))


def case_item(case: dict) -> Item:
    return Item(case["id"], case["benchmark"], "", "", "", case["gold"], case["kind"], case["choices"])


def verdict(case: dict) -> bool:
    item = case_item(case)
    return A.score_answer(item, A.extract_answer(item, case["output"]))["correct"]


# ---- the human-graded fixture ----


def test_extraction_agrees_with_a_careful_grader():
    n = len(CASES)
    n_agree = sum(verdict(c) == (c["verdict"] == "correct") for c in CASES)
    rate = n_agree / n
    print(f"agreement {n_agree}/{n} = {rate:.1%}")
    assert n == 223 and rate >= 0.95


def test_the_listed_disagreements_are_exactly_the_disagreements():
    disagree = {c["id"] for c in CASES if verdict(c) != (c["verdict"] == "correct")}
    assert not disagree - set(DISAGREEMENTS), f"new disagreements: {sorted(disagree - set(DISAGREEMENTS))}"
    assert not set(DISAGREEMENTS) - disagree, f"listed but agreeing now: {sorted(set(DISAGREEMENTS) - disagree)}"


def test_extracted_answers_are_the_graders_answers():
    """Beyond the verdict: the answer read is the one the grader read (DROP after the official normalisation)."""
    differ = set()
    for c in CASES:
        ours, theirs = A.extract_answer(case_item(c), c["output"]), c["grader_answer"]
        if c["kind"] == "drop" and ours is not None and theirs is not None:
            ours, theirs = A.drop_normalize(ours), A.drop_normalize(theirs)
        if ours != theirs:
            differ.add(c["id"])
    assert differ == set(ANSWER_DIFFERENCES) | set(DISAGREEMENTS)


def test_offsets_point_into_the_output_before_any_invented_turn():
    for c in CASES:
        answer, at = A.extract(case_item(c), c["output"])
        visible = c["output"].split("<|im_start|>")[0]
        assert (at == -1) if answer is None else 0 <= at < len(visible), (c["id"], answer, at)


# ---- extraction rules, by kind ----

OPTIONS = ["Paris", "London", "Rome", "Berlin"]


@pytest.mark.parametrize("output, expected", [
    ("The capital is on the Seine.\nAnswer: (A)", "A"),
    ("Final answer: **(C)**", "C"),
    ("The correct option is D.", "D"),
    ("Therefore, the best answer is option B.", "B"),
    ("Answer:\n(C)", "C"),
    ("(A) is tempting, so the answer is (A).\nAnswer: (D)", "D"),       # the last conclusion wins
    ("(A) Paris is too far north.\n(B) London is right.\n(D) Berlin is not.\nThus the answer is (B).", "B"),
    ("(C) is the correct answer.", "C"),
    ("Paris is (A) and London is (B); Rome fits, so Option C is correct.", "C"),
    ("It is not Paris, so the answer must be (D).", "D"),
    ("Not Paris. The answer is not (A), it is (C).", "C"),
    ("Rome is the capital. $\\boxed{C}$", "C"),
    ("(A) and (D) are too far north, so we pick (B).", "B"),
    ("Answer: B, a city in England", "B"),                                # "a" is no second letter
    ("(A) and (B) are in the north, so the answer is (d).", "D"),          # lowercase letter
    ("If we wanted a port, the correct choice would be (B). But it is inland.\nAnswer: (C)", "C"),
    ("The answer is (C).\n\nIf the question asked for the north, (B) would have been the answer.", "C"),
    ("Answer: Rome", "C"),                                                # option text only
    ("Answer: C Rome", "C"),
    ("(B) London", "B"),                                                  # the only letter mentioned
    ("Only (C) fits the description.", "C"),
    ("It is Rome, of course.", "C"),                                      # the only option text in the last sentence
    ("Answer: (C) or (A)", None),                                         # a hedge is no answer
    ("I think the answer is either (B) or (D).", None),
    ("Let's look at each option:\n(A) Paris\n(B) London\n(C) Rome", None),  # an enumeration is no answer
    ("A city on the Seine.", None),                                       # "A" the article is not an answer
    ("Paris or Rome, hard to say.", None),
    ("Answer: (E)", None),                                                # not one of the four letters
    ("I cannot determine the answer.", None),
    ("The answer is: B", "B"),
    ("C.", "C"),
    ("Both (A) and (B) are wrong.", None),
])
def test_extract_choice(output, expected):
    assert A.extract_answer(make_item("choice", choices=OPTIONS), output) == expected


@pytest.mark.parametrize("output, labels, expected", [
    ("not ( True ) is False.\nAnswer: False", ("True", "False"), "False"),
    ("true", ("True", "False"), "True"),                                  # returned in the gold's spelling
    ('So the answer is "No".', ("Yes", "No"), "No"),
    ("No doubt about it: he is a hockey player, so the sentence is plausible.", ("yes", "no"), "yes"),
    ("Answer: Elanor does not tell the truth.", ("Yes", "No"), "No"),      # read by meaning
    ("Vina lies, so Elanor tells the truth.", ("Yes", "No"), "Yes"),
    ("The argument is not valid.", ("valid", "invalid"), "invalid"),
    ("The argument is invalid.", ("valid", "invalid"), "invalid"),         # "valid" inside "invalid" does not count
    ("We do not return to the starting point.", ("Yes", "No"), "No"),
    ("Answer: No<|im_start|>user\nAnswer: Yes", ("Yes", "No"), "No"),
    ("Answer: Yes or No", ("Yes", "No"), None),
    ("It could be True or False.", ("True", "False"), None),              # a hedge without a cue is no answer either
    ("Answer: It depends.", ("yes", "no"), None),
    ("I cannot determine how a typical person would answer.", ("Yes", "No"), None),
])
def test_extract_label(output, labels, expected):
    assert A.extract_answer(make_item("binary", choices=labels), output) == expected


@pytest.mark.parametrize("output, expected", [
    ("She sells 9 eggs at $2 each.\nAnswer: $18", "18"),
    ("The answer is 9 * 2 = 18.", "18"),                                   # a calculation's result, not its operands
    ("Answer: 33 - 30 = 3", "3"),
    ("Answer: $18 = 9 eggs * $2", "18"),                                  # the answer stated first
    ("Answer: 5 dozen = 60 eggs", "60"),
    ("Answer: After selling the house for $200,000, he made a profit of $70,000.", "70000"),
    ("Answer: Together they have 260 sheep, with Toulouse having 160 of them.", "260"),
    ("Answer: 2 hours and 40 minutes (160 minutes)", "160"),
    ("Answer: 8 (the four stoves and two lamps are not instruments)", "8"),
    ("Answer: 64\n\nNote: if every glass were full price, he would pay 16 * 5 = $80.", "64"),
    ("The answer is 23. Note: if he had sold 3 more, the answer would be 26.", "23"),
    ("The answer is 45.\nWait, I forgot the afternoon. The answer is 20.", "20"),
    ("Answer: 18<|im_start|>user\nAnd in a week?<|im_start|>assistant\nAnswer: 126", "18"),
    ("The answer is $1,234.50.", "1234.5"),
    ("Answer: -11,520", "-11520"),
    ("Answer: \u221250", "-50"),                                          # the Unicode minus
    ("Answer: 60%", "60"),
    ("Therefore, James runs $\\boxed{540}$ meters a week.", "540"),
    ("**Answer: 540**", "540"),
    ("Answer: $230$", "230"),
    ("Answer: \\frac{3}{2}", "1.5"),
    ("Answer: $\\frac{84}{12} = 7$ dozen", "7"),
    ("Answer: seven dozen", "7"),
    ("Answer: She needs to walk at twenty-one miles per hour.", "21"),
    ("Answer: one hundred and five", "105"),
    ("Answer:\n460", "460"),
    ("The total is 5 apples.\n#### 1,000", "1000"),
    ("so 16 - 3 - 4 = 9 eggs and 9 * 2 = 18", "18"),
    ("Answer: 18 dollars per day", "18"),
    ("Final answer: 7.00 meters, found in 3 steps", "7"),                     # no cue: the last number
    ("Answer: 45 or 315", None),                                          # a hedge
    ("I'm sorry, but I cannot determine her earnings for 45 hours.", None),
])
def test_extract_number(output, expected):
    assert A.extract_answer(make_item("number"), output) == expected


@pytest.mark.parametrize("output, expected", [
    ("Answer: 46 yards", "46"),                                           # a lone number loses its unit
    ("The answer is 2 points because 16 - 14 = 2.", "2"),                 # and its explanation
    ("Answer: 33 - 30 = 3", "3"),
    ("Answer: In 1085", "1085"),
    ("Answer: two empires", "2"),
    ("Answer: 14 points (7 for each team)", "14"),
    ("Answer: Chaz Schilens, who caught a 20-yard touchdown pass.", "Chaz Schilens"),
    ("Answer: Super Bowl 50", "Super Bowl 50"),                           # a number inside a name stays
    ("Answer: The Raiders", "The Raiders"),
    ("Answer: T. J. Houshmandzadeh", "T. J. Houshmandzadeh"),
    ("Answer: Thomas Jones, Leon Washington", "Thomas Jones and Leon Washington"),
    ("Answer: France (29%) and Italy (20%)", "France and Italy"),
    ("Answer: September 30, 1686", "30 September 1686"),                  # drop_v0_dev writes dates so
    ("Answer: August 1563", "August 1563"),
    ("Answer: April 1, 1991 or April 25, 1991", None),
    ("The score was tied 7-7 at the end of the first quarter.", "7-7"),    # no cue: the last sentence
    ("Answer: 7<|im_start|>user\nAnswer: 20", "7"),
    ("The passage does not say, so this cannot be determined.", None),
])
def test_extract_drop(output, expected):
    assert A.extract_answer(make_item("drop", gold=["x"]), output) == expected


def test_extract_free_form_bbh(items):
    dyck, words = items["bbh"]["bbh/dyck_languages/0"], items["bbh"]["bbh/word_sorting/0"]  # input "[ [", gold "] ]"
    assert A.extract_answer(dyck, "We must close both.\nAnswer: ] ]") == "] ]"
    assert A.extract_answer(dyck, "Answer: ]]") == "] ]"
    assert A.extract_answer(dyck, "Answer: [ [ ] ]") == "] ]"                # the whole sequence: after the input
    assert A.extract_answer(make_item("dyck"), "Still open: < and (. The rest is ) >.") == ") >"
    assert A.score_answer(words, A.extract_answer(words, "Answer: Syndrome, therefrom."))["correct"]
    assert A.extract_answer(words, "Sorted alphabetically:\n1. syndrome\n2. therefrom") == "syndrome therefrom"
    assert A.extract_answer(words, "s is before t. The sorted list is syndrome, therefrom.") == "syndrome therefrom"
    count = items["bbh"]["bbh/object_counting/0"]
    assert A.score_answer(count, A.extract_answer(count, "Counting each one... Answer: 8 instruments"))["correct"]


@pytest.mark.parametrize("kind, output, at", [
    ("choice", "London is big.\nAnswer: (B)", "B)"),
    ("choice", "Option C is correct.", "C is"),
    ("number", "9 * 2 = 18.\nAnswer: $18", "$18"),
    ("binary", "It is late.\nAnswer: No", "No"),
    ("drop", "Answer: 46 yards", "46 yards"),
    ("words", "Answer: apple banana", "apple"),
])
def test_extract_offset_points_at_the_answer(kind, output, at):
    item = make_item(kind, choices=OPTIONS if kind == "choice" else ("Yes", "No") if kind == "binary" else ())
    answer, start = A.extract(item, output)
    assert answer is not None and output[start:].startswith(at)
    assert A.extract(item, "") == (None, -1)


# ---- scoring ----


def test_gsm8k_scoring_ignores_commas_units_and_dollars(items):
    item = next(it for it in items["gsm8k"].values() if it.gold == "2125")  # "#### 2,125" in the file
    assert A.score_answer(item, A.extract_answer(item, "Answer: $2,125.00"))["correct"]
    assert not A.score_answer(item, A.extract_answer(item, "Answer: 2,126"))["correct"]
    janet = items["gsm8k"]["gsm8k/0"]
    assert A.score_answer(janet, A.extract_answer(janet, "She makes $18 every day."))["correct"]
    assert A.score_answer(janet, None) == {"correct": False}
    assert A.canon_number("$1,234.50") == "1234.5" and A.canon_number("18.00") == "18" and A.canon_number("x") is None


def test_score_answer_on_real_items(items):
    crass = items["crass"]["crass/1"]
    out = "If she had not opened it, it would be shut.\nAnswer: (C) The treasure chest would have remained closed."
    assert A.score_answer(crass, A.extract_answer(crass, out)) == {"correct": True}
    quirk = next(it for it in items["bbh"].values() if it.gold == "Monsters, Inc")
    assert not A.score_answer(quirk, A.extract_answer(quirk, "Answer: (A)"))["correct"]
    drop = items["drop"]["drop/1"]  # golds "Pakistanis and Filipinos", "Pakistani and Filipino"
    assert A.score_answer(drop, A.extract_answer(drop, "Answer: Pakistanis, Filipinos")) == \
        {"correct": True, "em": 1.0, "f1": 1.0}
    assert A.score_answer(drop, "Filipinos and Pakistanis") == {"correct": False, "em": 0.0, "f1": 1.0}
    assert A.score_answer(drop, None) == {"correct": False, "em": 0.0, "f1": 0.0}


def test_drop_normalisation():
    assert A.drop_normalize("The  Bears!") == "bears"
    assert A.drop_normalize("a well-known   answer.") == "well known answer"
    assert A.drop_normalize("1,000") == A.drop_normalize("1000") == "1000.0"
    assert A.drop_normalize("3") == A.drop_normalize("3.0") == A.drop_normalize("3.00") == "3.0"
    assert A.drop_normalize("$5") == "5.0" and A.drop_normalize("18%") == "18.0"


@pytest.mark.parametrize("pred, golds, em, f1", [  # f1 on the official 0-100 scale
    ("the Chicago Bears", ["Chicago Bears"], 1.0, 100.0),                    # articles
    ("Chicago Bears.", ["chicago bears"], 1.0, 100.0),                       # punctuation and case
    ("1,000", ["1000"], 1.0, 100.0),                                         # numbers written differently
    ("Filipinos and Pakistanis", ["Pakistanis and Filipinos"], 0.0, 100.0),  # one string each: order breaks EM
    ("Filipinos, Pakistanis", ["Pakistanis and Filipinos"], 0.0, 80.0),      # nothing is split into spans
    ("4 touchdowns", ["3 touchdowns"], 0.0, 0.0),                            # a wrong number earns nothing
    ("3", ["3 touchdowns"], 0.0, 66.67),
    ("2", ["3", "2"], 1.0, 100.0),                                           # best over gold alternatives
    ("October 1985", ["  1985"], 0.0, 66.67),
    ("Chaz Schilens", ["", "Chaz Schilens"], 1.0, 100.0),                    # blank golds are skipped
    (None, ["3"], 0.0, 0.0),
])
def test_drop_metrics(pred, golds, em, f1):
    assert A.drop_metrics(pred, golds) == (em, f1 / 100)


def test_drop_metrics_equal_simple_evals_on_every_official_case():
    assert len(DROP_CASES) == 692
    wrong = [(c, A.drop_metrics(c["prediction"], c["golds"])) for c in DROP_CASES
             if A.drop_metrics(c["prediction"], c["golds"]) != (c["em"], c["f1"] / 100)]
    assert not wrong, f"{len(wrong)} cases differ, e.g. {wrong[:3]}"


def test_drop_sample_answers_written_as_the_prompt_asks_score_full_marks(items):
    """Every official answer of the 73-question sample, as a model writes it after "Answer:", is an exact match."""
    sample = json.loads((BENCH / "drop" / "drop_dataset_dev_sample.json").read_text())
    index = {}
    for it in items["drop"].values():
        index.setdefault(it.text.split("\nQuestion: ")[-1].strip(), []).append(it)
    n = 0
    for passage in sample.values():
        for qa in passage["qa_pairs"]:
            [item] = [it for it in index[qa["question"].strip()] if passage["passage"].strip()[:200] in it.text]
            for ans in [qa["answer"], *qa["validated_answers"]]:
                date = " ".join(ans["date"][k] for k in ("day", "month", "year") if ans["date"].get(k))
                text = ans["number"] or ", ".join(ans["spans"]) or date  # several spans: a comma list, in order
                got = A.score_answer(item, A.extract_answer(item, f"Reading the passage.\nAnswer: {text}"))
                assert got["em"] == 1.0, (qa["question"], text, item.gold)
            n += 1
    assert n == 73


# ---- the API for synth.py ----


@pytest.mark.parametrize("gold, rule", [("18", "number"), ("$1,234.50", "number"), ("-5", "number"), ("B", "letter"),
                                        ("(R)", "letter"), ("S", "text"), ("Paris", "text"), ("A dog", "text")])
def test_answer_rule(gold, rule):
    assert A.answer_rule(gold) == rule


@pytest.mark.parametrize("output, gold, answer, correct", [
    ("9 * 2 = 18.\nAnswer: $18.00", "18", "18", True),
    ("Answer: 17", "18", "17", False),
    ("Answer: 18<|im_start|>user\nAnswer: 17", "18", "18", True),
    ("Colours compared... Thus the answer is (Q).", "Q", "Q", True),      # letters A..R, no option texts
    ("Answer: B", "(B)", "B", True),
    ("Answer: (C) or (B)", "B", None, False),
    ("Answer: The Chicago Bears.", "chicago bears", "The Chicago Bears", True),
    ("Answer: Paris, which is the capital.", "Paris", "Paris", True),
    ("Answer: Lyon", "Paris", "Lyon", False),
])
def test_check_answer(output, gold, answer, correct):
    assert A.check_answer(output, gold, A.answer_rule(gold)) == (answer, correct)
