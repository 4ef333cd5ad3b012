"""evaluate.py and benchmarks.py: benchmark loading, configuration, summary and strategy profile, end-to-end runs of
a tiny model locally and through an OpenAI-compatible server wrapping it (tests/model_server.py)."""

import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SHARED_DATA, free_port
from model_server import ModelServer

import benchmarks as B
import cli
import evaluate as E
from servers import LocalServer, completion_response
from model import ModelArgs, Transformer
from orca2 import BENCHMARKS, CAUTIOUS_SYSTEM_MESSAGE, SYSTEM_MESSAGES
from tokenizer import Tokenizer

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
    assert lsat.gold == "C" and lsat.choices[0].startswith("Mon. morning: Helen")
    assert "(E) Mon. morning: Olivia" in lsat.text


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
    race = B.load_benchmark("race", BENCH, limit=1)
    assert [it.id for it in race] == ["race/high/high73.txt/0", "race/middle/middle1.txt/0"]


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
    with pytest.raises(ValueError, match=r"max new tokens \(60\) must be below the model's context \(60\)"):
        E.fit_context(ids, 60, 60)


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


def test_strategy_of_counts_the_non_empty_lines_above_the_answer():
    def strategy(output: str, answer: str) -> str:
        return E.strategy_of(output, output.rindex(answer))
    assert strategy("(B) is right, because ...", "(B)") == "direct"
    assert strategy("\n \nThe answer is (B).\nBecause ...", "(B)") == "direct"  # blank lines do not count
    assert strategy("It has 4 legs. So (B).", "(B)") == "direct"  # one line, however many sentences
    assert strategy("It has 4 legs.\nSo (B).", "(B)") == "other"
    assert strategy("It has 4 legs.\n\nDogs have 4 legs.\nSo (B).", "(B)") == "step by step"
    assert E.strategy_of("I cannot tell.", -1) == "not parsed"


# ---- end to end on a tiny model, locally and served ----


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model decodes fastest on one thread; more only wait on each other and on other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny random checkpoint whose outputs sometimes end on a stop id: it says <|im_start|>, <|im_end|>, </s>
    where it would have said its three favourite tokens (their output rows, copied a little larger)."""
    tok = Tokenizer.from_pretrained(SHARED_DATA / "llama2-tokenizer" / "tokenizer.model")
    model = Transformer(ModelArgs.from_name("tiny"))
    model.init_weights(seed=0)
    questions = ["What is 2 + 2?", "Is the sky green?", "Name a river in Europe. Answer with (A) or (B)."]
    with torch.inference_mode():
        probe = model.generate([tok.encode_prompt("", q) for q in questions], 8, stop_ids=())
    favourites = Counter(t for out in probe for t in out).most_common(3)
    with torch.no_grad():
        for stop, (token, _) in zip((tok.im_start_id, tok.im_end_id, tok.eos_id), favourites):
            model.lm_head.weight[stop] = 1.01 * model.lm_head.weight[token]
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def evaluate(tiny: Path, out: Path, *argv: str) -> list[dict]:
    """E.main on the tiny checkpoint; the records of its predictions.jsonl."""
    E.main(parse(["--model", str(tiny), "--out", str(out), "--device", "cpu", "--progress", "false", *argv]))
    return predictions(out)


def test_end_to_end_tiny_model(tiny, tmp_path):
    recs = evaluate(tiny, tmp_path, "--limit", "1", "--max_new_tokens", "8", "--max_new_tokens_per", "gsm8k=4",
                    "--batch_size", "8")
    per_system = 8 + 27 + 1 + 1 + 2 + 1  # --limit applies to every subset
    assert len(recs) == 2 * per_system
    for rec in recs:
        assert {"benchmark", "id", "system", "prompt", "output", "extracted", "gold", "correct"} <= set(rec)
        assert rec["prompt"].startswith("<|im_start|>system\n") and rec["prompt"].endswith("<|im_start|>assistant")
        assert 0 <= rec["new_tokens"] <= (4 if rec["benchmark"] == "gsm8k" else 8)
        assert "<|im_start|>" not in rec["output"] and "<|im_end|>" not in rec["output"]  # it stopped there
    assert sum(CAUTIOUS_SYSTEM_MESSAGE in r["prompt"] for r in recs) == per_system
    assert len({(r["id"], r["system"]) for r in recs}) == len(recs)
    md = (tmp_path / "summary.md").read_text()
    assert "| ours (empty sm) |" in md and "| ours (cautious sm) |" in md and "paper: Orca-2-7B" in md
    assert "| benchmark | system | median tokens | direct | step by step | other | not parsed |" in md
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert set(saved["results"]) == {"empty", "cautious"} and saved["stats"]["examples"] == 2 * per_system
    assert set(saved["results"]["empty"]) == {*BENCHMARKS, "avg"}
    assert saved["stats"]["new_tokens"] == sum(r["new_tokens"] for r in recs)


SAME = ["--limit", "1", "--system", "empty", "--max_new_tokens", "8"]  # 40 prompts, every benchmark


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Local evaluation (--batch_size=1) and served evaluation of the same prompts; (out folder, the live server)."""
    out = tmp_path_factory.mktemp("runs")
    evaluate(tiny, out / "local", *SAME, "--batch_size", "1")
    with ModelServer(tiny) as server:
        evaluate(tiny, out / "served", *SAME, "--base_url", server.base_url, "--served_model", "tiny")
        yield out, server


def test_served_predictions_equal_local_ones(runs):
    out, server = runs
    local = (out / "local" / "predictions.jsonl").read_text()
    assert (out / "served" / "predictions.jsonl").read_text() == local  # outputs, answers, scores, strategies
    assert len(local.splitlines()) == server.generated == 40
    ends = Counter(next((t for t in full if t in server.tok.stop_ids), None) for full in server.full.values())
    assert ends[None] > 0 and ends[server.tok.im_start_id] > 0 and ends[server.tok.im_end_id] > 0, \
        f"the tiny model should stop on some prompts, not all: {ends}"  # replies ending on a stop id are cut


def test_generation_stops_at_every_stop_id_im_start_included(tiny, runs):
    out, server = runs
    tok = Tokenizer.from_pretrained(tiny)
    stops = {tok.eos_id, tok.im_end_id, tok.im_start_id}  # </s>, <|im_end|>, and <|im_start|>: a turn it invents
    items = {it.id: it for b in BENCHMARKS for it in B.load_benchmark(b, BENCH, limit=1)}
    ctx = ModelArgs.from_name("tiny").max_seq_len
    went_on = 0  # outputs where the model would have gone on past <|im_start|>
    for rec in predictions(out / "local"):
        ids = E.fit_context(tok.encode_prompt(SYSTEM_MESSAGES["empty"], items[rec["id"]].prompt), 8, ctx)[0]
        full = server.full[tuple(ids)]  # what the model says when nothing stops it
        cut = next((k for k, t in enumerate(full) if t in stops), len(full))
        assert (rec["new_tokens"], rec["output"]) == (cut, tok.decode(full[:cut]))
        if cut + 1 < len(full) and full[cut] == tok.im_start_id:
            went_on += 1
    assert went_on > 0, "the tiny model should say <|im_start|> and more on some prompts"


def test_a_rerun_is_answered_from_the_cache(tiny, runs, capsys):
    out, server = runs
    sent = server.generated
    again = evaluate(tiny, out / "served", *SAME, "--base_url", server.base_url, "--served_model", "tiny")
    assert server.generated == sent and "served: 0 requests sent, 40 answered from cache" in capsys.readouterr().out
    assert again == predictions(out / "local")


def test_strategy_profile_of_hand_made_outputs(tiny, tmp_path):
    """A scripted server answers five GSM8K items on the first line, after two lines (right, wrong), after one
    line, and not at all; each reply ends with <|im_end|>, as vLLM's do."""
    tok = Tokenizer.from_pretrained(tiny)
    items = B.load_benchmark("gsm8k", BENCH, limit=5)
    g = [it.gold for it in items]
    outputs = [f"The answer is {g[0]}.\nI added the numbers.", f"First I count.\nThen I add.\nSo the answer is {g[1]}.",
               f"First I count.\n\nThen I add.\nThe answer is {int(g[2]) + 1}.", f"Let me see.\nThe answer is {g[3]}.",
               "I cannot tell from the question."]
    script = {}
    for it, text in zip(items, outputs):
        script[tuple(tok.encode_prompt(SYSTEM_MESSAGES["empty"], it.prompt))] = tok.encode(text) + [tok.im_end_id]
    respond = lambda path, body: (200, completion_response("", token_ids=script[tuple(body["prompt"])]), {})
    with LocalServer(respond) as server:
        recs = evaluate(tiny, tmp_path, "--benchmarks", "gsm8k", "--limit", "5", "--system", "empty",
                        "--max_new_tokens", "64", "--base_url", server.base_url, "--served_model", "scripted")
    assert [r["output"] for r in recs] == outputs
    assert [r["strategy"] for r in recs] == ["direct", "step by step", "step by step", "other", "not parsed"]
    assert [r["correct"] for r in recs] == [True, True, False, True, False]
    tokens = [len(tok.encode(text)) for text in outputs]
    assert [r["new_tokens"] for r in recs] == tokens  # the stop id is not an output token
    profile = json.loads((tmp_path / "summary.json").read_text())["results"]["empty"]["gsm8k"]["profile"]
    assert profile == {"median_tokens": statistics.median(tokens), "direct": {"share": 20.0, "accuracy": 100.0},
                       "step by step": {"share": 40.0, "accuracy": 50.0}, "other": {"share": 20.0, "accuracy": 100.0},
                       "not parsed": {"share": 20.0, "accuracy": 0.0}}
    row = "20.0 (100.00) | 40.0 (50.00) | 20.0 (100.00) | 20.0 (0.00) |"  # direct, step by step, other, not parsed
    assert f"| gsm8k | empty | {statistics.median(tokens)} | {row}" in (tmp_path / "summary.md").read_text()


# ---- one-line errors of the command ----


def one_line_errors(*argvs: list[str]) -> list[str]:
    """`python evaluate.py ARGV` for each ARGV, side by side; each must end in one line `error: ...` (exit 2)."""
    procs = []
    for argv in argvs:
        procs.append(subprocess.Popen([sys.executable, "evaluate.py", *argv], cwd=ROOT, text=True,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    lines = []
    for proc in procs:
        stderr = proc.communicate(timeout=120)[1].strip()
        assert proc.returncode == 2 and stderr.startswith("error: ") and "\n" not in stderr, stderr
        lines.append(stderr)
    return lines


def test_served_user_errors_are_one_line(tiny, tmp_path):
    argv = ["--model", str(tiny), "--benchmarks", "crass", "--limit", "1", "--system", "empty", "--max_new_tokens", "8",
            "--out", str(tmp_path), "--progress", "false", "--base_url"]
    gone = f"http://127.0.0.1:{free_port()}/v1"
    refusal = {"error": {"message": "Unrecognized request argument supplied: stop_token_ids"}}  # as OpenAI's API says
    with LocalServer(lambda path, body: (400, refusal, {})) as server:
        unnamed, unreachable, refused = one_line_errors([*argv, server.base_url], [*argv, gone, "--served_model", "m"],
                                                        [*argv, server.base_url, "--served_model", "m"])
    assert "--base_url needs --served_model" in unnamed
    assert f"{gone}: cannot connect" in unreachable
    assert f"{server.base_url}/completions: the server refused a completions request with fields " in refused
    assert "stop_token_ids, temperature and a token-id prompt: " in refused
    assert refused.endswith("Unrecognized request argument supplied: stop_token_ids")


def test_local_user_errors_are_one_line(tiny, tmp_path):
    """A base LLaMA-2 folder (32,000 rows) with Orca 2's tokenizer (32,003 ids), and sizes below their minimum."""
    base = Transformer(dataclasses.replace(ModelArgs.from_name("tiny"), vocab_size=32000))
    base.init_weights(seed=0)
    base.save_pretrained(tmp_path / "base")
    argv = ["--benchmarks", "crass", "--limit", "1", "--system", "empty", "--out", str(tmp_path / "out")]
    vocab, batch = one_line_errors(["--model", str(tmp_path / "base"), "--tokenizer", str(tiny), *argv],
                                   ["--model", str(tiny), "--batch_size", "0", *argv])
    assert "the tokenizer has 32003 ids" in vocab and "only 32000: pass its own" in vocab
    assert "--batch_size and --concurrency must be at least 1, --limit at least 0: got 0, 64, 1" in batch
