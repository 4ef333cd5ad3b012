"""Progressive Orca 2 training: one process on a CPU or GPU, or many under torchrun with FSDP2.

    python train.py                                                  # the miniature demo (~75 s on 2 CPU cores)
    python train.py --config=configs/orca2-7b.json --dry_run=true    # prepare every stage's data, print the plan
    torchrun --standalone --nproc_per_node=8 train.py --config=configs/orca2-7b.json
    sbatch configs/slurm-orca2-13b.sh                                # the paper's 4 x 8 A100s, preemptible

In order (all visible in train()): config -> device mesh -> every stage's data (ranks share the tokenizing) -> the
model, built on meta, sharded with FSDP2, filled tensor by tensor -> per stage, per step: batches, train_step per
micro-batch, clip, AdamW, log, checkpoint -> an HF export per stage -> the answer to a held-out prompt. A step's loss
is summed over every micro-batch on every rank and divided by the global batch's supervised tokens, so accumulation
or more ranks give one big batch's update; checkpoints are resharded on resume and the data position is global.

Preemption: on SIGTERM or SIGUSR1 every rank finishes its step (or save, or export), checkpoints and exits with code
75 (EX_TEMPFAIL; 2 is a user error); the same command resumes. During data preparation they stop at once.
"""

import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import signal
import struct
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

import cli
import data
import orca2
import tasks
from cli import UserError
from model import ModelArgs, Transformer, init_tensors
from tokenizer import Tokenizer
from weights import write_safetensors

STORIES260K = orca2.SHARED_DATA / "tiny-llama" / "stories260K.bin"
RUN_KEYS = ("stages", "data", "model", "tokenizer", "max_len", "global_batch", "epochs", "lr", "max_steps", "seed")
PREEMPTED = 75  # exit code after a checkpoint on SIGTERM / SIGUSR1: rerun the same command to continue

# ---- config ----


@dataclass
class TrainConfig(data.DataConfig):
    # model and tokenizer
    model: str = str(STORIES260K)  # an HF folder (LLaMA-2, Orca 2), a llama2.c .bin, or a preset name (random init)
    tokenizer: str = ""            # tokenizer.model or folder; "" = the model's own (LLaMA-2's for a preset)
    stages: list = field(default_factory=list)  # curriculum: orca2.Stage dicts {name, sources: [{name, path, weight,
                                                # erase, system}], epochs, lr, ...}; empty = one stage on `data`
    data: str = "miniature"        # that one stage's data file ("miniature": tasks.py's problems, in <out_dir>/data)
    epochs: int = 2                # that one stage's epochs
    lr: float = 5e-3               # that one stage's peak learning rate
    max_steps: int = 0             # stop each stage after this many optimizer steps (0 = run all epochs)
    max_len: int = 1024            # tokens per packed row (paper: 4096); may exceed the context, an example may not
    # batch (gradient accumulation = global_batch / (micro_batch * ranks))
    global_batch: int = 2          # packed rows per optimizer step, over all ranks
    micro_batch: int = 2           # rows per rank per forward
    # optimizer (ORCA2.md 5.4: not published; these are the project's defaults)
    beta1: float = 0.9             # AdamW's first-moment decay
    beta2: float = 0.95            # AdamW's second-moment decay
    eps: float = 1e-8              # AdamW's denominator term
    weight_decay: float = 0.0      # AdamW's decoupled weight decay (0 = none)
    grad_clip: float = 1.0         # max global gradient norm (0 = off)
    # precision and speed
    dtype: str = "auto"            # compute dtype: bfloat16 or float32; "auto" = bf16 on GPU (master weights fp32)
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    compile: bool = False          # torch.compile each transformer block (regional compilation)
    # distributed
    dp_replicate: int = 1          # HSDP: replicate groups (e.g. nodes); 1 = plain FSDP over all ranks
    timeout_s: int = 1800          # collective timeout: a dead rank ends the job after this many seconds
    # output
    out_dir: str = "out/demo"      # checkpoints/, export/, metrics.jsonl, config.json
    save_every: int = 0            # also checkpoint every N steps (0 = only at the end of each stage)
    keep_last: int = 2             # checkpoints kept (older ones are deleted)
    resume: bool = True            # continue from the latest complete checkpoint in out_dir
    stop_at_step: int = 0          # stop with a checkpoint after this many steps in all (0 = never); rerun resumes
    export_dtype: str = "bfloat16"  # dtype of the HF export written at the end of each stage
    prompt: str = tasks.EXAMPLE_PROMPT  # held-out prompt answered at the end (cautious system message)
    max_new_tokens: int = 64       # length of that answer
    temperature: float = 0.0       # its sampling temperature (0 = greedy)
    top_p: float = 1.0             # its nucleus sampling
    dry_run: bool = False          # prepare the data of every stage and print the plan; build no model


def curriculum(cfg: TrainConfig, rank: int, group) -> list[orca2.Stage]:
    """The stages from the config; the demo's miniature data is written first (rank 0; the others see it)."""
    if not cfg.stages:
        path = str(Path(cfg.out_dir) / "data" / "miniature.jsonl") if cfg.data == "miniature" else cfg.data
        if cfg.data == "miniature" and rank == 0 and not Path(path).is_file():
            problems = tasks.make_problems(random.Random(1234), 2000, seen={tasks.EXAMPLE_PROMPT})
            tasks.write_data(problems, Path(path))
        barrier(group)  # the others wait for it
        return [orca2.Stage("orca2", [orca2.Source("data", path, erase=True)], epochs=cfg.epochs, lr=cfg.lr)]
    stages, types = [], {c: {f.name: f.type for f in dataclasses.fields(c)} for c in (orca2.Stage, orca2.Source)}
    for i, s in enumerate(cfg.stages):  # every key and type checked: "erase": "no" must not mean erase
        s = cli.check_keys(s, types[orca2.Stage] | {"sources": list[dict]}, f"--stages[{i}]")
        try:
            sources = [orca2.Source(**cli.check_keys(src, types[orca2.Source], f"--stages[{i}].sources[{j}]"))
                       for j, src in enumerate(s["sources"])]
            stages.append(orca2.Stage(**{**s, "sources": sources}))
        except (TypeError, KeyError) as e:
            raise UserError(f"--stages[{i}]: {e}; a stage is {{name, sources: [{{name, path, weight, erase, system}}], "
                            "epochs, lr, warmup_ratio, min_lr_ratio}") from None
        for src in stages[-1].sources:  # fail before any work when a data file is missing
            if not Path(src.path).is_file():
                raise UserError(f"stage {s['name']!r}, source {src.name!r}: data file {src.path} does not exist")
    return stages


# ---- distributed set-up ----


def setup_distributed(cfg: TrainConfig):
    """(rank, world, device, mesh, prep_group). torchrun sets RANK/WORLD_SIZE; without them this is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu")
    if cfg.dp_replicate < 1 or world % cfg.dp_replicate:
        raise UserError(f"dp_replicate={cfg.dp_replicate} must divide the world size {world}")
    per_rank = cfg.global_batch / (cfg.micro_batch * world)
    if per_rank != int(per_rank) or per_rank < 1:
        ok = [b for b in range(1, cfg.global_batch + 1) if cfg.global_batch % (b * world) == 0]
        raise UserError(f"global_batch={cfg.global_batch} is not micro_batch={cfg.micro_batch} x {world} ranks x an "
                        f"integer accumulation; micro_batch values that work with {world} ranks: {ok or 'none'}")
    if "RANK" not in os.environ:
        return rank, world, device, None, None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=cfg.timeout_s))
    from torch.distributed.device_mesh import init_device_mesh
    shape = (cfg.dp_replicate, world // cfg.dp_replicate) if cfg.dp_replicate > 1 else (world,)
    names = ("replicate", "shard") if cfg.dp_replicate > 1 else ("shard",)  # HSDP: shard in a node, replicate across
    mesh = init_device_mesh(device.type, shape, mesh_dim_names=names)
    # Data preparation may keep rank 0 busy for hours: its broadcast and barrier wait a week, not timeout_s.
    prep_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))
    return rank, world, device, mesh, prep_group


def print0(*args):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def barrier(group=None):
    if dist.is_initialized():
        dist.barrier(group=group)


class Preemption(Exception):
    """SIGTERM / SIGUSR1 arrived: raised at once during data preparation; later the handler only sets `requested`."""
    requested = False
    immediate = True

    @classmethod
    def handler(cls, signum, frame):
        first = not cls.requested
        cls.requested = True
        if cls.immediate and first:
            raise cls(f"signal {signal.Signals(signum).name}")


# ---- model: build on meta, shard, then fill with weights ----


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device, mesh, dtype: torch.dtype) -> Transformer:
    if Path(cfg.model).exists():
        _, ckpt, tensors = Transformer.read_checked(cfg.model)  # each tensor checked against the checkpoint's model
        args = ckpt.args
        if vocab_size < args.vocab_size:
            raise UserError(f"the tokenizer has {vocab_size} ids but {cfg.model} has {args.vocab_size} embedding rows")
    else:
        args, tensors = ModelArgs.from_name(cfg.model), None
    ckpt_vocab = args.vocab_size
    args = dataclasses.replace(args, vocab_size=vocab_size)  # LLaMA-2's 32000 grow to Orca 2's 32003
    with torch.device("meta"):
        model = Transformer(args)
    for block in model.model.layers:
        block.checkpoint = cfg.activation_checkpointing
        if cfg.compile:
            block.compile()  # regional: one compiled graph reused by every block
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # Compute in cfg.dtype; sharded fp32 master weights, AdamW states and gradient reduction.
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    if tensors is None:
        fill_parameters(model, init_tensors(model, cfg.seed))  # the same values as Transformer.init_weights
    else:
        print0(f"loading initial weights from {cfg.model}")
        fill_parameters(model, grown(tensors, model, ckpt_vocab))
    return model


def grown(tensors, model: Transformer, ckpt_vocab: int):
    """A checkpoint's tensors; new vocabulary rows are the mean of the old ones (ORCA2.md 5.3)."""
    extra = model.args.vocab_size - ckpt_vocab
    if extra:
        print0(f"adding {extra} vocabulary rows to embed_tokens and lm_head, initialised to the mean of the others")
    for name, t in tensors:
        if extra and name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.cat([t.float(), t.float().mean(0, keepdim=True).expand(extra, -1)])
        yield name, t


@torch.no_grad()
def fill_parameters(model: Transformer, tensors):
    """Copy full tensors into (possibly sharded) parameters one at a time: no rank holds the whole model."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = dict(model.named_parameters())
    for name, full in tensors:
        p = params.pop(name)
        if isinstance(p, DTensor):  # each rank keeps only its own shard of the full tensor
            local = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
            p.to_local().copy_(local.to_local())
        else:
            p.copy_(full)
    if params:
        raise UserError(f"no initial value for {len(params)} parameters, e.g. {list(params)[:3]}")


def default_tokenizer(cfg: TrainConfig) -> str:
    """A folder's own tokenizer, tok<vocab>.model beside a llama2.c file (llama2.c's naming), else LLaMA-2's."""
    path = Path(cfg.model)
    if path.is_file():
        with path.open("rb") as f:  # the 28-byte header, not the whole model
            vocab = abs(struct.unpack("7i", f.read(28).ljust(28, b"\0"))[5])
        return str(path.with_name(f"tok{vocab}.model"))
    return cfg.model if path.is_dir() else str(data.LLAMA2_TOKENIZER)


# ---- the training step, optimizer schedule ----


def train_step(model: Transformer, batch: dict, device: torch.device, scale: float, autocast) -> torch.Tensor:
    """One micro-batch: forward with logits at the teacher tokens only, cross-entropy summed over them, backward of
    the sum times `scale`. Returns the summed loss. (bench.py times exactly this function.)"""
    labels = batch["labels"].to(device)
    supervised = labels != -100  # the label contract: -100 everywhere but the teacher's next tokens (data.py)
    positions = batch["position_ids"].to(device) if batch["position_ids"] is not None else None
    with autocast:  # the output layer is costly: its logits are computed where there is a label, nowhere else
        logits = model(batch["input_ids"].to(device), positions, logits_at=supervised)
    loss = F.cross_entropy(logits.float(), labels[supervised], reduction="sum")
    (loss * scale).backward()
    return loss.detach()


def lr_at(step: int, total: int, stage: orca2.Stage) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr; restarted at every stage."""
    warmup = max(1, round(stage.warmup_ratio * total))
    if step < warmup:
        return stage.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return stage.lr * (stage.min_lr_ratio + (1 - stage.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             weight_decay=cfg.weight_decay)


# ---- checkpoints: sharded, atomic, reshardable ----


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first; a directory only gets its final name once fully written."""
    return sorted(p for p in (out_dir / "checkpoints").glob("ckpt-*") if not p.name.endswith(".tmp")
                  and (p / "train_state.json").is_file())


def save_checkpoint(model, opt, state: dict, cfg: TrainConfig, rank: int):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    root = Path(cfg.out_dir) / "checkpoints"
    final = root / f"ckpt-{state['global_step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        for stale in root.glob("ckpt-*.tmp"):  # this one, or any left by a run killed while saving
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    barrier()
    if rank == 0:
        extra = dict(state, config=dataclasses.asdict(cfg), torch_rng_state=torch.get_rng_state().tolist())
        (tmp / "train_state.json").write_text(json.dumps(extra, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic: a kill before this line leaves a *.tmp folder, never a complete-looking one
        for old in checkpoint_dirs(Path(cfg.out_dir))[:-cfg.keep_last]:
            shutil.rmtree(old)
    barrier()


def load_checkpoint(model, opt, path: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)  # also creates the AdamW states to load into
    dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    state = json.loads((path / "train_state.json").read_text())
    torch.set_rng_state(torch.tensor(state["torch_rng_state"], dtype=torch.uint8))
    return state


def export_hf(model: Transformer, tok: Tokenizer, dst: Path, cfg: TrainConfig, rank: int):
    """An HF folder that from_pretrained, evaluate.py and the reference implementation load. Rank 0 writes
    safetensors one full tensor at a time; the other ranks only help gather each tensor."""
    from torch.distributed.tensor import DTensor
    dtype = getattr(torch, cfg.export_dtype)
    sd = model.state_dict()
    tensors = ((name, (t.full_tensor() if isinstance(t, DTensor) else t).detach().to("cpu", dtype))
               for name, t in sd.items())
    if rank != 0:
        for _ in tensors:
            pass
        return
    write_safetensors(tensors, dst, max_shard_size="5GB", total=len(sd))
    (dst / "config.json").write_text(json.dumps(model.args.to_hf_config(dtype), indent=2))
    tok.save_pretrained(dst)
    print0(f"exported {dst}")


# ---- throughput accounting ----

# Dense bf16 peak by the full name torch reports (an H100 PCIe is no H100 SXM); data sheets say twice, with sparsity
PEAK_BF16_FLOPS = {
    "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12,  # A100 data sheet: SXM and PCIe alike
    "NVIDIA A100 80GB PCIe": 312e12, "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100 PCIe": 756e12,  # H100 data sheet: SXM, PCIe
    "NVIDIA H100 NVL": 835e12,  # H100 data sheet: NVL, per GPU
    "NVIDIA H200": 989e12, "NVIDIA H200 NVL": 835e12,  # H200 data sheet: SXM, NVL
}


def block_params(args: ModelArgs) -> int:
    """Weights of one block's matmuls: q and o, k and v (grouped-query), and the three SwiGLU matrices."""
    kv = args.n_kv_heads * args.head_dim
    return 2 * args.dim * args.dim + 2 * args.dim * kv + 3 * args.dim * args.hidden_dim


def step_flops(args: ModelArgs, n_tok: float, n_sup: float, pairs: float) -> float:
    """FLOPs of forward + backward (3 x forward, 2 per multiply-add) as this trainer runs them: every block weight on
    every token, the output layer only at the n_sup teacher tokens, and attention's QK^T and AV over the causal pairs
    inside each document (pairs = sum of L^2 over documents, twice the causal pairs, hence 6 not 12)."""
    return (6 * args.n_layers * block_params(args) * n_tok + 6 * args.vocab_size * args.dim * n_sup
            + 6 * args.n_layers * args.dim * pairs)


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None (MFU not reported): on a CPU, or a GPU missing from the table."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if name is not None and name not in PEAK_BF16_FLOPS:
        print0(f"unknown device {name!r}, MFU not reported (add its dense bf16 peak to train.PEAK_BF16_FLOPS)")
    return PEAK_BF16_FLOPS.get(name)


def attention_pairs(batch: dict, pad_id: int) -> int:
    """sum of L_i^2 over the real documents: a document of length L has positions 0..L-1 and sum(2p+1) = L^2."""
    return int(((2 * batch["position_ids"] + 1) * (batch["input_ids"] != pad_id)).sum())


# ---- the training loop ----


def main(cfg: TrainConfig):
    for key, ok in (("dtype", ("auto", "bfloat16", "float32")), ("export_dtype", ("bfloat16", "float32"))):
        if getattr(cfg, key) not in ok:
            raise UserError(f"--{key} takes {'/'.join(ok)}, got {getattr(cfg, key)!r}")
    for key in ("keep_last", "global_batch", "micro_batch", "max_len", "epochs", "max_steps"):
        if getattr(cfg, key) < (key != "max_steps"):
            raise UserError(f"--{key} must be at least {int(key != 'max_steps')}, got {getattr(cfg, key)}")
    # DCP warns that one process has no process group: a supported case here, not a problem
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    previous = {}  # the caller's handlers, back at the end (main may be called from Python: tests, other commands)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        previous[sig] = signal.signal(sig, Preemption.handler)
    Preemption.requested, Preemption.immediate = False, True
    rank, world, device, mesh, prep_group = setup_distributed(cfg)
    try:
        return train(cfg, rank, world, device, mesh, prep_group)
    except Preemption as e:
        print(f"[rank {rank}] {e} during data preparation: stopped, exiting with code {PREEMPTED}; finished parts of "
              "the cache are kept, rerun the same command to continue", flush=True)
        raise SystemExit(PREEMPTED) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, rank: int, world: int, device: torch.device, mesh, prep_group):
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    print0(f"config: {json.dumps(dataclasses.asdict(cfg), indent=1)}")
    stages = curriculum(cfg, rank, prep_group)  # the config's stages checked first
    found = checkpoint_dirs(out_dir)  # checked before any work, and before config.json is written again
    if found and not cfg.resume:
        raise UserError(f"{out_dir} holds checkpoints of an earlier run ({found[-1].name}); continue it with "
                        "--resume=true, or start afresh in another --out_dir")
    before = json.loads((found[-1] / "train_state.json").read_text())["config"] if found else {}
    if changed := [k for k in RUN_KEYS if k in before and before[k] != getattr(cfg, k)]:  # would mix two runs
        raise UserError(f"{found[-1]} was made with other {', '.join(changed)}: rerun with its settings (in its "
                        "train_state.json) to continue it, or start afresh in another --out_dir")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    tok = Tokenizer.from_pretrained(cfg.tokenizer or default_tokenizer(cfg))
    # Every stage's data first: rank 0 plans (file hashes: all ranks agree), all tokenize, rank 0 merges and packs.
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    data_cfg = dataclasses.replace(cfg, num_workers=max(1, (cfg.num_workers or len(os.sched_getaffinity(0))) // local))
    plans = [[data.plan_stage(s.sources, tok, data_cfg, log=print0) for s in stages] if rank == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(plans, src=0, group=prep_group)
    packs = [data.build_stage(s.sources, tok, data_cfg, log=print0, plan=p, rank=rank, world=world)[0]
             for s, p in zip(stages, plans[0])]
    Preemption.immediate = False  # from here on a signal lets the current step (or save, or export) finish
    per_epoch = [data.steps_per_epoch(len(p), cfg.global_batch) for p in packs]
    totals = [min(n * s.epochs, cfg.max_steps or math.inf) for n, s in zip(per_epoch, stages)]  # optimizer steps
    for si, stage in enumerate(stages):
        print0(f"stage {si + 1}/{len(stages)} {stage.name!r}: {per_epoch[si]} steps/epoch x {stage.epochs} epochs, "
               f"{totals[si]} steps, peak lr {stage.lr:g}")
    if cfg.dry_run:
        return None
    auto = torch.bfloat16 if device.type == "cuda" else torch.float32  # a CPU computes in float32 unless asked
    dtype = auto if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    model = build_model(cfg, tok.vocab_size, device, mesh, dtype)
    longest, ctx = max(p.meta["longest"] for p in packs), model.args.max_seq_len
    if longest > ctx:
        raise UserError(f"the data holds examples of up to {longest} tokens, but the model's context is {ctx}: set "
                        f"--max_len={ctx} (longer examples are dropped, or cut with --on_too_long=truncate)")
    accum = cfg.global_batch // (cfg.micro_batch * world)
    print0(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {model.args}; computing in {dtype}; "
           f"global batch {cfg.global_batch} = {cfg.micro_batch} rows x {world} rank(s) x {accum} accumulation steps")
    opt = make_optimizer(model, cfg)
    state = {"stage": 0, "step": 0, "global_step": 0}
    if found:
        state = load_checkpoint(model, opt, found[-1])
        print0(f"resumed from {found[-1]} (stage {state['stage'] + 1}, step {state['step']})")
    # One process: autocast over fp32 weights. Under FSDP the MixedPrecisionPolicy casts the parameters instead.
    autocast = torch.autocast(device.type, dtype=dtype, enabled=mesh is None and dtype != torch.float32)
    peak = peak_flops(device)
    for si, stage in enumerate(stages):
        if si < state["stage"]:
            continue
        packed, total = packs[si], totals[si]
        if state["step"] == 0:  # each stage starts from the previous weights with a fresh optimizer and schedule
            opt = make_optimizer(model, cfg)
        bar = tqdm(total=total, initial=state["step"], desc=f"stage {si + 1}", unit="step", disable=rank != 0)
        while state["step"] < total:
            # A signal during the last step (or export, or save: they completed)? All ask, as it may reach them apart.
            if all_reduce_sum(torch.tensor(float(Preemption.requested), device=device)).item():
                save_checkpoint(model, opt, state, cfg, rank)
                print(f"[rank {rank}] preempted: checkpoint at step {state['global_step']} written, exiting with code "
                      f"{PREEMPTED}; rerun the same command to continue", flush=True)
                raise SystemExit(PREEMPTED)
            if cfg.stop_at_step and state["global_step"] >= cfg.stop_at_step:
                save_checkpoint(model, opt, state, cfg, rank)
                print0(f"stopped at step {state['global_step']} (stop_at_step); to continue, rerun with a larger "
                       "stop_at_step or without it")
                return None
            t0 = time.perf_counter()
            step = state["step"]
            epoch, step_in_epoch = divmod(step, per_epoch[si])
            order = data.epoch_order(len(packed), epoch, cfg.seed)
            mine = data.rank_packs(order, step_in_epoch, cfg.global_batch, rank, world)
            batches = [data.get_batch(packed, mine[m * cfg.micro_batch:(m + 1) * cfg.micro_batch], cfg.max_len,
                                      tok.pad_id) for m in range(accum)]
            # The denominator is known before any backward: the supervised tokens of the whole global batch.
            counts = [sum(b["num_supervised"] for b in batches), sum(b["num_tokens"] for b in batches),
                      sum(attention_pairs(b, tok.pad_id) for b in batches)]
            n_sup, n_tok, pairs = all_reduce_sum(torch.tensor(counts, dtype=torch.float64, device=device)).tolist()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for m, b in enumerate(batches):
                if mesh is not None and mesh.ndim == 2:  # HSDP: one cross-replica all-reduce, after the last one
                    model.set_requires_all_reduce(m == accum - 1)
                # (the reduce-scatter runs every micro-batch: skipping it would keep unsharded fp32 gradients)
                # FSDP averages gradients over the ranks; the factor `world` turns that mean back into a sum.
                loss_sum += train_step(model, b, device, world / max(n_sup, 1), autocast)
            loss_value = all_reduce_sum(loss_sum).item() / max(n_sup, 1)
            if not math.isfinite(loss_value):
                last = checkpoint_dirs(out_dir)
                raise UserError(f"loss is {loss_value} at stage {stage.name!r} step {step}; stopped before the "
                                f"update. Last good checkpoint: {last[-1] if last else 'none'}")
            lr = lr_at(step, total, stage)
            for group in opt.param_groups:
                group["lr"] = lr
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            opt.step()
            opt.zero_grad(set_to_none=True)
            grad_norm = norm.item()  # a host read after opt.step: the step's device work is done before the clock stops
            dt = time.perf_counter() - t0
            state["step"] += 1
            state["global_step"] += 1
            rec = dict(stage=stage.name, step=state["step"], global_step=state["global_step"], loss=loss_value, lr=lr,
                       grad_norm=grad_norm, tokens=int(n_tok), supervised_tokens=int(n_sup),
                       tok_s=n_tok / dt, sup_tok_s=n_sup / dt)
            if peak:  # the whole step (batches, forward, backward, collectives, AdamW) against every rank's peak
                rec["mfu"] = step_flops(model.args, n_tok, n_sup, pairs) / dt / (peak * world)
            if rank == 0:  # appended line by line: a resumed run goes on where the interrupted one stopped
                with open(out_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_s']:.0f}",
                            **({"mfu": f"{rec['mfu']:.1%}"} if peak else {}))
            bar.update(1)
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total:
                save_checkpoint(model, opt, state, cfg, rank)
        bar.close()
        export_hf(model, tok, out_dir / "export" / f"stage{si + 1}-{stage.name}", cfg, rank)
        state = {"stage": si + 1, "step": 0, "global_step": state["global_step"]}
        save_checkpoint(model, opt, state, cfg, rank)  # marks the stage done: a resume starts the next one
    export_hf(model, tok, out_dir / "export" / "final", cfg, rank)
    held_out_answer(model, tok, cfg, device)


def held_out_answer(model: Transformer, tok: Tokenizer, cfg: TrainConfig, device: torch.device):
    """Answer cfg.prompt under the cautious system message; under FSDP every rank runs it, on rank 0's tokens."""
    prompt = tok.encode_prompt(orca2.CAUTIOUS_SYSTEM_MESSAGE, cfg.prompt)
    answer = model.generate([prompt], cfg.max_new_tokens, stop_ids=tok.stop_ids, temperature=cfg.temperature,
                            top_p=cfg.top_p, pad_id=tok.pad_id, generator=torch.Generator(device).manual_seed(cfg.seed),
                            sync_ranks=dist.is_initialized())[0]
    text = tok.decode(answer, skip_special=True).removeprefix("\n")
    print0(f"\nheld-out prompt (cautious system message): {cfg.prompt}\nanswer:\n{text}")
    print0(tasks.judge(cfg.prompt, text))


if __name__ == "__main__":
    # record() reports a crash (a bug) through torchrun; cli.run turns a user error into one line first. A worker
    # leaves without interpreter shutdown: DTensor's caches keep gloo's threads alive past destroy_process_group, and
    # freeing them during shutdown can abort a finished run ("terminate called without an active exception").
    try:
        record(cli.run)(main, TrainConfig, __doc__)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    if "RANK" in os.environ:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
