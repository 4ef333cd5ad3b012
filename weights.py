"""Weight files, one tensor at a time: HF folders (safetensors, .bin unpickled safely) and llama2.c in; safetensors out.

    python model.py convert Orca-2-13b Orca-2-13b-bf16 --dtype=bfloat16 --max_shard_size=5GB   # uses this module
"""

import io
import json
import math
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from cli import UserError, read_json

WEIGHT_FILES = "model.safetensors.index.json model.safetensors pytorch_model.bin.index.json pytorch_model.bin".split()
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json")


def read_shard(file: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of one shard; the shard is released when the generator finishes."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(file), framework="pt") as f:
                yield from ((name, f.get_tensor(name)) for name in f.keys())
        except SafetensorError as e:
            raise UserError(f"{file}: not a readable safetensors file ({e}); is it truncated?") from None
        return
    import pickle
    try:  # weights_only: the unpickler builds tensors and plain containers only, and runs no code
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{file}: refused to unpickle: it holds objects other than tensors, and loading it "
                        f"could run code. Nothing in it was executed. ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{file}: cannot read this PyTorch file ({str(e).splitlines()[0]}); is it truncated?") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UserError(f"{file}: expected a plain dict of name -> tensor, found {type(sd).__name__}")
    yield from sd.items()


def iter_folder(path: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Every tensor of a checkpoint folder with the shard it came from, checking the index as it goes."""
    found = next((path / f for f in WEIGHT_FILES if (path / f).is_file()), None)  # safetensors before .bin
    if found is None:
        raise UserError(f"{path} holds no weights: expected one of {', '.join(WEIGHT_FILES)}")
    weight_map = read_json(found)["weight_map"] if found.suffix == ".json" else None
    files = [found] if weight_map is None else [path / f for f in dict.fromkeys(weight_map.values())]  # unique
    for f in files:
        if not f.is_file():
            raise UserError(f"{found} names the shard {f.name}, which is not in {path}")
    seen: dict[str, str] = {}
    for file in files:
        for name, t in read_shard(file):
            if name in seen:
                raise UserError(f"tensor {name!r} is stored twice: in {seen[name]} and in {file.name}")
            if weight_map is not None and weight_map.get(name) != file.name:
                raise UserError(f"{file}: holds {name!r}, but the index maps it to {weight_map.get(name)!r}")
            seen[name] = file.name
            if not name.endswith(".rotary_emb.inv_freq"):  # old conversions stored it; RoPE is recomputed
                yield name, t, file
    ignored = sum(name.endswith(".rotary_emb.inv_freq") for name in seen)
    if ignored:
        print(f"{path.name}: skipped {ignored} stored rotary_emb.inv_freq buffers (recomputed from rope_theta)")
    missing = sorted(set(weight_map or {}) - set(seen))
    if missing:
        raise UserError(f"{path}: the index lists {len(missing)} tensors that no shard holds, e.g. {missing[:3]}")


def read_llama2c(file: Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor, Path]]]:
    """A llama2.c checkpoint (7-int header, float32 tensors in its fixed order) as an HF config and HF tensors."""
    raw = file.read_bytes()
    # Any file has a "header" (zeros when too short): check it describes this file before any tensor is cut out of it.
    dim, hidden, L, n_heads, n_kv, vocab, seq_len = header = struct.unpack("7i", raw[:28].ljust(28, b"\0"))
    shared, vocab = vocab > 0, abs(vocab)
    hd = dim // n_heads if n_heads > 0 else 0
    per_layer = 2 * dim + 2 * dim * dim + 2 * n_kv * hd * dim + 3 * hidden * dim
    floats = vocab * dim * (1 if shared else 2) + L * per_layer + dim + seq_len * hd
    if min(header[:5] + (vocab, seq_len)) < 1 or dim % n_heads or hd % 2 or 4 * floats != len(raw) - 28:
        raise UserError(f"{file}: not a llama2.c version-0 checkpoint (header {header} does not match its "
                        f"{len(raw):,} bytes); pass a llama2.c .bin file or a model folder")
    stream = io.BytesIO(raw[28:])

    def take(*shape: int) -> torch.Tensor:  # the next tensor of the file
        return torch.frombuffer(bytearray(stream.read(4 * math.prod(shape))), dtype=torch.float32).view(*shape)

    def halves(w: torch.Tensor, heads: int) -> torch.Tensor:
        # llama2.c rotates interleaved pairs (x0, x1), ...; the HF layout rotates halves (x_i, x_{i+hd/2}).
        return w.view(L, heads, hd // 2, 2, dim).transpose(2, 3).reshape(L, heads * hd, dim)  # (L, heads*hd, dim)

    emb = take(vocab, dim)
    # llama2.c stores each weight for all layers at once, in this order (a dict literal is evaluated in order).
    layer = {"input_layernorm": take(L, dim), "self_attn.q_proj": halves(take(L, dim, dim), n_heads),
             "self_attn.k_proj": halves(take(L, n_kv * hd, dim), n_kv), "self_attn.v_proj": take(L, n_kv * hd, dim),
             "self_attn.o_proj": take(L, dim, dim), "post_attention_layernorm": take(L, dim),
             "mlp.gate_proj": take(L, hidden, dim), "mlp.down_proj": take(L, dim, hidden),
             "mlp.up_proj": take(L, hidden, dim)}
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": take(dim)}
    take(2, seq_len, hd // 2)  # llama2.c's precomputed RoPE tables (cos, sin): model.py computes its own
    sd["lm_head.weight"] = emb if shared else take(vocab, dim)  # a positive vocab in the header: shared classifier
    sd |= {f"model.layers.{i}.{name}.weight": w[i] for i in range(L) for name, w in layer.items()}
    config = {"hidden_size": dim, "intermediate_size": hidden, "num_hidden_layers": L,
              "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "vocab_size": vocab,
              "max_position_embeddings": seq_len, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    return config, ((name, t.clone(), file) for name, t in sd.items())


def read_checkpoint(path: str | Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor, Path]]]:
    """(config.json as a dict, every tensor with its file) of an HF folder or a llama2.c .bin file."""
    path = Path(path)
    if path.is_file():
        return read_llama2c(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: no config.json there; pass a Hugging Face model folder or a llama2.c .bin file")
    return read_json(path / "config.json"), iter_folder(path)


def check_tensor(name: str, t: torch.Tensor, expected: dict[str, torch.Tensor], file: Path) -> None:
    """UserError naming the file unless t is a floating-point parameter of `expected` with its shape."""
    if name not in expected:
        raise UserError(f"{file}: unexpected tensor {name!r}: not a parameter of this LLaMA model")
    if t.shape != expected[name].shape:
        raise UserError(f"{file}: {name} has shape {tuple(t.shape)}, config.json implies {tuple(expected[name].shape)}")
    if not t.is_floating_point():
        raise UserError(f"{file}: {name} is {t.dtype}; a weight must be a floating-point tensor")


def write_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], path: Path, max_shard_size: int | str = "5GB",
                      total: int | None = None) -> None:
    """Stream named tensors into safetensors shards of at most max_shard_size (indexed when sharded), holding one."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    # "5GB" is 5 * 10**9 bytes (decimal units, as the Hugging Face tools count); an int is a number of bytes.
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*", str(max_shard_size).upper())
    if not m:
        raise UserError(f"cannot read the size {max_shard_size!r}; write it like 500MB or 5GB")
    limit = int(float(m[1]) * 10 ** {"B": 0, "KB": 3, "MB": 6, "GB": 9, "TB": 12}[m[2] or "B"])
    path.mkdir(parents=True, exist_ok=True)  # old weight files go first, so a folder never mixes two saves
    for old in [*path.glob("model*.safetensors"), *path.glob("pytorch_model*.bin"), *path.glob("*.index.json")]:
        old.unlink()
    shards: list[list[str]] = []  # the tensor names of each shard written so far
    shard, total_bytes = {}, 0

    def flush():  # a temporary name until the number of shards, part of the final names, is known
        save_file(shard, str(path / f"part-{len(shards):05d}.safetensors.tmp"), metadata={"format": "pt"})
        shards.append(list(shard))
        shard.clear()

    for name, t in tqdm(tensors, total=total, desc=f"writing {path.name}", unit="tensor", leave=False):
        if shard and sum(v.nbytes for v in shard.values()) + t.nbytes > limit:
            flush()
        shard[name] = t.detach().to("cpu").contiguous()
        total_bytes += t.nbytes
    if shard or not shards:
        flush()
    n = len(shards)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for i, f in enumerate(final):
        (path / f"part-{i:05d}.safetensors.tmp").chmod(0o644)  # safetensors writes 0600: others could not read it
        (path / f"part-{i:05d}.safetensors.tmp").rename(path / f)
    if n > 1:
        weight_map = {name: f for f, names in zip(final, shards) for name in names}
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
