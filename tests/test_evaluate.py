"""evaluate.py and benchmarks.py: benchmark loading, configuration, summary and strategy profile, and an end-to-end run."""

import itertools
import json
import random
import shutil

import pytest
from conftest import SHARED_DATA

import benchmarks as B
import cli
import evaluate as E
from orca2 import BENCHMARKS, CAUTIOUS_SYSTEM_MESSAGE

BENCH = SHARED_DATA / "benchmarks"


@pytest.fixture(scope="module")
def items() -> dict[str, list[B.Item]]:
    return {b: B.load_benchmark(b, BENCH) for b in BENCHMARKS}


def by_id(items, benchmark: str) -> dict[str, B.Item]:
    return {it.id: it for it in items[benchmark]}


# ---- loading ----


def test_item_counts_match_the_published_sets(items):
    count = lambda b, s=None: sum(1 for it in items[b] if s is None or it.subset == s)
    assert count("crass") == 274 and count("gsm8k") == 1319 and count("drop") == 9536
    assert (count("race", "high"), count("race", "middle")) == (3498, 1436)
    agieval = {s: count("agieval", s) for s in B.AGIEVAL_TASKS}
    assert agieval == {"aqua-rat": 254, "logiqa-en": 651, "lsat-ar": 230, "lsat-lr": 510, "lsat-rc": 269,
                       "sat-math": 220, "sat-en": 206, "sat-en-without-passage": 206}
    bbh = {it.subset for it in items["bbh"]}
    assert len(bbh) == 27 and count("bbh") == 6511
    assert len(B.BBH_MC) == 23 and set(B.BBH_FREE_FORM) == {"dyck_languages", "word_sorting",
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
            text = B.item_text(it)
            assert it.prompt.startswith(text + "\n\n") and "End your response with" in it.prompt[len(text):]
            assert "End your response with" not in text
    race = items["race"][0]
    assert all(o in B.item_text(race) for o in race.choices) and race.text.startswith("Article:\n")
    drop = items["drop"][0]
    assert B.item_text(drop).startswith("Passage: ") and "\nQuestion: " in B.item_text(drop)


def test_bbh_golds_fit_their_formats(items):
    quirks = []
    for it in items["bbh"]:
        if it.kind == "choice":
            if it.gold in B.LETTERS[:len(it.choices)]:
                continue
            quirks.append(it.gold)
        elif it.kind == "binary":
            assert it.gold in it.choices
    # upstream targets that are texts, kept and scored as upstream (never equal to a letter)
    assert sorted(quirks) == ["Monsters, Inc", "dearth, wind, & fire", "rita, sue and bob poo"]


def test_limit_keeps_the_first_items_of_every_subset():
    bbh = B.load_benchmark("bbh", BENCH, limit=2)
    assert len(bbh) == 54 and [it.id for it in bbh[:2]] == ["bbh/boolean_expressions/0", "bbh/boolean_expressions/1"]
    assert [it.id for it in B.load_benchmark("race", BENCH, limit=1)] == ["race/high/high73.txt/0", "race/middle/middle1.txt/0"]


def test_missing_file_names_the_expected_path(tmp_path):
    with pytest.raises(ValueError, match="gsm8k/test.jsonl") as e:
        B.load_benchmark("gsm8k", tmp_path)
    assert str(tmp_path) in str(e.value)
    (tmp_path / "crass").mkdir()
    shutil.copy(BENCH / "crass" / "CR-C_CRASS_EN.json", tmp_path / "crass")
    with pytest.raises(ValueError, match="CR-C_CRASS_EN_gt_label.json"):
        B.load_benchmark("crass", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark"):
        B.load_benchmark("mmlu", BENCH)


# ---- configuration ----


def parse(argv):
    return cli.parse(E.EvalConfig, argv)


def test_parse_args_maps_onto_evalconfig():
    cfg = parse(["--model", "ckpt", "--limit=2", "--batch_size", "4", "--progress=false",
                        "--max_new_tokens", "8", "--max_new_tokens_per", "gsm8k=4,drop=2"])
    assert (cfg.model, cfg.limit, cfg.batch_size, cfg.progress) == ("ckpt", 2, 4, False)
    assert E.max_new_tokens_for(cfg) == dict(agieval=8, bbh=8, drop=2, crass=8, race=8, gsm8k=4)
    assert E.max_new_tokens_for(E.EvalConfig())["gsm8k"] == 1024
    with pytest.raises(ValueError, match="unknown option --lmit"):
        parse(["--lmit", "2"])
    with pytest.raises(ValueError, match="--limit takes an integer"):
        parse(["--limit", "two"])
    with pytest.raises(ValueError, match="needs a value"):
        parse(["--limit"])
    with pytest.raises(ValueError, match="gsm8k=512"):
        E.max_new_tokens_for(parse(["--max_new_tokens_per", "gsm=5"]))


def test_fit_context_cuts_the_middle():
    ids = list(range(100))
    assert E.fit_context(ids, 10, 200) == (ids, False)
    cut, was_cut = E.fit_context(ids, 20, 60)
    assert was_cut and len(cut) == 40 and cut[:10] == ids[:10] and cut[-30:] == ids[-30:]


# ---- summary ----


def record(benchmark, subset, correct, extracted="x", system="empty", **kw):
    return dict(benchmark=benchmark, subset=subset, correct=correct, extracted=extracted, system=system,
                strategy="direct" if extracted else "not parsed", new_tokens=10, **kw)


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
    summary = E.main(parse(["--model", str(tmp_path / "tiny"), "--benchmarks", ",".join(BENCHMARKS), "--system",
                            "empty,cautious", "--limit", "2", "--max_new_tokens", "8", "--batch_size", "8",
                            "--out", str(out), "--device", "cpu", "--progress", "false"]))
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
