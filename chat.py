"""Chat with a checkpoint under the Orca 2 template, streamed, several turns.

    python chat.py --model=Orca-2-13b                       # the release as published; cautious system message
    python chat.py --model=out/demo/export/final --system=empty --temperature=0.7

/reset starts over, /exit or Ctrl-D quits. Later turns are appended as the release's model card does
(orca2.FOLLOWUP after the previous answer and its <|im_end|>); generation stops on the tokenizer's stop ids.
"""

from dataclasses import dataclass

import torch

import cli
from cli import UserError
from model import Transformer
from orca2 import SYSTEM_MESSAGES
from tokenizer import Tokenizer


@dataclass
class ChatConfig:
    model: str = ""              # Hugging Face-style model folder (config.json, weights, tokenizer.model)
    system: str = "cautious"     # key of orca2.SYSTEM_MESSAGES: "cautious" (the release's default) or "empty"
    max_new_tokens: int = 1024   # per answer (ORCA2.md 7 default), at most what the context has left
    temperature: float = 0.0     # 0 = greedy
    top_p: float = 1.0           # nucleus sampling when temperature > 0
    device: str = ""             # "" = cuda when available, else cpu


def main(cfg: ChatConfig) -> None:
    if not cfg.model:
        raise UserError("--model is required: a model folder (config.json, weights, tokenizer.model)")
    if cfg.system not in SYSTEM_MESSAGES:
        raise UserError(f"--system must be one of {sorted(SYSTEM_MESSAGES)}, got {cfg.system!r}")
    if cfg.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {cfg.max_new_tokens}")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not (device.split(":")[0] == "cuda" and torch.cuda.is_available()):
        raise UserError(f"--device={device!r}: use cpu, or cuda / cuda:N where CUDA is available")
    tok = Tokenizer.from_pretrained(cfg.model)
    model = Transformer.from_pretrained(cfg.model, device=device,
                                        dtype=torch.bfloat16 if device.startswith("cuda") else None).eval()
    if tok.vocab_size > model.args.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} ids, {cfg.model} only {model.args.vocab_size} rows: pass "
                        "the model's own tokenizer")
    print(f"Chatting with {cfg.model} on {device}, {cfg.system} system message. /reset starts over, /exit quits.")
    history: list[int] = []  # token ids of the conversation so far
    while True:
        try:
            user = input("\nuser> ").strip()
        except (EOFError, KeyboardInterrupt):
            return print()
        if user in ("/exit", "/quit"):
            return
        if user == "/reset" or not user:
            history = [] if user else history
            continue
        # The previous answer is closed with <|im_end|>, as in multi-turn training data.
        prompt = tok.encode_prompt(SYSTEM_MESSAGES[cfg.system], user)
        ids = history + [tok.im_end_id] + tok.encode_followup(user) if history else prompt
        ctx = model.args.max_seq_len  # an answer gets max_new_tokens, or what the context has left when less
        if history and len(ids) + min(cfg.max_new_tokens, ctx // 4) > ctx:  # not even a quarter left: start over
            print("[conversation too long for the context; starting over]")
            ids = prompt
        if len(ids) >= ctx:
            print(f"[the message alone is {len(ids)} tokens; the context holds {ctx}]")
            continue
        new, shown = [], 0
        print("orca> ", end="", flush=True)

        def stream(step: list[int | None]) -> None:
            nonlocal shown
            if step[0] is not None:
                new.append(step[0])
                text = tok.decode(new, skip_special=True).removeprefix("\n")  # the answer starts after a newline
                if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    print(text[shown:], end="", flush=True)
                    shown = len(text)

        out = model.generate([ids], min(cfg.max_new_tokens, ctx - len(ids)), stop_ids=tok.stop_ids,
                             temperature=cfg.temperature, top_p=cfg.top_p, pad_id=tok.pad_id, on_token=stream)[0]
        print(tok.decode(out, skip_special=True).removeprefix("\n")[shown:])
        history = ids + out


if __name__ == "__main__":
    cli.run(main, ChatConfig, __doc__)
