"""The Orca 2 release layout: fp32 PyTorch .bin shards with an index, safe unpickling, and the converter."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES, SHARED_DATA
from model import ConvertConfig, Transformer, convert

REF_TENSORS = load_file(str(FIXTURES / "reference_logits.safetensors"))


def release_folder(dst, n_shards=3):
    """A tiny checkpoint laid out like microsoft/Orca-2-7b: .bin shards + index, old config, tokenizer files."""
    dst.mkdir(parents=True)
    sd = load_file(str(FIXTURES / "llama-mha" / "model.safetensors"))
    names = list(sd)
    weight_map = {}
    for i in range(n_shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: sd[k] for k in names[i::n_shards]}
        torch.save(part, dst / fname)
        weight_map.update({k: fname for k in part})
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in sd.values())}, "weight_map": weight_map}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    shutil.copy(FIXTURES / "orca2-release-config.json", dst / "config.json")
    (dst / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    shutil.copy(SHARED_DATA / "llama2-tokenizer" / "tokenizer.model", dst / "tokenizer.model")
    (dst / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 32002, "<|im_start|>": 32001, "[PAD]": 32000}))
    return dst


def logits_of(model):
    with torch.no_grad():
        return model(REF_TENSORS["llama-mha.input_ids"])


def test_bin_shards_with_index_give_reference_logits(tmp_path):
    model = Transformer.from_pretrained(release_folder(tmp_path / "orca"))
    torch.testing.assert_close(logits_of(model), REF_TENSORS["llama-mha.logits"], atol=1e-4, rtol=0)


def test_single_pytorch_model_bin(tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    torch.save(load_file(str(FIXTURES / "llama-mha" / "model.safetensors")), d / "pytorch_model.bin")
    shutil.copy(FIXTURES / "orca2-release-config.json", d / "config.json")
    reference = REF_TENSORS["llama-mha.logits"]
    torch.testing.assert_close(logits_of(Transformer.from_pretrained(d)), reference, atol=1e-4, rtol=0)


def test_safetensors_win_over_bin(tmp_path):
    d = release_folder(tmp_path / "both")
    for f in d.glob("pytorch_model-*.bin"):
        f.write_bytes(b"not a pickle")  # would fail if read
    shutil.copy(FIXTURES / "llama-mha" / "model.safetensors", d / "model.safetensors")
    reference = REF_TENSORS["llama-mha.logits"]
    torch.testing.assert_close(logits_of(Transformer.from_pretrained(d)), reference, atol=1e-4, rtol=0)


class Payload:
    """Unpickling this object runs os.system, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path):
    d = release_folder(tmp_path / "evil")
    marker = tmp_path / "PWNED"
    sd = torch.load(d / "pytorch_model-00001-of-00003.bin", weights_only=True)
    sd["model.norm.weight"] = Payload(marker)  # smuggled in among real tensors
    torch.save(sd, d / "pytorch_model-00001-of-00003.bin")
    refused = r"pytorch_model-00001-of-00003.bin: refused to unpickle.*Nothing in it was executed"
    with pytest.raises(ValueError, match=refused):
        Transformer.from_pretrained(d)
    assert not marker.exists()


def test_convert_bin_to_bf16_safetensors_round_trip(tmp_path):
    src = release_folder(tmp_path / "src")
    convert(ConvertConfig(str(src), str(tmp_path / "dst"), dtype="bfloat16", max_shard_size="300KB"))
    dst = tmp_path / "dst"
    assert (dst / "model.safetensors.index.json").is_file()
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for f in ("tokenizer.model", "added_tokens.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (src / f).read_bytes()
    back = Transformer.from_pretrained(dst, dtype=torch.bfloat16)
    source = load_file(str(FIXTURES / "llama-mha" / "model.safetensors"))
    for k, v in back.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, source[k].to(torch.bfloat16)), k


def test_release_defects_are_named(tmp_path):
    d = release_folder(tmp_path / "trunc")
    f = d / "pytorch_model-00002-of-00003.bin"
    f.write_bytes(f.read_bytes()[:2000])
    with pytest.raises(ValueError, match="pytorch_model-00002-of-00003.bin: cannot read.*truncated"):
        Transformer.from_pretrained(d)

    d = release_folder(tmp_path / "twice")
    one = torch.load(d / "pytorch_model-00001-of-00003.bin", weights_only=True)
    two = torch.load(d / "pytorch_model-00002-of-00003.bin", weights_only=True)
    key = next(iter(one))
    torch.save({**two, key: one[key]}, d / "pytorch_model-00002-of-00003.bin")
    with pytest.raises(ValueError, match=f"{key}.*pytorch_model-00002-of-00003.bin"):
        Transformer.from_pretrained(d)

    d = release_folder(tmp_path / "int")
    one = torch.load(d / "pytorch_model-00001-of-00003.bin", weights_only=True)
    key = next(iter(one))
    torch.save({**one, key: one[key].to(torch.int32)}, d / "pytorch_model-00001-of-00003.bin")
    with pytest.raises(ValueError, match=f"00001-of-00003.bin: {key} is torch.int32; a weight must be a floating"):
        Transformer.from_pretrained(d)

    d = release_folder(tmp_path / "list")
    torch.save([torch.zeros(2)], d / "pytorch_model-00003-of-00003.bin")
    with pytest.raises(ValueError, match="00003-of-00003.bin: expected a plain dict of name -> tensor, found list"):
        Transformer.from_pretrained(d)
