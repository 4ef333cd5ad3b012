"""model.py against the reference implementation's golden fixtures, plus packing, generation and bad input."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import FIXTURES
from model import ModelArgs, Transformer

REF = json.loads((FIXTURES / "reference.json").read_text())
REF_TENSORS = load_file(str(FIXTURES / "reference_logits.safetensors"))


# ---- parity with the reference implementation ----


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa"])  # single-file MHA; sharded GQA with rope_theta 5e5
def test_logits_match_reference(name):
    ref = REF["models"][name]
    model = Transformer.from_pretrained(FIXTURES / ref["dir"])
    with torch.no_grad():
        logits = model(REF_TENSORS[ref["input_ids_key"]])
    torch.testing.assert_close(logits, REF_TENSORS[ref["logits_key"]], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama-mha", "llama-gqa"])
def test_greedy_matches_reference_alone_and_batched(name):
    ref = REF["models"][name]
    model = Transformer.from_pretrained(FIXTURES / ref["dir"])
    prompts = [g["prompt"] for g in ref["greedy"]]
    expected = [g["new_tokens"] for g in ref["greedy"]]
    # The reference ran with EOS stopping off (one gqa continuation passes through id 2), so no stop ids here.
    alone = [model.generate([p], max_new_tokens=20, stop_ids=())[0] for p in prompts]
    assert alone == expected
    batched = model.generate(prompts, max_new_tokens=20, stop_ids=())  # prompts of lengths 5, 11, 17
    assert batched == expected
    assert model.generate(prompts, max_new_tokens=20, stop_ids=(), use_cache=False) == expected


def test_old_style_release_config_loads_same_logits(tmp_path):
    # The Orca 2 release's config.json: top-level rope_theta, rope_scaling null, torch_dtype, pretraining_tp.
    shutil.copytree(FIXTURES / "llama-mha", tmp_path / "m")
    shutil.copy(FIXTURES / "orca2-release-config.json", tmp_path / "m" / "config.json")
    model = Transformer.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        logits = model(REF_TENSORS["llama-mha.input_ids"])
    torch.testing.assert_close(logits, REF_TENSORS["llama-mha.logits"], atol=1e-4, rtol=0)


def test_save_pretrained_round_trip_sharded_and_single(tmp_path):
    src = Transformer.from_pretrained(FIXTURES / "llama-gqa")
    for shard in ("200KB", "5GB"):
        out = tmp_path / shard
        src.save_pretrained(out, max_shard_size=shard)
        assert (out / "model.safetensors.index.json").is_file() == (shard == "200KB")
        assert {p.stat().st_mode & 0o777 for p in out.glob("*.safetensors")} == {0o644}  # others can read the weights
        back = Transformer.from_pretrained(out)
        assert back.args == src.args
        for (k, a), (k2, b) in zip(src.state_dict().items(), back.state_dict().items()):
            assert k == k2 and torch.equal(a, b), k
    # saving again into a used folder leaves no stale shard behind
    src.save_pretrained(tmp_path / "200KB", max_shard_size="5GB")
    assert sorted(p.name for p in (tmp_path / "200KB").iterdir()) == ["config.json", "model.safetensors"]


def test_bfloat16_load_is_not_overridden_by_config():
    model = Transformer.from_pretrained(FIXTURES / "llama-mha", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


# ---- packed sequences ----


def tiny_model(seed=0, **overrides) -> Transformer:
    args = ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=300, hidden_dim=96,
                               max_seq_len=256), **overrides})
    model = Transformer(args)
    model.init_weights(seed=seed, std=0.1)
    return model


def test_packed_forward_equals_separate_documents_logits_and_grads():
    model = tiny_model()
    lengths = [7, 19, 1, 30, 7]  # includes a one-token document and two of the same length
    ids = torch.randint(0, 300, (1, sum(lengths)))
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    packed = model(ids, pos)
    packed.square().mean().backward()
    g_packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    pieces = torch.split(ids, lengths, dim=1)
    alone = torch.cat([model(p) for p in pieces], dim=1)
    alone.square().mean().backward()
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(g_packed[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_packed_path_equals_dense_block_diagonal_reference():
    model = tiny_model()
    ids = torch.randint(0, 300, (3, 64))
    pos = torch.stack([torch.cat([torch.arange(n) for n in ls]) for ls in ([64], [10, 54], [20, 20, 20, 4])])
    packed = model(ids, pos)
    model.attn_impl = "dense"
    dense = model(ids, pos)
    torch.testing.assert_close(packed, dense, atol=1e-5, rtol=1e-5)
    keep = torch.rand(3, 64, generator=torch.Generator().manual_seed(1)) < 0.3  # logits at chosen positions only
    torch.testing.assert_close(model(ids, pos, logits_at=keep), dense[keep], atol=1e-5, rtol=1e-5)
    # no leakage: changing document 1 of row 2 leaves the logits of its other documents unchanged
    ids2 = ids.clone()
    ids2[2, 20:40] = (ids2[2, 20:40] + 1) % 300
    model.attn_impl = "packed"
    changed = model(ids2, pos)
    torch.testing.assert_close(changed[2, :20], packed[2, :20])
    torch.testing.assert_close(changed[2, 40:], packed[2, 40:])


def test_activation_checkpointing_keeps_names_and_gradients():
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 32))
    model(ids).sum().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    names = list(model.state_dict())
    for block in model.model.layers:
        block.checkpoint = True
    model(ids).sum().backward()
    assert list(model.state_dict()) == names
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(a, p.grad)


# ---- presets ----


@pytest.mark.parametrize("name, expected", [
    ("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320), ("llama2-70b", 68_976_648_192),
    ("orca2-7b", 6_738_440_192), ("orca2-13b", 13_015_895_040),
])
def test_preset_parameter_counts_on_meta(name, expected):
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_name(name))
    assert sum(p.numel() for p in model.parameters()) == expected
    assert all(p.is_meta for p in model.parameters())


def test_tiny_preset_initial_loss_is_about_ln_vocab():
    args = ModelArgs.from_name("tiny")
    model = Transformer(args)
    model.init_weights(seed=0)
    x = torch.randint(0, args.vocab_size, (2, 33))
    with torch.no_grad():
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    assert abs(loss.item() - math.log(args.vocab_size)) < 0.2


# ---- generation ----


def test_generate_stops_per_row_and_returns_only_new_tokens():
    model = tiny_model()
    prompts = [[1, 5, 9], [1, 7, 7, 7, 8, 2, 4]]
    free = model.generate(prompts, max_new_tokens=10, stop_ids=())
    assert [len(o) for o in free] == [10, 10]
    stop = free[0][3]  # make row 0 stop at its 4th new token; row 1 runs on unless it meets that id
    out = model.generate(prompts, max_new_tokens=10, stop_ids=(stop,))
    assert out[0] == free[0][:3]
    cut = free[1].index(stop) if stop in free[1] else 10
    assert out[1] == free[1][:cut]
    streamed = []
    model.generate(prompts, max_new_tokens=10, stop_ids=(stop,), on_token=streamed.append)
    assert [s[0] for s in streamed if s[0] is not None] == out[0]


def test_sampling_is_reproducible_with_a_generator():
    model = tiny_model()
    a, b = (model.generate([[1, 2, 3]], 12, stop_ids=(), temperature=0.8, top_p=0.9,
                           generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert a == b


# ---- bad input ----


def test_bad_inputs_get_clear_errors(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 300\)"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        model(torch.zeros(1, 257, dtype=torch.long))
    with pytest.raises(ValueError, match="position_ids has shape"):
        model(torch.zeros(1, 8, dtype=torch.long), torch.arange(7)[None])
    with pytest.raises(ValueError, match="restart at 0 for each document"):
        model(torch.zeros(1, 8, dtype=torch.long), torch.tensor([[0, 1, 2, 4, 5, 0, 1, 2]]))
    with pytest.raises(ValueError, match="outside"):
        model.generate([[1, 400]], 3, stop_ids=(2,))
    with pytest.raises(ValueError, match="no config.json"):
        Transformer.from_pretrained(tmp_path)


def broken_copy(tmp_path, name="llama-gqa"):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def test_broken_checkpoints_name_the_file_and_key(tmp_path):
    d = broken_copy(tmp_path / "a")
    (d / "model-00002-of-00004.safetensors").unlink()
    with pytest.raises(ValueError, match="model-00002-of-00004.safetensors"):
        Transformer.from_pretrained(d)

    d = broken_copy(tmp_path / "b")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, intermediate_size=100)))
    shape = (r"model-0000\d-of-00004.safetensors: model.layers.0.mlp.\w+_proj.weight has shape .*172"
             r".*config.json implies .*100")
    with pytest.raises(ValueError, match=shape):
        Transformer.from_pretrained(d)

    d = broken_copy(tmp_path / "c")
    (d / "config.json").write_text(json.dumps(dict(cfg, rope_parameters={"rope_type": "yarn", "factor": 4.0})))
    with pytest.raises(ValueError, match="rope scaling 'yarn' is not implemented"):
        Transformer.from_pretrained(d)

    d = broken_copy(tmp_path / "d")
    shard = d / "model-00004-of-00004.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated download
    with pytest.raises(ValueError, match="model-00004-of-00004.safetensors.*truncated"):
        Transformer.from_pretrained(d)

    d = broken_copy(tmp_path / "e")
    (d / "config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(ValueError, match=r"3[0-9]* parameters are missing|missing from the checkpoint"):
        Transformer.from_pretrained(d)
