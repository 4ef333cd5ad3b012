"""Orca 2's claim in miniature, on a CPU: strategies taught with the instruction erased beat imitating direct answers.

The paper (ORCA2.md sections 1-3) says a small student taught *how* to solve problems (several strategies, each on
the task type it suits), with the teacher's strategy instruction erased from its prompt, beats a student that copies
the teacher's direct answers, zero-shot and on held-out problems. This script tests that with the project's own
pipeline: a programmatic teacher writes the data, train.py fine-tunes a tiny pretrained base (llama2.c's 260K-parameter
TinyStories model, which shares the 512-piece tokenizer: our stand-in for LLaMA-2) into each student, and the students
are scored zero-shot by exact match on held-out problems, including harder ones than any seen in training.

Task types and the teacher's strategy for each (each strategy has its own detailed system instruction):
  arith    'Ann has 5 coins. Ann gets 3 more. Ann gives away 2. ...'   step by step: a running total, one line a change
  compare  'Box 3 is heavier than box 7. ... Which is heavier, box 3 or box 5?'   recall the facts one by one, answer
  easy     'What is 5 + 3?'                                              direct answer
Held-out splits: unseen problems of the training sizes (-test) and longer ones (-hard: 4-5 changes instead of 2-3,
6-7 boxes instead of 4-5).

Three arms, trained on the same problems (only the system message and the response differ):
  direct   the teacher asked to answer directly; its one-line answers, system message erased (Source erase=true)
  kept     the teacher's step-by-step explanations with its detailed, strategy-specific instruction kept
  erased   the same explanations, instruction replaced by orca2.ERASED_SYSTEM_MESSAGE (Orca 2's prompt erasing)
Every student is tested with the generic message only (no strategy instruction, no examples: zero-shot).

Run it:
    python repro.py                          # 3 arms x 2 seeds -> out/repro/results.md, results.json, predictions.jsonl
    python repro.py --seeds=0,1,2 --out_dir=out/repro3
    python repro.py --quick=true             # a smoke run of the whole pipeline (~1 min; numbers mean nothing)
    python repro.py --threads=1              # when other jobs share the CPU (2 threads on 2 busy cores thrash)
"""

import dataclasses
import json
import math
import random
import shutil
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import orca2
import train
from data import Tokenizer
from evaluate import extract_number
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent
TOK512 = ROOT.parent / "shared" / "data" / "tiny-llama" / "tok512.model"
STORIES260K = ROOT.parent / "shared" / "data" / "tiny-llama" / "stories260K.bin"

# ---- config ----


@dataclass
class ReproConfig:
    seeds: str = "0,1"             # training seeds, comma-separated; each arm runs each seed. With the pretrained
                                   # base a seed sets the data order only; with base=scratch also the init
    arms: str = "direct,kept,erased"  # which students to train (see the module docstring)
    quick: bool = False            # smoke run: few problems, one short epoch; checks the pipeline, not the claim
    out_dir: str = "out/repro"     # data, students, results.md and results.json
    tokenizer: str = str(TOK512)   # 512-piece SentencePiece (digits are single tokens) + the 3 Orca 2 tokens
    data_seed: int = 1234          # the problems (training and test) are fixed by this seed, the same for all arms
    n_train: int = 3000            # training problems (each arm sees the same ones)
    n_test: int = 100              # held-out problems per test split
    # student: the pretrained base (like LLaMA-2 for Orca 2), or a random tiny LLaMA-2 of the size below
    base: str = "stories260K"      # "stories260K" (llama2.c's TinyStories model, tok512) or "scratch"
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 352          # SwiGLU inner width
    # training (passed to train.py)
    seq_len: int = 1024            # packed row length; an example is ~190-330 tokens, most of it the system message
    global_batch: int = 2          # packed rows per optimizer step (~7 problems)
    micro_batch: int = 2
    epochs: int = 2
    lr: float = 5e-3               # peak; warmup 3% then cosine to 10% (train.py's schedule)
    # evaluation
    eval_system: str = "cautious"  # key of orca2.SYSTEM_MESSAGES used at test time ("cautious" = the erased message)
    oracle: bool = True            # also test the kept arm WITH the teacher's instruction (not zero-shot; a reference)
    max_new_tokens: int = 160      # enough for the longest explanation of the hardest split (135 tokens)
    eval_batch: int = 100          # prompts decoded together (greedy)
    threads: int = 0               # torch CPU threads; 0 = torch's default (one per core). Use 1 when other jobs
                                   # share the cores: 2 threads on 2 busy cores ran 20x slower, 1 thread 1.8x


def parse_config(argv: list[str]) -> ReproConfig:
    """--key=value overrides of ReproConfig, type-checked; an unknown key is an error."""
    types = {f.name: type(f.default) for f in dataclasses.fields(ReproConfig)}
    values = {}
    for arg in argv:
        key, sep, raw = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep:
            raise SystemExit(f"arguments are --key=value; got {arg!r}")
        if key not in types:
            raise SystemExit(f"unknown option --{key}; known: {', '.join(types)}")
        if types[key] is bool:
            if raw.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--{key}={raw}: expected true or false")
            values[key] = raw.lower() in ("true", "1")
        else:
            try:
                values[key] = types[key](raw)
            except ValueError:
                raise SystemExit(f"--{key}={raw}: expected a {types[key].__name__}") from None
    cfg = ReproConfig(**values)
    if cfg.quick:  # keep any size the user gave explicitly
        cfg = dataclasses.replace(cfg, **{k: v for k, v in dict(n_train=240, n_test=20, epochs=1).items()
                                          if k not in values})
    if cfg.base not in ("stories260K", "scratch"):
        raise SystemExit(f"--base must be stories260K or scratch; got {cfg.base!r}")
    if cfg.eval_system not in orca2.SYSTEM_MESSAGES:
        raise SystemExit(f"--eval_system must be one of {sorted(orca2.SYSTEM_MESSAGES)}")
    if set(cfg.arms.split(",")) - set(ARMS):
        raise SystemExit(f"--arms must be a subset of {','.join(ARMS)}; got {cfg.arms}")
    return cfg


# ---- the task family: three task types, each with a difficulty knob ----

NAMES = ["Ann", "Bob", "Cid", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon", "Kim", "Lea", "Max", "Ned", "Oli",
         "Pam", "Ray", "Sue", "Tom", "Uma"]
THINGS = ["coins", "apples", "cards", "stamps", "books", "shells"]
ADJECTIVES = ["heavier", "bigger", "older", "taller"]


@dataclass
class Problem:
    kind: str        # "arith" | "compare" | "easy"
    question: str    # the user message
    answer: str      # the gold final answer (a number: the total, or the heavier box)
    steps: list      # the solution's intermediate lines, used by the teacher's explanation
    size: int        # difficulty: changes (arith) or boxes (compare)


def make_arith(rng: random.Random, n_changes: int) -> Problem:
    """A running total: 'Ann has 5 coins. Ann gets 3 more. Ann gives away 2. ...' (changes 1-3, total kept in 0-9)."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    total = rng.randint(2, 9)
    text, steps = [f"{name} has {total} {thing}."], []
    for _ in range(n_changes):
        k = rng.randint(1, 3)
        add = total - k < 0 or (total + k <= 9 and rng.random() < 0.5)  # the total stays in 0..9
        new = total + k if add else total - k
        text.append(f"{name} gets {k} more." if add else f"{name} gives away {k}.")
        steps.append(f"{total} {'+' if add else '-'} {k} = {new}")
        total = new
    text.append(f"How many {thing} does {name} have now?")
    return Problem("arith", " ".join(text), str(total), steps, n_changes)


def make_compare(rng: random.Random, n_boxes: int) -> Problem:
    """A hidden order of numbered boxes, given as shuffled 'Box 3 is heavier than box 7.' facts; which of two is
    heavier? The solution recalls the facts down from the first box asked until it meets the second (the first is
    heavier) or a box that no fact goes below, 'Box 5 is last.' (the second is heavier)."""
    adj = rng.choice(ADJECTIVES)
    order = rng.sample(range(1, 10), n_boxes)  # order[0] is the heaviest
    facts = [f"Box {a} is {adj} than box {b}." for a, b in zip(order, order[1:])]
    i, j = rng.sample(range(n_boxes), 2)
    while abs(i - j) < 2:  # at least two facts must be chained: no single fact answers the question
        i, j = rng.sample(range(n_boxes), 2)
    recalled = facts[i:j] if i < j else facts[i:] + [f"Box {order[-1]} is last."]
    rng.shuffle(facts)
    question = " ".join(facts) + f" Which is {adj}, box {order[i]} or box {order[j]}?"
    return Problem("compare", question, str(order[min(i, j)]), recalled, n_boxes)


def make_easy(rng: random.Random) -> Problem:
    """One small change, 'What is 5 + 3?': a task the teacher answers directly."""
    a, k = rng.randint(0, 9), rng.randint(1, 3)
    add = a - k < 0 or (a + k <= 9 and rng.random() < 0.5)
    return Problem("easy", f"What is {a} {'+' if add else '-'} {k}?", str(a + k if add else a - k), [], 1)


# Difficulty of each split; the hard split is strictly beyond anything in training.
TRAIN_SIZES = {"arith": (2, 3), "compare": (4, 5)}
HARD_SIZES = {"arith": (4, 5), "compare": (6, 7)}  # changes (arith), boxes (compare)
TRAIN_MIX = {"arith": 0.49, "compare": 0.495, "easy": 0.015}  # only 48 distinct easy sums exist


def make_problem(rng: random.Random, kind: str, sizes: dict) -> Problem:
    if kind == "easy":
        return make_easy(rng)
    size = rng.choice(sizes[kind])
    return make_arith(rng, size) if kind == "arith" else make_compare(rng, size)


def make_splits(cfg: ReproConfig) -> dict[str, list[Problem]]:
    """train, and held-out test splits per task type (sizes as in training: '-test'; larger: '-hard').

    Test problems are drawn first. Training problems are all distinct and none equals a held-out one (a draw that
    does is redrawn), so no held-out problem is ever trained on. The easy sums are too few to hold out: the
    'easy-seen' split checks that the student still answers them directly and correctly."""
    rng = random.Random(cfg.data_seed)
    splits = {f"{kind}-{name}": [make_problem(rng, kind, sizes) for _ in range(cfg.n_test)]
              for kind in ("arith", "compare") for name, sizes in (("test", TRAIN_SIZES), ("hard", HARD_SIZES))}
    seen = {p.question for ps in splits.values() for p in ps}
    train_set = []
    kinds = [kind for kind, share in TRAIN_MIX.items() for _ in range(round(share * cfg.n_train))]
    rng.shuffle(kinds)
    for kind in kinds:
        p, tries = make_problem(rng, kind, TRAIN_SIZES), 0
        while p.question in seen:
            p, tries = make_problem(rng, kind, TRAIN_SIZES), tries + 1
            if tries > 10_000:
                raise ValueError(f"ran out of distinct {kind} problems; lower n_train or that kind's share")
        seen.add(p.question)
        train_set.append(p)
    easy = [p for p in train_set if p.kind == "easy"]
    splits["easy-seen"] = [easy[k % len(easy)] for k in range(min(cfg.n_test, len(easy)))]
    return {"train": train_set, **splits}


# ---- the teacher: a strategy per task type, each with its own detailed instruction ----

INSTRUCTIONS = {  # what the teacher is told; the kept arm trains on these, the erased arm never sees them
    "arith": "You are a careful math tutor. Solve the word problem step by step with a running total. Write "
             "'Running total:' then one line per change, in the order the changes happen, as 'old + change = new' "
             "or 'old - change = new'. End with 'Answer: ' and the final number.",
    "compare": "Solve ordering puzzles by recalling facts. Write 'Recall the facts:', then one fact per line: the "
               "one about the first box asked, then the one about the box it names, and so on, until the second box "
               "or a box with none below it ('Box N is last.'). Reaching the second box makes the first the answer, "
               "else the second. End with 'Answer: ' and its number.",
    "easy": "This question is easy: answer it directly, without explanation. Write 'Answer: ' and the result.",
}
DIRECT_INSTRUCTION = "Give only the final answer, as 'Answer: ' followed by it, with no explanation."
# arm -> (which teacher response, erase the system message at training). The direct arm is erased too, so it trains
# on the same generic message it is tested with: direct and erased differ only in the teacher's response.
ARMS = {
    "direct": ("direct", True),
    "kept": ("explain", False),
    "erased": ("explain", True),
}


def teacher(p: Problem, mode: str) -> tuple[str, str]:
    """(system instruction, response) of the programmatic teacher: 'direct' answers or strategy 'explain'."""
    if mode == "direct":
        return DIRECT_INSTRUCTION, f"Answer: {p.answer}"
    if p.kind == "arith":
        return INSTRUCTIONS["arith"], "Running total:\n" + "\n".join(p.steps) + f"\nAnswer: {p.answer}"
    if p.kind == "compare":
        return INSTRUCTIONS["compare"], "Recall the facts:\n" + "\n".join(p.steps) + f"\nAnswer: {p.answer}"
    return INSTRUCTIONS["easy"], f"Answer: {p.answer}"


def extract(output: str) -> str | None:
    """evaluate.py's GSM8K rule (every answer here is a number): the first number after the last answer cue, else
    the last number in the output; None when there is no number (format not OK)."""
    return extract_number(output)


def write_jsonl(problems: list[Problem], mode: str, path: Path) -> None:
    """OpenOrca layout (system_prompt, question, response), which train.py / data.py read."""
    with open(path, "w") as f:
        for p in problems:
            system, response = teacher(p, mode)
            f.write(json.dumps({"system_prompt": system, "question": p.question, "response": response}) + "\n")


# ---- the pretrained base: llama2.c's stories260K, converted to this project's LLaMA layout ----


def load_llama2c(path: Path, max_seq_len: int = 0) -> Transformer:
    """A llama2.c checkpoint (7-int header, float32 tensors in its fixed order) as a Transformer.

    llama2.c rotates interleaved pairs (x0, x1), (x2, x3), ... while this project rotates halves (x_i, x_{i+hd/2}), so
    the rows of wq and wk are permuted per head; a shared classifier (positive vocab in the header) is copied to
    lm_head. Positions restart per packed example, so a longer max_seq_len only allows longer packed rows."""
    raw = Path(path).read_bytes()
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("7i", raw[:28])
    shared, vocab = vocab > 0, abs(vocab)
    flat = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
    hd, offset = dim // n_heads, 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal offset
        t = flat[offset:offset + math.prod(shape)].view(*shape)
        offset += t.numel()
        return t

    def halves(w: torch.Tensor, heads: int) -> torch.Tensor:
        return w.view(heads, hd // 2, 2, dim).transpose(1, 2).reshape(heads * hd, dim)  # (heads*hd, dim)

    emb, attn_norm = take(vocab, dim), take(n_layers, dim)
    wq, wk, wv, wo = take(n_layers, dim, dim), take(n_layers, n_kv * hd, dim), take(n_layers, n_kv * hd, dim), \
        take(n_layers, dim, dim)
    ffn_norm = take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    final_norm = take(dim)
    take(2, seq_len, hd // 2)  # llama2.c's precomputed RoPE tables (cos, sin): model.py computes its own
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": final_norm,
          "lm_head.weight": emb if shared else take(vocab, dim)}
    if offset != flat.numel():
        raise ValueError(f"{path}: {flat.numel() - offset} floats left over; not a llama2.c version-0 checkpoint")
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": attn_norm[i], p + "post_attention_layernorm.weight": ffn_norm[i],
               p + "self_attn.q_proj.weight": halves(wq[i], n_heads),
               p + "self_attn.k_proj.weight": halves(wk[i], n_kv),
               p + "self_attn.v_proj.weight": wv[i], p + "self_attn.o_proj.weight": wo[i],
               p + "mlp.gate_proj.weight": w1[i], p + "mlp.down_proj.weight": w2[i], p + "mlp.up_proj.weight": w3[i]}
    model = Transformer(ModelArgs(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv, hidden_dim=hidden,
                                  vocab_size=vocab, max_seq_len=max_seq_len or seq_len))
    model.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)
    return model


# ---- training one student with train.py ----


def train_student(cfg: ReproConfig, arm: str, seed: int, data_file: Path, work: Path) -> Path:
    """The base (stories260K, or a random tiny LLaMA) fine-tuned by train.main on one arm's data; returns the
    exported HF folder. train.py's own data path does the rest: template, loss mask, prompt erasing, packing."""
    out = work / f"{arm}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)  # never resume a previous run's checkpoint
    if cfg.base == "stories260K":  # 512 rows; train.py adds the 3 Orca 2 rows (mean init), as for LLaMA-2
        base = load_llama2c(STORIES260K, max_seq_len=cfg.seq_len)
    else:
        tok = Tokenizer.from_pretrained(cfg.tokenizer)
        base = Transformer(ModelArgs(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads,
                                     hidden_dim=cfg.hidden_dim, vocab_size=tok.vocab_size, max_seq_len=cfg.seq_len))
        base.init_weights(seed=seed)
    base.save_pretrained(out / "init")
    stage = {"name": arm, "epochs": cfg.epochs, "lr": cfg.lr,
             "sources": [{"name": f"{arm}", "path": str(data_file), "erase": ARMS[arm][1]}]}
    argv = dict(model=out / "init", tokenizer=cfg.tokenizer, stages=json.dumps([stage]), seq_len=cfg.seq_len,
                global_batch=cfg.global_batch, micro_batch=cfg.micro_batch, seed=seed, out_dir=out,
                cache_dir=work / "cache", num_workers=1, export_dtype="float32", resume="false",
                prompt=EXAMPLE_PROMPT, max_new_tokens=cfg.max_new_tokens)
    train.main([f"--{k}={v}" for k, v in argv.items()])
    return out / "export" / "final"


EXAMPLE_PROMPT = "Ann has 5 coins. Ann gets 3 more. Ann gives away 2. How many coins does Ann have now?"

# ---- zero-shot evaluation: generic system message, greedy, exact match ----

OPENINGS = {"arith": "Running total:", "compare": "Recall the facts:", "easy": "Answer:"}  # each strategy's first words


@torch.inference_mode()
def evaluate_student(cfg: ReproConfig, folder: Path, splits: dict, system_of) -> dict:
    """{split: {acc, format_ok, strategy, outputs}}; system_of(problem) is the system message the student gets.

    strategy = share of outputs that open the way the Orca 2 teacher solves that task type (OPENINGS): whether the
    student picked the right strategy by itself."""
    model, tok = Transformer.from_pretrained(folder).eval(), Tokenizer.from_pretrained(folder)
    results = {}
    for name, problems in splits.items():
        outputs = []
        for b in range(0, len(problems), cfg.eval_batch):
            batch = problems[b:b + cfg.eval_batch]
            prompts = [tok.encode_prompt(system_of(p), p.question) for p in batch]
            outs = model.generate(prompts, cfg.max_new_tokens, stop_ids=tok.stop_ids, pad_id=tok.pad_id)
            outputs += [tok.decode(o, skip_special=True).removeprefix("\n") for o in outs]
        preds = [extract(text) for text in outputs]
        n = len(problems)
        results[name] = {"acc": sum(x == p.answer for x, p in zip(preds, problems)) / n,
                         "format_ok": sum(x is not None for x in preds) / n,
                         "strategy": sum(t.startswith(OPENINGS[p.kind]) for t, p in zip(outputs, problems)) / n,
                         "outputs": outputs}
    return results


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


def main(argv: list[str]) -> dict:
    cfg = parse_config(argv)
    t0 = time.time()
    seeds, arms = [int(x) for x in cfg.seeds.split(",")], cfg.arms.split(",")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    print(f"repro config: {json.dumps(dataclasses.asdict(cfg))}")
    work = Path(cfg.out_dir)
    (work / "data").mkdir(parents=True, exist_ok=True)
    splits = make_splits(cfg)
    train_set, tests = splits.pop("train"), splits
    files = {mode: work / "data" / f"train-{mode}.jsonl" for mode in ("direct", "explain")}
    for mode, path in files.items():
        write_jsonl(train_set, mode, path)
    counts = ", ".join(f"{k} {sum(p.kind == k for p in train_set)}" for k in TRAIN_MIX)
    print(f"{len(train_set)} training problems ({counts}); test splits: "
          + ", ".join(f"{k} {len(v)}" for k, v in tests.items()))
    generic = orca2.SYSTEM_MESSAGES[cfg.eval_system]
    rows, timings = [], {}
    for seed in seeds:
        for arm in arms:
            t = time.time()
            folder = train_student(cfg, arm, seed, files[ARMS[arm][0]], work)
            t_train = time.time() - t
            # Zero-shot: every student gets the same generic message, never the strategy instruction.
            res = evaluate_student(cfg, folder, tests, lambda p: generic)
            rows.append((arm, str(seed), res))
            if arm == "kept" and cfg.oracle:  # a reference only: the instruction is a hint the user would not give
                rows.append(("kept, instruction at test", str(seed),
                             evaluate_student(cfg, folder, tests, lambda p: teacher(p, "explain")[0])))
            t_eval = time.time() - t - t_train
            timings[f"{arm}-seed{seed}"] = {"train_s": round(t_train, 1), "eval_s": round(t_eval, 1)}
            print(f"[repro] {arm} seed {seed}: " + ", ".join(f"{k} {100 * v['acc']:.0f}%" for k, v in res.items())
                  + f" (train {t_train:.0f}s, eval {t_eval:.0f}s)")
    wall = time.time() - t0
    names = list(tests)
    text = (f"## Exact-match accuracy (%), zero-shot\n\n{markdown_table(rows, names)}\n"
            f"## Strategy chosen as the Orca 2 teacher would (%)\n\n{markdown_table(rows, names, 'strategy')}\n"
            f"Greedy decoding, system message {cfg.eval_system!r} for every student ('kept, instruction at test' "
            f"is the exception); {cfg.n_test} problems per held-out split; base {cfg.base}; seeds {seeds} "
            f"({'data order only: the base is pretrained' if cfg.base != 'scratch' else 'init and data order'}); "
            f"data seed {cfg.data_seed}; {cfg.n_train} training problems x {cfg.epochs} epochs; "
            f"wall time {wall / 60:.1f} min.\n")
    print("\n" + text)
    (work / "results.md").write_text(text)
    result = {"config": dataclasses.asdict(cfg), "wall_s": round(wall, 1), "timings": timings,
              "rows": [{"arm": a, "seed": s, "results": {k: {m: v for m, v in r.items() if m != "outputs"}
                                                         for k, r in res.items()}} for a, s, res in rows]}
    (work / "results.json").write_text(json.dumps(result, indent=1))
    with open(work / "predictions.jsonl", "w") as f:  # every output, for reading what the students do
        for a, s, res in rows:
            for split, r in res.items():
                for p, out in zip(tests[split], r["outputs"]):
                    f.write(json.dumps({"arm": a, "seed": s, "split": split, "question": p.question,
                                        "gold": p.answer, "output": out, "extracted": extract(out)}) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
