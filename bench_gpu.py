"""bench.py's GPU section: the MFU of a LLaMA-2-7B-shaped training step and decode speed against the memory-bandwidth
limit. bench.py runs each case here in a fresh process where CUDA is present; the tests run them on the CPU with a
tiny shape. The training step is train.train_step itself, the decoder model.generate itself.

    python bench.py --only=gpu          # the section, written into out/bench/bench.md
    python bench_gpu.py                 # both cases once: the 7B shape on a GPU, the tiny shape on a CPU

This module never imports bench.py (bench.py imports it).
"""

import dataclasses
import time

import torch

import cli
import train
from bench_data import timed
from model import ModelArgs, Transformer

PEAK_HBM_BYTES_S = {"A100-SXM4-80GB": 2.039e12, "A100-SXM4-40GB": 1.555e12, "A100 80GB PCIe": 1.935e12,
                    "A100-PCIE-40GB": 1.555e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12}


def random_model(args, device: str, dtype: torch.dtype):
    """A model of any size straight on the device (built on meta, filled there): no CPU copy of 7B weights."""
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    model.to_empty(device=device)  # allocated once, in the final dtype
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02)
    return model


def sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def fitting_layers(per_layer_bytes: float, fixed_bytes: float, device: str, want: int) -> int:
    """The most blocks (up to want) whose bytes fit in 60% of the device's memory; all of them off the GPU."""
    if not device.startswith("cuda"):
        return want
    budget = 0.6 * torch.cuda.get_device_properties(device).total_memory - fixed_bytes
    return max(1, min(want, int(budget // per_layer_bytes)))


def gpu_train_case(preset: str, device: str, seq_len: int, micro_batch: int, steps: int) -> dict:
    """train.py's step on one device: fp32 master weights, bf16 autocast, activation checkpointing, packed rows of
    Orca-like documents (teacher tokens = the second half of each), logits at teacher tokens, clipping, fused AdamW.
    LLaMA-2-7B's block shape; as many of its 32 blocks as fit next to AdamW's 16 bytes per parameter."""
    full = dataclasses.replace(ModelArgs.from_name(preset), vocab_size=32003, max_seq_len=seq_len)
    fixed = 16 * 2 * full.vocab_size * full.dim + 8e9  # embedding and output layer, plus room for activations
    layers = fitting_layers(16 * train.block_params(full), fixed, device, full.n_layers)
    args = dataclasses.replace(full, n_layers=layers)
    model = random_model(args, device, torch.float32)
    for block in model.model.layers:
        block.checkpoint = True
    cuda = device.startswith("cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cuda)
    g = torch.Generator().manual_seed(0)
    positions, teacher = [], []
    # documents of 128-1024 tokens fill each row exactly; the second half of each is taught
    for _ in range(micro_batch):
        lengths = []
        while sum(lengths) < seq_len:
            lengths.append(min(int(torch.randint(128, 1025, (), generator=g)), seq_len - sum(lengths)))
        positions.append(torch.cat([torch.arange(n) for n in lengths]))
        teacher.append(torch.cat([torch.arange(n) >= n // 2 for n in lengths]))
    position_ids, supervised = torch.stack(positions).to(device), torch.stack(teacher).to(device)
    input_ids = torch.randint(3, 32000, (micro_batch, seq_len), generator=g).to(device)
    targets = torch.randint(3, 32000, (micro_batch, seq_len), generator=g).to(device)
    # data.py's label contract: -100 everywhere but the teacher's tokens
    batch = dict(input_ids=input_ids, labels=torch.where(supervised, targets, -100), position_ids=position_ids)
    n_tok, n_sup = input_ids.numel(), int(supervised.sum())
    pairs = train.attention_pairs(batch, pad_id=-1)  # no padding
    autocast = torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda)

    def step():  # what train.py does per optimizer step with one micro-batch
        train.train_step(model, batch, torch.device(device), 1 / n_sup, autocast)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernel selection
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t) / steps
    flops = train.step_flops(args, n_tok, n_sup, pairs)
    peak = train.peak_flops(torch.device(device))
    return {"layers": args.n_layers, "step_s": dt, "tok_s": n_tok / dt, "tflops": flops / dt / 1e12,
            "mfu": flops / dt / peak if peak else float("nan"), "matmul_tflops": matmul_tflops(device),
            "mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else float("nan")}


def matmul_tflops(device: str, n: int = 8192) -> float:
    """What this device's bf16 matmuls reach (a yardstick for GPUs missing from train.PEAK_BF16_FLOPS)."""
    n = n if device.startswith("cuda") else 512
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    s = timed(lambda: (a @ b, sync(device)), 5)
    return 2 * n ** 3 / s / 1e12


def copy_bytes_s(device: str) -> float:
    """Measured memory bandwidth: bytes read + written by a large device-to-device copy."""
    x = torch.empty(int(2e9 if device.startswith("cuda") else 1e8) // 2, dtype=torch.bfloat16, device=device)
    y = torch.empty_like(x)
    s = timed(lambda: (y.copy_(x), sync(device)), 5)
    return 2 * x.numel() * x.element_size() / s


def gpu_decode_case(preset: str, device: str, batch: int, prompt_len: int, new_tokens: int) -> dict:
    """Greedy KV-cache decoding of a bf16 LLaMA-2-7B-shaped model (random weights, same speed). Each new token
    reads every weight once (the embedding only one row) plus the cache so far: that many bytes at the device's
    bandwidth is the fastest any decoder can go."""
    full = dataclasses.replace(ModelArgs.from_name(preset), vocab_size=32003)
    layers = fitting_layers(2 * train.block_params(full), 4 * full.vocab_size * full.dim, device, full.n_layers)
    args = dataclasses.replace(full, n_layers=layers)
    model = random_model(args, device, torch.bfloat16).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    with torch.inference_mode():
        run = lambda n: (model.generate(prompts, n, stop_ids=()), sync(device))  # noqa: E731
        t_prefill = timed(lambda: run(1), 2)
        t_all = timed(lambda: run(new_tokens + 1), 2)
    per_token = (t_all - t_prefill) / new_tokens  # decode steps only, prefill subtracted
    weights = sum(p.numel() * p.element_size() for p in model.parameters()) - \
        model.model.embed_tokens.weight.numel() * 2 + args.dim * 2
    kv = 2 * args.n_layers * batch * args.n_kv_heads * args.head_dim * 2 * (prompt_len + new_tokens / 2)
    bw = copy_bytes_s(device)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    nominal = next((v for k, v in PEAK_HBM_BYTES_S.items() if k in name), None)
    return {"layers": args.n_layers, "tok_s": batch / per_token, "bound_tok_s": batch * bw / (weights + kv),
            "frac_measured": (weights + kv) / per_token / bw,
            "frac_nominal": (weights + kv) / per_token / nominal if nominal else float("nan"),
            "copy_gb_s": bw / 1e9, "gb_per_token": (weights + kv) / 1e9}


if __name__ == "__main__":
    cli.demo_args(__doc__)
    on_gpu = torch.cuda.is_available()
    preset, dev = ("llama2-7b", "cuda") if on_gpu else ("tiny", "cpu")
    print("train:", gpu_train_case(preset, dev, seq_len=4096 if on_gpu else 256, micro_batch=2, steps=2))
    print("decode:", gpu_decode_case(preset, dev, batch=1, prompt_len=128 if on_gpu else 16, new_tokens=32))
