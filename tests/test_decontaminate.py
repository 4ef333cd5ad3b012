"""decontaminate.py: planted benchmark items are found (verbatim, recased and repunctuated, a passage excerpt), a clean
file reports zero, the shorter-than-n rule, n-grams never span two texts, clean copies, the parallel path."""

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import decontaminate as dc
from conftest import SHARED_DATA
from benchmarks import load_benchmark

BENCHMARKS = SHARED_DATA / "benchmarks"


@pytest.fixture(scope="module")
def items() -> dict[str, list]:
    return {name: load_benchmark(name, BENCHMARKS) for name in ("gsm8k", "crass", "race")}


def openorca(question: str, response: str, system: str = "") -> dict:
    return {"id": "x", "system_prompt": system, "question": question, "response": response}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def run(tmp_path, train: list[str], benchmarks: str = "gsm8k,crass,race", **kw) -> dict:
    cfg = dc.DecontaminateConfig(**{"train": ",".join(train), "benchmarks": benchmarks,
                                    "out": str(tmp_path / "report.json"),
                                    "data_dir": str(BENCHMARKS), "num_workers": 1, **kw})
    rep = dc.report(cfg, log=lambda _: None)
    assert json.loads((tmp_path / "report.json").read_text()) == rep
    return rep


def test_planted_items_are_found_and_named_by_evaluate_ids(items, tmp_path):
    # (CRASS items often share their first 13 words with a sibling, e.g. crass/41 and crass/42: this one does not)
    gsm, crass, race = items["gsm8k"][17], items["crass"][10], items["race"][300]
    shouted = crass.text.upper().replace(" ", " ... ").replace("?", "!!")  # case and punctuation changed
    passage = race.text.split("\n")[1].split()  # the article, not the question or options
    excerpt = " ".join(passage[10:30])  # 20 words from inside the passage
    records = [openorca("Solve this: " + gsm.text, "The answer is 42."),
               openorca("Hello there.", "Hi! How can I help?"),
               openorca("Summarize.", f"It says: {excerpt}. That is all.", system="You are a reader."),
               openorca("Think about this: " + shouted, "Okay.")]
    rep = run(tmp_path, [write_jsonl(tmp_path / "train.jsonl", records)])
    assert (rep["ngram"], rep["train_examples"], rep["train_examples_flagged"]) == (13, 4, 3)
    b = rep["benchmarks"]
    assert (b["gsm8k"]["items"], b["crass"]["items"], b["race"]["items"]) == (1319, 274, 4934)
    assert b["gsm8k"]["ids"] == ["gsm8k/17"] and b["crass"]["ids"] == [crass.id] == ["crass/11"]
    same_article = [it.id for it in items["race"] if it.text.split("\n")[1] == race.text.split("\n")[1]]
    assert race.id in b["race"]["ids"] and b["race"]["ids"] == same_article  # every question of that passage
    assert b["gsm8k"]["where"]["gsm8k/17"].endswith("train.jsonl:1") and b["crass"]["where"][crass.id].endswith(":4")


def test_a_clean_file_reports_zero(items, tmp_path):
    sample = SHARED_DATA / "orca-samples/orca_dpo_pairs_validation.jsonl"
    rep = run(tmp_path, [str(sample)])
    assert rep["train_examples"] == 284 and rep["train_examples_flagged"] == 0
    assert all(b["contaminated"] == 0 and b["ids"] == [] for b in rep["benchmarks"].values())


def test_an_item_shorter_than_n_is_one_ngram_of_its_whole_text():
    short = SimpleNamespace(text="not ( True ) and ( True ) is")  # 5 words after normalising
    long = SimpleNamespace(text=" ".join(f"w{k}" for k in range(20)))
    table = dc.benchmark_table([short, long], n=13)
    assert table["lengths"].tolist() == [5, 13] and table["words"].tolist() == [5, 20]

    def matched(*texts) -> set[int]:
        h, text = dc.word_hashes(list(texts))
        return {int(i) for length, hashes, _ in dc.ngram_hashes(h, text, [5, 13]) for i in dc.lookup(table, hashes)[1]}

    assert matched("Is it: NOT (true) AND (true) is, right?") == {0}  # the whole short text, inside a longer one
    assert matched("not true and true") == set()  # 4 of its 5 words
    assert matched(" ".join(f"w{k}" for k in range(3, 16))) == {1}  # 13 words of the long item
    assert matched(" ".join(f"w{k}" for k in range(3, 15))) == set()  # 12 are not enough
    assert matched(" ".join(f"w{k}" for k in range(3, 9)), " ".join(f"w{k}" for k in range(9, 16))) == set()  # split


def test_normalising_and_hashing():
    assert dc.normalize("Hello, World! It's  3.5 __ yes") == ["hello", "world", "its", "35", "yes"]
    a, ta = dc.word_hashes(["Hello, World!", "", "x\u00a0Y"])
    b, tb = dc.word_hashes(["hello world", "", "X y"])
    assert np.array_equal(a, b) and ta.tolist() == [0, 0, 2, 2] == tb.tolist() and len(set(a.tolist())) == 4


def test_write_clean_and_parquet_training_files_in_parallel(items, tmp_path):
    gsm = items["gsm8k"]
    rows = [openorca(f"Question {k}: what is {k} plus {k}?", f"It is {2 * k}.") for k in range(3000)]
    for k, item in ((5, 5), (1500, 100), (2999, 1300)):
        rows[k] = openorca(gsm[item].text, "Some answer.")
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)  # 3 row groups: parts for 2 workers
    lines = [openorca("Clean.", "Yes."), openorca("Again: " + gsm[7].text, "No."), openorca("Clean 2.", "Yes.")]
    jsonl = write_jsonl(tmp_path / "small.jsonl", lines)
    rep = run(tmp_path, [str(path), jsonl], benchmarks="gsm8k", write_clean=str(tmp_path / "clean"),
              num_workers=2)
    assert rep["benchmarks"]["gsm8k"]["ids"] == ["gsm8k/5", "gsm8k/7", "gsm8k/100", "gsm8k/1300"]
    assert rep["train_files"][str(path)] == dict(examples=3000, flagged=3, skipped_bad_records=0,
                                                 written=str(tmp_path / "clean/train.parquet"))
    assert rep["benchmarks"]["gsm8k"]["where"]["gsm8k/100"] == f"{path} row 1500"
    clean = pq.read_table(tmp_path / "clean/train.parquet").to_pylist()
    assert len(clean) == 2997 and clean[5]["question"] == "Question 6: what is 6 plus 6?"
    assert [json.loads(line)["question"] for line in (tmp_path / "clean/small.jsonl").read_text().splitlines()] == \
        ["Clean.", "Clean 2."]
    with pytest.raises(ValueError, match="would overwrite the training file"):
        run(tmp_path, [jsonl], benchmarks="gsm8k", write_clean=str(tmp_path))
