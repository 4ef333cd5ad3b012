"""Weight files: the one home of checkpoint-folder I/O (model loading, the trainer's export, `convert`).

    python model.py convert Orca-2-13b Orca-2-13b-bf16 --dtype=bfloat16 --max_shard_size=5GB   # uses this module

Reads Hugging Face LLaMA folders as published (config.json; model.safetensors or sharded safetensors with an index;
the release's fp32 pytorch_model-*.bin shards, unpickled safely with weights_only and mmap) and llama2.c's
version-0 .bin checkpoints (converted to the same names and layout); writes sharded safetensors with an index.
Tensors stream one at a time, so nothing here holds a whole large model. It knows nothing of the network itself:
model.py checks names and shapes against the model it builds.
"""

import json
import math
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import torch

from cli import UserError

TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "generation_config.json")
# Old conversions stored the RoPE frequencies as a buffer; model.py recomputes them from rope_theta instead.
IGNORED_TENSOR = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def checkpoint_files(path: Path) -> tuple[str, list[Path], dict[str, str] | None]:
    """(format, shard files, index weight_map or None) of a checkpoint folder. safetensors wins over .bin."""
    for fmt, index, single in (("safetensors", "model.safetensors.index.json", "model.safetensors"),
                               ("bin", "pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text())["weight_map"]
            files = [path / f for f in dict.fromkeys(weight_map.values())]  # unique, in index order
            for f in files:
                if not f.is_file():
                    raise UserError(f"{path / index} names the shard {f.name}, which is not in {path}")
            return fmt, files, weight_map
        if (path / single).is_file():
            return fmt, [path / single], None
    raise UserError(f"{path} holds no weights: expected model.safetensors, model.safetensors.index.json, "
                    "pytorch_model.bin or pytorch_model.bin.index.json")


def read_shard(file: Path, fmt: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the tensors of one shard; the shard is released when the generator finishes."""
    if fmt == "safetensors":
        from safetensors import SafetensorError, safe_open
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
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
    del sd


def iter_folder(path: Path) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Every tensor of a checkpoint folder with the shard it came from, checking the index as it goes."""
    fmt, files, weight_map = checkpoint_files(path)
    seen: dict[str, str] = {}
    ignored = 0
    for file in files:
        for name, t in read_shard(file, fmt):
            if name in seen:
                raise UserError(f"tensor {name!r} is stored twice: in {seen[name]} and in {file.name}")
            if weight_map is not None and weight_map.get(name) != file.name:
                raise UserError(f"{file}: holds {name!r}, but the index maps it to {weight_map.get(name)!r}")
            seen[name] = file.name
            if IGNORED_TENSOR.fullmatch(name):
                ignored += 1
                continue
            yield name, t, file
    if ignored:
        print(f"{path.name}: skipped {ignored} stored rotary_emb.inv_freq buffers (recomputed from rope_theta)")
    if weight_map is not None and set(weight_map) - set(seen):
        missing = sorted(set(weight_map) - set(seen))
        raise UserError(f"{path}: the index lists {len(missing)} tensors that no shard holds, e.g. {missing[:3]}")


def read_llama2c(file: Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor, Path]]]:
    """A llama2.c checkpoint (7-int header, float32 tensors in its fixed order) as an HF config and HF tensors.

    llama2.c rotates interleaved pairs (x0, x1), (x2, x3), ... while the HF layout rotates halves (x_i, x_{i+hd/2}),
    so the rows of wq and wk are permuted per head; a shared classifier (positive vocab in the header) is copied."""
    raw = file.read_bytes()
    if len(raw) < 28:
        raise UserError(f"{file}: {len(raw)} bytes, too short for a llama2.c checkpoint; pass one, or a model folder")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = header = struct.unpack("7i", raw[:28])
    shared, vocab = vocab > 0, abs(vocab)
    # Any file has a "header": check it describes this file before any tensor is cut out of it.
    hd = dim // n_heads if n_heads > 0 else 0
    per_layer = 2 * dim + 2 * dim * dim + 2 * n_kv * hd * dim + 3 * hidden * dim
    floats = vocab * dim * (1 if shared else 2) + n_layers * per_layer + dim + seq_len * hd
    if min(header[:5] + (vocab, seq_len)) < 1 or dim % n_heads or hd % 2 or 4 * floats != len(raw) - 28:
        raise UserError(f"{file}: not a llama2.c version-0 checkpoint (header {header} does not match its "
                        f"{len(raw):,} bytes); pass a llama2.c .bin file or a model folder")
    flat = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
    offset = 0

    def take(*shape: int) -> torch.Tensor:
        nonlocal offset
        t = flat[offset:offset + math.prod(shape)].view(*shape)
        offset += t.numel()
        return t

    def halves(w: torch.Tensor, heads: int) -> torch.Tensor:
        return w.view(heads, hd // 2, 2, dim).transpose(1, 2).reshape(heads * hd, dim)  # (heads*hd, dim)

    emb, attn_norm = take(vocab, dim), take(n_layers, dim)
    wq, wk = take(n_layers, dim, dim), take(n_layers, n_kv * hd, dim)
    wv, wo = take(n_layers, n_kv * hd, dim), take(n_layers, dim, dim)
    ffn_norm = take(n_layers, dim)
    w1, w2, w3 = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    final_norm = take(dim)
    take(2, seq_len, hd // 2)  # llama2.c's precomputed RoPE tables (cos, sin): model.py computes its own
    sd = {"model.embed_tokens.weight": emb, "model.norm.weight": final_norm,
          "lm_head.weight": emb if shared else take(vocab, dim)}
    assert offset == flat.numel(), f"{file}: {flat.numel() - offset} floats left over after the header's tensors"
    for i in range(n_layers):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": attn_norm[i], p + "post_attention_layernorm.weight": ffn_norm[i],
               p + "self_attn.q_proj.weight": halves(wq[i], n_heads),
               p + "self_attn.k_proj.weight": halves(wk[i], n_kv),
               p + "self_attn.v_proj.weight": wv[i], p + "self_attn.o_proj.weight": wo[i],
               p + "mlp.gate_proj.weight": w1[i], p + "mlp.down_proj.weight": w2[i], p + "mlp.up_proj.weight": w3[i]}
    config = {"hidden_size": dim, "intermediate_size": hidden, "num_hidden_layers": n_layers,
              "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "vocab_size": vocab,
              "max_position_embeddings": seq_len, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    return config, ((name, t.clone(), file) for name, t in sd.items())


def read_checkpoint(path: str | Path) -> tuple[dict, Iterator[tuple[str, torch.Tensor, Path]]]:
    """(config.json as a dict, every tensor with its file) of an HF folder or a llama2.c .bin file."""
    path = Path(path)
    if path.is_file():
        return read_llama2c(path)
    if not (path / "config.json").is_file():
        raise UserError(f"{path} is not a checkpoint folder: it has no config.json (expected config.json with "
                        "model.safetensors, sharded safetensors plus index, or pytorch_model*.bin)")
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise UserError(f"{path / 'config.json'}: not valid JSON ({e})") from None
    return config, iter_folder(path)


def check_tensor(name: str, t: torch.Tensor, expected: dict[str, torch.Tensor], file: Path) -> None:
    if name not in expected:
        raise UserError(f"{file}: unexpected tensor {name!r}: not a parameter of this LLaMA model")
    if t.shape != expected[name].shape:
        raise UserError(f"{file}: {name} has shape {tuple(t.shape)}, config.json implies {tuple(expected[name].shape)}")
    if not t.is_floating_point():
        raise UserError(f"{file}: {name} is {t.dtype}; a weight must be a floating-point tensor")


def parse_size(size: int | str) -> int:
    """'5GB' -> 5 * 10**9 bytes (decimal units, as the Hugging Face tools count); ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*", size.upper())
    if not m:
        raise UserError(f"cannot read the size {size!r}; write it like 500MB or 5GB")
    return int(float(m[1]) * 10 ** {"B": 0, "KB": 3, "MB": 6, "GB": 9, "TB": 12}[m[2] or "B"])


def write_safetensors(tensors: Iterator[tuple[str, torch.Tensor]], path: Path, max_shard_size: int | str = "5GB",
                      total: int | None = None) -> list[str]:
    """Stream named tensors into safetensors shards of at most max_shard_size, with an index when sharded.

    Only the shard being filled is held in memory. Old weight files in `path` are removed first, so a folder
    never mixes two saves. Returns the shard file names."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("model*.safetensors"), *path.glob("pytorch_model*.bin"), *path.glob("*.index.json")]:
        old.unlink()
    limit, shard, shard_bytes, names, weight_map, total_bytes = parse_size(max_shard_size), {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        name = f"part-{len(names):05d}.safetensors.tmp"
        save_file(shard, str(path / name), metadata={"format": "pt"})
        names.append(name)
        for k in shard:
            weight_map[k] = name
        shard, shard_bytes = {}, 0

    for name, t in tqdm(tensors, total=total, desc=f"writing {path.name}", unit="tensor", leave=False):
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > limit:
            flush()
        shard[name] = t.detach().to("cpu").contiguous()
        shard_bytes += nbytes
        total_bytes += nbytes
    if shard or not names:
        flush()
    n = len(names)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, f in zip(names, final):
        (path / tmp).rename(path / f)
    if n > 1:
        rename = dict(zip(names, final))
        index = {"metadata": {"total_size": total_bytes}, "weight_map": {k: rename[v] for k, v in weight_map.items()}}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return final
