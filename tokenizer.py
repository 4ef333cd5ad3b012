"""The Orca 2 tokenizer: LLaMA-2's SentencePiece plus three added tokens, encoding by the exact rule of ORCA2.md 6.4.

    python tokenizer.py "What is 2+2?"        # the ids of that prompt under the template, and back to text
    ids = Tokenizer.from_pretrained("Orca-2-7b").encode_prompt(system, user)  # the release's exact ids
"""

import hashlib
import json
import sys
from itertools import groupby
from pathlib import Path
from typing import NamedTuple

import sentencepiece as spm

from cli import UserError, read_json
from orca2 import (BOS, CAUTIOUS_SYSTEM_MESSAGE, EOS, FOLLOWUP, IM_END, IM_START, PAD, PROMPT, SHARED_DATA, SPECIAL_IDS,
                   UNK, is_field)

# sentencepiece has no switch for the dummy prefix, so we append a second NormalizerSpec (ModelProto field 3) holding
# only add_dummy_prefix = false (field 3, varint 0). Protobuf merges repeated message fields: only that flag changes.
NO_DUMMY_PREFIX = b"\x1a\x02\x18\x00"


class Segment(NamedTuple):
    text: str          # a marker string when marker is True, else ordinary text
    supervised: bool   # teacher tokens (get labels)
    marker: bool       # placed by the template: becomes one control id


def fill(template: tuple[str, ...], values: dict[str, str], supervised: bool) -> list[Segment]:
    """A template of orca2.py as Segments: one per marker, one per run of text between markers (filled in)."""
    segments = []
    for is_marker, parts in groupby(template, lambda part: part in (IM_START, IM_END)):
        if is_marker:
            segments += [Segment(marker, supervised, True) for marker in parts]
        else:  # literal parts and values joined, as the whole rendered string would be encoded
            text = "".join(values[part[1:-1]] if is_field(part) else part for part in parts)
            segments.append(Segment(text, supervised, False))
    return segments


class Tokenizer:
    def __init__(self, model_proto: bytes, added_tokens: dict[str, int] | None = None, pad: str = PAD):
        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.sp_raw = spm.SentencePieceProcessor(model_proto=model_proto + NO_DUMMY_PREFIX)
        n = self.sp.vocab_size()
        # marker -> id; default: the added tokens right after the SentencePiece vocabulary (32000-32002 for LLaMA-2)
        self.added = dict(added_tokens or {s: n + SPECIAL_IDS[s] - SPECIAL_IDS[PAD] for s in (PAD, IM_START, IM_END)})
        self.marker_of = {i: s for s, i in self.added.items()}
        if {IM_START, IM_END} - set(self.added) or min(self.marker_of) < n or len(self.marker_of) < len(self.added):
            raise UserError(f"added tokens {self.added} need {IM_START}, {IM_END} and distinct ids >= vocab size {n}")
        self.vocab_size = max(self.marker_of) + 1
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.im_start_id, self.im_end_id = self.added[IM_START], self.added[IM_END]
        self.pad_token = pad  # the tokenizer decides padding, not config.json (13b's says pad_token_id 0)
        self.pad_id = self.added[pad] if pad in self.added else self.sp.piece_to_id(pad)
        self.stop_ids = (self.eos_id, self.im_end_id, self.im_start_id)  # <|im_start|>: it would open an invented turn
        digest = hashlib.sha256(model_proto + json.dumps(self.added, sort_keys=True).encode()).hexdigest()
        self.identity = f"{digest[:16]}-pad{self.pad_id}"  # part of every cache key

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Tokenizer":
        """A tokenizer.model file, or a folder with tokenizer.model (+ added_tokens.json / tokenizer_config.json)."""
        path = Path(path)
        model_file = path / "tokenizer.model" if path.is_dir() else path
        if not model_file.is_file():
            raise UserError(f"{model_file}: no SentencePiece model there; pass a tokenizer.model or a model folder")
        folder = model_file.parent  # its added_tokens.json and tokenizer_config.json, {} when absent
        added, config = (read_json(f) if f.is_file() else {} for f in (folder / "added_tokens.json",
                                                                           folder / "tokenizer_config.json"))
        pad = config.get("pad_token") or PAD
        pad = pad.get("content", PAD) if isinstance(pad, dict) else pad
        decoder = {t["content"]: int(i) for i, t in config.get("added_tokens_decoder", {}).items()}
        if not added and IM_START in decoder:  # newer releases list added tokens only in tokenizer_config.json
            added = {s: decoder[s] for s in (PAD, IM_START, IM_END) if s in decoder}
        try:
            return cls(model_file.read_bytes(), added or None, pad)
        except RuntimeError as e:  # sentencepiece's message for bytes that are not a model: "ParseFromArray ..."
            raise UserError(f"{model_file}: not a SentencePiece model ({str(e).strip()})") from None

    def save_pretrained(self, dst: Path) -> None:
        """The release's tokenizer files: SentencePiece model, added tokens, special tokens, generation settings."""
        (dst / "tokenizer.model").write_bytes(self.model_proto)
        special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": self.pad_token}
        config = dict(special, tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False, legacy=True,
                      added_tokens_decoder={str(i): {"content": s, "special": True} for s, i in self.added.items()})
        gen = {"bos_token_id": self.bos_id, "eos_token_id": [self.eos_id, self.im_end_id], "pad_token_id": self.pad_id}
        files = {"added_tokens.json": self.added, "special_tokens_map.json": special, "tokenizer_config.json": config,
                 "generation_config.json": gen}
        for name, content in files.items():
            (dst / name).write_text(json.dumps(content, indent=2))

    def encode_docs(self, docs: list[list[Segment]], bos: bool = True,
                    start: bool = True) -> tuple[list[int], list[int], list[int]]:
        """Many segment lists at once, by the rule of ORCA2.md 6.4: flat ids, flat teacher flags (0/1), lengths."""
        pieces = []  # per document: (text or marker id, supervised)
        for segs in docs:
            doc = [(self.bos_id, False)] if bos else []
            if start and segs and segs[0].marker:  # a text that starts with a marker: its '▁' is a piece of its own
                doc.append(("▁", False))
            for k, s in enumerate(segs):  # '▁' typed in text is a space; the whole text starts with one '▁'
                text = ("▁" if start and k == 0 else "") + s.text.replace("▁", " ")
                if s.marker or text:
                    doc.append((self.added[s.text] if s.marker else text, s.supervised))
            pieces.append(doc)
        # One SentencePiece call (no dummy prefix) per batch; repeated pieces (system messages) are encoded once.
        unique = list(dict.fromkeys(p for doc in pieces for p, _ in doc if isinstance(p, str)))
        encoded = dict(zip(unique, self.sp_raw.encode(unique, num_threads=1)))
        ids, sup, lengths = [], [], []
        for doc in pieces:
            n0 = len(ids)
            for p, s in doc:
                ids += encoded.get(p, [p])  # a text piece's ids, or the marker id itself
                sup += [int(s)] * (len(ids) - len(sup))  # the piece's flag on each of its ids
            lengths.append(len(ids) - n0)
        return ids, sup, lengths

    def encode(self, text: str) -> list[int]:
        """Plain text to ids, no BOS; marker strings inside the text stay ordinary text."""
        return self.encode_docs([[Segment(text, False, False)]], bos=False)[0] if text else []

    def encode_prompt(self, system: str, user: str) -> list[int]:
        """BOS + the model card's prompt (ends after 'assistant'); equals the release tokenizer's ids."""
        return self.encode_docs([fill(PROMPT, {"system": system, "user": user}, False)])[0]

    def encode_followup(self, user: str) -> list[int]:
        """A later user turn, to append after the previous answer and its <|im_end|> (no BOS, no leading '▁')."""
        return self.encode_docs([fill(FOLLOWUP, {"user": user}, False)], bos=False, start=False)[0]

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        """Ids to text; added ids become their marker strings (dropped with skip_special), BOS/EOS are dropped."""
        ids = [int(i) for i in ids]
        if ids and not 0 <= min(ids) <= max(ids) < self.vocab_size:
            raise ValueError(f"token ids {min(ids)}..{max(ids)} go outside the vocabulary (0..{self.vocab_size - 1})")
        out = []
        for k, (is_marker, run) in enumerate(groupby(ids, lambda i: i in self.marker_of)):
            if not is_marker:  # only text at the very start carries the prepended '▁' that decoding removes
                out.append((self.sp if k == 0 else self.sp_raw).decode([i for i in run if i < self.sp.vocab_size()]))
            elif not skip_special:
                out += [self.marker_of[i] for i in run]
        return "".join(out)


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
        raise SystemExit(0)
    tok = Tokenizer.from_pretrained(SHARED_DATA / "llama2-tokenizer")
    prompt = tok.encode_prompt(CAUTIOUS_SYSTEM_MESSAGE, " ".join(sys.argv[1:]) or "What is 2+2?")
    print(f"{len(prompt)} ids: {prompt}\n{tok.decode(prompt)!r}\nstop ids: {tok.stop_ids}")
