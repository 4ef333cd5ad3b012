"""OpenAI-compatible servers on 127.0.0.1: the miniature's programmatic teacher, and the tests' scripted servers.

The teacher reads only the question and the system instruction: always right under the strategy that fits the task
(tasks.solution), sometimes wrong under the others, as a real model is when it guesses a multi-step answer at once,
so strategy selection has something to find.

    python servers.py                                   # client.py's speed: requests/s sent, then from its cache
    python -c "import servers; servers.teacher_server(8100).serve_forever()"   # the teacher, for synth.py by hand

repro.py serves the teacher with teacher_server() for its run, so its data is made by synth.py through the
same wire protocol as a real teacher's; bench.py and the tests script LocalServer with a respond(path, body).
"""

import hashlib
import json
import random
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import tasks
from orca2 import STRATEGIES

def chat_response(text: str, finish_reason: str = "stop", prompt_tokens: int = 0, completion_tokens: int = 0) -> dict:
    """A /chat/completions response body, for scripted servers."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
    return {"choices": [choice], "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}}


def completion_response(text: str, token_ids: list[int] | None = None, finish_reason: str = "stop") -> dict:
    """A /completions response body, with vLLM's generated token_ids when given, for scripted servers."""
    choice = {"index": 0, "text": text, "finish_reason": finish_reason, "token_ids": token_ids}
    return {"choices": [choice], "usage": {"prompt_tokens": 0, "completion_tokens": len(token_ids or [])}}



class Handler(BaseHTTPRequestHandler):
    """Answers a POST with the server's respond(path, body); a GET gets 501, which check() accepts."""
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse a connection rather than open one per request
    disable_nagle_algorithm = True  # headers and body are two writes: send the second without waiting for an ACK

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        status, reply, headers = self.server.respond(self.path, body)
        data = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": len(data), **headers}.items():
            self.send_header(name, str(value))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class LocalServer(ThreadingHTTPServer):
    """An OpenAI-compatible server on 127.0.0.1: respond(path, body) -> (status, JSON object or text, headers)."""
    daemon_threads = True
    request_queue_size = 256  # many clients connect at once; the default backlog of 5 drops some

    def __init__(self, respond, port: int = 0):
        super().__init__(("127.0.0.1", port), Handler)
        self.respond = respond  # called with the path as sent, e.g. "/v1/chat/completions", and the JSON body
        self.base_url = f"http://127.0.0.1:{self.server_address[1]}/v1"

    def handle_error(self, request, client_address):
        # a client that goes away mid-request (Ctrl-C, kill -9, a timeout) is routine; anything else is a bug to show
        if not isinstance(sys.exc_info()[1], (ConnectionError, json.JSONDecodeError)):
            super().handle_error(request, client_address)

    def start(self) -> "LocalServer":
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self, *exc) -> None:
        self.shutdown()
        self.server_close()

    __enter__ = start
    __exit__ = stop  # a with block stops it however it ends


# The teacher's accuracy when a strategy does not fit: (task, strategy) -> chance of the right answer.
MISFIT_ACCURACY = {("arith", "recall-then-generate"): 0.7, ("compare", "step-by-step"): 0.8}
GUESS_ACCURACY = {"arith": 0.5, "compare": 0.55}  # any other strategy: an answer guessed at once


def teacher(question: str, strategy: str) -> str:
    """The teacher's response under a strategy: right under the fitting one, sometimes wrong under the others."""
    p = tasks.solve(question)
    if strategy == tasks.FITS[p.kind]:
        return tasks.solution(p)
    answer = p.answer
    if p.kind != "easy":  # a guess or an ill-fitting method: sometimes wrong (deterministically, per question)
        chance = MISFIT_ACCURACY.get((p.kind, strategy), GUESS_ACCURACY[p.kind])
        right = random.Random(hashlib.sha256(f"{strategy}\n{question}".encode()).digest()).random() < chance
        if not right and p.kind == "arith":  # a plausible mistake: off by one
            answer = str(int(answer) + 1 if int(answer) < 9 else int(answer) - 1)
        elif not right:  # or the other box asked about
            answer = next(b for b in re.findall(r"box (\d)", question.split("Which")[-1]) if b != answer)
    sentences = [s.strip() for s in re.findall(r"[^.?]+[.?]", question)][:-1]  # the statements, not the question
    if strategy not in ("step-by-step", "recall-then-generate"):
        lines = []  # direct, or a strategy this teacher does not know: it answers at once
    elif p.kind == "easy":
        lines = [f"{question[8:-1]} = {answer}"]
    elif strategy == "step-by-step":
        lines = ["Step by step:", *sentences]
    else:
        lines = [tasks.OPENINGS["compare"], *sentences]
    return "\n".join(lines + [f"Answer: {answer}"])


def strategy_of(system: str) -> str:
    """The library strategy whose instruction is `system`; anything else counts as 'direct'."""
    return next((name for name, text in STRATEGIES.items() if text == system), "direct")


def teacher_server(port: int = 0) -> LocalServer:
    """The programmatic teacher behind the OpenAI chat-completions wire protocol, on 127.0.0.1."""
    def respond(path: str, body: dict):
        messages = body["messages"]
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        text = teacher(messages[-1]["content"], strategy_of(system))
        return 200, chat_response(text, prompt_tokens=len(json.dumps(messages)) // 4,
                                  completion_tokens=len(text) // 4), {}
    return LocalServer(respond, port)



if __name__ == "__main__":
    import tempfile

    from client import Endpoint
    reply = (200, chat_response("4", prompt_tokens=9, completion_tokens=1), {})
    with LocalServer(lambda path, body: reply) as server, tempfile.TemporaryDirectory() as tmp:
        teacher = Endpoint(server.base_url, "teacher", f"{tmp}/cache.sqlite", concurrency=64, desc="teacher")
        teacher.check()
        requests = [("chat", {"messages": [{"role": "user", "content": f"{i} + 0?"}]}) for i in range(2000)]
        for what in ("sent", "cached"):
            start = time.time()
            assert all(r.text == "4" for r in teacher.run(requests))
            print(f"{what}: {len(requests) / (time.time() - start):.0f} requests/s, totals {teacher.stats}")
