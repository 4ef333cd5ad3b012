"""The one way this project talks to OpenAI-compatible servers, with every paid answer kept in an on-disk cache.

    python servers.py  # 2,000 requests to a scripted server on 127.0.0.1, then the same again from the cache
    teacher = Endpoint("https://api.openai.com/v1", "gpt-4", "runs/teacher.sqlite")  # then teacher.check()
    replies = teacher.run([("chat", {"messages": [...], "max_tokens": 1024, "temperature": 0.0}), ...])

A good reply is committed to sqlite, keyed by the sha256 of (kind, model, body), the moment it arrives: a kill -9
loses none and a rerun sends only what is missing; the key is never stored. The openai client retries 408, 409,
429, 5xx, timeouts and lost connections; what still fails, or a 200 that breaks the protocol, is a Failure (not
stored) that the next run retries; so is a 4xx (a prompt too long, a content filter), unless the first requests of
an endpoint that never answered are all refused: then the run stops with a UserError naming what was refused.
"""

import asyncio
import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import openai
from tqdm import tqdm

from cli import UserError

PATHS = {"chat": "/chat/completions", "completions": "/completions"}  # request kind -> where it is POSTed


def request_key(kind: str, model: str, body: dict) -> str:
    text = json.dumps([kind, model, body], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def one_line(text: object, limit: int = 200) -> str:
    return " ".join(str(text).split())[:limit]


# ---- cache ----

class Cache:
    """Successful replies in one sqlite file, each committed by itself as it arrives."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # Every statement commits; WAL + synchronous=NORMAL survives a killed process without an fsync per reply.
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS replies "
                        "(key TEXT PRIMARY KEY, kind TEXT, model TEXT, request TEXT, reply TEXT, created REAL)")

    def get_many(self, keys: list[str]) -> dict[str, dict]:
        # the keys go in as one JSON array: no limit on the number of ? parameters to chunk around
        query = "SELECT key, reply FROM replies WHERE key IN (SELECT value FROM json_each(?))"
        return {key: json.loads(reply) for key, reply in self.db.execute(query, [json.dumps(keys)])}

    def put(self, key: str, kind: str, model: str, body: dict, reply: dict) -> None:
        row = (key, kind, model, json.dumps(body), json.dumps(reply), time.time())
        self.db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?)", row)


# ---- replies ----

@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop", "length", ...
    prompt_tokens: int  # as the server counted them; 0 when it does not say
    completion_tokens: int
    token_ids: list[int] | None  # the generated token ids, where the server returns them (vLLM's return_token_ids)
    cached: bool  # True: read from the cache, nothing was sent


@dataclass
class Failure:
    error: str  # one line: what went wrong after the retries, with the start of what came back


def parse_reply(kind: str, data: object, cached: bool = False) -> Reply:
    """The Reply in a response's JSON; ValueError naming what breaks the protocol."""
    where = "choices[0].message.content" if kind == "chat" else "choices[0].text"
    try:
        choice = data["choices"][0]
        text = choice["message"]["content"] if kind == "chat" else choice["text"]
        usage = data.get("usage") or {}  # llama.cpp and vLLM send it; a server that does not counts as 0 tokens
        reply = Reply(text, str(choice.get("finish_reason") or ""), int(usage.get("prompt_tokens", 0)),
                      int(usage.get("completion_tokens", 0)), choice.get("token_ids"), cached)
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError(f"no {where}") from None
    if not isinstance(text, str):
        raise ValueError(f"{where} is not a string")
    ids = reply.token_ids
    if ids is not None and not (isinstance(ids, list) and all(type(t) is int for t in ids)):  # bool is no token
        raise ValueError("choices[0].token_ids is not a list of integers")
    return reply


# ---- endpoint ----

@dataclass
class Endpoint:
    """One model on one OpenAI-compatible server, with its cache; .stats holds totals over every run()."""
    base_url: str  # e.g. https://api.openai.com/v1 or http://localhost:8000/v1 (vLLM)
    model: str  # the model name the server knows; part of every cache key
    cache_path: str | Path  # the sqlite file of replies; a rerun with the same file sends only what is missing
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key; unset: "none" (local servers)
    concurrency: int = 16  # requests in flight at once
    timeout_s: float = 120.0  # seconds for one try of one request
    max_retries: int = 6  # the openai client's retries of 408/409/429/5xx/timeouts/lost connections, per request
    progress: bool = True  # a tqdm bar over each run
    desc: str = "requests"  # the bar's label

    def __post_init__(self):
        self.base_url = self.base_url.rstrip("/")
        self.cache = Cache(self.cache_path)
        # requests and tokens count only what was sent (paid for), never cache hits
        self.stats = dict(requests=0, cache_hits=0, failures=0, prompt_tokens=0, completion_tokens=0, seconds=0.0)

    def client_options(self) -> dict:
        api_key = os.environ.get(self.api_key_env) or "none"  # local servers take any key, but the client needs one
        return dict(base_url=self.base_url, api_key=api_key, max_retries=self.max_retries, timeout=self.timeout_s)

    def check(self) -> None:
        """Fail in seconds when the server cannot be reached or refuses the key (a missing GET /models is fine)."""
        with openai.OpenAI(**{**self.client_options(), "max_retries": 0, "timeout": 10.0}) as client:
            try:
                client.get("/models", cast_to=str)
            except openai.APIConnectionError as e:
                why = f"cannot connect ({one_line(e.__cause__ or e.message)})"
                raise UserError(f"{self.base_url}: {why}; start the server or fix --base_url") from None
            except openai.APIStatusError as e:
                if e.status_code in (401, 403):
                    raise UserError(self.key_refused(e)) from None

    def key_refused(self, e: openai.APIStatusError) -> str:
        return f"{self.base_url}: the key was refused (HTTP {e.status_code}); set ${self.api_key_env} to a valid key"

    def run(self, requests: list[tuple[str, dict]], max_new: int | None = None) -> list[Reply | Failure | None]:
        """Replies in request order: cached ones at once, the rest sent; None for those beyond max_new left unsent."""
        start = time.time()
        keys = [request_key(kind, self.model, body) for kind, body in requests]
        unique = dict(zip(keys, requests))  # identical requests are sent once and share one reply
        for kind, body in unique.values():
            assert kind in PATHS, f"request kind must be one of {list(PATHS)}, got {kind!r}"
            assert body.get("n", 1) == 1 and not body.get("stream"), "one sample per request: no n > 1, no stream"
        stored = self.cache.get_many(list(unique))
        replies = {key: parse_reply(unique[key][0], data, cached=True) for key, data in stored.items()}
        missing = [key for key in unique if key not in replies]
        hits = len(requests) - len(missing)
        self.stats["cache_hits"] += hits
        bar = tqdm(total=len(requests), initial=hits, unit="req", desc=self.desc, disable=not self.progress)
        try:
            asyncio.run(self.send_all(unique, missing[:max_new], replies, bar))
        finally:  # Ctrl-C included: every reply put so far is committed
            bar.close()
            self.stats["seconds"] += time.time() - start
        return [replies.get(key) for key in keys]

    async def send_all(self, unique: dict, todo: list[str], replies: dict, bar: tqdm) -> None:
        """Send the todo requests, at most concurrency at once, caching each good reply as it arrives."""
        pending, self.todo, self.refused = iter(todo), len(todo), 0  # pending: each worker takes the next one

        async def worker(client: openai.AsyncOpenAI) -> None:
            for key in pending:
                reply = await self.send(client, key, *unique[key])
                replies[key] = reply
                self.stats["requests"] += 1
                self.stats["failures"] += isinstance(reply, Failure)
                self.stats["prompt_tokens"] += getattr(reply, "prompt_tokens", 0)
                self.stats["completion_tokens"] += getattr(reply, "completion_tokens", 0)
                tokens = self.stats["prompt_tokens"] + self.stats["completion_tokens"]
                bar.set_postfix(tokens=str(tokens), failures=self.stats["failures"], refresh=False)
                bar.update(1)  # tqdm's req/s and ETA count only these, not the cache hits it started with

        async with openai.AsyncOpenAI(**self.client_options()) as client:  # one per loop: its connections belong to it
            tasks = [asyncio.create_task(worker(client)) for _ in range(self.concurrency)]
            try:
                await asyncio.gather(*tasks)
            finally:  # a UserError or Ctrl-C cancels the rest at once; nothing half-received is stored
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def send(self, client: openai.AsyncOpenAI, key: str, kind: str, body: dict) -> Reply | Failure:
        """One request through the client's retries; a good reply is in the cache before this returns."""
        url = self.base_url + PATHS[kind]
        try:
            # the body goes out exactly as given (vLLM's extra fields too) and comes back as text: we check the
            # protocol ourselves and read fields the SDK does not know
            text = await client.post(PATHS[kind], body={"model": self.model, **body}, cast_to=str)
        except openai.APIStatusError as e:
            if e.status_code in (401, 403):
                raise UserError(self.key_refused(e)) from None
            refused = e.status_code < 500 and e.status_code not in (408, 409, 429)
            self.refused += refused  # 3 refusals (or all, when fewer are sent) before any answer: it refuses them all
            never = not self.stats["cache_hits"] and self.stats["requests"] == self.stats["failures"]
            if refused and never and self.refused >= min(3, self.todo):
                token_ids = " and a token-id prompt" if isinstance(body.get("prompt"), list) else ""
                sent = f"a {kind} request with fields {', '.join(sorted(body))}{token_ids}"
                raise UserError(f"{url}: the server refused {sent}: {one_line(e.message, 400)}") from None
            return Failure(f"{url}: HTTP {e.status_code}{'' if refused else ' after retries'}: {one_line(e.message)}")
        except openai.APIConnectionError as e:
            return Failure(f"{url}: {e.message} {one_line(e.__cause__ or '')} after retries")
        try:
            data = json.loads(text)
            reply = parse_reply(kind, data)
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            what = "not JSON" if isinstance(e, json.JSONDecodeError) else str(e)
            return Failure(f"{url}: malformed reply ({what}): {one_line(text)}")
        self.cache.put(key, kind, self.model, body, data)
        return reply


if __name__ == "__main__":  # how fast: servers.py's demo runs this client against a local server
    import runpy
    runpy.run_path(str(Path(__file__).with_name("servers.py")), run_name="__main__")
