"""Progressive Orca 2 training: one process on a CPU or GPU, or many under torchrun with FSDP2.

Run it:
    python train.py                                              # CPU miniature: tiny model, Orca-style sample, ~2 min
    python train.py --config=configs/orca2-7b.json --dry_run=true   # print the resolved config and data plan, no training
    torchrun --standalone --nproc_per_node=8 train.py --config=configs/orca2-7b.json
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \
        train.py --config=configs/orca2-13b.json                  # the paper's 4 x 8 A100s; see configs/slurm-orca2-13b.sh

What happens, in order (all visible in main()):
  resolve the config (dataclass defaults < --config JSON < --key=value) -> set up the device mesh -> build the model
  on the meta device -> shard it with FSDP2 (under torchrun) -> load the initial weights tensor by tensor (or init)
  -> for each curriculum stage: tokenize + pack its data (cached) -> for step: batch, forward, loss summed over
  teacher tokens / supervised tokens of the whole global batch, backward, clip, AdamW step, log, checkpoint
  -> export an HF folder at the end of each stage -> generate an answer for a held-out prompt.

Loss normalisation: each optimizer step sums the token losses of every micro-batch on every rank and divides by the
number of supervised tokens in the whole global batch, so gradient accumulation or more ranks give the same update
as one big batch. Checkpoints are torch distributed checkpoints (sharded, reshardable to another number of ranks);
the data position is the global step, so a resume continues on exactly the packs it would have seen.
"""

import dataclasses
import datetime
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.elastic.multiprocessing.errors import record

import data
import orca2
from model import (IGNORED_TENSOR, ModelArgs, Transformer, check_tensor, init_tensors, iter_checkpoint, read_config,
                   write_safetensors)

ROOT = Path(__file__).resolve().parent
SAMPLE = ROOT.parent / "shared" / "data" / "orca-samples" / "orca_dpo_pairs_validation.jsonl"
LLAMA2_TOKENIZER = ROOT.parent / "shared" / "data" / "llama2-tokenizer" / "tokenizer.model"

# ---- config ----


@dataclass
class TrainConfig:
    # model and tokenizer
    model: str = "tiny"            # ModelArgs preset to train from scratch, or an HF folder (LLaMA-2 / Orca 2) to start from
    tokenizer: str = ""            # tokenizer.model or a folder; "" = the model folder's, else ../shared's LLaMA-2 tokenizer
    # curriculum: list of stages as dicts {name, sources: [{name, path, weight, erase, system}], epochs, lr,
    # warmup_ratio, min_lr_ratio} (see orca2.Stage); empty = one stage on `data` with prompt erasing
    stages: list = field(default_factory=list)
    data: str = str(SAMPLE)        # the single-stage data file used when `stages` is empty
    epochs: int = 3                # epochs of that single stage
    max_steps: int = 0             # stop each stage after this many optimizer steps (0 = run all epochs)
    # batch: global_batch packed rows per optimizer step over all ranks; micro_batch rows per rank per forward;
    # gradient accumulation = global_batch / (micro_batch * data-parallel ranks)
    seq_len: int = 1024            # packed row length in tokens (the paper: 4096)
    global_batch: int = 8
    micro_batch: int = 2
    # optimizer (ORCA2.md 5.4: not published; these are the project's defaults)
    lr: float = 3e-3               # peak learning rate of the single stage (per-stage lr comes from `stages`)
    warmup_ratio: float = 0.03     # linear warmup over this share of the stage's steps
    min_lr_ratio: float = 0.1      # cosine decay ends at min_lr_ratio * peak
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0         # max global gradient norm (0 = off)
    # precision and speed
    dtype: str = "bfloat16"        # compute dtype on GPU (FSDP param_dtype / autocast); CPU always computes in float32
    activation_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute
    compile: bool = False          # torch.compile each transformer block (regional compilation)
    # distributed
    dp_replicate: int = 1          # HSDP: replicate groups (e.g. nodes); 1 = plain FSDP over all ranks
    timeout_s: int = 1800          # collective timeout: a dead rank ends the job after this many seconds
    # data pipeline
    cache_dir: str = ""            # tokenized/packed cache; "" = <out_dir>/cache
    num_workers: int = 2           # tokenizer processes
    on_too_long: str = "drop"      # examples longer than seq_len: "drop" (counted and reported) or "truncate"
    skip_bad_lines: bool = False   # skip malformed input lines (counted and reported) instead of stopping
    # output
    out_dir: str = "out/demo"      # checkpoints/, export/, metrics.jsonl, config.json
    save_every: int = 0            # also checkpoint every N steps (0 = only at the end of each stage)
    keep_last: int = 2             # checkpoints kept (older ones are deleted)
    resume: bool = True            # continue from the latest complete checkpoint in out_dir
    stop_at_step: int = 0          # end the run after this many optimizer steps in all, with a checkpoint (as when a
                                   # cluster allocation ends); a later run resumes from it. 0 = run to the end
    export_dtype: str = "bfloat16"  # dtype of the HF export written at the end of each stage
    seed: int = 0                  # model init and data order
    prompt: str = "Which is heavier, a kilogram of feathers or a kilogram of iron? Explain briefly."  # held-out prompt answered at the end
    max_new_tokens: int = 64       # length of that answer
    temperature: float = 0.7       # sampling temperature of that answer (0 = greedy; a tiny model repeats itself greedily)
    top_p: float = 0.9             # nucleus sampling of that answer
    dry_run: bool = False          # resolve config and data, print the plan, do not train


def parse_config(argv: list[str]) -> TrainConfig:
    """Defaults < --config=FILE.json < --key=value; values are type-checked and unknown keys are errors."""
    known = {f.name: f.type.__name__ for f in dataclasses.fields(TrainConfig)}  # "int", "float", "str", "bool", "list"
    values: dict = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"arguments are --key=value; got {arg!r}")
        key, raw = arg[2:].split("=", 1)
        if key == "config":
            file_values = json.loads(Path(raw).read_text())
            for k in file_values:
                if k not in known:
                    raise SystemExit(f"{raw}: unknown config key {k!r}; known keys: {', '.join(known)}")
            values.update(file_values)
            continue
        if key not in known:
            raise SystemExit(f"unknown option --{key}; known keys: {', '.join(known)}")
        values[key] = coerce(key, raw, known[key])
    for k, v in values.items():
        expected = {"str": str, "int": int, "float": (int, float), "bool": bool, "list": list}[known[k]]
        if not isinstance(v, expected) or (known[k] != "bool" and isinstance(v, bool)):
            raise SystemExit(f"config key {k!r} must be {known[k]}, got {v!r}")
        if known[k] == "float":
            values[k] = float(v)
    cfg = TrainConfig(**values)
    for key in ("dtype", "export_dtype"):
        if getattr(cfg, key) not in ("bfloat16", "float32"):
            raise SystemExit(f"{key} must be 'bfloat16' or 'float32', got {getattr(cfg, key)!r}")
    if cfg.keep_last < 1 or cfg.global_batch < 1 or cfg.micro_batch < 1:
        raise SystemExit("keep_last, global_batch and micro_batch must be at least 1")
    return cfg


def coerce(key: str, raw: str, type_name: str):
    try:
        if type_name == "bool":
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if type_name == "list":
            return json.loads(raw)
        return {"str": str, "int": int, "float": float}[type_name](raw)
    except ValueError:
        raise SystemExit(f"--{key}={raw}: expected a {type_name}") from None


def curriculum(cfg: TrainConfig) -> list[orca2.Stage]:
    if not cfg.stages:
        return [orca2.Stage("orca2", [orca2.Source("sample", cfg.data, erase=True)], epochs=cfg.epochs, lr=cfg.lr,
                            warmup_ratio=cfg.warmup_ratio, min_lr_ratio=cfg.min_lr_ratio)]
    stages = []
    for i, s in enumerate(cfg.stages):
        try:
            sources = [orca2.Source(**src) for src in s["sources"]]
            stages.append(orca2.Stage(**{**s, "sources": sources}))
        except (TypeError, KeyError) as e:
            raise SystemExit(f"stages[{i}]: {e}; a stage is {{name, sources: [{{name, path, weight, erase, system}}], "
                             "epochs, lr, warmup_ratio, min_lr_ratio}") from None
    for s in stages:  # fail before any work when a data file is missing
        for src in s.sources:
            if not Path(src.path).is_file():
                raise SystemExit(f"stage {s.name!r}, source {src.name!r}: data file {src.path} does not exist")
    return stages


# ---- distributed set-up ----


def setup_distributed(cfg: TrainConfig):
    """(rank, world, device, mesh). torchrun sets RANK/WORLD_SIZE; without them this is one plain process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if cfg.dp_replicate < 1 or world % cfg.dp_replicate:
        raise SystemExit(f"dp_replicate={cfg.dp_replicate} must divide the world size {world}")
    per_rank = cfg.global_batch / (cfg.micro_batch * world)
    if per_rank != int(per_rank) or per_rank < 1:
        ok = [b for b in range(1, cfg.global_batch + 1) if cfg.global_batch % (b * world) == 0]
        raise SystemExit(f"global_batch={cfg.global_batch} is not micro_batch={cfg.micro_batch} x {world} ranks x an "
                         f"integer accumulation; micro_batch values that work with {world} ranks: {ok or 'none'}")
    if "RANK" not in os.environ:
        return rank, world, device, None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            timeout=datetime.timedelta(seconds=cfg.timeout_s))
    from torch.distributed.device_mesh import init_device_mesh
    if cfg.dp_replicate > 1:  # HSDP: shard inside a group, replicate across groups
        mesh = init_device_mesh(device.type, (cfg.dp_replicate, world // cfg.dp_replicate),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return rank, world, device, mesh


def print0(*args):
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, flush=True)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


# ---- model: build on meta, shard, then fill with weights ----


def build_model(cfg: TrainConfig, vocab_size: int, device: torch.device, mesh) -> Transformer:
    start = Path(cfg.model)
    args = read_config(start)[1] if start.is_dir() else ModelArgs.from_name(cfg.model)
    ckpt_vocab = args.vocab_size
    if vocab_size < ckpt_vocab and start.is_dir():
        raise SystemExit(f"the tokenizer has {vocab_size} ids but {cfg.model} has {ckpt_vocab} embedding rows")
    args = dataclasses.replace(args, vocab_size=vocab_size)  # LLaMA-2's 32000 grow to Orca 2's 32003
    if cfg.seq_len > args.max_seq_len:
        raise SystemExit(f"seq_len={cfg.seq_len} exceeds the model's context of {args.max_seq_len}")
    with torch.device("meta"):
        model = Transformer(args)
    for block in model.model.layers:
        block.checkpoint = cfg.activation_checkpointing
        if cfg.compile:
            block.compile()  # regional: one compiled graph reused by every block
    if mesh is not None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        # bf16 compute on GPU; fp32 sharded master weights, AdamW states and gradient reduction everywhere.
        compute = getattr(torch, cfg.dtype) if device.type == "cuda" else torch.float32
        mp = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32)
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
    model.to_empty(device=device)
    if start.is_dir():
        print0(f"loading initial weights from {start}")
        tensors = checkpoint_tensors(start, model, ckpt_vocab)
    else:
        tensors = init_tensors(model, cfg.seed)  # the same values as Transformer.init_weights
    fill_parameters(model, tensors)
    return model


def checkpoint_tensors(path: Path, model: Transformer, ckpt_vocab: int):
    """An HF folder's tensors, read one at a time; new vocabulary rows are the mean of the old ones (ORCA2.md 5.3)."""
    expected = {k: v for k, v in model.state_dict().items()}
    extra = model.args.vocab_size - ckpt_vocab
    if extra:
        print0(f"adding {extra} vocabulary rows to embed_tokens and lm_head, initialised to the mean of the existing rows")
    for name, t, file in iter_checkpoint(path):
        if IGNORED_TENSOR.fullmatch(name):
            continue
        if extra and name in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.cat([t.float(), t.float().mean(0, keepdim=True).expand(extra, -1)])
        check_tensor(name, t, expected, file)
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
        raise ValueError(f"no initial value for {len(params)} parameters, e.g. {list(params)[:3]}")


# ---- optimizer schedule ----


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
    root = out_dir / "checkpoints"
    return sorted(p for p in root.glob("ckpt-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "train_state.json").is_file())


def save_checkpoint(model, opt, state: dict, cfg: TrainConfig, rank: int):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    root = Path(cfg.out_dir) / "checkpoints"
    final = root / f"ckpt-{state['global_step']:08d}"
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    model_sd, optim_sd = get_state_dict(model, opt)
    with warnings.catch_warnings():  # one process without a process group is a supported case, not a problem
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    barrier()
    if rank == 0:
        rng = torch.get_rng_state().tolist()
        extra = dict(state, config=dataclasses.asdict(cfg), torch_rng_state=rng)
        (tmp / "train_state.json").write_text(json.dumps(extra, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # atomic: a crash before this line leaves only a *.tmp folder, never a complete-looking one
        for old in checkpoint_dirs(Path(cfg.out_dir))[:-cfg.keep_last]:
            shutil.rmtree(old)
    barrier()


def load_checkpoint(model, opt, path: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, opt)  # also creates the AdamW states to load into
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    set_state_dict(model, opt, model_state_dict=model_sd, optim_state_dict=optim_sd)
    state = json.loads((path / "train_state.json").read_text())
    torch.set_rng_state(torch.tensor(state["torch_rng_state"], dtype=torch.uint8))
    return state


def barrier():
    if dist.is_initialized():
        dist.barrier()


# ---- export: an HF folder that from_pretrained, evaluate.py and the reference implementation load ----


def export_hf(model: Transformer, tok: data.Tokenizer, dst: Path, cfg: TrainConfig, rank: int):
    """Rank 0 writes safetensors one full tensor at a time; the other ranks only help gather each tensor."""
    from torch.distributed.tensor import DTensor
    dtype = getattr(torch, cfg.export_dtype)
    sd = model.state_dict()

    def tensors():
        for name, t in sd.items():
            full = t.full_tensor() if isinstance(t, DTensor) else t
            yield name, full.detach().to("cpu", dtype)

    if rank != 0:
        for _ in tensors():
            pass
        return
    write_safetensors(tensors(), dst, max_shard_size="5GB", total=len(sd))
    (dst / "config.json").write_text(json.dumps(model.args.to_hf_config(dtype), indent=2))
    save_tokenizer(tok, dst)
    print0(f"exported {dst}")


def save_tokenizer(tok: data.Tokenizer, dst: Path):
    """The release's tokenizer files: SentencePiece model, added tokens, special tokens, generation settings."""
    (dst / "tokenizer.model").write_bytes(tok.model_proto)
    (dst / "added_tokens.json").write_text(json.dumps(tok.added, indent=2))
    special = {"bos_token": orca2.BOS, "eos_token": orca2.EOS, "unk_token": orca2.UNK, "pad_token": tok.pad_token}
    (dst / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    decoder = {str(i): {"content": s, "special": True} for s, i in tok.added.items()}
    (dst / "tokenizer_config.json").write_text(json.dumps(dict(special, tokenizer_class="LlamaTokenizer",
        add_bos_token=True, add_eos_token=False, legacy=True, added_tokens_decoder=decoder), indent=2))
    gen = {"bos_token_id": tok.bos_id, "eos_token_id": list(tok.stop_ids), "pad_token_id": tok.pad_id}
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2))


# ---- throughput accounting ----

PEAK_BF16_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12}  # dense bf16 tensor-core peak per GPU (SXM)


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
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


# ---- the training loop ----


@record  # under torchrun, a rank's exception is reported by the launcher with that rank's traceback
def main(argv: list[str]):
    cfg = parse_config(argv)
    stages = curriculum(cfg)
    rank, world, device, mesh = setup_distributed(cfg)
    out_dir = Path(cfg.out_dir)
    torch.manual_seed(cfg.seed)
    print0(f"config: {json.dumps(dataclasses.asdict(cfg), indent=1)}")
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    tok_path = cfg.tokenizer or (cfg.model if Path(cfg.model).is_dir() else str(LLAMA2_TOKENIZER))
    tok = data.Tokenizer.from_pretrained(tok_path)
    data_cfg = data.DataConfig(max_len=cfg.seq_len, on_too_long=cfg.on_too_long, skip_bad_lines=cfg.skip_bad_lines,
                               seed=cfg.seed, num_workers=cfg.num_workers,
                               cache_dir=cfg.cache_dir or str(out_dir / "cache"))
    if cfg.dry_run:  # the data plan only: tokenize, pack and count, build no model
        for si, stage in enumerate(stages):
            packed, _ = stage_data(stage, tok, data_cfg, rank)
            print0(f"stage {si + 1} {stage.name!r}: {stage_steps(len(packed), stage, cfg)} optimizer steps")
        return finish(None)
    model = build_model(cfg, tok.vocab_size, device, mesh)
    n_params = sum(p.numel() for p in model.parameters())
    accum = cfg.global_batch // (cfg.micro_batch * world)
    print0(f"model: {n_params:,} parameters, {model.args}; {world} rank(s), global batch {cfg.global_batch} rows = "
           f"micro {cfg.micro_batch} x {world} ranks x {accum} accumulation steps of {cfg.seq_len} tokens")
    opt = make_optimizer(model, cfg)
    found = checkpoint_dirs(out_dir)
    if found and not cfg.resume:
        raise SystemExit(f"{out_dir} holds checkpoints of an earlier run ({found[-1].name}); continue it with "
                         "--resume=true, or start afresh in another --out_dir")
    state = {"stage": 0, "step": 0, "global_step": 0}
    if found:
        state = load_checkpoint(model, opt, found[-1])
        print0(f"resumed from {found[-1]} (stage {state['stage'] + 1}, step {state['step']})")
    autocast = torch.autocast("cuda", dtype=getattr(torch, cfg.dtype), enabled=device.type == "cuda" and mesh is None)
    peak = peak_flops(device)
    metrics = open(out_dir / "metrics.jsonl", "a") if rank == 0 else None

    for si, stage in enumerate(stages):
        if si < state["stage"]:
            continue
        packed, _ = stage_data(stage, tok, data_cfg, rank)
        per_epoch = data.steps_per_epoch(len(packed), cfg.global_batch)
        total = stage_steps(len(packed), stage, cfg)
        print0(f"stage {si + 1}/{len(stages)} {stage.name!r}: {per_epoch} steps/epoch x {stage.epochs} epochs, "
               f"{total} steps, peak lr {stage.lr:g}")
        if state["step"] == 0:  # each stage starts from the previous weights with a fresh optimizer and schedule
            opt = make_optimizer(model, cfg)
        bar = tqdm_bar(total, state["step"], f"stage {si + 1} {stage.name}", rank)
        while state["step"] < total:
            if cfg.stop_at_step and state["global_step"] >= cfg.stop_at_step:
                save_checkpoint(model, opt, state, cfg, rank)
                print0(f"stopped at step {state['global_step']} (stop_at_step); to continue, rerun with a larger "
                       "stop_at_step or without it")
                return finish(metrics)
            step = state["step"]
            epoch, step_in_epoch = divmod(step, per_epoch)
            order = data.epoch_order(len(packed), epoch, cfg.seed)
            mine = data.rank_packs(order, step_in_epoch, cfg.global_batch, rank, world)
            batches = [data.get_batch(packed, mine[m * cfg.micro_batch:(m + 1) * cfg.micro_batch], cfg.seq_len,
                                      tok.pad_id) for m in range(accum)]
            # The denominator is known before any backward: the supervised tokens of the whole global batch.
            counts = torch.tensor([sum(b["num_supervised"] for b in batches), sum(b["num_tokens"] for b in batches),
                                   sum(attention_pairs(b, tok.pad_id) for b in batches)], dtype=torch.float64, device=device)
            n_sup, n_tok, pairs = all_reduce_sum(counts).tolist()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            for m, b in enumerate(batches):
                if mesh is not None and mesh.ndim == 2:  # HSDP: one cross-replica all-reduce, after the last micro-batch
                    model.set_requires_all_reduce(m == accum - 1)
                # (the reduce-scatter runs every micro-batch: skipping it would keep unsharded fp32 gradients)
                labels = b["labels"].to(device)
                supervised = labels != -100
                with autocast:  # logits only where there is a label: the output layer is costly
                    logits = model(b["input_ids"].to(device), b["position_ids"].to(device), logits_at=supervised)
                loss = F.cross_entropy(logits.float(), labels[supervised], reduction="sum")
                # FSDP averages gradients over the ranks; the factor `world` turns that mean back into a sum.
                (loss * (world / max(n_sup, 1))).backward()
                loss_sum += loss.detach()
            loss_value = all_reduce_sum(loss_sum).item() / max(n_sup, 1)
            if not math.isfinite(loss_value):
                last = checkpoint_dirs(out_dir)
                raise SystemExit(f"loss is {loss_value} at stage {stage.name!r} step {step}; stopped before the update. "
                                 f"Last good checkpoint: {last[-1] if last else 'none'}")
            lr = lr_at(step, total, stage)
            for group in opt.param_groups:
                group["lr"] = lr
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            opt.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            state["global_step"] += 1
            dt = time.perf_counter() - t0
            rec = dict(stage=stage.name, step=state["step"], global_step=state["global_step"], loss=loss_value, lr=lr,
                       grad_norm=norm.item(), tokens=int(n_tok), supervised_tokens=int(n_sup),
                       tok_s=n_tok / dt, sup_tok_s=n_sup / dt)
            if peak:
                rec["mfu"] = step_flops(model.args, n_tok, n_sup, pairs) / dt / (peak * world)
            if metrics:
                metrics.write(json.dumps(rec) + "\n")
                metrics.flush()
            if bar:
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{rec['tok_s']:.0f}",
                                sup_tok_s=f"{rec['sup_tok_s']:.0f}", **({"mfu": f"{rec['mfu']:.1%}"} if peak else {}))
                bar.update(1)
            if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total:
                save_checkpoint(model, opt, state, cfg, rank)
        if bar:
            bar.close()
        export_hf(model, tok, out_dir / "export" / f"stage{si + 1}-{stage.name}", cfg, rank)
        state = {"stage": si + 1, "step": 0, "global_step": state["global_step"]}
        save_checkpoint(model, opt, state, cfg, rank)  # marks the stage done: a resume starts the next one

    export_hf(model, tok, out_dir / "export" / "final", cfg, rank)
    prompt = tok.encode_prompt(orca2.CAUTIOUS_SYSTEM_MESSAGE, cfg.prompt)
    answer = model.generate([prompt], cfg.max_new_tokens, stop_ids=tok.stop_ids, temperature=cfg.temperature,
                            top_p=cfg.top_p, generator=torch.Generator(device).manual_seed(cfg.seed))[0]
    print0(f"\nheld-out prompt (cautious system message): {cfg.prompt}\n"
           f"answer: {tok.decode(answer, skip_special=True).strip()}")
    finish(metrics)


def finish(metrics):
    if metrics:
        metrics.close()
    if dist.is_initialized():
        dist.destroy_process_group()


def stage_data(stage: orca2.Stage, tok: data.Tokenizer, data_cfg: data.DataConfig, rank: int):
    """Tokenize and pack on rank 0 first; the other ranks then open the same memory-mapped cache."""
    if rank != 0:
        barrier()
    packed, stats = data.build_stage(stage.sources, tok, data_cfg, log=print0)
    if rank == 0:
        barrier()
    return packed, stats


def stage_steps(num_packs: int, stage: orca2.Stage, cfg: TrainConfig) -> int:
    total = data.steps_per_epoch(num_packs, cfg.global_batch) * stage.epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def attention_pairs(batch: dict, pad_id: int) -> int:
    """sum of L_i^2 over the real documents: a document of length L has positions 0..L-1 and sum(2p+1) = L^2."""
    real = batch["input_ids"] != pad_id
    return int(((2 * batch["position_ids"] + 1) * real).sum())


def tqdm_bar(total: int, initial: int, desc: str, rank: int):
    if rank != 0:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


if __name__ == "__main__":
    main(sys.argv[1:])
