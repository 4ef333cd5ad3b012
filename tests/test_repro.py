"""repro.py without the training run: the task generator, the teacher, the splits, the answer extractor, the
prompt erasing of the arms' data, the config parser and the stories260K converter."""

import json
import re

import pytest
import torch

import data
import orca2
import repro
from conftest import SHARED_DATA


@pytest.fixture(scope="module")
def splits():
    return repro.make_splits(repro.ReproConfig(n_train=3000, n_test=100))


def solve(question: str) -> str:
    """An independent solver that reads only the question text (not the generator's bookkeeping)."""
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


def test_teacher_explanations_reach_the_right_answer(splits):
    for name, problems in splits.items():
        for p in problems:
            assert p.answer == solve(p.question), (name, p.question, p.answer)
            for mode in ("direct", "explain"):
                response = repro.teacher(p, mode)[1]
                assert repro.extract(response) == p.answer, (mode, response)


def test_explanation_steps_are_valid(splits):
    """Every arithmetic line is true and starts from the previous result; every chain link is a stated fact."""
    for p in splits["train"] + splits["arith-hard"] + splits["compare-hard"]:
        text = repro.teacher(p, "explain")[1]
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
            for line in lines:  # each recalled line is a stated fact about the box reached so far, or its end
                assert line.startswith(f"Box {box} ")
                assert line in p.question or line == f"Box {box} is last." and f"Box {box} is" not in p.question
                box = line.split()[-1].rstrip(".")
            assert box == second or lines[-1].endswith("is last."), text


def test_strategies_differ_by_task_type(splits):
    by_kind = {p.kind: p for p in splits["train"]}
    assert set(by_kind) == {"arith", "compare", "easy"}
    systems = {kind: repro.teacher(p, "explain")[0] for kind, p in by_kind.items()}
    assert len(set(systems.values())) == 3  # one detailed instruction per strategy
    assert repro.teacher(by_kind["easy"], "explain")[1].startswith("Answer:")  # easy items: answered directly
    assert repro.teacher(by_kind["arith"], "explain")[1].startswith("Running total:")
    assert repro.teacher(by_kind["compare"], "explain")[1].startswith("Recall the facts:")
    assert all(repro.teacher(p, "direct")[1] == f"Answer: {p.answer}" for p in by_kind.values())


def test_held_out_splits_are_disjoint_and_harder(splits):
    train = {p.question for p in splits["train"]}
    assert len(train) == len(splits["train"])  # no duplicates (data.py would drop them silently otherwise)
    for name in ("arith-test", "compare-test", "arith-hard", "compare-hard"):
        assert not train & {p.question for p in splits[name]}, name
    for kind in ("arith", "compare"):
        seen = max(p.size for p in splits["train"] if p.kind == kind)
        assert min(p.size for p in splits[f"{kind}-hard"]) > seen
        assert {p.size for p in splits[f"{kind}-test"]} <= set(repro.TRAIN_SIZES[kind])
    assert {p.question for p in splits["easy-seen"]} <= train


def test_splits_are_fixed_by_the_data_seed():
    a = repro.make_splits(repro.ReproConfig(n_train=50, n_test=10))
    b = repro.make_splits(repro.ReproConfig(n_train=50, n_test=10))
    c = repro.make_splits(repro.ReproConfig(n_train=50, n_test=10, data_seed=7))
    assert [p.question for p in a["train"]] == [p.question for p in b["train"]] != [p.question for p in c["train"]]


@pytest.mark.parametrize("output, expected", [
    ("Running total:\n2 + 3 = 5\n5 - 2 = 3\nAnswer: 3", "3"),
    ("Answer: 7", "7"),
    ("Running total:\n2 + 3 = 5\n5 - 2 = 3", "3"),  # no cue: evaluate.py's last-number rule
    ("Running total:", None),
    ("Answer: 0", "0"),
    ("Recall the facts:\nBox 4 is older than box 7.\nBox 7 is last.\nAnswer: 2", "2"),
    ("Answer: box 5.", "5"),
    ("Recall the facts:\nBox 4 is older than box 7.", "7"),  # no cue: the last number (a wrong guess, as it should be)
    ("", None),
])
def test_extract(output, expected):
    assert repro.extract(output) == expected


def test_arm_data_erases_only_where_asked(tmp_path, splits):
    """Rendered by data.py as train.py would: the erased arm trains on the generic message, the kept arm on the
    teacher's instruction, and both on the same question and explanation."""
    tok = data.Tokenizer.from_pretrained(repro.TOK512)
    problems = [next(p for p in splits["train"] if p.kind == "compare")]
    path = tmp_path / "explain.jsonl"
    repro.write_jsonl(problems, "explain", path)
    texts = {}
    for arm in ("kept", "erased"):
        source = orca2.Source(arm, str(path), erase=repro.ARMS[arm][1])
        packed, _ = data.build_stage([source], tok, data.DataConfig(max_len=1024, cache_dir=str(tmp_path / arm),
                                                                    num_workers=1))
        texts[arm] = tok.decode(data.get_batch(packed, [0], 1024, tok.pad_id)["input_ids"][0].tolist(),
                                skip_special=True)
    response = repro.teacher(problems[0], "explain")[1]
    assert repro.INSTRUCTIONS["compare"] in texts["kept"] and orca2.ERASED_SYSTEM_MESSAGE not in texts["kept"]
    assert orca2.ERASED_SYSTEM_MESSAGE in texts["erased"] and repro.INSTRUCTIONS["compare"] not in texts["erased"]
    assert all(problems[0].question in t and response in t for t in texts.values())


def test_config_parsing():
    cfg = repro.parse_config(["--seeds=3,4", "--epochs=1", "--lr=0.01", "--oracle=false"])
    assert (cfg.seeds, cfg.epochs, cfg.lr, cfg.oracle) == ("3,4", 1, 0.01, False)
    assert repro.parse_config(["--quick=true", "--n_test=7"]).n_test == 7  # quick keeps explicit sizes
    for bad in (["--nope=1"], ["--epochs=two"], ["--oracle=maybe"], ["--arms=direct,cot"], ["--base=llama"], ["epochs=1"]):
        with pytest.raises(SystemExit):
            repro.parse_config(bad)


def test_stories260k_conversion_matches_llama2c():
    """The converted base reproduces llama2.c's greedy decode (independent float64 reference), token for token."""
    golden = json.loads((SHARED_DATA / "tiny-llama" / "stories260K_expected.json").read_text())
    model = repro.load_llama2c(repro.STORIES260K).eval()
    with torch.inference_mode():
        out = model.generate([[1]], 24, stop_ids=(), pad_id=0)[0]
        logits = model(torch.tensor([golden["logits_prefix_token_ids"]]))[0].double()
    assert out == golden["greedy_token_ids_including_bos"][1:25]
    assert torch.allclose(logits, torch.tensor(golden["logits_prefix"], dtype=torch.float64), atol=1e-4)
