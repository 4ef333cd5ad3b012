"""client.py against scripted servers on 127.0.0.1: cache, retries, failures, refusals, token ids, kill -9."""

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest
from conftest import ROOT, free_port

from cli import UserError
from client import Endpoint, Failure, Reply
from servers import LocalServer, chat_response, completion_response

FAST = {"retry-after-ms": "1"}  # the openai client waits what the server says, so retries take milliseconds


def chat(i: int, **sampling) -> tuple[str, dict]:
    return "chat", {"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 16, **sampling}


def asked(body: dict) -> str:
    return body["messages"][-1]["content"]


class Script:
    """A respond() that counts the requests per question and answers with answer(question, attempt)."""

    def __init__(self, answer, delay_s: float = 0.0):
        self.answer = answer
        self.delay_s = delay_s  # a slow server keeps requests in flight
        self.seen = Counter()  # question -> requests received
        self.lock = threading.Lock()  # the server answers on many threads

    def __call__(self, path: str, body: dict):
        with self.lock:
            self.seen[asked(body)] += 1
            attempt = self.seen[asked(body)]
        time.sleep(self.delay_s)
        return self.answer(asked(body), attempt)


def echo(question: str, attempt: int):
    return 200, chat_response(f"answer to {question}", prompt_tokens=3, completion_tokens=2), {}


def endpoint(server: LocalServer, tmp_path, **options) -> Endpoint:
    options = {"progress": False, "max_retries": 3, "concurrency": 4, **options}
    return Endpoint(server.base_url, "test-model", tmp_path / "cache.sqlite", **options)


def test_replies_come_in_order_and_a_rerun_sends_nothing(tmp_path):
    script = Script(echo)
    requests = [chat(i) for i in range(30)]
    with LocalServer(script) as server:
        first = endpoint(server, tmp_path).run(requests + [requests[0]])  # a repeated request is sent once
        assert [r.text for r in first] == [f"answer to q{i}" for i in range(30)] + ["answer to q0"]
        assert not any(r.cached for r in first) and set(script.seen.values()) == {1}
        rerun = endpoint(server, tmp_path)
        again = rerun.run(requests)
        assert sum(script.seen.values()) == 30, "the rerun sent requests the cache holds"
        assert all(r.cached for r in again) and [r.text for r in again] == [r.text for r in first[:30]]
        assert rerun.stats["cache_hits"] == 30 and rerun.stats["requests"] == 0
        changed = rerun.run([chat(0, temperature=0.7)])  # a different sampling parameter is a different request
        assert not changed[0].cached and script.seen["q0"] == 2


def test_429_and_500_are_retried_until_they_succeed(tmp_path):
    def flaky(question: str, attempt: int):
        if attempt == 1:
            return 429, {"error": {"message": "rate limited"}}, FAST
        if attempt == 2:
            return 500, {"error": {"message": "overloaded"}}, FAST
        return echo(question, attempt)

    script = Script(flaky)
    with LocalServer(script) as server:
        ep = endpoint(server, tmp_path)
        replies = ep.run([chat(i) for i in range(10)])
    assert [r.text for r in replies] == [f"answer to q{i}" for i in range(10)]
    assert set(script.seen.values()) == {3} and ep.stats["failures"] == 0 and ep.stats["completion_tokens"] == 20


def test_a_request_that_keeps_failing_is_a_failure_and_only_it_is_retried_by_a_rerun(tmp_path):
    def broken_q3(question: str, attempt: int):
        if question == "q3":
            return 503, {"error": {"message": "backend q3 unavailable"}}, FAST
        return echo(question, attempt)

    script = Script(broken_q3)
    with LocalServer(script) as server:
        ep = endpoint(server, tmp_path)
        replies = ep.run([chat(i) for i in range(6)])
        assert isinstance(replies[3], Failure) and ep.stats["failures"] == 1
        assert "503" in replies[3].error and "backend q3 unavailable" in replies[3].error
        assert script.seen["q3"] == 1 + 3, "one try and max_retries=3 retries"
        assert all(isinstance(r, Reply) for i, r in enumerate(replies) if i != 3)
        again = endpoint(server, tmp_path).run([chat(i) for i in range(6)])
    assert isinstance(again[3], Failure) and script.seen["q3"] == 8
    assert all(script.seen[f"q{i}"] == 1 for i in (0, 1, 2, 4, 5)), "a rerun sent a request that had succeeded"


def test_a_malformed_200_is_a_failure_showing_what_came_back(tmp_path):
    bodies = {"q0": "<html>502 Bad Gateway from the proxy</html>", "q1": {"choices": []},
              "q2": {"choices": [{"message": {"role": "assistant", "content": None}}]}}
    script = Script(lambda question, attempt: (200, bodies[question], {}))
    with LocalServer(script) as server:
        replies = endpoint(server, tmp_path).run([chat(i) for i in range(3)])
        endpoint(server, tmp_path).run([chat(i) for i in range(3)])
    assert all(isinstance(r, Failure) for r in replies)
    assert "not JSON" in replies[0].error and "<html>502 Bad Gateway from the proxy</html>" in replies[0].error
    assert "no choices[0].message.content" in replies[1].error and '{"choices": []}' in replies[1].error
    assert "choices[0].message.content is not a string" in replies[2].error
    assert set(script.seen.values()) == {2}, "a malformed reply was cached"


def test_check_names_an_unreachable_url_within_seconds(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/v1"
    start = time.time()
    with pytest.raises(UserError, match=f"{url}: cannot connect"):
        Endpoint(url, "test-model", tmp_path / "cache.sqlite").check()
    assert time.time() - start < 5
    with LocalServer(Script(echo)) as server:
        endpoint(server, tmp_path).check()  # a live server passes


def test_max_new_stops_after_that_many_and_a_rerun_continues(tmp_path):
    script = Script(echo)
    requests = [chat(i) for i in range(10)]
    with LocalServer(script) as server:
        ep = endpoint(server, tmp_path)
        part = ep.run(requests, max_new=4)
        assert sum(r is not None for r in part) == 4 and sum(script.seen.values()) == 4 == ep.stats["requests"]
        rest = ep.run(requests)
    assert all(isinstance(r, Reply) for r in rest) and sum(r.cached for r in rest) == 4
    assert set(script.seen.values()) == {1} and len(script.seen) == 10


def test_the_api_key_never_reaches_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCA2_TEST_KEY", "sk-test-do-not-store-8c1f")
    with LocalServer(Script(echo)) as server:
        ep = endpoint(server, tmp_path, api_key_env="ORCA2_TEST_KEY")
        assert ep.client_options()["api_key"] == "sk-test-do-not-store-8c1f"
        assert ep.run([chat(0)])[0].text == "answer to q0"
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("cache.sqlite*"))  # the database, its WAL and index
    assert b"answer to q0" in stored and b"sk-test-do-not-store" not in stored


def test_completions_send_token_ids_and_extra_fields_unchanged_and_return_token_ids(tmp_path):
    seen = []

    def vllm(path: str, body: dict):
        seen.append((path, body))
        return 200, completion_response(" 42", token_ids=[29871, 29946, 29906, 2], finish_reason="stop"), {}

    body = {"prompt": [1, 518, 25580, 29962], "max_tokens": 8, "temperature": 0.0, "stop_token_ids": [2],
            "skip_special_tokens": False, "return_token_ids": True}
    with LocalServer(vllm) as server:
        reply = endpoint(server, tmp_path).run([("completions", body)])[0]
        cached = endpoint(server, tmp_path).run([("completions", body)])[0]
    assert seen == [("/v1/completions", {"model": "test-model", **body})], "the body changed on the way"
    assert reply.text == " 42" and reply.token_ids == [29871, 29946, 29906, 2] and reply.completion_tokens == 4
    assert cached.cached and cached.token_ids == reply.token_ids


def test_a_refused_request_stops_the_run_with_the_servers_message(tmp_path):
    script = Script(lambda question, attempt: (400, {"error": {"message": "prompt must be a string"}}, {}))
    with LocalServer(script) as server:
        with pytest.raises(UserError, match=f"{server.base_url}/chat/completions: the server refused a chat request"
                                            r".*prompt must be a string"):
            endpoint(server, tmp_path).run([chat(i) for i in range(200)])
        assert sum(script.seen.values()) < 20, "the run went on after the server refused a request"
        script.answer = lambda question, attempt: (401, {"error": {"message": "invalid api key"}}, {})
        with pytest.raises(UserError, match=r"key was refused \(HTTP 401\); set \$OPENAI_API_KEY"):
            endpoint(server, tmp_path).run([chat(0)])


@pytest.mark.parametrize("first", [0, 3])  # the refused item first (before any answer) or after some
def test_an_item_the_server_refuses_fails_alone(tmp_path, first):
    too_long = {"error": {"message": "This model's maximum context length is 4096 tokens. However, you requested 5000"}}
    flagged = {"error": {"message": "Invalid prompt: your prompt was flagged as potentially violating our policy."}}
    refuse = {f"q{first}": too_long, "q7": flagged}
    script = Script(lambda q, attempt: (400, refuse[q], FAST) if q in refuse else echo(q, attempt))
    with LocalServer(script) as server:
        ep = endpoint(server, tmp_path)
        replies = ep.run([chat(i) for i in range(10)])
    assert isinstance(replies[first], Failure) and "HTTP 400: " in replies[first].error
    assert "This model's maximum context length" in replies[first].error
    assert isinstance(replies[7], Failure) and "flagged" in replies[7].error and ep.stats["failures"] == 2
    assert [r.text for k, r in enumerate(replies) if k not in (first, 7)] == \
        [f"answer to q{i}" for i in range(10) if i not in (first, 7)]


KILLED_RUN = """
import sys
sys.path.insert(0, {root!r})
from client import Endpoint
requests = [("chat", {{"messages": [{{"role": "user", "content": f"q{{i}}"}}], "max_tokens": 16}}) for i in range(200)]
Endpoint({url!r}, "test-model", {cache!r}, concurrency=8, progress=False).run(requests)
"""


def test_kill_9_loses_no_stored_reply_and_a_rerun_sends_only_the_rest(tmp_path):
    script = Script(echo, delay_s=0.01)
    with LocalServer(script) as server:
        code = KILLED_RUN.format(root=str(ROOT), url=server.base_url, cache=str(tmp_path / "cache.sqlite"))
        child = subprocess.Popen([sys.executable, "-c", code])
        deadline = time.time() + 30
        while sum(script.seen.values()) < 80 and child.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        child.send_signal(signal.SIGKILL)
        child.wait()
        with sqlite3.connect(tmp_path / "cache.sqlite") as db:
            stored = {asked(json.loads(row[0])) for row in db.execute("SELECT request FROM replies")}
        assert 50 < len(stored) < 200, f"kill at the wrong moment: {len(stored)} stored"
        before = Counter(script.seen)
        replies = endpoint(server, tmp_path, concurrency=8).run([chat(i) for i in range(200)])
    rerun = script.seen - before
    assert all(isinstance(r, Reply) for r in replies)
    assert not stored & set(rerun), "the rerun paid again for a reply stored before the kill"
    assert max(script.seen.values()) <= 2 and sum(n == 2 for n in script.seen.values()) <= 8, "more than in flight"
