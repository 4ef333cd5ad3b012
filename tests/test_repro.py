"""tasks.py and repro.py without the long training run: the task generator, the teacher's accuracy per strategy,
the splits, the arms' data (synth.py through the served teacher; prompt erasing) and the stories260K base."""

import json
import re

import pytest
import torch

import data
import orca2
import repro
import servers
import tasks
from conftest import SHARED_DATA
from tokenizer import Tokenizer

TOK512 = SHARED_DATA / "tiny-llama" / "tok512.model"


@pytest.fixture(scope="module")
def splits():
    return repro.make_splits(data_seed=1234, n_train=3000, n_test=100)


def solve(question: str) -> str:
    """An independent solver that reads only the question text (not tasks.solve)."""
    if question.startswith("What is"):
        a, op, b = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", question).groups()
        return str(int(a) + int(b) if op == "+" else int(a) - int(b))
    start = re.match(r"\w+ has (\d+) ", question)
    if start:
        total = int(start.group(1))
        for verb, k in re.findall(r"(gets|gives away) (\d+)", question):
            total += int(k) if verb == "gets" else -int(k)
        return str(total)
    facts = re.findall(r"Box (\d) is \w+ than box (\d)\.", question)
    first, second = re.search(r"Which is \w+, box (\d) or box (\d)\?", question).groups()
    below, box = dict(facts), first
    while box in below:  # follow the facts down from the first box
        box = below[box]
        if box == second:
            return first
    return second


def answer(text: str) -> str:
    return text.rsplit("Answer: ", 1)[1]


def test_the_fitting_strategy_is_always_right_and_the_others_are_not(splits):
    wrong = {(kind, s): 0 for kind in tasks.FITS for s in ("direct", "step-by-step", "recall-then-generate")}
    for p in splits["train"]:
        assert p.answer == solve(p.question), p.question
        for s in ("direct", "step-by-step", "recall-then-generate"):
            wrong[p.kind, s] += answer(servers.teacher(p.question, s)) != p.answer
    n = {kind: sum(p.kind == kind for p in splits["train"]) for kind in tasks.FITS}
    for kind, fit in tasks.FITS.items():
        assert wrong[kind, fit] == 0
    assert wrong["easy", "direct"] == wrong["easy", "step-by-step"] == wrong["easy", "recall-then-generate"] == 0
    assert 0.35 < wrong["arith", "direct"] / n["arith"] < 0.65   # a guess at a multi-step sum
    assert 0.2 < wrong["arith", "recall-then-generate"] / n["arith"] < 0.4
    assert 0.1 < wrong["compare", "step-by-step"] / n["compare"] < 0.3
    question = splits["train"][0].question
    assert servers.teacher(question, "direct") == servers.teacher(question, "direct")  # the same every time


def test_explanations_under_the_fitting_strategies_are_valid(splits):
    """Every running-total line is true and continues the previous one; every recalled line is a stated fact."""
    for p in splits["train"] + splits["arith-hard"] + splits["compare-hard"]:
        text = servers.teacher(p.question, tasks.FITS[p.kind])
        assert text.startswith(tasks.OPENINGS[p.kind])
        if p.kind == "arith":
            lines = re.findall(r"^(\d+) ([+-]) (\d+) = (\d+)$", text, re.M)
            assert len(lines) == p.size
            prev = re.match(r"\w+ has (\d+)", p.question).group(1)
            for a, op, b, c in lines:
                assert a == prev and int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)), text
                prev = c
        elif p.kind == "compare":
            first, second = re.search(r"box (\d) or box (\d)\?", p.question).groups()
            lines, box = re.findall(r"^(Box .*)$", text, re.M), first
            for line in lines:
                assert line.startswith(f"Box {box} ")
                assert line in p.question or line == f"Box {box} is last." and f"Box {box} is" not in p.question
                box = line.split()[-1].rstrip(".")
            assert box == second or lines[-1].endswith("is last."), text


def test_held_out_splits_are_disjoint_harder_and_fixed_by_the_seed(splits):
    train = {p.question for p in splits["train"]}
    assert len(train) == len(splits["train"]) and tasks.EXAMPLE_PROMPT not in train
    for name in ("arith-test", "compare-test", "arith-hard", "compare-hard"):
        assert not train & {p.question for p in splits[name]}, name
    for kind in ("arith", "compare"):
        seen = max(p.size for p in splits["train"] if p.kind == kind)
        assert min(p.size for p in splits[f"{kind}-hard"]) > seen
        assert {p.size for p in splits[f"{kind}-test"]} <= set(tasks.TRAIN_SIZES[kind])
    assert {p.question for p in splits["easy-seen"]} <= train
    a, b, c = (repro.make_splits(seed, 50, 10)["train"] for seed in (1234, 1234, 7))
    assert [p.question for p in a] == [p.question for p in b] != [p.question for p in c]


def test_repro_makes_its_data_with_synth_and_erases_only_where_asked(tmp_path, splits):
    """The served teacher through synth.py selects the fitting strategy per task type; data.py then trains the kept
    arm on the teacher's instruction and the erased arm on the generic message, on the same responses."""
    problems = [p for p in splits["train"] if p.kind != "easy"][:120] + [p for p in splits["train"] if p.kind == "easy"]
    cfg = repro.ReproConfig(select_n=20, out_dir=str(tmp_path))
    files, selected = repro.make_data(cfg, problems, tmp_path)
    assert {k: v["strategy"] for k, v in selected.items()} == tasks.FITS
    rows = [json.loads(line) for line in files["erased"].read_text().splitlines()]
    assert [r["question"] for r in rows] == [p.question for p in problems]  # every problem once, in order
    assert all(r["correct"] for r in rows)
    tok = Tokenizer.from_pretrained(TOK512)
    compare = next(k for k, r in enumerate(rows) if r["task"] == "compare")
    texts = {}
    for arm in ("kept", "erased"):
        d = data.tokenize_source(orca2.Source(arm, str(files[arm]), erase=repro.ARMS[arm]), tok,
                                 data.DataConfig(max_len=1024, cache_dir=str(tmp_path / "cache"), num_workers=1),
                                 log=None)
        texts[arm] = tok.decode(d.ids[d.offsets[compare]:d.offsets[compare + 1]].tolist(), skip_special=True)
    instruction = orca2.STRATEGIES["recall-then-generate"]
    assert instruction in texts["kept"] and orca2.ERASED_SYSTEM_MESSAGE not in texts["kept"]
    assert orca2.ERASED_SYSTEM_MESSAGE in texts["erased"] and instruction not in texts["erased"]
    assert all(rows[compare]["response"] in t for t in texts.values())
    direct = [json.loads(line) for line in files["direct"].read_text().splitlines()]
    assert [r["response"] for r in direct] == [f"Answer: {p.answer}" for p in problems]


def test_stories260k_loads_as_llama2c_decodes_it():
    """The llama2.c checkpoint loads straight into the model and reproduces llama2.c's greedy decode (an independent
    float64 reference), token for token."""
    from model import Transformer
    golden = json.loads((SHARED_DATA / "tiny-llama" / "stories260K_expected.json").read_text())
    model = Transformer.from_pretrained(SHARED_DATA / "tiny-llama" / "stories260K.bin").eval()
    with torch.inference_mode():
        out = model.generate([[1]], 24, stop_ids=(), pad_id=0)[0]
        logits = model(torch.tensor([golden["logits_prefix_token_ids"]]))[0].double()
    assert out == golden["greedy_token_ids_including_bos"][1:25]
    assert torch.allclose(logits, torch.tensor(golden["logits_prefix"], dtype=torch.float64), atol=1e-4)


def test_students_trained_side_by_side_equal_students_trained_one_after_the_other(tmp_path):
    """--jobs=2 trains each student in its own process with its own log; the results are those of --jobs=1."""
    small = dict(n_train=60, n_test=4, epochs=1, seeds="0", arms="direct,erased", threads=1, oracle=False)
    a = repro.main(repro.ReproConfig(**small, jobs=1, out_dir=str(tmp_path / "a")))
    b = repro.main(repro.ReproConfig(**small, jobs=2, out_dir=str(tmp_path / "b")))
    assert [(r["arm"], r["seed"]) for r in b["rows"]] == [("direct", "0"), ("erased", "0")]
    assert a["rows"] == b["rows"]
    pa, pb = ((tmp_path / d / "predictions.jsonl").read_text() for d in "ab")
    n = sum(len(v) for k, v in repro.make_splits(1234, 60, 4).items() if k != "train")
    assert pa == pb and len(pa.splitlines()) == 2 * n  # every student's output for every held-out problem
    assert "[data] erased:" in (tmp_path / "b" / "erased-seed0.log").read_text()


def test_quick_sizes_fill_only_the_sizes_not_given():
    assert (lambda c: (c.n_train, c.n_test, c.epochs))(repro.check_config(repro.ReproConfig())) == (3000, 100, 2)
    quick = repro.check_config(repro.ReproConfig(quick=True, epochs=2))
    assert (quick.n_train, quick.n_test, quick.epochs) == (240, 20, 2)  # --epochs=2 kept although it is the full size
    with pytest.raises(repro.UserError, match="--arms must be a subset"):
        repro.check_config(repro.ReproConfig(arms="direct,copied"))

