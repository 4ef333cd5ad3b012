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
    max_new_tokens: int = 1024   # per answer (ORCA2.md 7 default)
    temperature: float = 0.0     # 0 = greedy
    top_p: float = 1.0           # nucleus sampling when temperature > 0
    device: str = ""             # "" = cuda when available, else cpu


def main(cfg: ChatConfig) -> None:
    if cfg.system not in SYSTEM_MESSAGES:
        raise UserError(f"--system must be one of {sorted(SYSTEM_MESSAGES)}, got {cfg.system!r}")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer.from_pretrained(cfg.model)
    model = Transformer.from_pretrained(cfg.model, device=device,
                                        dtype=torch.bfloat16 if device.startswith("cuda") else None).eval()
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
        if len(ids) + cfg.max_new_tokens > model.args.max_seq_len:
            print("[conversation too long for the context; starting over]")
            ids = prompt
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

        out = model.generate([ids], cfg.max_new_tokens, stop_ids=tok.stop_ids, temperature=cfg.temperature,
                             top_p=cfg.top_p, pad_id=tok.pad_id, on_token=stream)[0]
        print(tok.decode(out, skip_special=True).removeprefix("\n")[shown:])
        history = ids + out


if __name__ == "__main__":
    cli.run(main, ChatConfig, __doc__)
