"""evaluate.py: benchmark loading, answer extraction, metrics (DROP official, GSM8K), summary, and an end-to-end run."""

import itertools
import json
import random
import shutil

import pytest
from conftest import SHARED_DATA

import evaluate as E
from orca2 import BENCHMARKS, CAUTIOUS_SYSTEM_MESSAGE

BENCH = SHARED_DATA / "benchmarks"


@pytest.fixture(scope="module")
def items() -> dict[str, list[E.Item]]:
    return {b: E.load_benchmark(b, BENCH) for b in BENCHMARKS}


def by_id(items, benchmark: str) -> dict[str, E.Item]:
    return {it.id: it for it in items[benchmark]}


# ---- loading ----


def test_item_counts_match_the_published_sets(items):
    count = lambda b, s=None: sum(1 for it in items[b] if s is None or it.subset == s)
    assert count("crass") == 274 and count("gsm8k") == 1319 and count("drop") == 9536
    assert (count("race", "high"), count("race", "middle")) == (3498, 1436)
    agieval = {s: count("agieval", s) for s in E.AGIEVAL_TASKS}
    assert agieval == {"aqua-rat": 254, "logiqa-en": 651, "lsat-ar": 230, "lsat-lr": 510, "lsat-rc": 269,
                       "sat-math": 220, "sat-en": 206, "sat-en-without-passage": 206}
    bbh = {it.subset for it in items["bbh"]}
    assert len(bbh) == 27 and count("bbh") == 6511
    assert len(E.BBH_MC) == 23 and set(E.BBH_FREE_FORM) == {"dyck_languages", "word_sorting",
                                                             "multistep_arithmetic_two", "object_counting"}


def test_ids_are_unique_and_point_at_the_right_items(items):
    all_ids = [it.id for b in BENCHMARKS for it in items[b]]
    assert len(all_ids) == len(set(all_ids))
    assert by_id(items, "gsm8k")["gsm8k/0"].gold == "18"  # "#### 18"
    assert by_id(items, "gsm8k")["gsm8k/0"].text.startswith("Janet’s ducks lay 16 eggs")
    race = by_id(items, "race")["race/middle/middle2640.txt/0"]  # the README's example article
    assert race.gold == "C" and "How to do well in science" in race.text and race.subset == "middle"
    crass = by_id(items, "crass")["crass/1"]  # slot Answer1 is empty: 3 options, gold Answer4 becomes (C)
    assert crass.choices == ["The treasure chest would have been open.", "That is not possible.",
                             "The treasure chest would have remained closed."]
    assert crass.gold == "C" and "(D)" not in crass.text
    nav = by_id(items, "bbh")["bbh/navigate/0"]
    assert nav.kind == "binary" and nav.gold == "No" and nav.choices == ["Yes", "No"]
    date = by_id(items, "bbh")["bbh/date_understanding/0"]
    assert date.kind == "choice" and date.gold == "B" and date.choices[1] == "12/25/1937"
    assert by_id(items, "drop")["drop/1"].gold == ["Pakistanis and Filipinos", "Pakistani and Filipino"]
    lsat = by_id(items, "agieval")["agieval/lsat-ar/0"]
    assert lsat.gold == "C" and lsat.choices[0].startswith("Mon. morning: Helen") and "(E) Mon. morning: Olivia" in lsat.text


def test_item_text_is_what_the_model_sees_without_the_instruction(items):
    for b in BENCHMARKS:
        for it in items[b][:3]:
            text = E.item_text(it)
            assert it.prompt.startswith(text + "\n\n") and "End your response with" in it.prompt[len(text):]
            assert "End your response with" not in text
    race = items["race"][0]
    assert all(o in E.item_text(race) for o in race.choices) and race.text.startswith("Article:\n")
    drop = items["drop"][0]
    assert E.item_text(drop).startswith("Passage: ") and "\nQuestion: " in E.item_text(drop)


def test_bbh_golds_fit_their_formats(items):
    quirks = []
    for it in items["bbh"]:
        if it.kind == "choice":
            if it.gold in E.LETTERS[:len(it.choices)]:
                continue
            quirks.append(it.gold)
        elif it.kind == "binary":
            assert it.gold in it.choices
    # upstream targets that are texts, kept and scored as upstream (never equal to a letter)
    assert sorted(quirks) == ["Monsters, Inc", "dearth, wind, & fire", "rita, sue and bob poo"]


def test_limit_keeps_the_first_items_of_every_subset():
    bbh = E.load_benchmark("bbh", BENCH, limit=2)
    assert len(bbh) == 54 and [it.id for it in bbh[:2]] == ["bbh/boolean_expressions/0", "bbh/boolean_expressions/1"]
    assert [it.id for it in E.load_benchmark("race", BENCH, limit=1)] == ["race/high/high73.txt/0", "race/middle/middle1.txt/0"]


def test_missing_file_names_the_expected_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="gsm8k/test.jsonl") as e:
        E.load_benchmark("gsm8k", tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "crass").mkdir()
    shutil.copy(BENCH / "crass" / "CR-C_CRASS_EN.json", tmp_path / "crass")
    with pytest.raises(FileNotFoundError, match="CR-C_CRASS_EN_gt_label.json"):
        E.load_benchmark("crass", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark"):
        E.load_benchmark("mmlu", BENCH)


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
    assert E.extract_choice(output, OPTIONS) == expected


@pytest.mark.parametrize("output, labels, expected", [
    ("not ( True ) is False.\nAnswer: False", ("True", "False"), "False"),
    ("true", ("True", "False"), "True"),                           # returned in the gold's spelling
    ('So the answer is "No".', ("Yes", "No"), "No"),
    ("Yes, the sentence is plausible.", ("yes", "no"), "yes"),
    ("The argument is invalid.", ("valid", "invalid"), "invalid"),  # "valid" inside "invalid" does not count
    ("It could be True or False.", ("True", "False"), None),
])
def test_extract_label(output, labels, expected):
    assert E.extract_label(output, labels) == expected


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
    assert E.extract_number(output) == expected


def test_gsm8k_scoring_ignores_commas_units_and_dollars(items):
    gsm = by_id(items, "gsm8k")
    item = next(it for it in items["gsm8k"] if it.gold == "2125")  # "#### 2,125" in the file
    assert E.score_answer(item, E.extract_answer(item, "Answer: $2,125.00"))["correct"]
    assert not E.score_answer(item, E.extract_answer(item, "Answer: 2,126"))["correct"]
    janet = gsm["gsm8k/0"]
    assert E.score_answer(janet, E.extract_answer(janet, "She makes $18 every day."))["correct"]
    assert E.score_answer(janet, None) == {"correct": False}


def test_extract_free_form_bbh_and_drop(items):
    bbh = by_id(items, "bbh")
    dyck, words = bbh["bbh/dyck_languages/0"], bbh["bbh/word_sorting/0"]
    assert E.extract_answer(dyck, "We must close both.\nAnswer: ] ]") == "] ]"
    assert E.score_answer(dyck, E.extract_answer(dyck, "Answer: ]]"))["correct"]
    assert E.score_answer(words, E.extract_answer(words, "Answer: Syndrome, therefrom."))["correct"]
    assert E.extract_answer(words, "Let me think.\nThe words are many.") is None  # several lines, no cue
    count = bbh["bbh/object_counting/0"]
    assert E.score_answer(count, E.extract_answer(count, "Counting each one... Answer: 8 instruments"))["correct"]
    drop = items["drop"][0]
    assert E.extract_answer(drop, "Answer: **1,000 yards**.") == "1000 yards"
    assert E.extract_answer(drop, "The answer is $3,500.5") == "3500.5"
    assert E.extract_answer(drop, "25 to 44") == "25 to 44"             # a one-line answer is the answer
    assert E.extract_answer(drop, "First, look.\nThen count.") is None
    assert E.extract_answer(drop, "Let me answer step by step.\nThe Bears won.") is None  # the verb is no cue
    assert E.extract_answer(drop, "Two field goals.\nThe answer to this question is 2.") == "2"


def test_score_answer_on_real_items(items):
    crass = by_id(items, "crass")["crass/1"]
    out = "If she had not opened it, it would still be shut.\nAnswer: (C) The treasure chest would have remained closed."
    assert E.score_answer(crass, E.extract_answer(crass, out)) == {"correct": True}
    quirk = next(it for it in items["bbh"] if it.gold == "Monsters, Inc")
    assert not E.score_answer(quirk, E.extract_answer(quirk, "Answer: (A)"))["correct"]
    drop = by_id(items, "drop")["drop/1"]
    assert E.score_answer(drop, "Filipinos, Pakistanis") == {"correct": True, "em": 1.0, "f1": 1.0}
    assert E.score_answer(drop, None) == {"correct": False, "em": 0.0, "f1": 0.0}


# ---- DROP metric ----


def test_drop_normalisation():
    assert E.drop_normalize("The  Bears!") == "bears"
    assert E.drop_normalize("a well-known   answer.") == "well known answer"
    assert E.drop_normalize("1,000") == E.drop_normalize("1000") == "1000.0"
    assert E.drop_normalize("3") == E.drop_normalize("3.0") == E.drop_normalize("3.00") == "3.0"
    assert E.drop_normalize("$5") == "5.0" and E.drop_normalize("18%") == "18.0"


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
    assert E.drop_metrics(pred, golds) == (em, f1)


def test_drop_alignment_is_optimal_not_greedy():
    # greedy would pair row 0 with column 0 (0.9) and leave 0.0; the best matching is 0.8 + 0.85
    assert E.best_assignment([[0.9, 0.8], [0.85, 0.0]]) == pytest.approx(1.65)
    rng = random.Random(0)
    for _ in range(200):
        n, m = rng.randint(1, 5), rng.randint(1, 6)
        s = [[rng.choice([0.0, rng.random()]) for _ in range(m)] for _ in range(n)]
        k = min(n, m)
        brute = max(sum(s[i][j] for i, j in zip(rows, cols))
                    for rows in itertools.combinations(range(n), k) for cols in itertools.permutations(range(m), k))
        assert E.best_assignment(s) == pytest.approx(brute)


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
                assert E.drop_metrics(text, item.gold) == (1.0, 1.0), (qa["question"], text, item.gold)
            n += 1
    assert n == 73


# ---- configuration ----


def test_parse_args_maps_onto_evalconfig():
    cfg = E.parse_args(["--model", "ckpt", "--limit=2", "--batch_size", "4", "--progress=false",
                        "--max_new_tokens", "8", "--max_new_tokens_per", "gsm8k=4,drop=2"])
    assert (cfg.model, cfg.limit, cfg.batch_size, cfg.progress) == ("ckpt", 2, 4, False)
    assert E.max_new_tokens_for(cfg) == dict(agieval=8, bbh=8, drop=2, crass=8, race=8, gsm8k=4)
    assert E.max_new_tokens_for(E.EvalConfig())["gsm8k"] == 1024
    with pytest.raises(ValueError, match="unknown option --lmit"):
        E.parse_args(["--lmit", "2"])
    with pytest.raises(ValueError, match="--limit takes a int"):
        E.parse_args(["--limit", "two"])
    with pytest.raises(ValueError, match="needs a value"):
        E.parse_args(["--limit"])
    with pytest.raises(ValueError, match="gsm8k=512"):
        E.max_new_tokens_for(E.parse_args(["--max_new_tokens_per", "gsm=5"]))


def test_fit_context_cuts_the_middle():
    ids = list(range(100))
    assert E.fit_context(ids, 10, 200) == (ids, False)
    cut, was_cut = E.fit_context(ids, 20, 60)
    assert was_cut and len(cut) == 40 and cut[:10] == ids[:10] and cut[-30:] == ids[-30:]


# ---- summary ----


def record(benchmark, subset, correct, extracted="x", system="empty", **kw):
    return dict(benchmark=benchmark, subset=subset, correct=correct, extracted=extracted, system=system, **kw)


def test_summary_headlines_and_markdown():
    recs = [record("agieval", "lsat-ar", True), record("agieval", "sat-en", True), record("agieval", "sat-en", False),
            record("agieval", "sat-en", False, None),
            record("bbh", "navigate", True), record("bbh", "snarks", False), record("bbh", "word_sorting", True),
            record("race", "high", True), record("race", "middle", False), record("race", "middle", False),
            record("drop", "dev", True, em=1.0, f1=1.0), record("drop", "dev", False, em=0.0, f1=0.5),
            record("crass", "all", True), record("gsm8k", "test", False, None)]
    res = E.summarize(recs)["empty"]
    agieval = {r[0]: r for r in res["agieval"]["rows"]}
    assert res["agieval"]["score"] == pytest.approx((100 + 100 / 3) / 2)  # mean over sets, not pooled
    assert agieval["pooled"][2] == pytest.approx(50.0) and res["agieval"]["format_ok"] == pytest.approx(75.0)
    assert res["bbh"]["score"] == pytest.approx(50.0)                      # the free-form task is not in it
    assert {r[0]: r[2] for r in res["bbh"]["rows"]}["mean over 1 free-form tasks"] == pytest.approx(100.0)
    assert res["race"]["score"] == pytest.approx(100 / 3)                  # pooled over the levels
    assert res["drop"]["score"] == pytest.approx(75.0) and res["drop"]["rows"][0][2] == pytest.approx(50.0)
    assert res["gsm8k"]["format_ok"] == 0.0
    assert res["avg"] == pytest.approx(sum(res[b]["score"] for b in BENCHMARKS) / 6)
    assert E.summarize(recs[:4])["empty"]["avg"] is None                   # no average over a partial set
    stats = dict(examples=14, new_tokens=100, seconds=2.0, tokens_per_s=50.0, examples_per_s=7.0, truncated=0)
    md = E.summary_markdown(E.summarize(recs + [dict(r, system="cautious") for r in recs]), stats)
    assert "| ours (empty sm) |" in md and "| ours (cautious sm) |" in md
    assert "| paper: Orca-2-13B w/ cautious sm | 48.18 | 50.01 | 70.88 | 87.59 | 79.16 | 65.73 | 66.92 |" in md
    assert "| AGIEval | pooled | 4 | 50.00 | 75.00 | 50.00 | 75.00 |" in md
    assert "50.0 tokens/s" in md


# ---- end to end on the tiny model ----


def test_end_to_end_tiny_model(tmp_path):
    from model import ModelArgs, Transformer
    model = Transformer(ModelArgs.from_name("tiny"))
    model.init_weights(seed=0)
    model.save_pretrained(tmp_path / "tiny")
    shutil.copy(SHARED_DATA / "llama2-tokenizer" / "tokenizer.model", tmp_path / "tiny" / "tokenizer.model")
    out = tmp_path / "out"
    summary = E.main(["--model", str(tmp_path / "tiny"), "--benchmarks", ",".join(BENCHMARKS), "--system",
                      "empty,cautious", "--limit", "2", "--max_new_tokens", "8", "--batch_size", "8",
                      "--out", str(out), "--device", "cpu", "--progress", "false"])
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    per_system = 8 * 2 + 27 * 2 + 2 + 2 + 2 * 2 + 2  # --limit applies to every subset
    assert len(lines) == 2 * per_system
    for rec in lines:
        assert {"benchmark", "id", "system", "prompt", "output", "extracted", "gold", "correct"} <= set(rec)
        assert rec["prompt"].startswith("<|im_start|>system\n") and rec["prompt"].endswith("<|im_start|>assistant")
        assert 0 < rec["new_tokens"] <= 8
    assert sum(CAUTIOUS_SYSTEM_MESSAGE in r["prompt"] for r in lines) == per_system
    assert len({(r["id"], r["system"]) for r in lines}) == len(lines)
    md = (out / "summary.md").read_text()
    assert "| ours (empty sm) |" in md and "| ours (cautious sm) |" in md and "paper: Orca-2-7B" in md
    saved = json.loads((out / "summary.json").read_text())
    assert set(saved["results"]) == {"empty", "cautious"} and saved["stats"]["examples"] == 2 * per_system
    assert set(summary["empty"]) == {*BENCHMARKS, "avg"}
