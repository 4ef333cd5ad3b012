"""LLaMA-2 / Orca 2 in one file: the network, packed attention, batched generation, loading and saving.

    python model.py                                       # tiny demo: initial loss ~ ln(vocab), packing, generation
    python model.py convert SRC DST --dtype=bfloat16 --max_shard_size=5GB   # .bin/safetensors folder -> safetensors
    model = Transformer.from_pretrained("Orca-2-7b", dtype=torch.bfloat16)   # the released folder, unchanged
    logits = model(input_ids, position_ids)                                   # packed rows: docs start where pos == 0
    new_tokens = model.generate([[1, ...], [1, ...]], max_new_tokens=256)

Notable features:
- RMSNorm (pre-norm), rotate-half RoPE as in the released checkpoints (no weight permutes), grouped-query
  attention (LLaMA-2-70B), SwiGLU feed-forward, untied input/output embeddings, no biases.
- Parameter names are exactly the Hugging Face `LlamaForCausalLM` names, so loading is a strict load_state_dict.
- Packed sequences: attention stays inside each document and costs sum(L_i^2), not T^2 (a dense mask is the reference).
- Loads what weights.py reads (safetensors, the release's .bin, llama2.c) one tensor at a time into a meta model.

Shapes: B batch, T sequence, S cache, C model dim, nh/nkv query/key-value heads, hd head dim, V vocab, N docs of len L.
"""

import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path

import torch
import torch.distributed
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from cli import UserError
from weights import TOKENIZER_FILES, check_tensor, read_checkpoint, write_safetensors

# ---- config ----


@dataclass
class ModelArgs:
    dim: int = 4096            # model (residual stream) width
    n_layers: int = 32         # transformer blocks
    n_heads: int = 32          # query heads
    n_kv_heads: int = 32       # key/value heads; < n_heads is grouped-query attention
    vocab_size: int = 32000    # rows of the embedding and of the output matrix
    hidden_dim: int = 11008    # SwiGLU inner width (HF "intermediate_size")
    norm_eps: float = 1e-5     # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    max_seq_len: int = 4096    # context length the model was trained for (HF "max_position_embeddings")

    def __post_init__(self):
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise UserError(f"dim {self.dim} must divide by n_heads {self.n_heads}, and n_heads by n_kv_heads "
                            f"{self.n_kv_heads}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise UserError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict, where: str = "config.json") -> "ModelArgs":
        """Read a Hugging Face LLaMA config.json (old top-level rope_theta or new nested rope_parameters)."""
        for key, value in LLAMA.items():
            if cfg.get(key, value) != value:
                raise UserError(f"{where}: {key}={cfg[key]!r} is not supported; LLaMA-2 has {key}={value!r}")
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or {}
        rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
        if rope_type != "default":
            raise UserError(f"{where}: rope scaling {rope_type!r} is not implemented; only plain RoPE (LLaMA-2) is")
        try:
            args = cls(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
                       n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
                       vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"],
                       norm_eps=cfg.get("rms_norm_eps", 1e-6), max_seq_len=cfg.get("max_position_embeddings", 4096),
                       rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
        except KeyError as e:
            raise UserError(f"{where}: missing key {e.args[0]!r}") from None
        if cfg.get("head_dim", args.head_dim) != args.head_dim:
            raise UserError(f"{where}: head_dim {cfg['head_dim']} != hidden_size/num_attention_heads = {args.head_dim}")
        return args

    def to_hf_config(self, dtype: torch.dtype = torch.float32) -> dict:
        """The config.json that the reference implementation and from_pretrained both read."""
        return {"architectures": ["LlamaForCausalLM"], **LLAMA, "hidden_size": self.dim,
                "intermediate_size": self.hidden_dim, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
                "vocab_size": self.vocab_size, "max_position_embeddings": self.max_seq_len,
                "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta, "rope_scaling": None, "bos_token_id": 1,
                "eos_token_id": 2, "torch_dtype": str(dtype).removeprefix("torch.")}


LLAMA = {"model_type": "llama", "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
         "tie_word_embeddings": False}  # what config.json must say of a LLaMA-2 (from_hf_config checks it)
_7B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008)
_13B = dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, hidden_dim=13824)
PRESETS = {
    "llama2-7b": dict(_7B, vocab_size=32000),
    "llama2-13b": dict(_13B, vocab_size=32000),
    "llama2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, hidden_dim=28672, vocab_size=32000),
    "orca2-7b": dict(_7B, vocab_size=32003),   # LLaMA-2's 32000 + [PAD], <|im_start|>, <|im_end|>
    "orca2-13b": dict(_13B, vocab_size=32003),
    # CPU-sized, same tokenizer and vocabulary as Orca 2 so the real data and template work unchanged.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=352, vocab_size=32003, max_seq_len=1024),
}

# ---- modules ----


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()  # normalise in fp32 and cast back before the gain, as the reference does (matters in bf16)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape (B, T, hd) for the rotate-half convention; computed in fp32 from the positions."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Rotate-half: pairs are (i, i + hd/2), which is how the released checkpoints' q/k weights are laid out.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos[:, None] + torch.cat([-x2, x1], dim=-1) * sin[:, None]  # cat: (B, nh, T, hd)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Grouped-query attention: KV head j serves query heads j*n_rep ... j*n_rep + n_rep - 1."""
    B, nkv, T, hd = x.shape
    return x[:, :, None].expand(B, nkv, n_rep, T, hd).reshape(B, nkv * n_rep, T, hd)  # (B, nh, T, hd)


class DocLayout:
    """Where the documents of a packed batch lie; computed once per forward and shared by every layer."""

    def __init__(self, position_ids: torch.Tensor):
        B, T = position_ids.shape
        pos = position_ids.reshape(-1)  # (B*T,)
        is_start = pos == 0
        is_start[:: T] = True  # every row starts a document
        starts = is_start.nonzero().squeeze(1)
        lengths = torch.diff(starts, append=torch.tensor([B * T], device=pos.device))
        # Within a document the positions must count 0, 1, 2, ...: anything else is a broken packing.
        expected = torch.arange(B * T, device=pos.device) - torch.repeat_interleave(starts, lengths)
        if not torch.equal(pos, expected):
            bad = (pos != expected).nonzero()[0].item()
            raise ValueError(f"position_ids must restart at 0 for each document and count up by 1 within it; "
                             f"row {bad // T}, column {bad % T} has {pos[bad].item()}, expected {expected[bad].item()}")
        self.lengths = lengths.tolist()  # document lengths in token order; groups: their indices, by length
        self.groups = [[i for i, n in enumerate(self.lengths) if n == L] for L in dict.fromkeys(self.lengths)]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, layout: DocLayout | None = None, mask: torch.Tensor | None = None,
                cache: "KVCache | None" = None, cache_pos: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(cache_pos, k, v)  # (B, nkv, S, hd): everything written so far
        k, v = (repeat_kv(t, self.n_heads // self.n_kv_heads) for t in (k, v))  # (B, nh, S, hd)
        if layout is not None:
            y = packed_attention(q, k, v, layout)
        else:  # the given mask (generation, the dense reference), else causal over the whole row
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


def packed_attention(q, k, v, layout: DocLayout) -> torch.Tensor:
    """Causal attention inside each document only; documents of equal length L share one SDPA call on (N, L). Cut with
    split/stack/unbind/cat, whose backward is as cheap as the forward (slicing writes a full gradient per document)."""
    B, nh, T, hd = q.shape
    q, k, v = (t.transpose(1, 2).reshape(B * T, nh, hd).split(layout.lengths) for t in (q, k, v))  # (L_i, nh, hd) each
    out = {}  # document index -> its output (L_i, nh, hd)
    for docs in layout.groups:
        qi, ki, vi = (torch.stack([t[i] for i in docs]).transpose(1, 2) for t in (q, k, v))  # (N, nh, L, hd)
        yi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True).transpose(1, 2)  # (N, L, nh, hd)
        out.update(zip(docs, yi.unbind(0)))
    y = torch.cat([out[i] for i in range(len(out))]) if len(out) > 1 else out[0]  # (B*T, nh, hd)
    return y.view(B, T, nh, hd).transpose(1, 2)  # (B, nh, T, hd)


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = FeedForward(args)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.checkpoint = False  # activation checkpointing as a flag, not a wrapper: parameter names never change

    def _forward(self, x, cos, sin, layout=None, mask=None, cache=None, cache_pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, layout, mask, cache, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, cos, sin, layout=None, mask=None, cache=None, cache_pos=0):
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._forward, x, cos, sin, layout, mask, use_reentrant=False)
        return self._forward(x, cos, sin, layout, mask, cache, cache_pos)


class KVCache:
    """Static key/value cache of one layer (batch x longest prompt + new tokens), made in the keys' dtype."""

    def __init__(self, B: int, n_kv_heads: int, S: int, head_dim: int, device):
        self.shape, self.device, self.k, self.v = (B, n_kv_heads, S, head_dim), device, None, None  # (B, nkv, S, hd)

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor):
        if self.k is None:
            self.k = torch.zeros(self.shape, device=self.device, dtype=k.dtype)
            self.v = torch.zeros_like(self.k)
        end = pos + k.shape[2]
        self.k[:, :, pos:end], self.v[:, :, pos:end] = k, v
        return self.k[:, :, :end], self.v[:, :, :end]


# ---- the transformer ----


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(dict(embed_tokens=nn.Embedding(args.vocab_size, args.dim),
                                        layers=nn.ModuleList(Block(args) for _ in range(args.n_layers)),
                                        norm=RMSNorm(args.dim, args.norm_eps)))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.attn_impl = "packed"  # per-document attention on packed rows; "dense": the block-diagonal mask reference

    @torch.no_grad()
    def init_weights(self, seed: int = 0, std: float = 0.02):
        """Random init for training from scratch (kept out of __init__ so meta-device construction stays free)."""
        for p, (_, t) in zip(self.parameters(), init_tensors(self, seed, std)):
            p.copy_(t)

    @classmethod
    def read_checked(cls, path: str | Path) -> tuple[dict, "Transformer", Iterator[tuple[str, torch.Tensor]]]:
        """config.json, the model it describes (on the meta device), and the checkpoint's tensors checked against it."""
        config, tensors = read_checkpoint(path)
        with torch.device("meta"):
            model = cls(ModelArgs.from_hf_config(config, f"{path}/config.json"))
        left = model.state_dict()  # names and shapes, without memory; what is left at the end is missing

        def checked():
            for name, t, file in tensors:
                check_tensor(name, t, left, file)
                del left[name]
                yield name, t
            if left:
                raise UserError(f"{path}: {len(left)} parameters missing from the checkpoint, e.g. {list(left)[:3]}")
        return config, model, checked()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> "Transformer":
        """Load an HF LLaMA folder or llama2.c .bin strictly: every parameter, right shapes, nothing else. Tensors go
        one by one into `dtype` (float32 unless given, never config.json's) on `device` (cpu): peak = model + shard."""
        config, model, tensors = cls.read_checked(path)
        dtype, device = dtype or torch.float32, torch.device(device or "cpu")
        stored = config.get("torch_dtype", config.get("dtype"))  # older and newer spellings of the same key
        if stored not in (None, str(dtype).removeprefix("torch.")):
            print(f"from_pretrained: {Path(path).name} is stored as {stored}; loading as {dtype} as asked")
        if config.get("pad_token_id") is not None:  # Orca-2-13b says 0 while its tokenizer pads with [PAD] = 32000
            print(f"from_pretrained: config.json's pad_token_id={config['pad_token_id']} is unused: the tokenizer pads")
        state = {name: t.to(device=device, dtype=dtype, copy=True) for name, t in tensors}
        model.load_state_dict(state, strict=True, assign=True)
        return model

    def save_pretrained(self, path: str | Path, max_shard_size: int | str = "5GB", dtype: torch.dtype | None = None):
        """Write config.json and safetensors (sharded with an index when larger than max_shard_size)."""
        sd = self.state_dict()
        dtype = dtype or self.lm_head.weight.dtype
        write_safetensors(((k, v.to(dtype)) for k, v in sd.items()), Path(path), max_shard_size, total=len(sd))
        (Path(path) / "config.json").write_text(json.dumps(self.args.to_hf_config(dtype), indent=2))

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                caches: list[KVCache] | None = None, cache_pos: int = 0):
        """Logits (B, T, V); with position_ids, each row packs documents that start where pos == 0. logits_at, a
        (B, T) bool, keeps only those logits, (N, V): training needs only the teacher's tokens; lm_head costs most."""
        if caches is None:
            self.check_inputs(input_ids, position_ids)
        B, T = input_ids.shape
        layout = None
        if position_ids is None:
            position_ids = torch.arange(T, device=input_ids.device).expand(B, T)
        elif mask is None and self.attn_impl == "packed":
            layout = DocLayout(position_ids)
        elif mask is None:  # attn_impl "dense"
            mask = block_diagonal_mask(position_ids)
        h = self.model.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = rope_cos_sin(position_ids, self.args.head_dim, self.args.rope_theta, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, layout, mask, caches[i] if caches else None, cache_pos)
        if logits_at is not None:
            h = h[logits_at]  # (N, C)
        return self.lm_head(self.model.norm(h))  # (B, T, V), or (N, V) with logits_at

    def check_inputs(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None):
        """ValueError for ids or positions this model cannot take."""
        shape = tuple(input_ids.shape)
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.long, torch.int):
            raise ValueError(f"input_ids must be a (batch, seq) integer tensor, got {input_ids.dtype} of shape {shape}")
        if position_ids is not None and position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids has shape {tuple(position_ids.shape)} but input_ids has {shape}")
        # A packed row may be longer than the context: positions restart, and each document must fit it.
        longest = shape[1] if position_ids is None else int(position_ids.max()) + 1
        if longest > self.args.max_seq_len:
            raise ValueError(f"a sequence of {longest} tokens exceeds the model's context of {self.args.max_seq_len}")
        lo, hi = input_ids.min().item(), input_ids.max().item()
        if lo < 0 or hi >= self.args.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.args.vocab_size}); found {lo if lo < 0 else hi} "
                             "(does the tokenizer match the model's vocabulary?)")

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, stop_ids: tuple[int, ...],
                 temperature: float = 0.0, top_p: float = 1.0, pad_id: int = 0, use_cache: bool = True,
                 generator: torch.Generator | None = None, on_token: Callable[[list[int | None]], None] | None = None,
                 sync_ranks: bool = False) -> list[list[int]]:
        """Batched generation: the new tokens of each prompt, without its stop token. Left-padded prompts decode in
        lockstep into one static KV cache; pads are masked and positions start at 0 at each prompt, so greedy output
        does not depend on the batch. A row stops at a stop id, max_new_tokens or the context. on_token(tokens) streams
        each step (None: row finished); sync_ranks: under FSDP, every rank takes rank 0's tokens."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs a non-empty list of non-empty prompts (token-id lists)")
        V, ctx = self.args.vocab_size, self.args.max_seq_len
        for i, p in enumerate(prompts):
            if min(p) < 0 or max(p) >= V:
                raise ValueError(f"prompt {i} has token ids outside [0, {V})")
            if len(p) >= ctx:
                raise ValueError(f"prompt {i} has {len(p)} tokens; the model's context is {ctx}")
        device = self.lm_head.weight.device
        B, P = len(prompts), max(len(p) for p in prompts)
        S = min(P + max_new_tokens, ctx)
        tokens = torch.tensor([[pad_id] * (P - len(p)) + p + [pad_id] * (S - P) for p in prompts], device=device)
        pad = torch.tensor([P - len(p) for p in prompts], device=device)[:, None]  # (B, 1) left padding per row
        col = torch.arange(S, device=device)
        # The left padding is a document of its own: each prompt's positions start at 0, and it never sees a pad.
        positions = torch.where(col >= pad, col - pad, col)  # (B, S)
        full_mask = block_diagonal_mask(positions)  # (B, 1, S, S)
        caches = [KVCache(B, self.args.n_kv_heads, S, self.args.head_dim, device) for _ in self.model.layers] \
            if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stops = torch.tensor(stop_ids, dtype=torch.long, device=device)
        last = (col == S - 1).expand(B, S)  # logits_at: the last position of whatever slice is fed
        for t in range(P, S):
            # With the cache: the prompt once, then one token per step; without (the baseline): the whole prefix.
            lo = t - 1 if use_cache and t > P else 0
            logits = self(tokens[:, lo:t], positions[:, lo:t], last[:, lo - t:], full_mask[:, :, lo:t, :t], caches, lo)
            nxt = sample(logits.float(), temperature, top_p, generator)  # (B,)
            if sync_ranks:
                torch.distributed.broadcast(nxt, src=0)
            tokens[:, t] = torch.where(done, pad_id, nxt)
            stop_now = torch.isin(nxt, stops) & ~done
            if on_token is not None:  # streaming: the one place that reads every step's tokens
                on_token([None if d or s else x for x, d, s in zip(nxt.tolist(), done.tolist(), stop_now.tolist())])
            done |= stop_now
            if done.all():  # the one scalar read per step: new tokens stay on the device
                break
        rows = tokens[:, P:].tolist()  # the one copy to the host
        return [list(takewhile(lambda x: x not in stop_ids, row)) for row in rows]  # each cut at its first stop id


def init_tensors(model: nn.Module, seed: int = 0, std: float = 0.02) -> Iterator[tuple[str, torch.Tensor]]:
    """Full initial tensors in parameter order, drawn on the CPU so every device and sharding gets the same values."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        yield name, torch.ones(p.shape) if name.endswith("norm.weight") else torch.randn(p.shape, generator=g) * std


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Greedy at temperature 0, else nucleus sampling from the (B, V) logits."""
    if temperature <= 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def block_diagonal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """The reference (B, 1, T, T) mask: causal and within one document. Memory grows with T^2."""
    doc = (position_ids == 0).cumsum(dim=1)  # (B, T) document number of each token, compared only within a row
    T = position_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]  # (B, 1, T, T)


# ---- commands: convert (any checkpoint folder to safetensors of another dtype) and the demo ----


@dataclass
class ConvertConfig:
    src: str = ""                  # checkpoint folder to read (.bin or safetensors, any dtype)
    dst: str = ""                  # new folder to write: safetensors, config.json, tokenizer files
    dtype: str = "bfloat16"        # target dtype: bfloat16, float16 or float32
    max_shard_size: str = "5GB"    # largest safetensors shard (decimal units: 500MB, 5GB)


def convert(cfg: ConvertConfig) -> None:
    """Stream a checkpoint into safetensors of cfg.dtype, holding one source and one destination shard at a time;
    config.json (its dtype updated), generation_config.json and the tokenizer files are copied."""
    src, dst = Path(cfg.src), Path(cfg.dst)
    if src.resolve() == dst.resolve():
        raise UserError("convert writes a new folder; SRC and DST must differ")
    target = getattr(torch, cfg.dtype, None)
    if not isinstance(target, torch.dtype) or not target.is_floating_point:
        raise UserError(f"--dtype must be a floating-point torch dtype (bfloat16, float16, float32); got {cfg.dtype!r}")
    config, model, tensors = Transformer.read_checked(src)
    n = len(model.state_dict())
    write_safetensors(((name, t.to(target)) for name, t in tensors), dst, cfg.max_shard_size, total=n)
    key = "dtype" if "dtype" in config else "torch_dtype"  # keep the spelling the source used
    (dst / "config.json").write_text(json.dumps(dict(config, **{key: cfg.dtype}), indent=2))
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy2(src / f, dst / f)
    print(f"converted {src} -> {dst} ({n} tensors, {cfg.dtype})")


def demo() -> None:
    args = ModelArgs.from_name("tiny")
    model = Transformer(args)
    model.init_weights(seed=0)
    print(f"tiny preset: {sum(p.numel() for p in model.parameters()):,} parameters, {args}")
    x = torch.randint(0, args.vocab_size, (2, 65), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    print(f"initial loss {loss.item():.3f} vs ln(vocab) = {math.log(args.vocab_size):.3f}")
    # Two documents packed in one row see nothing of each other: the packed forward equals separate forwards.
    packed = model(x[:1, :64], torch.cat([torch.arange(40), torch.arange(24)])[None])
    alone = torch.cat([model(x[:1, :40]), model(x[:1, 40:64])], dim=1)
    print(f"packed vs separate documents, max |diff| of logits: {(packed - alone).abs().max().item():.2e}")
    out = model.generate([[1, 100, 200, 300], [1, 5, 6]], 12, stop_ids=(2,))
    print(f"greedy continuations (random weights): {out}")


if __name__ == "__main__":
    import sys

    import cli
    if sys.argv[1:2] == ["convert"]:
        cli.run(convert, ConvertConfig, convert.__doc__, sys.argv[2:], positional=("src", "dst"))
    else:
        cli.demo_args(__doc__)  # the demo takes no options
        demo()
