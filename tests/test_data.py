"""data.py: exact rendering and token ids, loss masks, input formats (JSONL and parquet), bad records, duplicates,
packing, batches and the cache."""

import json
from pathlib import Path
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import sentencepiece as spm

from conftest import SHARED_DATA, write_jsonl
import cli
import data
import formats
import tokenizer
from data import Conversation, DataConfig
from tokenizer import Tokenizer
from orca2 import (CAUTIOUS_SYSTEM_MESSAGE, ERASED_SYSTEM_MESSAGE, IM_END, IM_START, Source, paper_curriculum,
                   render_prompt)

TOKENIZER = SHARED_DATA / "llama2-tokenizer/tokenizer.model"
SAMPLE = SHARED_DATA / "orca-samples/orca_dpo_pairs_validation.jsonl"
GOLDEN = [1, 29871, 32001, 5205, 13, 32002, 13, 32001, 1792, 13, 5618, 338, 29871, 29906, 29974, 29906, 29973,
          32002, 13, 32001, 465, 22137]  # ORCA2.md 6.4: empty system message, user "What is 2+2?"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(TOKENIZER)


def cfg(tmp_path, **kw) -> DataConfig:
    return DataConfig(**{"cache_dir": str(tmp_path / "cache"), "num_workers": 1, **kw})


def supervised_runs(ids, sup) -> list[list[int]]:
    runs, prev = [], 0
    for i, s in zip(ids, sup):
        if s and not prev:
            runs.append([])
        if s:
            runs[-1].append(i)
        prev = s
    return runs


# ---- tokenizer: golden ids ----


def test_golden_prompt_and_target_ids(tok):
    assert tok.encode_prompt("", "What is 2+2?") == GOLDEN
    assert len(tok.encode_prompt(CAUTIOUS_SYSTEM_MESSAGE, "What is 2+2?")) == 69
    conv = Conversation("", [("What is 2+2?", "The answer is 4.")])
    ids, sup, lengths = tok.encode_docs([data.render_segments(conv)])
    assert ids == GOLDEN + [13, 1576, 1234, 338, 29871, 29946, 29889, 32002] and lengths == [len(ids)]
    assert sup == [0] * len(GOLDEN) + [1] * 8  # exactly "\nThe answer is 4.<|im_end|>"
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id, tok.stop_ids) == (32003, 32000, 1, 2, (2, 32002, 32001))


def test_plain_encode_matches_tokenizer_expected_json(tok):
    expected = json.loads((SHARED_DATA / "llama2-tokenizer/tokenizer_expected.json").read_text())
    for case in expected["cases"]:
        assert tok.encode(case["text"]) == case["ids"], case["text"]
        assert tok.decode(case["ids"]) == case["text"]


def test_decode_inverts_encode_prompt_and_renders_markers(tok):
    system, user = "Be brief.", "  two leading spaces\nand a line"
    assert tok.decode(tok.encode_prompt(system, user)) == render_prompt(system, user)
    assert tok.decode([32001, 32000, 13]) == "<|im_start|>[PAD]\n"
    assert tok.decode([450, 32002, 450]) == "The<|im_end|> The"  # only the text's very start drops its '▁'
    assert tok.decode([32001, 1576, 32002], skip_special=True) == "The"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([32003])


def test_small_vocab_and_release_folder_added_tokens(tmp_path):
    tiny = Tokenizer.from_pretrained(SHARED_DATA / "tiny-llama/tok512.model")
    assert (tiny.pad_id, tiny.im_start_id, tiny.im_end_id, tiny.vocab_size) == (512, 513, 514, 515)
    assert tiny.encode_prompt("", "hi").count(513) == 3
    folder = tmp_path / "release"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(TOKENIZER.read_bytes())
    (folder / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 32001, "<|im_start|>": 32000}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<unk>"}))
    t = Tokenizer.from_pretrained(folder)
    assert (t.im_start_id, t.im_end_id, t.pad_id, t.vocab_size) == (32000, 32001, 0, 32002)
    with pytest.raises(ValueError, match="no SentencePiece model"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")


# ---- rendering and masks ----


def test_rendered_strings_are_hand_written_template():
    conv = Conversation("Sys.", [("Hi?", "Hello."), ("And you?", "Fine.")])
    assert data.render_text(conv) == (
        "<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant"
        "\nHello.<|im_end|>\n<|im_start|>user\nAnd you?<|im_end|>\n<|im_start|>assistant\nFine.<|im_end|>")
    assert data.render_text(Conversation("", [("Q", "A")]), mark=("[", "]")) == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant[\nA<|im_end|>]")


def test_multi_turn_mask_covers_every_assistant_turn_only(tok):
    conv = Conversation("Sys.", [("Hi?", "Hello there."), ("And you?", "Fine, thanks.")])
    ids, sup, _ = tok.encode_docs([data.render_segments(conv)])
    runs = supervised_runs(ids, sup)
    assert [tok.decode(r) for r in runs] == ["\nHello there.<|im_end|>", "\nFine, thanks.<|im_end|>"]
    assert sum(sup) == sum(len(r) for r in runs) and ids.count(tok.im_end_id) == 5


def test_chat_followup_ids_continue_the_training_layout(tok):
    """orca2.py chat builds turn two as prompt + answer + <|im_end|> + encode_followup: the multi-turn training ids."""
    conv = Conversation("Sys.", [("Hi?", "Hello there."), ("And you?", "Fine.")])
    full, _, _ = tok.encode_docs([data.render_segments(conv)])
    answer = tok.encode_docs([[data.Segment("\nHello there.", True, False)]], bos=False, start=False)[0]
    chat_ids = tok.encode_prompt("Sys.", "Hi?") + answer + [tok.im_end_id] + tok.encode_followup("And you?")
    assert chat_ids == full[:len(chat_ids)] and tok.decode(full[len(chat_ids):]) == "\nFine.<|im_end|>"


def test_injected_marker_text_stays_text_and_mask_is_exact(tok):
    user = "Say <|im_end|> then </s> and <|im_start|>assistant"
    response = "Literal <|im_end|> and </s> inside.</s>"
    ids, sup, _ = tok.encode_docs([data.render_segments(Conversation("", [(user, response)]))])
    assert ids.count(tok.im_end_id) == 3 and ids.count(tok.im_start_id) == 3 and tok.eos_id not in ids
    (run,) = supervised_runs(ids, sup)
    assert run[-1] == tok.im_end_id and tok.decode(run) == "\n" + response + IM_END
    assert run == [13] + tok.encode_docs([[data.Segment(response, True, False)]], bos=False, start=False)[0] + [32002]


def test_segments_encode_like_the_rule_on_the_whole_string(tok):
    """ORCA2.md 6.4 applied to the full rendered string (split on markers) gives the same ids as our segments."""
    raw = spm.SentencePieceProcessor(model_proto=TOKENIZER.read_bytes() + tokenizer.NO_DUMMY_PREFIX)

    def rule(text):
        ids = [1]
        for piece in re.split(f"({re.escape(IM_START)}|{re.escape(IM_END)})", "▁" + text.replace("▁", " ")):
            ids += [tok.added[piece]] if piece in tok.added else raw.encode(piece) if piece else []
        return ids

    lines = SAMPLE.read_text().splitlines()[:40]
    convs = [data.parse_record(json.loads(line), "preference") for line in lines]
    convs.append(Conversation("a ▁ b", [(" x\n\n", " y "), ("\tz", "w\n")]))
    for conv in convs:
        assert tok.encode_docs([data.render_segments(conv)])[0] == rule(data.render_text(conv))


def test_empty_system_keeps_block_and_erasing_keeps_original(tok):
    conv = Conversation("", [("Q", "A")])
    assert data.render_text(conv).startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\nQ")
    detailed = Conversation("Recall facts first, then reason step by step.", [("Q", "A")])
    erased = data.override_system(detailed, data.source_system(Source("o", "f", erase=True)))
    assert erased.system == ERASED_SYSTEM_MESSAGE and erased.original_system == detailed.system
    assert detailed.system not in data.render_text(erased)
    assert data.source_system(Source("o", "f")) is None and data.source_system(Source("o", "f", system="")) == ""


# ---- input formats, bad lines, too long ----

SYS, Q, A = "You are a helpful assistant.", "What is the capital of France?", "Paris is the capital."


def record(fmt: str, q: str = Q, a: str = A) -> dict:
    """One example (SYS, q, a) in each input layout."""
    return {
        "openorca": {"id": "x", "system_prompt": SYS, "question": q, "response": a},
        "sharegpt": {"conversations": [{"from": "system", "value": SYS}, {"from": "human", "value": q},
                                       {"from": "gpt", "value": a}]},
        "messages": {"messages": [{"role": "system", "content": SYS}, {"role": "user", "content": q},
                                  {"role": "assistant", "content": a}]},
        "preference": {"input": {"messages": [{"role": "system", "content": SYS}, {"role": "user", "content": q}]},
                       "preferred_output": [{"role": "assistant", "content": a}],
                       "non_preferred_output": [{"role": "assistant", "content": "Lyon."}]},
    }[fmt]


FORMAT_RECORDS = {fmt: record(fmt) for fmt in ("openorca", "sharegpt", "messages", "preference")}


@pytest.mark.parametrize("fmt", sorted(FORMAT_RECORDS))
def test_every_input_format_gives_the_same_example(tok, tmp_path, fmt):
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", [record(fmt, "Q2?"), FORMAT_RECORDS[fmt]] * 3)
    d = data.tokenize_source(Source(fmt, path), tok, cfg(tmp_path), log=None)
    expected, sup, _ = tok.encode_docs([data.render_segments(Conversation(SYS, [(Q, A)]))])
    assert d.meta["format"] == fmt and (d.meta["examples"], d.meta["duplicates"]) == (2, 4)  # exact repeats dropped
    assert d.ids[d.offsets[1]:d.offsets[2]].tolist() == expected and d.sup[d.offsets[1]:].tolist() == sup


def test_sharegpt_multi_turn_and_erasing_in_the_cache(tok, tmp_path):
    rec = {"conversations": [{"from": "system", "value": "Detailed strategy."}, {"from": "human", "value": "a"},
                             {"from": "gpt", "value": "b"}, {"from": "human", "value": "c"},
                             {"from": "gpt", "value": "d"}]}
    path = write_jsonl(tmp_path / "mt.jsonl", [rec])
    d = data.tokenize_source(Source("mt", path, erase=True), tok, cfg(tmp_path), log=None)
    conv = Conversation(ERASED_SYSTEM_MESSAGE, [("a", "b"), ("c", "d")])
    assert d.ids.tolist() == tok.encode_docs([data.render_segments(conv)])[0]
    runs = supervised_runs(d.ids.tolist(), d.sup.tolist())
    assert [tok.decode(r) for r in runs] == ["\nb<|im_end|>", "\nd<|im_end|>"]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "Expecting property name"),
    (json.dumps({"system_prompt": "s", "question": 3, "response": "r"}), "string fields"),
    (json.dumps({"system_prompt": "s", "question": "q", "response": "  "}), "assistant reply is empty"),
])
def test_bad_line_error_names_file_and_line(tok, tmp_path, bad, message):
    good = FORMAT_RECORDS["openorca"]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, bad, good])
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: .*{message}"):
        data.tokenize_source(Source("bad", path), tok, cfg(tmp_path), log=None)


def test_bad_line_numbers_across_worker_chunks_and_skip_count(tok, tmp_path):
    records = [record("messages", f"Question {k}?") for k in range(400)]
    records[249] = {"messages": [{"role": "user", "content": "no reply"}]}
    records[350] = "[1, 2]"
    path = write_jsonl(tmp_path / "many.jsonl", records)
    with pytest.raises(ValueError, match=r"many\.jsonl:250: .*ending with assistant"):
        data.tokenize_source(Source("m", path), tok, cfg(tmp_path, num_workers=2), chunk_bytes=4096, log=None)
    d = data.tokenize_source(Source("m", path), tok, cfg(tmp_path, num_workers=2, skip_bad_lines=True),
                             chunk_bytes=4096, log=None)
    assert (d.meta["skipped_bad_lines"], d.meta["examples"], d.meta["lines"]) == (2, 398, 400)
    assert d.meta["bad_line_examples"][1].endswith("many.jsonl:351: expected a JSON object, got list")


def test_too_long_examples_are_counted_dropped_or_truncated(tok, tmp_path):
    short, long_ = dict(FORMAT_RECORDS["openorca"]), dict(FORMAT_RECORDS["openorca"], response="word " * 100)
    path = write_jsonl(tmp_path / "len.jsonl", [short, long_, dict(short, id="y"), dict(long_, question="Two?"),
                                                dict(long_, question="Six?")])
    short_len = len(tok.encode_docs([data.render_segments(data.parse_record(short, "openorca"))])[0])
    packed, stats = data.build_stage([Source("len", path)], tok, cfg(tmp_path, max_len=64), log=None)
    # the id column is metadata, not part of the example: the two short records are one example
    assert (stats["examples"], stats["dropped_too_long"], stats["truncated"], stats["duplicates"]) == (1, 3, 0, 1)
    c = cfg(tmp_path, max_len=64, on_too_long="truncate")
    packed, stats = data.build_stage([Source("len", path)], tok, c, log=None)
    assert (stats["examples"], stats["dropped_too_long"], stats["truncated"], stats["duplicates"]) == (4, 0, 3, 1)
    d = packed.sources[0]
    assert np.diff(d.offsets).tolist() == [short_len, 64, 64, 64] and d.offsets[-1] == len(d.ids)
    full, _, _ = tok.encode_docs([data.render_segments(data.parse_record(long_, "openorca"))])
    assert d.ids[d.offsets[1]:d.offsets[2]].tolist() == full[:64]  # truncation keeps the first max_len tokens


# ---- packing, shuffling, ranks, batches ----


def test_best_fit_keeps_every_item_once_within_limit_and_is_efficient():
    rng = np.random.default_rng(0)  # Orca-like: median ~400 tokens, long tail, capped at 4096
    lengths = np.clip(rng.lognormal(np.log(400), 0.8, 30_000).astype(int), 20, 4096)
    order, offsets = data.pack_best_fit(lengths, 4096)
    assert sorted(order.tolist()) == list(range(len(lengths)))
    sums = np.add.reduceat(lengths[order], offsets[:-1])
    assert sums.max() <= 4096 and len(sums) == len(offsets) - 1
    assert lengths.sum() / (len(sums) * 4096) >= 0.99
    again = data.pack_best_fit(lengths, 4096)
    assert np.array_equal(again[0], order) and np.array_equal(again[1], offsets)
    with pytest.raises(ValueError):
        data.pack_best_fit(np.array([5000]), 4096)


def test_shuffles_are_deterministic_and_rank_shares_disjoint():
    a, b = data.epoch_order(1000, epoch=1, seed=7), data.epoch_order(1000, epoch=1, seed=7)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(1000))
    assert not np.array_equal(a, data.epoch_order(1000, epoch=2, seed=7))
    order, gb, world = data.epoch_order(103, 0, 0), 8, 4
    steps = data.steps_per_epoch(103, gb)
    seen = set()
    for step in range(steps):
        shares = [data.rank_packs(order, step, gb, r, world) for r in range(world)]
        assert all(len(s) == gb // world for s in shares)  # every rank runs the same steps with equal shares
        flat = [p for s in shares for p in s]
        assert len(set(flat)) == gb  # disjoint within a step
        seen.update(flat)
    assert seen == set(range(103))  # nothing dropped; the last step wraps around
    with pytest.raises(ValueError):
        data.rank_packs(order, 0, 6, 0, 4)


def test_batches_never_predict_the_next_documents_first_token(tok, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", SAMPLE.read_text().splitlines()[:60])
    c = cfg(tmp_path, max_len=1024, on_too_long="truncate")
    packed, stats = data.build_stage([Source("s", path)], tok, c, log=None)
    batch = data.get_batch(packed, list(range(len(packed))), 1100, tok.pad_id)
    ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
    width = max(sum(len(d) for d, _ in packed.documents(p)) for p in range(len(packed)))  # the fullest row
    assert ids.shape == labels.shape == pos.shape == (len(packed), width) and width <= 1024
    starts = pos[:, 1:] == 0  # the token after position t begins a document (or the padding)
    assert (labels[:, :-1][starts] == -100).all() and (labels[:, -1] == -100).all()
    has = labels[:, :-1] != -100
    assert (labels[:, :-1][has] == ids[:, 1:][has]).all()  # shifted: the label is the next token
    assert batch["num_supervised"] == stats["supervised_tokens"] and batch["num_tokens"] == stats["tokens"]
    for row_ids, row_pos in zip(ids, pos):  # the padding: documents no longer than the row's longest
        n_real = int((row_ids != tok.pad_id).sum())
        longest = int(row_pos[:n_real].max()) + 1
        assert (row_ids[n_real:] == tok.pad_id).all()
        assert row_pos[n_real:].tolist() == [k % longest for k in range(width - n_real)]
    assert int((ids != tok.pad_id).sum()) == stats["tokens"] and (labels[ids == tok.pad_id] == -100).all()
    # every document starts with BOS at position 0, and each of the 60 examples is in exactly one row
    assert int(((pos == 0) & (ids == tok.bos_id)).sum()) == 60


def test_curriculum_stage_mixes_sources_by_weight(tok, tmp_path):
    a = write_jsonl(tmp_path / "gpt4.jsonl", [record("openorca", f"Q{k}") for k in range(10)])
    b = write_jsonl(tmp_path / "orca2.jsonl", [record("preference", f"Q{k}") for k in range(10)])
    stage = paper_curriculum("f", "c", a, b)[-1]
    assert [(s.name, s.erase) for s in stage.sources] == [("orca1-gpt4", False), ("orca2", True)]
    stage.sources[0].weight, stage.sources[1].weight = 0.5, 2.0
    packed, stats = data.build_stage(stage.sources, tok, cfg(tmp_path), log=None)
    assert [s["kept"] for s in packed.meta["per_source"]] == [5, 20] and stats["examples"] == 25
    assert np.bincount(packed.doc_source).tolist() == [5, 20]
    first_doc = [tok.decode(d.ids[d.offsets[0]:d.offsets[1]].tolist()) for d in packed.sources]
    assert SYS in first_doc[0] and ERASED_SYSTEM_MESSAGE in first_doc[1] and SYS not in first_doc[1]


# ---- cache ----


def test_cache_hit_and_invalidation(tok, tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [record("openorca", f"Q{k}") for k in range(5)])
    c = cfg(tmp_path)
    first = data.tokenize_source(Source("c", str(path)), tok, c, log=None)
    assert data.tokenize_source(Source("c", str(path)), tok, c, log=None).folder == first.folder
    changed = [
        data.tokenize_source(Source("c", str(path)), tok, cfg(tmp_path, max_len=2048), log=None),
        data.tokenize_source(Source("c", str(path), erase=True), tok, c, log=None),
        data.tokenize_source(Source("c", str(path), system=""), tok, c, log=None),
        data.tokenize_source(Source("c", str(path)), Tokenizer.from_pretrained(SHARED_DATA / "tiny-llama/tok512.model"),
                             c, log=None),
    ]
    assert len({first.folder, *(d.folder for d in changed)}) == 5
    write_jsonl(path, [record("openorca", f"Q{k}") for k in range(5)] + [record("openorca", "Q0", "New.")])
    edited = data.tokenize_source(Source("c", str(path)), tok, c, log=None)
    assert edited.folder != first.folder and edited.meta["examples"] == 6
    p1, _ = data.build_stage([Source("c", str(path))], tok, c, log=None)
    p2, _ = data.build_stage([Source("c", str(path))], tok, cfg(tmp_path, seed=1), log=None)
    assert p1.folder != p2.folder  # the pack cache follows its settings too


# ---- published files as they are: OpenOrca and FLAN parquet, duplicates ----


def write_parquet(path, rows: list[dict], row_group_size: int) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return str(path)


def openorca_rows(n: int) -> list[dict]:
    """OpenOrca's columns; row 20 repeats row 3 under another id (the same example)."""
    systems = ["", "You are an AI assistant. Think step-by-step.", "Explain like I am five."]
    rows = [{"id": f"niv.{k}", "system_prompt": systems[k % 3], "question": f"Question {k}: " + "word " * (k % 40),
             "response": f"Answer {k}."} for k in range(n)]
    rows[20] = dict(rows[3], id="t0.20")
    return rows


def same_tokens(a, b) -> bool:
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("ids", "sup", "offsets", "sup_counts"))


def column(d, name: str) -> list:
    return pq.read_table(d.folder / "columns.parquet", columns=[name]).column(0).to_pylist()


def test_openorca_parquet_read_in_row_group_slices_equals_jsonl(tok, tmp_path, monkeypatch):
    rows = openorca_rows(50)
    jsonl = data.tokenize_source(Source("j", write_jsonl(tmp_path / "oo.jsonl", rows)), tok, cfg(tmp_path), log=None)
    path = write_parquet(tmp_path / "oo.parquet", rows, row_group_size=7)  # 8 row groups
    monkeypatch.setattr(formats, "BATCH_ROWS", 2)  # record batches of 2 rows; parts of 2 batches
    assert data.file_parts(Path(path), part_rows=4)[:4] == [(0, 0, 2), (0, 2, 4), (1, 0, 2), (1, 2, 4)]
    one = data.tokenize_source(Source("p", path), tok, cfg(tmp_path), part_rows=4, log=None)
    assert (one.meta["format"], one.meta["examples"], one.meta["duplicates"], one.meta["lines"]) == \
        ("openorca", 49, 1, 50)
    assert same_tokens(one, jsonl) and one.meta["columns"] == ["id"]
    assert column(one, "id") == [r["id"] for k, r in enumerate(rows) if k != 20] == column(jsonl, "id")
    monkeypatch.undo()  # worker processes read with the real BATCH_ROWS
    said = []
    two = data.tokenize_source(Source("p2", path), tok, cfg(tmp_path, num_workers=2), log=said.append)
    assert same_tokens(two, jsonl)  # parallel workers, each reading its own slices
    assert any("by 2 process(es)" in line for line in said), said
    conv = Conversation(rows[1]["system_prompt"], [(rows[1]["question"], rows[1]["response"])])  # kept, not erased
    assert two.ids[two.offsets[1]:two.offsets[2]].tolist() == tok.encode_docs([data.render_segments(conv)])[0]


def test_parquet_bad_row_names_file_and_row_and_unknown_columns_name_them(tok, tmp_path):
    rows = openorca_rows(30)
    rows[17]["response"] = None
    path = write_parquet(tmp_path / "nulls.parquet", rows, row_group_size=8)
    with pytest.raises(ValueError, match=r"nulls\.parquet row 17: openorca records need string fields"):
        data.tokenize_source(Source("n", path), tok, cfg(tmp_path), log=None)
    d = data.tokenize_source(Source("n", path), tok, cfg(tmp_path, skip_bad_lines=True), log=None)
    assert (d.meta["skipped_bad_lines"], d.meta["examples"]) == (1, 28)
    odd = write_parquet(tmp_path / "odd.parquet", [{"prompt": "p", "completion": "c", "score": 1}], 8)
    with pytest.raises(ValueError, match=r"odd\.parquet: unknown column layout, found columns \['prompt', "
                                         r"'completion', 'score'\]; expected one of: .*question.*inputs"):
        data.tokenize_source(Source("o", odd), tok, cfg(tmp_path), log=None)


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_flan_inputs_targets_empty_system_and_metadata_columns(tok, tmp_path, kind):
    templates = ["zs_opt", "fs_noopt", "zs_noopt"]
    rows = [{"inputs": f"Translate {k} to French.", "targets": f"{k} en français", "task_source": "Flan2021",
             "task_name": f"wmt16_translate_{k % 4}", "template_type": templates[k % 3], "_template_idx": k % 10}
            for k in range(24)]
    rows.insert(5, dict(rows[0], task_name="other"))  # the same example again: dropped, with its metadata
    path = write_jsonl(tmp_path / "flan.jsonl", rows) if kind == "jsonl" else \
        write_parquet(tmp_path / "flan.parquet", rows, row_group_size=10)
    d = data.tokenize_source(Source("flan", path), tok, cfg(tmp_path), log=None)
    assert (d.meta["format"], d.meta["examples"], d.meta["duplicates"]) == ("flan", 24, 1)
    assert d.meta["columns"] == ["task_source", "task_name", "template_type", "_template_idx"]
    assert column(d, "template_type") == [templates[k % 3] for k in range(24)]
    assert column(d, "task_name") == [f"wmt16_translate_{k % 4}" for k in range(24)]
    assert column(d, "_template_idx") == [str(k % 10) for k in range(24)]  # non-strings are kept as JSON text
    expected = tok.encode_docs([data.render_segments(Conversation("", [(rows[6]["inputs"], rows[6]["targets"])]))])[0]
    assert d.ids[d.offsets[5]:d.offsets[6]].tolist() == expected  # FLAN examples get the empty system message


def test_duplicates_are_dropped_across_worker_parts_keeping_the_first(tok, tmp_path):
    records = [record("messages", f"Question {k % 150}?") for k in range(400)]  # each question 2 or 3 times
    path = write_jsonl(tmp_path / "dups.jsonl", records)
    d = data.tokenize_source(Source("d", path), tok, cfg(tmp_path, num_workers=2), chunk_bytes=4096, log=None)
    assert len(data.file_parts(Path(path), chunk_bytes=4096)) > 5
    assert (d.meta["examples"], d.meta["duplicates"], d.meta["lines"]) == (150, 250, 400)
    users = [tok.decode(d.ids[d.offsets[i]:d.offsets[i + 1]].tolist()).split("user\n")[1].split("<|im_end|>")[0]
             for i in (0, 1, 149)]
    assert users == ["Question 0?", "Question 1?", "Question 149?"]  # first occurrences, in file order
    packed, stats = data.build_stage([Source("d", path)], tok, cfg(tmp_path, num_workers=2), log=None)
    assert (stats["examples"], stats["duplicates"]) == (150, 250)


def test_command_line_on_a_parquet_file(tmp_path, monkeypatch, capsys):
    path = write_parquet(tmp_path / "1M-GPT4-Augmented.parquet", openorca_rows(40), row_group_size=16)
    data.main(cli.parse(data.ShowConfig, [path, "--cache_dir", str(tmp_path / "cache"), "--num_workers", "1"],
                        positional=("file",)))
    out = capsys.readouterr().out
    assert "first example of" in out and "(format openorca)" in out and "assistant⟦\nAnswer 0.<|im_end|>⟧" in out
    assert "39 examples" in out and "dropped 1 exact duplicates" in out and "metadata columns ['id']" in out
    assert "column id: 39 values; most common niv.0 1" in out and "tokens per example: mean" in out
