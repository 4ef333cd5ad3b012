"""Zero-shot evaluation of a checkpoint on the Orca 2 benchmarks (ORCA2.md 7), scored by rules, locally or served.

    python evaluate.py --model=DIR                      # everything, both system messages; --help lists every option
    python evaluate.py --model=DIR --benchmarks=gsm8k,drop --system=cautious --limit=50 --batch_size=32
    vllm serve DIR --served-model-name orca2 &          # the same prompts through a serving engine:
    python evaluate.py --model=DIR --base_url=http://127.0.0.1:8000/v1 --served_model=orca2 --concurrency=256

Greedy until </s>, <|im_end|> or <|im_start|>; a new checkpoint needs a new --out (served replies are cached there).
Not in the paper: AGIEval's score is the mean of its 8 English MC sets, BBH's of its 23 MC/binary tasks, RACE's pooled.
"""

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import cli
from answers import extract, score_answer
from benchmarks import BBH_FREE_FORM, BBH_MC, DEFAULT_DATA_DIR, load_benchmark
from cli import UserError
from model import ModelArgs, Transformer
from orca2 import BENCHMARKS, PAPER_RESULTS, SYSTEM_MESSAGES, render_prompt
from tokenizer import Tokenizer
from weights import read_checkpoint

# ---- configuration ----


@dataclass
class EvalConfig:
    model: str = ""               # checkpoint folder (config.json, weights, tokenizer.model); --base_url: no weights
    tokenizer: str = ""           # tokenizer.model file or folder holding it; "" = the model folder
    benchmarks: str = ",".join(BENCHMARKS)  # comma-separated subset of agieval,bbh,drop,crass,race,gsm8k
    system: str = "empty,cautious"  # comma-separated system messages (orca2.SYSTEM_MESSAGES keys)
    data_dir: str = str(DEFAULT_DATA_DIR)  # folder holding agieval/ bbh/ drop/ crass/ race/ gsm8k/
    limit: int = 0                # first N items of every subset; 0 = all
    batch_size: int = 16          # prompts per generate() call (local)
    max_new_tokens: int = 1024    # new tokens per answer, every benchmark (ORCA2.md 7 default)
    max_new_tokens_per: str = ""  # per-benchmark overrides of max_new_tokens, e.g. "gsm8k=512,drop=256"
    out: str = "out/eval"         # output folder: predictions.jsonl, summary.json, summary.md (and cache.sqlite)
    device: str = ""              # "" = cuda if available, else cpu (local)
    dtype: str = ""               # "" = bfloat16 on cuda, float32 on cpu (local)
    base_url: str = ""            # an OpenAI-compatible server (vLLM, SGLang) serving the same model; "" = local
    served_model: str = ""        # the model name the server knows it by
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the server's key (a local one needs none)
    concurrency: int = 64         # requests in flight at once (served)
    timeout_s: float = 600.0      # per request (served)
    progress: bool = True         # show a tqdm progress bar


def max_new_tokens_for(cfg: EvalConfig) -> dict[str, int]:
    """Benchmark -> max new tokens: max_new_tokens, with max_new_tokens_per entries on top."""
    out = {b: cfg.max_new_tokens for b in BENCHMARKS}
    for entry in filter(None, cfg.max_new_tokens_per.split(",")):
        name, _, n = entry.partition("=")
        if name not in out or not n.isdigit():
            raise UserError(f"--max_new_tokens_per entry {entry!r}: write it like gsm8k=512 (benchmarks {BENCHMARKS})")
        out[name] = int(n)
    return out


# ---- scores, strategy profile, summary ----


def avg(xs) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def score_row(label: str, recs: list[dict], key: str = "correct") -> list:
    return [label, len(recs), 100 * avg(r[key] for r in recs), 100 * avg(r["extracted"] is not None for r in recs)]


def mean_row(label: str, rows: list[list]) -> list:
    return [label, sum(r[1] for r in rows), avg(r[2] for r in rows), avg(r[3] for r in rows)]


def benchmark_summary(benchmark: str, recs: list[dict]) -> dict:
    """{score, format_ok, n, rows, profile} of one benchmark; the headline choices are in the module docstring."""
    rows = [score_row(s, [r for r in recs if r["subset"] == s]) for s in dict.fromkeys(r["subset"] for r in recs)]
    if benchmark == "agieval":
        rows += [mean_row("mean over sets", rows), score_row("pooled", recs)]
    elif benchmark == "bbh":
        mc, free = [r for r in rows if r[0] in BBH_MC], [r for r in rows if r[0] in BBH_FREE_FORM]
        rows += [mean_row(f"mean over {len(mc)} MC tasks", mc),
                 mean_row(f"mean over {len(free)} free-form tasks", free)]
    elif benchmark == "drop":
        rows = [score_row("EM", recs, "em"), score_row("F1", recs, "f1")]
    elif benchmark == "race":
        rows.append(score_row("pooled", recs))
    headline = rows[-2] if benchmark in ("agieval", "bbh") else rows[-1]  # mean over sets; F1; pooled; the only one
    return {"score": headline[2], "format_ok": 100 * avg(r["extracted"] is not None for r in recs), "n": len(recs),
            "rows": rows, "profile": profile(recs)}


def summarize(records: list[dict]) -> dict:
    """system -> benchmark -> benchmark_summary(), and "avg": the paper's mean of the six headline scores."""
    out: dict = {}
    for system in dict.fromkeys(r["system"] for r in records):
        res = out[system] = {}
        for b in BENCHMARKS:
            recs = [r for r in records if r["benchmark"] == b and r["system"] == system]
            if recs:
                res[b] = benchmark_summary(b, recs)
        res["avg"] = avg(res[b]["score"] for b in BENCHMARKS) if all(b in res for b in BENCHMARKS) else None
    return out


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def md_row(*cells) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def summary_markdown(summary: dict, stats: dict) -> str:
    """Our rows beside the paper's Orca 2 rows, then format-OK rates, every subset, and the strategy profile."""
    names = {"agieval": "AGIEval", "bbh": "BBH", "drop": "DROP", "crass": "CRASS", "race": "RACE", "gsm8k": "GSM8K"}
    head = ["model", *names.values(), "avg"]
    lines = ["## Zero-shot results (%)", "", md_row(*head), md_row(*["---"] * len(head))]
    for system, res in summary.items():
        scores = [res.get(b, {}).get("score") for b in BENCHMARKS] + [res["avg"]]
        lines.append(md_row(f"ours ({system} sm)", *map(fmt, scores)))
    for name in ("Orca-2-7B", "Orca-2-7B w/ cautious sm", "Orca-2-13B", "Orca-2-13B w/ cautious sm"):
        lines.append(md_row(f"paper: {name}", *(fmt(PAPER_RESULTS[name][b]) for b in (*BENCHMARKS, "avg"))))
    lines += ["", "## Format-OK rate (% of outputs with an extractable answer)", "", md_row("system", *head[1:-1]),
              md_row(*["---"] * (len(head) - 1))]
    for system, res in summary.items():
        lines.append(md_row(system, *(fmt(res.get(b, {}).get("format_ok")) for b in BENCHMARKS)))
    head = ["benchmark", "subset", "n", *(c for s in summary for c in (s, f"{s} fmt-OK"))]
    lines += ["", "## Per subset (score %, format-OK %)", "", md_row(*head), md_row(*["---"] * len(head))]
    for b in BENCHMARKS:
        per_system = [{r[0]: r for r in res[b]["rows"]} if b in res else {} for res in summary.values()]
        for label in dict.fromkeys(k for p in per_system for k in p):
            n = next(p[label][1] for p in per_system if label in p)
            cells = [fmt(x) for p in per_system for x in (p[label][2:] if label in p else (None, None))]
            lines.append(md_row(names[b], label, n, *cells))
    head = ["benchmark", "system", "median tokens", *PROFILE]
    lines += ["", "## Strategy profile: share of outputs % (accuracy within the group %)", "", md_row(*head),
              md_row(*["---"] * len(head))]
    for b in BENCHMARKS:
        for system, res in summary.items():
            if b in res:
                p = res[b]["profile"]
                cells = [f"{p[g]['share']:.1f} ({fmt(p[g]['accuracy'])})" for g in PROFILE]
                lines.append(md_row(b, system, f"{p['median_tokens']:g}", *cells))
    lines += ["", "Generated {new_tokens:,} tokens for {examples:,} prompts in {seconds:.1f} s: {tokens_per_s:.1f} "
              "tokens/s, {examples_per_s:.2f} examples/s; {truncated} prompts cut to fit the context.".format(**stats)]
    return "\n".join(lines) + "\n"


def strategy_of(output: str, start: int) -> str:
    """How it answered: "direct" (first non-empty line), "step by step" (2+ lines above), "other", "not parsed"."""
    if start < 0:
        return "not parsed"
    before = [line for line in output[:start].split("\n")[:-1] if line.strip()]  # whole lines above the answer's
    return "direct" if not before else "step by step" if len(before) >= 2 else "other"


PROFILE = ("direct", "step by step", "other", "not parsed")


def profile(recs: list[dict]) -> dict:
    groups = {g: [r for r in recs if r["strategy"] == g] for g in PROFILE}
    return {"median_tokens": statistics.median(r["new_tokens"] for r in recs),
            **{g: {"share": 100 * len(rs) / len(recs), "accuracy": 100 * avg(r["correct"] for r in rs) if rs else None}
               for g, rs in groups.items()}}


# ---- generation: local, or through a serving engine ----


def fit_context(ids: list[int], max_new: int, ctx: int) -> tuple[list[int], bool]:
    """Cut a prompt in the middle so that prompt + max_new tokens fit the context (keeps template start and end)."""
    if max_new >= ctx:
        raise UserError(f"max new tokens ({max_new}) must be below the model's context ({ctx}); lower --max_new_tokens")
    budget = ctx - max_new
    if len(ids) <= budget:
        return ids, False
    head = budget // 4
    return ids[:head] + ids[len(ids) - (budget - head):], True


def generate_local(model, prompts: list[list[int]], max_new: list[int], stop_ids: tuple[int, ...], pad_id: int,
                   cfg: EvalConfig) -> list[list[int]]:
    """Greedy outputs for every prompt: batches of one max_new value, longest prompts first (little padding)."""
    order = sorted(range(len(prompts)), key=lambda i: (max_new[i], -len(prompts[i])))
    outputs: dict[int, list[int]] = {}
    start, new_tokens, t0 = 0, 0, time.perf_counter()
    with tqdm(total=len(prompts), unit="ex", disable=not cfg.progress, dynamic_ncols=True) as bar:
        while start < len(order):
            batch = [i for i in order[start:start + cfg.batch_size] if max_new[i] == max_new[order[start]]]
            with torch.inference_mode():  # returns host lists: the clock counts finished work, not queued kernels
                outs = model.generate([prompts[i] for i in batch], max_new[batch[0]], stop_ids=stop_ids, pad_id=pad_id)
            outputs.update(zip(batch, outs))
            new_tokens += sum(len(out) for out in outs)  # output tokens, stop ids not counted (as in the summary)
            start += len(batch)
            bar.update(len(batch))
            bar.set_postfix(tok_s=f"{new_tokens / (time.perf_counter() - t0):.1f}")
    return [outputs[i] for i in range(len(prompts))]


def generate_served(prompts: list[list[int]], max_new: list[int], stop_ids: tuple[int, ...],
                    cfg: EvalConfig) -> list[list[int]]:
    """The same greedy generation through an OpenAI-compatible server, as token ids in and token ids out."""
    from client import Endpoint, Failure
    endpoint = Endpoint(cfg.base_url, cfg.served_model, Path(cfg.out) / "cache.sqlite", api_key_env=cfg.api_key_env,
                        concurrency=cfg.concurrency, timeout_s=cfg.timeout_s, progress=cfg.progress, desc="prompts")
    endpoint.check()
    greedy = dict(temperature=0.0, stop_token_ids=list(stop_ids), skip_special_tokens=False, return_token_ids=True)
    requests = [("completions", {"prompt": ids, "max_tokens": n, **greedy}) for ids, n in zip(prompts, max_new)]
    outputs = []
    for k, reply in enumerate(endpoint.run(requests)):
        if isinstance(reply, Failure):
            raise UserError(f"{cfg.base_url}: prompt {k} failed after retries: {reply.error}; rerun to resume (cached)")
        if reply.token_ids is None:
            raise UserError(f"{cfg.base_url} ignored return_token_ids; use vLLM >= 0.10.2 or SGLang")
        ids = reply.token_ids
        outputs.append(ids[:next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))])  # vLLM sends the stop id
    print(f"served: {endpoint.stats['requests']:,} requests sent, {endpoint.stats['cache_hits']:,} answered from cache")
    return outputs


def load_model(cfg: EvalConfig):
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, cfg.dtype or ("bfloat16" if device.startswith("cuda") else "float32"), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"--dtype must be a floating-point torch dtype (bfloat16, float16, float32); got {cfg.dtype!r}")
    return Transformer.from_pretrained(cfg.model, device=device, dtype=dtype).eval()


# ---- main ----


def main(cfg: EvalConfig) -> dict:
    print("evaluate config:", json.dumps(asdict(cfg)))
    if not Path(cfg.model).is_dir():
        raise UserError(f"--model={cfg.model!r}: not a folder; give the checkpoint folder (config.json, weights)")
    if min(cfg.batch_size, cfg.concurrency) < 1 or cfg.limit < 0:
        raise UserError(f"--batch_size and --concurrency must be at least 1, --limit at least 0: got {cfg.batch_size}, "
                        f"{cfg.concurrency}, {cfg.limit}")
    if cfg.base_url and not cfg.served_model:
        raise UserError("--base_url needs --served_model: the name the server gives the model")
    benchmarks, systems = cfg.benchmarks.split(","), cfg.system.split(",")
    for s in systems:
        if s not in SYSTEM_MESSAGES:
            raise UserError(f"unknown system message {s!r}; choose from {', '.join(SYSTEM_MESSAGES)}")
    new_per = max_new_tokens_for(cfg)
    items = [it for b in benchmarks for it in load_benchmark(b, cfg.data_dir, cfg.limit)]  # before the model loads
    print(f"{len(items):,} items:", ", ".join(f"{b} {sum(it.benchmark == b for it in items)}" for b in benchmarks))
    tok = Tokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    model = None if cfg.base_url else load_model(cfg)
    args = model.args if model else ModelArgs.from_hf_config(read_checkpoint(cfg.model)[0])
    if tok.vocab_size > args.vocab_size:  # e.g. a LLaMA-2 folder (32,000 rows) with Orca 2's tokenizer (32,003 ids)
        raise UserError(f"the tokenizer has {tok.vocab_size} ids, {cfg.model} only {args.vocab_size}: pass its own")
    jobs = [(it, s) for s in systems for it in items]
    max_new = [new_per[it.benchmark] for it, _ in jobs]
    encoded = [tok.encode_prompt(SYSTEM_MESSAGES[s], it.prompt) for it, s in jobs]
    fitted = [fit_context(ids, n, args.max_seq_len) for ids, n in zip(encoded, max_new)]  # (ids, whether cut to fit)
    prompts = [ids for ids, _ in fitted]
    out_dir = Path(cfg.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    outputs = (generate_served(prompts, max_new, tok.stop_ids, cfg) if model is None
               else generate_local(model, prompts, max_new, tok.stop_ids, tok.pad_id, cfg))
    seconds = max(time.perf_counter() - t0, 1e-9)  # it divides below
    new_tokens = sum(len(o) for o in outputs)
    stats = dict(examples=len(prompts), new_tokens=new_tokens, seconds=seconds, truncated=sum(c for _, c in fitted),
                 tokens_per_s=new_tokens / seconds, examples_per_s=len(prompts) / seconds)
    records = []
    for (it, s), (ids, was_cut), out in zip(jobs, fitted, outputs):
        text = tok.decode(out)
        extracted, start = extract(it, text)
        records.append({"benchmark": it.benchmark, "subset": it.subset, "id": it.id, "system": s,
                        "prompt": render_prompt(SYSTEM_MESSAGES[s], it.prompt), "output": text, "extracted": extracted,
                        "gold": it.gold, **score_answer(it, extracted), "strategy": strategy_of(text, start),
                        "prompt_tokens": len(ids), "prompt_cut": was_cut, "new_tokens": len(out)})
    lines = [json.dumps(rec, ensure_ascii=False) + "\n" for rec in records]
    (out_dir / "predictions.jsonl").write_text("".join(lines), encoding="utf-8")
    summary = summarize(records)
    md = summary_markdown(summary, stats)
    (out_dir / "summary.md").write_text(md, encoding="utf-8")
    (out_dir / "summary.json").write_text(json.dumps(dict(config=asdict(cfg), stats=stats, results=summary), indent=2))
    print(md)
    print(f"wrote {cfg.out}/predictions.jsonl ({len(records):,} lines), summary.md, summary.json")
    return summary


if __name__ == "__main__":
    cli.run(main, EvalConfig, __doc__)
