"""synth.py against the miniature's programmatic teacher (servers.teacher_server) on 127.0.0.1: strategy selection by
teacher and student, exact outputs, kill -9 and rerun, retries and failures, the API key, prompt erasing, errors."""

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import client
import servers
import data
import formats
import synth
import repro
import tasks
from cli import UserError
from conftest import ROOT, SHARED_DATA, free_port, write_jsonl
from orca2 import ERASED_SYSTEM_MESSAGE, STRATEGIES, Source
from tokenizer import Tokenizer

CANDIDATES = "direct,step-by-step,recall-then-generate"
FAST = {"retry-after-ms": "1"}  # the openai client waits what the server says, so retries take milliseconds
QUOTA = {"arith": 20, "compare": 20, "easy": 5}  # the qa file; the FLAN file holds 8 more compare problems
COLUMNS = ["system_prompt", "question", "response", "id", "task", "strategy", "teacher", "correct"]


class Teacher:
    """servers.teacher_server, counting requests per (strategy, question), with scripted faults, a delay, and the
    Authorization headers it received."""

    def __init__(self, fault=None, delay_s: float = 0.0):
        self.server = servers.teacher_server()
        self.answer, self.server.respond = self.server.respond, self
        self.server.RequestHandlerClass = KeyHandler
        self.fault, self.delay_s = fault, delay_s  # fault(strategy, question, attempt) -> a response or None
        self.seen, self.auth, self.lock = Counter(), set(), threading.Lock()

    def __call__(self, path: str, body: dict):
        messages = body["messages"]
        key = (servers.strategy_of(messages[0]["content"]), messages[-1]["content"])
        with self.lock:
            self.seen[key] += 1
            attempt = self.seen[key]
        time.sleep(self.delay_s)
        return (self.fault and self.fault(*key, attempt)) or self.answer(path, body)

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop()


class KeyHandler(servers.Handler):
    def do_POST(self):
        self.server.respond.auth.add(self.headers.get("Authorization"))
        super().do_POST()


@pytest.fixture(scope="module")
def task_files(tmp_path_factory) -> str:
    """mini.jsonl (question/answer layout, task = kind) and flan.parquet (FLAN layout, task_name flan-compare)."""
    folder = tmp_path_factory.mktemp("tasks")
    train, taken = repro.make_splits(1, 400, 1)["train"], Counter()
    qa, flan = [], []
    for p in train:
        taken[p.kind] += 1
        if taken[p.kind] <= QUOTA.get(p.kind, 0):
            qa.append({"question": p.question, "answer": p.answer, "task": p.kind})
        elif p.kind == "compare" and len(flan) < 8:
            flan.append({"inputs": p.question, "targets": p.answer, "task_name": "flan-compare"})
    pq.write_table(pa.Table.from_pylist(flan), folder / "flan.parquet", row_group_size=5)  # two row groups
    return write_jsonl(folder / "mini.jsonl", qa) + "," + str(folder / "flan.parquet")


def config(files: str, url: str, out: Path, **options) -> synth.SynthConfig:
    options = {"strategies": CANDIDATES, "select_n": 4, "concurrency": 4, "max_retries": 2, "progress": False,
               **options}
    return synth.SynthConfig(tasks=files, base_url=url, teacher="mini", out=str(out), **options)


def argv(cfg: synth.SynthConfig) -> list[str]:
    return [sys.executable, "synth.py"] + [f"--{k}={v}" for k, v in vars(cfg).items()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def samples(files: str, select_n: int = 4) -> dict[str, list]:
    """Each group's selection items, as synth.py chooses them."""
    groups = {}
    for it in synth.read_tasks(files.split(","), "", 0):
        groups.setdefault(it.group, []).append(it)
    return {g: synth.selection_sample(its, select_n, 0, g) for g, its in groups.items()}


def right(question: str, strategy: str) -> bool:
    return servers.teacher(question, strategy).endswith(f"Answer: {tasks.solve(question).answer}")


@pytest.fixture(scope="module")
def clean_run(task_files, tmp_path_factory):
    """One run with a truncated and a refused answer among the items that only generation asks for."""
    sample_ids = {it.id for its in samples(task_files).values() for it in its}
    items = synth.read_tasks(task_files.split(","), "", 0)
    victims = {k: next(it for it in items if it.group == k and it.id not in sample_ids) for k in ("arith", "compare")}

    def fault(strategy, question, attempt):
        if question == victims["arith"].question:
            return 200, servers.chat_response("Running total:\n4 + 2", finish_reason="length"), {}
        if question == victims["compare"].question:
            return 200, servers.chat_response("I'm sorry, I cannot help with that."), {}

    out = tmp_path_factory.mktemp("clean")
    with Teacher(fault) as teacher:
        result = synth.main(config(task_files, teacher.server.base_url, out))
    return out, result, teacher, items, victims


def test_the_teacher_chooses_the_designed_strategy_per_group(clean_run, task_files):
    out, result, teacher, items, victims = clean_run
    chosen = json.loads((out / "strategies.json").read_text())
    # easy: every strategy is right, so the candidate order (direct first) breaks the tie
    assert {g: c["strategy"] for g, c in chosen.items()} == {
        "arith": "step-by-step", "compare": "recall-then-generate", "easy": "direct",
        "flan-compare": "recall-then-generate"}
    for g, sample in samples(task_files).items():  # the scores are the teacher's accuracy on the selection items
        scores = {s: sum(right(it.question, s) for it in sample) / 4 for s in CANDIDATES.split(",")}
        assert chosen[g] == {"strategy": chosen[g]["strategy"], "scores": scores, "scored_by": "teacher", "n": 4,
                             "rule": "number"}
    assert chosen["compare"]["scores"]["direct"] < 1, "the selection items do not tell the strategies apart"


def test_every_item_once_in_file_order_with_exact_files_and_counts(clean_run, task_files):
    out, result, teacher, items, victims = clean_run
    chosen = json.loads((out / "strategies.json").read_text())
    rows = read_jsonl(out / "data.jsonl")
    lost = {victims["arith"].id, victims["compare"].id}
    assert [r["id"] for r in rows] == [it.id for it in items if it.id not in lost]
    assert (items[0].id, items[-1].id, len(items)) == ("mini:1", "flan:8", 53)
    for r, it in zip(rows, (it for it in items if it.id not in lost)):
        s = chosen[it.group]["strategy"]
        assert list(r) == COLUMNS
        assert r == dict(system_prompt=STRATEGIES[s], question=it.question, response=servers.teacher(it.question, s),
                         id=it.id, task=it.group, strategy=s, teacher="mini", correct=True)
    rejected = read_jsonl(out / "rejected.jsonl")
    assert [(r["id"], r["reason"]) for r in rejected] == [(victims["arith"].id, "truncated"),
                                                          (victims["compare"].id, "refused")]
    selection = read_jsonl(out / "selection.jsonl")  # the selection answers under the losing strategies
    expected = {(it.id, s) for g, its in samples(task_files).items() for it in its
                for s in CANDIDATES.split(",") if s != chosen[g]["strategy"]}
    assert {(r["id"], r["strategy"]) for r in selection} == expected and len(selection) == 16 * 2
    question = {it.id: it.question for it in items}
    for r in selection:
        assert r["by"] == "teacher" and r["response"] == servers.teacher(question[r["id"]], r["strategy"])
        assert r["correct"] == right(question[r["id"]], r["strategy"])
    assert (out / "failures.jsonl").read_text() == ""
    # 16 selection items x 3 strategies, then the 37 other items; the 16 under the winner come from the cache
    assert sum(teacher.seen.values()) == 48 + 37 and max(teacher.seen.values()) == 1
    assert (result["requests"], result["cache_hits"], result["failed"]) == (85, 16, 0)
    report = (out / "report.md").read_text()
    written = {"arith": "19 | 0 | 1 | 0 | 0", "compare": "19 | 0 | 0 | 1 | 0", "easy": "5 | 0 | 0 | 0 | 0",
               "flan-compare": "8 | 0 | 0 | 0 | 0"}
    for g, counts in written.items():
        scores = ", ".join(f"{s} {chosen[g]['scores'][s]:.2f}" for s in CANDIDATES.split(","))
        assert f"| {g} | {QUOTA.get(g, 8)} | 0 | {chosen[g]['strategy']} | {scores} | {counts} |" in report
    assert "51 of 53 items written; 0 wrong dropped, 1 truncated, 1 empty/refused, 0 failed; 85 requests sent, " \
           "16 cache hits, 0 failures" in report


def test_a_student_chooses_and_the_teacher_breaks_its_ties(task_files, tmp_path):
    good = {"arith": {"direct"}, "compare": {"direct", "recall-then-generate"}, "easy": {"recall-then-generate"}}

    def student(path, body):
        strategy, question = servers.strategy_of(body["messages"][0]["content"]), body["messages"][-1]["content"]
        p = tasks.solve(question)
        return 200, servers.chat_response(f"Answer: {p.answer if strategy in good[p.kind] else 99}"), {}

    with Teacher() as teacher, servers.LocalServer(student) as server:
        result = synth.main(config(task_files, teacher.server.base_url, tmp_path, student="stage2",
                                   student_base_url=server.base_url))
    chosen = json.loads((tmp_path / "strategies.json").read_text())
    # arith: the student is right only when told to answer directly, whatever the teacher prefers; compare: a tie
    # of direct (first in order) and recall-then-generate, which the teacher's accuracy breaks
    assert {g: c["strategy"] for g, c in chosen.items()} == {
        "arith": "direct", "compare": "recall-then-generate", "easy": "recall-then-generate",
        "flan-compare": "recall-then-generate"}
    assert chosen["compare"]["scores"] == {"direct": 1.0, "step-by-step": 0.0, "recall-then-generate": 1.0}
    assert chosen["compare"]["teacher_scores"]["direct"] < chosen["compare"]["teacher_scores"]["recall-then-generate"]
    assert all(c["scored_by"] == "student" for c in chosen.values()) and result["failed"] == 0
    students = [r for r in read_jsonl(tmp_path / "selection.jsonl") if r["by"] == "student"]
    assert len(students) == 16 * 3, "every student answer is kept for inspection"
    assert {r["strategy"] for r in read_jsonl(tmp_path / "data.jsonl") if r["task"] == "arith"} == {"direct"}


def test_wrong_answers_are_dropped_or_kept_with_correct_false(task_files, tmp_path):
    items = synth.read_tasks(task_files.split(","), "", 0)
    with Teacher() as teacher:
        synth.main(config(task_files, teacher.server.base_url, tmp_path, strategies="direct,step-by-step"))
        sent = sum(teacher.seen.values())
        chosen = json.loads((tmp_path / "strategies.json").read_text())
        wrong = [it.id for it in items if not right(it.question, chosen[it.group]["strategy"])]
        assert wrong, "no wrong answer to filter"
        rejected = read_jsonl(tmp_path / "rejected.jsonl")
        assert [(r["id"], r["reason"]) for r in rejected] == [(i, "wrong") for i in wrong]
        assert [r["id"] for r in read_jsonl(tmp_path / "data.jsonl")] == [it.id for it in items if it.id not in wrong]
        synth.main(config(task_files, teacher.server.base_url, tmp_path, strategies="direct,step-by-step",
                          filter_wrong=False))
    assert sum(teacher.seen.values()) == sent, "the second run sent requests the cache holds"
    kept = {r["id"]: r["correct"] for r in read_jsonl(tmp_path / "data.jsonl")}
    assert list(kept) == [it.id for it in items] and [i for i, ok in kept.items() if ok is False] == wrong
    assert (tmp_path / "rejected.jsonl").read_text() == ""


def test_max_requests_stops_cleanly_and_a_rerun_goes_on(task_files, tmp_path):
    with Teacher() as teacher:
        stopped = synth.main(config(task_files, teacher.server.base_url, tmp_path, max_requests=60))
        assert stopped["stopped"] and sum(teacher.seen.values()) == 60  # 48 for selection, 12 of generation
        assert not (tmp_path / "data.jsonl").exists()
        done = synth.main(config(task_files, teacher.server.base_url, tmp_path))
    assert not done["stopped"] and done["requests"] == 85 - 60 and max(teacher.seen.values()) == 1
    assert len(read_jsonl(tmp_path / "data.jsonl")) == 53


def test_kill_9_in_generation_then_a_rerun_gives_the_uninterrupted_data(task_files, tmp_path):
    with Teacher(delay_s=0.03) as teacher:
        cfg = config(task_files, teacher.server.base_url, tmp_path / "killed")
        child = subprocess.Popen(argv(cfg), cwd=ROOT, stdout=subprocess.DEVNULL)
        deadline = time.time() + 60
        while sum(teacher.seen.values()) < 48 + 12 and child.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
        child.wait()
        with sqlite3.connect(tmp_path / "killed" / "cache.sqlite") as db:
            stored = {(servers.strategy_of(m[0]["content"]), m[-1]["content"])
                      for (request,) in db.execute("SELECT request FROM replies")
                      for m in [json.loads(request)["messages"]]}
        assert 48 + 4 <= len(stored) < 85, f"killed at the wrong moment: {len(stored)} answers stored"
        before = Counter(teacher.seen)
        assert synth.main(cfg)["failed"] == 0
        rerun = teacher.seen - before
        assert not stored & set(rerun), "the rerun paid again for an answer stored before the kill"
        assert sum(n == 2 for n in teacher.seen.values()) <= cfg.concurrency, "more repeated than were in flight"
        synth.main(config(task_files, teacher.server.base_url, tmp_path / "whole"))
    killed, whole = (tmp_path / name / "data.jsonl" for name in ("killed", "whole"))
    assert killed.read_bytes() == whole.read_bytes() and len(read_jsonl(whole)) == 53


def test_retries_succeed_failures_are_listed_and_a_rerun_sends_only_them(task_files, tmp_path):
    extra = write_jsonl(tmp_path / "extra.jsonl", [  # no gold: not in selection, answered under arith's winner
        {"question": "Ann has 2 coins. Ann gets 1 more. How many coins does Ann have now?", "answer": "",
         "task": "arith"},
        {"question": "Bob has 5 cards. Bob gives away 2. How many cards does Bob have now?", "task": "arith"}])
    down, garbled = (json.loads(line)["question"] for line in Path(extra).read_text().splitlines())

    def fault(strategy, question, attempt):
        if question == down:
            return 503, {"error": {"message": "backend down"}}, FAST
        if question == garbled:
            return 200, "<html>502 Bad Gateway</html>", {}
        if attempt <= 2:
            return (429, {"error": {"message": "slow down"}}, FAST) if attempt == 1 else \
                (500, {"error": {"message": "oops"}}, FAST)

    with Teacher(fault) as teacher:
        cfg = config(task_files + "," + extra, teacher.server.base_url, tmp_path)
        done = subprocess.run(argv(cfg), cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode == 1 and "2 requests failed" in done.stdout and "Traceback" not in done.stderr
        assert teacher.seen[("step-by-step", down)] == 3 and teacher.seen[("step-by-step", garbled)] == 1
        assert all(n == 3 for key, n in teacher.seen.items() if key[1] not in (down, garbled)), "429/500 not retried"
        failures = read_jsonl(tmp_path / "failures.jsonl")
        assert [(f["id"], f["strategy"], f["by"]) for f in failures] == [("extra:1", "step-by-step", "teacher"),
                                                                          ("extra:2", "step-by-step", "teacher")]
        assert failures[0]["error"].startswith("extra:1: ") and "503" in failures[0]["error"]
        assert failures[1]["error"].startswith("extra:2: ") and "<html>502 Bad Gateway</html>" in failures[1]["error"]
        assert len(read_jsonl(tmp_path / "data.jsonl")) == 53
        teacher.fault, before = None, Counter(teacher.seen)
        again = synth.main(cfg)
    assert teacher.seen - before == Counter({("step-by-step", down): 1, ("step-by-step", garbled): 1})
    assert again["failed"] == 0 and (tmp_path / "failures.jsonl").read_text() == ""
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "data.jsonl")}
    assert len(rows) == 55 and rows["extra:1"]["correct"] is None and rows["extra:2"]["response"].endswith("3")


def test_the_api_key_is_sent_but_never_written(task_files, tmp_path, monkeypatch):
    key = "sk-synth-test-do-not-store-51c2"
    monkeypatch.setenv("ORCA2_SYNTH_KEY", key)
    with Teacher() as teacher:
        synth.main(config(task_files, teacher.server.base_url, tmp_path, api_key_env="ORCA2_SYNTH_KEY"))
    assert teacher.auth == {f"Bearer {key}"}
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) >= 7 and not any(key.encode() in p.read_bytes() for p in files)


def test_prompt_erasing_trains_on_the_generic_message_and_the_teachers_answers(clean_run, tmp_path):
    out = clean_run[0]
    rows = read_jsonl(out / "data.jsonl")
    tok = Tokenizer.from_pretrained(SHARED_DATA / "llama2-tokenizer" / "tokenizer.model")
    d = data.tokenize_source(Source("x", str(out / "data.jsonl"), erase=True), tok,
                             data.DataConfig(cache_dir=str(tmp_path / "cache"), num_workers=1), log=None)
    assert d.meta["examples"] == len(rows) == 51
    for k, row in enumerate(rows):
        ids, sup = d.ids[d.offsets[k]:d.offsets[k + 1]], d.sup[d.offsets[k]:d.offsets[k + 1]]
        prompt = tok.decode([int(i) for i, s in zip(ids, sup) if not s])
        assert prompt == f"<|im_start|>system\n{ERASED_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n" \
                         f"{row['question']}<|im_end|>\n<|im_start|>assistant"
        assert tok.decode([int(i) for i, s in zip(ids, sup) if s]) == "\n" + row["response"] + "<|im_end|>"
        assert row["system_prompt"] not in tok.decode([int(i) for i in ids])


def test_bad_task_and_strategy_files_are_user_errors_naming_the_place(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"question": "2+2?", "response": "4", "system_prompt": ""}])
    broken = write_jsonl(tmp_path / "broken.jsonl", [{"question": "2+2?", "answer": "4"}, "", "{not json"])
    with pytest.raises(UserError, match=f"{chat}:1: not a task record, found keys "
                                        r"\['question', 'response', 'system_prompt'\]"):
        synth.read_tasks([chat], "", 0)
    with pytest.raises(UserError, match=f"{broken}:3: "):
        synth.read_tasks([broken], "", 0)
    with pytest.raises(UserError, match=f"{broken}:1: no field 'topic' to group by"):
        synth.read_tasks([broken], "topic", 0)
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"mine": "Think in pictures. End with a last line Answer: ..."}))
    assert list(synth.read_candidates(str(own))) == list(STRATEGIES) + ["mine"]  # a file adds; no names: all
    assert list(synth.read_candidates(f"{own},mine,direct")) == ["mine", "direct"]  # names restrict, in order
    with pytest.raises(UserError, match="unknown strategy 'nope'"):
        synth.read_candidates("direct,nope")
    own.write_text("[1, 2]")
    with pytest.raises(UserError, match=f"--strategies {own}: expected a JSON object"):
        synth.read_candidates(str(own))


def test_the_command_line_says_one_line_errors_and_a_dry_run_sends_nothing(task_files, tmp_path):
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"prompt": "2+2?", "completion": "4"}])
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with Teacher() as teacher:
        url = teacher.server.base_url
        runs = {"layout": config(odd, url, tmp_path / "a"), "url": config(task_files, dead, tmp_path / "b"),
                "dry": config(task_files, url, tmp_path / "c", dry_run=True)}
        procs = {k: subprocess.Popen(argv(cfg), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k, cfg in runs.items()}  # at once: each start imports torch (through data.py)
        (rc, out, err), (url_rc, _, url_err), (dry_rc, dry_out, dry_err) = (
            (p.wait(timeout=60), *p.communicate()) for p in procs.values())
    assert rc == 2 and err == f"error: {odd}:1: unknown column layout, found columns ['prompt', 'completion']; " \
                              f"expected one of: {'; '.join(line for _, line in formats.FORMATS.values())}\n"
    assert url_rc == 2 and url_err.startswith(f"error: {dead}: cannot connect") and url_err.count("\n") == 1
    assert dry_rc == 0 and dry_err == "" and "selection: teacher mini: 48 requests (0 cached)" in dry_out
    assert "generation: 53 teacher requests, 37 beyond the selection answers" in dry_out and "characters / 4" in dry_out
    assert sum(teacher.seen.values()) == 0 and not (tmp_path / "c").exists(), "the dry run sent or wrote something"
