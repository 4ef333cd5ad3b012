"""Orca 2's claim in miniature, on a CPU: strategies taught with the instruction erased beat imitating direct answers.

    python repro.py                          # 3 arms x 2 seeds -> out/repro/results.md, results.json, predictions.jsonl
    python repro.py --seeds=0,1,2 --out_dir=out/repro3
    python repro.py --quick=true             # a smoke run of the whole pipeline (~1 min; numbers mean nothing)
    python repro.py --jobs=1 --threads=1     # when other jobs share the CPU (2 threads on 2 busy cores thrash)

The paper (ORCA2.md sections 1-3) says a small student taught *how* to solve problems (several strategies, each on
the task type it suits), with the teacher's strategy instruction erased from its prompt, beats a student that copies
the teacher's direct answers, zero-shot and on held-out problems. This script tests that with the project's own
pipeline end to end: servers.py's programmatic teacher is served on 127.0.0.1 through the OpenAI wire protocol,
synth.py picks a strategy per task type by the teacher's accuracy and writes the Orca 2 data, train.py fine-tunes a
tiny pretrained base (llama2.c's 260K-parameter TinyStories model, which shares the 512-piece tokenizer: our
stand-in for LLaMA-2) into each student, and the students are scored zero-shot by exact match on held-out problems,
including harder ones than any seen in training. Task types (tasks.py) and the strategy each is designed for:
  arith    'Ann has 5 coins. Ann gets 3 more. Ann gives away 2. ...'   step-by-step: a running total
  compare  'Box 3 is heavier than box 7. ... Which is heavier, box 3 or box 5?'   recall-then-generate: the facts
  easy     'What is 5 + 3?'                                              direct
The teacher is sometimes wrong under a strategy that does not fit the task, so selection has something to find.

Three arms, trained on the same problems (only the system message and the response differ):
  direct   the correct one-line answers ('Answer: 6'), system message erased: imitating a teacher's direct answers
  kept     synth.py's data: the teacher's answers under the selected strategy, its detailed instruction kept
  erased   the same data, instruction replaced by orca2.ERASED_SYSTEM_MESSAGE (Orca 2's prompt erasing)
Every student is tested with the generic message only (no strategy instruction, no examples: zero-shot).
"""

import contextlib
import dataclasses
import json
import multiprocessing
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import cli
import orca2
import servers
import synth
import tasks
import train
from answers import check_answer
from cli import UserError
from model import Transformer
from tokenizer import Tokenizer

# ---- config ----


@dataclass
class ReproConfig:
    seeds: str = "0,1"             # training seeds, comma-separated; each arm runs each seed (the base is
                                   # pretrained, so a seed sets the data order only)
    arms: str = "direct,kept,erased"  # which students to train (see the module docstring)
    quick: bool = False            # smoke run: few problems, one short epoch; checks the pipeline, not the claim
    out_dir: str = "out/repro"     # data, students, results.md and results.json
    data_seed: int = 1234          # the problems (training and test) are fixed by this seed, the same for all arms
    n_train: int = 0               # training problems (each arm sees the same ones); 0 = 3000 (240 with --quick)
    n_test: int = 0                # held-out problems per test split; 0 = 100 (20 with --quick)
    strategies: str = "direct,step-by-step,recall-then-generate"  # synth.py's candidates, in tie-break order
    select_n: int = 20             # problems per task type answered under every candidate during selection
    # training (train.py), from stories260K
    max_len: int = 1024            # packed row length; an example is ~250-400 tokens
    global_batch: int = 2          # packed rows per optimizer step (~7 problems)
    micro_batch: int = 2           # rows per forward pass (= global_batch: no accumulation)
    epochs: int = 0                # passes over the training problems; 0 = 2 (1 with --quick)
    lr: float = 5e-3               # peak; warmup 3% then cosine to 10% (train.py's schedule)
    # evaluation
    eval_system: str = "cautious"  # key of orca2.SYSTEM_MESSAGES used at test time ("cautious" = the erased message)
    oracle: bool = True            # also test the kept arm WITH the teacher's instruction (not zero-shot; a reference)
    max_new_tokens: int = 160      # enough for the longest explanation of the hardest split (135 tokens)
    eval_batch: int = 100          # prompts decoded together (greedy)
    jobs: int = 0                  # students trained at once, each in its own process; 0 = one per CPU core. A
                                   # model this small uses cores better side by side (here 2 x 1 thread gave 1.38x
                                   # the throughput of 1 x 2 threads)
    threads: int = 0               # torch threads per student; 0 = cores / jobs. Use --jobs=1 --threads=1 when other
                                   # jobs share the cores: 2 threads on 2 busy cores ran 20x slower, 1 thread 1.8x


ARMS = {"direct": True, "kept": False, "erased": True}  # arm -> erase the system message when training


def check_config(cfg: ReproConfig) -> ReproConfig:
    if set(cfg.arms.split(",")) - set(ARMS):
        raise UserError(f"--arms must be a subset of {','.join(ARMS)}; got {cfg.arms}")
    if cfg.eval_system not in orca2.SYSTEM_MESSAGES:
        raise UserError(f"--eval_system must be one of {sorted(orca2.SYSTEM_MESSAGES)}")
    if min(cfg.n_train, cfg.n_test, cfg.epochs) < 0:
        raise UserError("--n_train, --n_test and --epochs must be at least 0 (0 = the default size)")
    sizes = dict(n_train=(3000, 240), n_test=(100, 20), epochs=(2, 1))  # (full, --quick); a size given is kept
    return dataclasses.replace(cfg, **{k: size[cfg.quick] for k, size in sizes.items() if not getattr(cfg, k)})


# ---- the problems, and the data: direct answers, and synth.py's Orca 2 data from the served teacher ----

HARD_SIZES = {"arith": (4, 5), "compare": (6, 7)}  # strictly beyond anything in training (tasks.TRAIN_SIZES)


def make_splits(data_seed: int, n_train: int, n_test: int) -> dict[str, list[tasks.Problem]]:
    """train, and held-out splits per task type: '-test' (training sizes), '-hard' (larger), 'easy-seen'."""
    rng = random.Random(data_seed)  # the held-out problems (and EXAMPLE_PROMPT) come first: training never repeats one
    splits = {f"{kind}-{name}": [tasks.make_problem(rng, kind, sizes) for _ in range(n_test)]
              for kind in ("arith", "compare") for name, sizes in (("test", tasks.TRAIN_SIZES), ("hard", HARD_SIZES))}
    held_out = {p.question for ps in splits.values() for p in ps} | {tasks.EXAMPLE_PROMPT}
    train = tasks.make_problems(rng, n_train, held_out)
    # the easy sums are too few to hold out: 'easy-seen' checks they are still answered directly and correctly
    splits["easy-seen"] = [p for p in train if p.kind == "easy"][:n_test]
    return {"train": train, **splits}


def make_data(cfg: ReproConfig, problems: list[tasks.Problem], work: Path) -> tuple[dict[str, Path], dict]:
    """The training file of each arm, and synth.py's selected strategy per task type."""
    direct = work / "data" / "direct.jsonl"
    direct.parent.mkdir(parents=True, exist_ok=True)
    with open(direct, "w") as f:  # the right answer, stated at once, for every problem
        for p in problems:
            f.write(json.dumps({"system_prompt": orca2.STRATEGIES["direct"], "question": p.question,
                                "response": f"Answer: {p.answer}"}) + "\n")
    task_file = work / "data" / "tasks.jsonl"
    with open(task_file, "w") as f:  # synth.py's question/answer task layout, grouped by task type
        for p in problems:
            f.write(json.dumps({"question": p.question, "answer": p.answer, "task": p.kind}) + "\n")
    with servers.teacher_server() as server:  # the teacher behind the OpenAI wire protocol, for this run only
        synth.main(synth.SynthConfig(tasks=str(task_file), base_url=server.base_url, teacher="miniature-teacher",
                                     out=str(work / "synth"), strategies=cfg.strategies, select_n=cfg.select_n,
                                     filter_wrong=False, progress=False))
    selected = json.loads((work / "synth" / "strategies.json").read_text())
    orca = work / "synth" / "data.jsonl"
    return {"direct": direct, "kept": orca, "erased": orca}, selected


# ---- training one student with train.py ----


def train_student(cfg: ReproConfig, arm: str, seed: int, data_file: Path, work: Path) -> Path:
    """stories260K fine-tuned by train.main on one arm's data; returns the exported HF folder. train.py's own data
    path does the rest: template, loss mask, prompt erasing, packing."""
    out = work / f"{arm}-seed{seed}"
    stage = {"name": arm, "epochs": cfg.epochs, "lr": cfg.lr,
             "sources": [{"name": arm, "path": str(data_file), "erase": ARMS[arm]}]}
    train.main(train.TrainConfig(stages=[stage], max_len=cfg.max_len, global_batch=cfg.global_batch,
                                 micro_batch=cfg.micro_batch, seed=seed, out_dir=str(out), resume=False,
                                 cache_dir=str(out / "cache"), num_workers=1, export_dtype="float32",
                                 prompt=tasks.EXAMPLE_PROMPT, max_new_tokens=cfg.max_new_tokens))
    return out / "export" / "final"


# ---- zero-shot evaluation: generic system message, greedy, exact match ----


@torch.inference_mode()
def evaluate_student(cfg: ReproConfig, folder: Path, splits: dict, system_of) -> dict:
    """{split: {acc, format_ok, strategy, outputs}}; system_of(problem) is the system message the student gets.

    strategy = share of outputs that open the way the teacher does under the strategy that fits the task
    (tasks.OPENINGS): whether the student picked the right strategy by itself."""
    model, tok = Transformer.from_pretrained(folder).eval(), Tokenizer.from_pretrained(folder)
    results = {}
    for name, problems in splits.items():
        outputs = []
        for b in range(0, len(problems), cfg.eval_batch):
            batch = problems[b:b + cfg.eval_batch]
            prompts = [tok.encode_prompt(system_of(p), p.question) for p in batch]
            outs = model.generate(prompts, cfg.max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
            outputs += [tok.decode(o, skip_special=True).removeprefix("\n") for o in outs]
        checked = [check_answer(text, p.answer, "number") for text, p in zip(outputs, problems)]
        n = len(problems)
        results[name] = {"acc": sum(correct for _, correct in checked) / n,
                         "format_ok": sum(x is not None for x, _ in checked) / n,
                         "strategy": sum(t.startswith(tasks.OPENINGS[p.kind]) for t, p in zip(outputs, problems)) / n,
                         "outputs": outputs}
    return results


def student(cfg, arm, seed, data_file, work, tests, selected, threads, to_log) -> tuple:
    """Train and test one student (in a worker process when students run in parallel, its output to a log)."""
    torch.set_num_threads(threads)
    with contextlib.ExitStack() as stack:
        if to_log:
            log = stack.enter_context(open(work / f"{arm}-seed{seed}.log", "w"))
            stack.enter_context(contextlib.redirect_stdout(log))
            stack.enter_context(contextlib.redirect_stderr(log))
        t = time.time()
        folder = train_student(cfg, arm, seed, data_file, work)
        t_train = time.time() - t
        # Zero-shot: every student gets the same generic message, never the strategy instruction.
        res = evaluate_student(cfg, folder, tests, lambda p: orca2.SYSTEM_MESSAGES[cfg.eval_system])
        rows = [(arm, str(seed), res)]
        if arm == "kept" and cfg.oracle:  # a reference only: the instruction is a hint the user would not give
            instruction = lambda p: orca2.STRATEGIES[selected[p.kind]["strategy"]]  # noqa: E731
            rows.append(("kept, instruction at test", str(seed), evaluate_student(cfg, folder, tests, instruction)))
        t_eval = time.time() - t - t_train
    line = (f"[repro] {arm} seed {seed}: " + ", ".join(f"{k} {100 * v['acc']:.0f}%" for k, v in res.items())
            + f" (train {t_train:.0f}s, eval {t_eval:.0f}s)")
    if not to_log:
        print(line)
    return arm, seed, line, rows, {"train_s": round(t_train, 1), "eval_s": round(t_eval, 1)}


def student_star(args: tuple) -> tuple:
    return student(*args)


# ---- the tables ----


def markdown_table(rows: list[tuple[str, str, dict]], split_names: list[str], key: str = "acc") -> str:
    """One row per (arm, seed), then a mean row per arm; cells are results[split][key] in percent."""
    held = [s for s in split_names if not s.endswith("-seen")]
    head = "| arm | seed | " + " | ".join(split_names) + " | held-out mean |\n"
    head += "| --- | --- |" + " ---: |" * (len(split_names) + 1) + "\n"
    lines, by_arm = [], {}
    for arm, seed, res in rows:
        cells = [100 * res[s][key] for s in split_names]
        cells.append(sum(100 * res[s][key] for s in held) / len(held))
        by_arm.setdefault(arm, []).append(cells)
        lines.append(f"| {arm} | {seed} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
    for arm, vals in by_arm.items():
        means = [sum(col) / len(col) for col in zip(*vals)]
        lines.append(f"| **{arm}** | mean | " + " | ".join(f"**{m:.1f}**" for m in means) + " |")
    return head + "\n".join(lines) + "\n"


# ---- main ----


def main(cfg: ReproConfig) -> dict:
    cfg = check_config(cfg)
    t0 = time.time()
    seeds, arms = [int(x) for x in cfg.seeds.split(",")], cfg.arms.split(",")
    print(f"repro config: {json.dumps(dataclasses.asdict(cfg))}")
    work = Path(cfg.out_dir)
    splits = make_splits(cfg.data_seed, cfg.n_train, cfg.n_test)
    train_set, tests = splits.pop("train"), splits
    files, selected = make_data(cfg, train_set, work)
    counts = ", ".join(f"{k} {sum(p.kind == k for p in train_set)}" for k in tasks.TRAIN_MIX)
    print(f"{len(train_set)} training problems ({counts}); test splits: "
          + ", ".join(f"{k} {len(v)}" for k, v in tests.items()))
    picked = "; ".join(f"{task}: {s['strategy']} (" + ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["scores"].items())
                       + ")" for task, s in selected.items())
    print(f"strategies selected by synth.py (teacher accuracy per candidate): {picked}")
    # Longest arms first, so that parallel workers finish together; each student's log is {arm}-seed{seed}.log.
    order = [(arm, seed) for arm in sorted(arms, key=["kept", "erased", "direct"].index) for seed in seeds]
    cores = len(os.sched_getaffinity(0))
    jobs = min(cfg.jobs or cores, len(order))
    threads = cfg.threads or max(1, cores // jobs)
    args = [(cfg, arm, seed, files[arm], work, tests, selected, threads, jobs > 1) for arm, seed in order]
    if jobs == 1:
        done = [student(*a) for a in args]
    else:
        print(f"training {len(order)} students, {jobs} at a time with {threads} thread(s) each; logs in {work}/")
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            done = []
            for d in pool.imap_unordered(student_star, args):
                print(d[2], flush=True)
                done.append(d)
    done.sort(key=lambda d: (seeds.index(d[1]), arms.index(d[0])))
    rows = [row for d in done for row in d[3]]
    timings = {f"{d[0]}-seed{d[1]}": d[4] for d in done}
    wall = time.time() - t0
    names = list(tests)
    text = (f"## Exact-match accuracy (%), zero-shot\n\n{markdown_table(rows, names)}\n"
            f"## Strategy chosen as the Orca 2 teacher would (%)\n\n{markdown_table(rows, names, 'strategy')}\n"
            f"Strategies selected by synth.py per task type: {picked}.\n\n"
            f"Greedy decoding, system message {cfg.eval_system!r} for every student ('kept, instruction at test' "
            f"is the exception); {cfg.n_test} problems per held-out split; base stories260K; seeds {seeds} (data "
            f"order only); data seed {cfg.data_seed}; {cfg.n_train} training problems x {cfg.epochs} epochs; "
            f"wall time {wall / 60:.1f} min.\n")
    print("\n" + text)
    (work / "results.md").write_text(text)
    result = {"config": dataclasses.asdict(cfg), "wall_s": round(wall, 1), "timings": timings, "selected": selected,
              "rows": [{"arm": a, "seed": s, "results": {k: {m: v for m, v in r.items() if m != "outputs"}
                                                         for k, r in res.items()}} for a, s, res in rows]}
    (work / "results.json").write_text(json.dumps(result, indent=1))
    with open(work / "predictions.jsonl", "w") as f:  # every output, for reading what the students do
        for a, s, res in rows:
            for split, r in res.items():
                for p, out in zip(tests[split], r["outputs"]):
                    f.write(json.dumps({"arm": a, "seed": s, "split": split, "question": p.question,
                                        "gold": p.answer, "output": out,
                                        "extracted": check_answer(out, p.answer, "number")[0]}) + "\n")
    return result


if __name__ == "__main__":
    cli.run(main, ReproConfig, __doc__)
