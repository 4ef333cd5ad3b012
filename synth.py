"""Orca 2 training data from any teacher: pick a strategy per task group, then have the teacher answer every item.

    # an open teacher served by vLLM (vllm serve meta-llama/Llama-3.1-70B-Instruct --port 8000)
    python synth.py --tasks=../shared/data/seed-tasks/gsm8k-train.jsonl,flan.parquet \\
        --base_url=http://localhost:8000/v1 --teacher=meta-llama/Llama-3.1-70B-Instruct --out=runs/synth
    # OpenAI, choosing by a stage-2 student served by vLLM on another port; first the bill, nothing sent
    python synth.py --tasks=tasks.jsonl --base_url=https://api.openai.com/v1 --teacher=gpt-4 --out=runs/gpt4 \\
        --student=stage2 --student_base_url=http://localhost:8001/v1 --dry_run=true
    # the miniature (tasks.py): ~300 problems, and its programmatic teacher on port 8100
    python -c "import json, random, tasks; [print(json.dumps(vars(p) | {'task': p.kind})) for p in \\
        tasks.make_problems(random.Random(0), 300, set())]" > mini.jsonl
    python -c "import servers; servers.teacher_server(8100).serve_forever()" &
    python synth.py --tasks=mini.jsonl --base_url=http://127.0.0.1:8100/v1 --teacher=mini --out=runs/mini \\
        --strategies=direct,step-by-step,recall-then-generate --select_n=10

Task files (JSONL or parquet, streamed) are FLAN ({inputs, targets, task_name?}) or question/answer ({question,
answer, task?}; the gold is what follows GSM8K's "####", else the whole answer). Items are grouped (--group_by) and
each group gets one strategy ("cautious reasoning", ORCA2.md 2.2): select_n of its items with a gold are answered
under every candidate instruction and checked; the best accuracy wins (the student's when --student is given, the
teacher's breaking its ties; then the candidate order). Every item of the group is then answered by the teacher
under the winner; the selection answers under the winner are the same requests, so the cache returns them free.

Out folder: data.jsonl (OpenOrca layout: system_prompt = the instruction the teacher saw, question, response; plus
id, task, strategy, teacher, correct), which orca2.Source(name, path, erase=True) trains on with prompt erasing;
strategies.json, selection.jsonl (the other selection answers), rejected.jsonl (wrong, truncated, empty, refused),
failures.jsonl, report.md and cache.sqlite. Every answer is cached as it arrives: a rerun (after a failure, a kill,
--max_requests) sends only what is missing. The exit code is 1 when a request still failed after its retries.
"""

import json
import os
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cli
from answers import answer_rule, check_answer
from client import Cache, Endpoint, Failure, Reply, request_key
from cli import UserError
from formats import detect_file_format, file_parts, read_part, read_record
from orca2 import STRATEGIES

TASK_KEYS = {"flan": ("inputs", "targets"), "qa": ("question", "answer")}  # task layout -> (input, gold) fields
# A text gold longer than this is a summary or an essay: no "Answer:" line can equal it, so it is not checked.
TEXT_GOLD_WORDS = 10
BY = ("teacher", "student")  # who answers: endpoints[0] and endpoints[1]
REFUSAL = re.compile(r"\s*(?:I[’']m sorry|I am sorry|I apologi[sz]e|I cannot|I can[’']t|I can not|I[’']m unable|"
                     r"I am unable|As an AI)", re.I)


@dataclass
class SynthConfig:
    tasks: str = ""  # task files, comma-separated: JSONL or parquet, FLAN or question/answer layout
    base_url: str = ""  # the teacher's OpenAI-compatible server: http://localhost:8000/v1 (vLLM), OpenAI's, ...
    teacher: str = ""  # the teacher's model name on that server (part of every cache key; the data's teacher column)
    out: str = ""  # output folder: data.jsonl, strategies.json, report.md, ... and cache.sqlite
    strategies: str = ""  # comma-separated names of orca2.STRATEGIES and/or .json files {name: instruction}: the
                          # files add to the library (replacing a same-named entry), the names restrict the
                          # candidates to themselves in that order; no names: every library strategy (files'
                          # last). The order breaks ties. "" = the library
    select_n: int = 20  # items with a gold per group answered under every candidate to choose its strategy
    group_by: str = ""  # the field that groups items; "" = task_name or task where a row has it, else the file stem
    student: str = ""  # a student model that scores the strategies (the paper: by the student's accuracy); "" = none
    student_base_url: str = ""  # the student's server; "" = --base_url
    student_api_key_env: str = ""  # the student's key variable; "" = --api_key_env on the teacher's server, else none
    concurrency: int = 16  # requests in flight at once, per server
    max_tokens: int = 1024  # the longest answer; a longer one is truncated (finish_reason "length") and rejected
    temperature: float = 0.0  # sampling temperature of teacher and student
    filter_wrong: bool = True  # drop answers whose final answer contradicts the gold
    limit: int = 0  # use the first N items of the task files in order; 0 = all
    max_requests: int = 0  # stop cleanly after N new requests (teacher + student); a rerun goes on; 0 = no limit
    timeout_s: float = 120.0  # seconds for one try of one request
    max_retries: int = 6  # retries of 429/5xx/timeouts per request before it counts as failed
    dry_run: bool = False  # print the requests (and cached ones) and a prompt-token estimate; send nothing
    seed: int = 0  # seeds the choice of each group's selection items
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the teacher's key (never written)
    progress: bool = True  # tqdm bars while requests run


@dataclass
class Item:
    id: str  # file stem + ":" + line (JSONL) or row (parquet) number, from 1: "gsm8k-train:17"
    group: str  # the task group; one strategy per group
    question: str  # the user message
    gold: str | None  # the checkable gold answer; None: none given, or a long text no answer line can match


# ---- reading strategies and task files ----


def read_strategy_file(name: str) -> dict[str, str]:
    try:
        own = json.loads(Path(name).read_text())
    except OSError as e:
        raise UserError(f"--strategies {name}: cannot read it ({e.strerror})") from None
    except ValueError as e:
        raise UserError(f"--strategies {name}: not valid JSON ({e})") from None
    good = isinstance(own, dict) and own and all(isinstance(v, str) and v.strip() for v in own.values())
    if not good:
        raise UserError(f"--strategies {name}: expected a JSON object of strategy name: non-empty instruction")
    return own


def read_candidates(spec: str) -> dict[str, str]:
    """The candidate strategies, name -> instruction, in tie-break order."""
    entries = [e.strip() for e in spec.split(",") if e.strip()]
    library, files = dict(STRATEGIES), {}
    for e in entries:
        if e.endswith(".json"):
            files[e] = read_strategy_file(e)
            library.update(files[e])
    names = [e for e in entries if e not in files] or list(library)
    for name in names:
        if name not in library:
            raise UserError(f"--strategies: unknown strategy {name!r}; known: {', '.join(library)} (or give a "
                            ".json file of name: instruction)")
    return {name: library[name] for name in names}


def records(path: Path):
    """(where, number, record) for every non-blank record of a task file, streamed in file order."""
    number = 0
    for part in file_parts(path):
        for batch in read_part(path, part):
            for raw in batch:
                number += 1
                where = f"{path} row {number}" if path.suffix == ".parquet" else f"{path}:{number}"
                try:
                    record = read_record(raw)
                except ValueError as e:
                    raise UserError(f"{where}: {e}") from None
                if record is not None:
                    yield where, number, record


def gold_of(answer: object, fmt: str, where: str) -> str | None:
    if answer is None:
        return None
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise UserError(f"{where}: {TASK_KEYS[fmt][1]} must be a string or a number, got {type(answer).__name__}")
    text = str(answer)
    if fmt == "qa" and "####" in text:  # GSM8K: the reasoning, then "#### 72"
        text = text.rsplit("####", 1)[1]
    text = text.strip()
    if not text or (answer_rule(text) == "text" and len(text.split()) > TEXT_GOLD_WORDS):
        return None
    return text


def read_tasks(files: list[str], group_by: str, limit: int) -> list[Item]:
    """The items of the task files in file order, at most limit (> 0) of them."""
    items, stems = [], set()
    for name in files:
        path = Path(name)
        fmt, _ = detect_file_format(path)  # an unknown layout: an error naming the file and the keys found
        if path.stem in stems:
            raise UserError(f"{path}: another task file is also named {path.stem!r}; item ids need distinct names")
        stems.add(path.stem)
        for where, number, record in records(path):
            if fmt not in TASK_KEYS:  # formats.read_record gives dicts only
                raise UserError(f"{where}: not a task record, found keys {list(record)}; a task file has inputs and "
                                "targets (FLAN) or question and answer")
            question = record.get(TASK_KEYS[fmt][0])
            if not isinstance(question, str) or not question.strip():
                raise UserError(f"{where}: {TASK_KEYS[fmt][0]} must be a non-empty string")
            if group_by and group_by not in record:
                raise UserError(f"{where}: no field {group_by!r} to group by (--group_by); found keys {list(record)}")
            group = record[group_by] if group_by else record.get("task_name") or record.get("task") or path.stem
            items.append(Item(f"{path.stem}:{number}", str(group), question,
                              gold_of(record.get(TASK_KEYS[fmt][1]), fmt, where)))
            if len(items) == limit:
                return items
    return items


def selection_sample(items: list[Item], select_n: int, seed: int, group: str) -> list[Item]:
    """select_n of the group's items with a gold, in file order; all of them when there are fewer."""
    golden = [it for it in items if it.gold is not None]
    if len(golden) <= select_n:
        return golden
    rng = random.Random(f"{seed}:{group}")  # per group: another file or group leaves this sample as it is
    picked = set(rng.sample(range(len(golden)), select_n))
    return [it for k, it in enumerate(golden) if k in picked]


# ---- requests ----


def chat(instruction: str, question: str, cfg: SynthConfig) -> tuple[str, dict]:
    """The one request for (strategy, item): selection and generation send the same bytes, so one cache key."""
    messages = [{"role": "system", "content": instruction}, {"role": "user", "content": question}]
    return "chat", {"messages": messages, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature}


def send(ep: Endpoint, requests: list, desc: str, cfg: SynthConfig, endpoints: list) -> list | None:
    """ep's replies in order, or None when --max_requests runs out first (what was answered stays cached)."""
    ep.desc = desc
    left = max(cfg.max_requests - sum(e.stats["requests"] for e in endpoints), 0) if cfg.max_requests else None
    replies = ep.run(requests, max_new=left)
    return None if any(r is None for r in replies) else replies


def judge(reply: Reply, gold: str | None) -> tuple[str | None, bool | None]:
    """(the final answer read, whether it equals the gold; None without a gold)."""
    if gold is None:
        return None, None
    return check_answer(reply.text, gold, answer_rule(gold))


def rejection(reply: Reply) -> str | None:
    """Why an answer is never training data, or None."""
    if reply.finish_reason == "length":
        return "truncated"
    if not reply.text.strip():
        return "empty"
    return "refused" if REFUSAL.match(reply.text) else None


def choose(names: list[str], scores: dict, tie_break: dict | None) -> str:
    """The best score; then the tie-break scores (the teacher's, when a student scored); then the candidate order."""
    return max(names, key=lambda s: (scores[s], tie_break[s] if tie_break else 0, -names.index(s)))


# ---- the command ----


def dry_run(cfg: SynthConfig, candidates: dict, items: list, sample_ids: set, selection: list) -> dict:
    cache_path = Path(cfg.out) / "cache.sqlite"
    cache = Cache(cache_path) if cache_path.is_file() else None  # a dry run creates nothing
    models = {"teacher": cfg.teacher, "student": cfg.student} if cfg.student else {"teacher": cfg.teacher}
    counts = {}
    for by, model in models.items():
        keys = {request_key(kind, model, body) for kind, body in selection}
        counts[by] = (len(keys), len(cache.get_many(list(keys))) if cache else 0)
    chars = sum(len(m["content"]) for _, body in selection for m in body["messages"]) * len(models)
    mean_instruction = sum(map(len, candidates.values())) / len(candidates)
    generate = [it for it in items if it.id not in sample_ids]
    gen_chars = sum(len(it.question) + mean_instruction for it in generate)
    said = "; ".join(f"{by} {models[by]}: {n} requests ({hit} cached)" for by, (n, hit) in counts.items())
    print(f"dry run, nothing sent: {len(items)} items, {len(candidates)} candidate strategies")
    print(f"selection: {said}; about {chars / 4:.0f} prompt tokens (characters / 4)")
    print(f"generation: {len(items)} teacher requests, {len(generate)} beyond the selection answers it reuses; "
          f"about {gen_chars / 4:.0f} prompt tokens (characters / 4, mean instruction length: not chosen yet)")
    return dict(dry_run=True, selection=counts, generation=len(generate))


def score(cfg: SynthConfig, names: list, groups: dict, samples: dict, asked: list,
          answers: list) -> tuple[dict, dict, list, dict]:
    """Check the selection answers and choose each group's winner: (winners, strategies.json, selection.jsonl
    rows, failures)."""
    judged = {by: {} for by in BY}  # by -> (item id, strategy) -> correct
    rows, failures = [], {}
    for by, replies in zip(BY, answers):
        for (it, s), reply in zip(asked, replies):
            if isinstance(reply, Failure):
                failures[it.id, s, by] = dict(id=it.id, strategy=s, by=by, error=f"{it.id}: {reply.error}")
                judged[by][it.id, s] = False  # scored as wrong for now; the exit code asks for a rerun
                continue
            extracted, judged[by][it.id, s] = judge(reply, it.gold)
            rows.append(dict(id=it.id, task=it.group, strategy=s, by=by, response=reply.text, extracted=extracted,
                             correct=judged[by][it.id, s]))
    winners, chosen_json = {}, {}
    for g, sample in samples.items():
        acc = {by: {s: sum(judged[by][it.id, s] for it in sample) / max(len(sample), 1) for s in names}
               for by in BY[:len(answers)]}
        main_scores = acc["student"] if cfg.student else acc["teacher"]
        winners[g] = choose(names, main_scores, acc["teacher"] if cfg.student else None)
        rules = Counter(answer_rule(it.gold) for it in groups[g] if it.gold is not None)
        chosen_json[g] = dict(strategy=winners[g], scores=main_scores,
                              scored_by="none" if not sample else "student" if cfg.student else "teacher",
                              n=len(sample), rule=rules.most_common(1)[0][0] if rules else None)
        if cfg.student:
            chosen_json[g]["teacher_scores"] = acc["teacher"]
    # the teacher's answers under the winner become data.jsonl's rows; the others (and all the student's) stay here
    rows = [r for r in rows if r["by"] == "student" or r["strategy"] != winners[r["task"]]]
    return winners, chosen_json, rows, failures


def sort_answers(cfg: SynthConfig, items: list, groups: dict, winners: dict, candidates: dict, replies: list,
                 failures: dict) -> tuple[list, list, dict]:
    """The generated answers as (data.jsonl rows, rejected.jsonl rows, counts per group); failures are added to."""
    rows, rejected = [], []
    counts = {g: Counter(items=len(its), no_gold=sum(it.gold is None for it in its)) for g, its in groups.items()}
    for it, reply in zip(items, replies):
        s, count = winners[it.group], counts[it.group]
        if isinstance(reply, Failure):
            failures[it.id, s, "teacher"] = dict(id=it.id, strategy=s, by="teacher", error=f"{it.id}: {reply.error}")
            count["failed"] += 1
            continue
        why = rejection(reply)
        extracted, correct = (None, None) if why else judge(reply, it.gold)
        if why:
            count["truncated" if why == "truncated" else "empty/refused"] += 1
        elif correct is False:
            count["wrong"] += 1
            why = "wrong" if cfg.filter_wrong else None  # else written, with correct: false
        if why:
            rejected.append(dict(id=it.id, task=it.group, strategy=s, reason=why, response=reply.text,
                                 extracted=extracted, gold=it.gold))
            continue
        count["written"] += 1
        rows.append(dict(system_prompt=candidates[s], question=it.question, response=reply.text, id=it.id,
                         task=it.group, strategy=s, teacher=cfg.teacher, correct=correct))
    return rows, rejected, counts


def stopped(cfg: SynthConfig, endpoints: list) -> dict:
    sent = sum(ep.stats["requests"] for ep in endpoints)
    print(f"[synth] stopped after {sent} new requests (--max_requests={cfg.max_requests}); data.jsonl was not "
          f"written. Every answer so far is cached in {Path(cfg.out) / 'cache.sqlite'}: rerun the command to go on.")
    return dict(stopped=True, requests=sent, failed=0)


def main(cfg: SynthConfig) -> dict:
    """Choose a strategy per group, generate, write the out folder; returns the counts (failed > 0: exit 1)."""
    for name in ("tasks", "base_url", "teacher", "out"):
        if not getattr(cfg, name):
            raise UserError(f"--{name} is required (see --help)")
    if cfg.select_n < 1 or cfg.concurrency < 1:
        raise UserError("--select_n and --concurrency must be at least 1")
    print(f"[synth] {cfg}")
    candidates = read_candidates(cfg.strategies)
    names = list(candidates)
    items = read_tasks([f.strip() for f in cfg.tasks.split(",") if f.strip()], cfg.group_by, cfg.limit)
    groups: dict[str, list[Item]] = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    samples = {g: selection_sample(its, cfg.select_n, cfg.seed, g) for g, its in groups.items()}
    asked = [(it, s) for sample in samples.values() for it in sample for s in names]  # each item x each candidate
    selection = [chat(candidates[s], it.question, cfg) for it, s in asked]
    if cfg.dry_run:
        return dry_run(cfg, candidates, items, {it.id for sample in samples.values() for it in sample}, selection)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    options = dict(concurrency=cfg.concurrency, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                   progress=cfg.progress)
    endpoints = [Endpoint(cfg.base_url, cfg.teacher, out / "cache.sqlite", api_key_env=cfg.api_key_env, **options)]
    if cfg.student:
        url = cfg.student_base_url or cfg.base_url
        # the teacher's key (OpenAI's) goes to no other server unless asked to
        key_env = cfg.student_api_key_env or (cfg.api_key_env if url == cfg.base_url else "")
        endpoints.append(Endpoint(url, cfg.student, out / "cache.sqlite", api_key_env=key_env, **options))
    for ep in endpoints:
        ep.check()  # an unreachable server or a refused key: an error in seconds, naming the URL
    answers = []
    for ep, by in zip(endpoints, BY):
        answers.append(send(ep, selection, f"{by} selection", cfg, endpoints))
        if answers[-1] is None:
            return stopped(cfg, endpoints)
    winners, chosen_json, selection_rows, failures = score(cfg, names, groups, samples, asked, answers)
    # every item under its group's winner: the selection items' requests are the same bytes, so cache hits
    generation = [chat(candidates[winners[it.group]], it.question, cfg) for it in items]
    replies = send(endpoints[0], generation, "teacher generation", cfg, endpoints)
    if replies is None:
        return stopped(cfg, endpoints)
    rows, rejected, counts = sort_answers(cfg, items, groups, winners, candidates, replies, failures)

    # only a complete run writes, and it rewrites every file: no list is left over from an earlier run
    report = make_report(cfg, names, chosen_json, counts, endpoints, len(failures))
    for name, lines in (("data.jsonl", rows), ("selection.jsonl", selection_rows), ("rejected.jsonl", rejected),
                        ("failures.jsonl", list(failures.values()))):
        write_text(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    write_text(out / "strategies.json", json.dumps(chosen_json, indent=1) + "\n")
    write_text(out / "report.md", report)
    print(report, end="")
    if failures:
        print(f"[synth] {len(failures)} requests failed after their retries (see {out / 'failures.jsonl'}); "
              "rerun the same command to retry only those")
    totals = {k: sum(ep.stats[k] for ep in endpoints) for k in endpoints[0].stats}
    return dict(stopped=False, groups=chosen_json, counts=counts, failed=len(failures), **totals)


def make_report(cfg: SynthConfig, names: list, strategies_json: dict, counts: dict, endpoints: list,
                failed: int) -> str:
    """report.md: one row per group, then the totals."""
    by = f"the student {cfg.student}, ties by the teacher" if cfg.student else "the teacher"
    lines = [f"# synth.py: teacher {cfg.teacher} at {cfg.base_url}", "",
             f"tasks: {cfg.tasks}; candidates (tie-break order): {', '.join(names)}; select_n {cfg.select_n} "
             f"(seed {cfg.seed}); scored by {by}; wrong answers {'dropped' if cfg.filter_wrong else 'kept'}", "",
             "| group | items | no gold | strategy | scores | written | wrong | truncated | empty/refused | failed |",
             "| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for g, chose in strategies_json.items():
        c = counts[g]
        scores = ", ".join(f"{s} {chose['scores'][s]:.2f}" for s in names) if chose["n"] else "no gold: first"
        lines.append(f"| {g} | {c['items']} | {c['no_gold']} | {chose['strategy']} | {scores} | {c['written']} | "
                     f"{c['wrong']} | {c['truncated']} | {c['empty/refused']} | {c['failed']} |")
    total = sum(counts.values(), Counter())
    stats = {k: sum(ep.stats[k] for ep in endpoints) for k in ("requests", "cache_hits", "prompt_tokens",
                                                                  "completion_tokens")}
    dropped = total["wrong"] if cfg.filter_wrong else 0
    lines += ["", f"Totals: {total['written']} of {total['items']} items written; {dropped} wrong dropped, "
              f"{total['truncated']} truncated, {total['empty/refused']} empty/refused, {total['failed']} failed; "
              f"{stats['requests']} requests sent, {stats['cache_hits']} cache hits, {failed} failures; "
              f"{stats['prompt_tokens']} prompt and {stats['completion_tokens']} completion tokens (as the "
              "servers counted them, this run).", ""]
    return "\n".join(lines)


def write_text(path: Path, text: str) -> None:
    """Write atomically: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


if __name__ == "__main__":
    result = cli.run(main, SynthConfig, __doc__)
    raise SystemExit(1 if result.get("failed") else 0)
