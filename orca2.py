"""The Orca 2 recipe in one place: template, special tokens, system messages, curriculum, paper numbers.

Everything that is specific to Orca 2 (arXiv 2311.11045) rather than to LLaMA-2 training in general lives
here and nowhere else. Facts marked "published" come from the paper or the release files; the rest are this
project's defaults where the authors are silent (see ../shared/docs/ORCA2.md, section 9).

Run it:
    python orca2.py                                   # print the recipe: template, messages, curriculum
    python orca2.py chat --model DIR                  # interactive chat with a checkpoint (cautious system message)
    python orca2.py chat --model DIR --system empty   # ... with the empty system message
"""

import argparse
from dataclasses import dataclass, field, fields

# ---- chat template and special tokens (published: model card, added_tokens.json) ----

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "[PAD]"
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
# The release's vocabulary: LLaMA-2's 32000 pieces plus three added tokens.
SPECIAL_IDS = {UNK: 0, BOS: 1, EOS: 2, PAD: 32000, IM_START: 32001, IM_END: 32002}
BOS_ID, EOS_ID, PAD_ID, IM_START_ID, IM_END_ID = 1, 2, 32000, 32001, 32002
VOCAB_SIZE = 32003
# Generation stops on either end marker: the release's generation_config names EOS 2, the template ends turns with 32002.
STOP_IDS = (EOS_ID, IM_END_ID)


def render_prompt(system: str, user: str) -> str:
    """The model card's f-string, character for character: ends right after 'assistant', no newline."""
    return f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{user}{IM_END}\n{IM_START}assistant"


def render_followup(user: str) -> str:
    """A later user turn, appended to the previous assistant output (no second <s>)."""
    return f"\n{IM_START}user\n{user}{IM_END}\n{IM_START}assistant"


def render_target(response: str) -> str:
    """The supervised span of one assistant turn (ORCA2.md 5.1): newline, the teacher's text, end marker."""
    return f"\n{response}{IM_END}"


# ---- system messages ----

# Published: the release's default system message, called "cautious" in the evaluation (215 characters).
CAUTIOUS_SYSTEM_MESSAGE = (
    "You are Orca, an AI language model created by Microsoft. You are a cautious assistant. "
    "You carefully follow instructions. You are helpful and harmless and you follow ethical guidelines "
    "and promote positive behavior."
)
EMPTY_SYSTEM_MESSAGE = ""
# Prompt erasing replaces every detailed teacher instruction by one generic message (ORCA2.md section 3);
# the release's default message is that generic message.
ERASED_SYSTEM_MESSAGE = CAUTIOUS_SYSTEM_MESSAGE
SYSTEM_MESSAGES = {"empty": EMPTY_SYSTEM_MESSAGE, "cautious": CAUTIOUS_SYSTEM_MESSAGE}

# ---- progressive learning (ORCA2.md section 4) ----


@dataclass
class Source:
    name: str          # short name used in logs and the cache key
    path: str          # data file (JSONL / parquet); see data.py for the accepted layouts
    weight: float = 1.0  # mixture weight: the share of this source's examples kept per epoch (1.0 = all of them)
    erase: bool = False  # prompt erasing: replace the system message by ERASED_SYSTEM_MESSAGE
    system: str | None = None  # force this system message (FLAN stage: ""); None keeps the file's own


@dataclass
class Stage:
    name: str                 # "flan", "orca1-chatgpt", "orca1-gpt4+orca2"
    sources: list[Source] = field(default_factory=list)  # mixed together, then packed
    epochs: int = 1           # published per stage
    lr: float = 2e-5          # peak learning rate; not published, ORCA2.md 5.4 default
    # warmup then cosine decay to min_lr_ratio * lr, restarted per stage (not published)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.1


def paper_curriculum(flan: str, orca1_chatgpt: str, orca1_gpt4: str, orca2: str) -> list[Stage]:
    """The three published stages, each starting from the previous one's weights."""
    return [
        Stage("flan", [Source("flan-v2", flan, system=EMPTY_SYSTEM_MESSAGE)], epochs=1),
        Stage("orca1-chatgpt", [Source("orca1-chatgpt", orca1_chatgpt)], epochs=3),
        Stage("orca1-gpt4+orca2", [Source("orca1-gpt4", orca1_gpt4), Source("orca2", orca2, erase=True)], epochs=4),
    ]


# ---- the paper's results (ORCA2.md section 8, Table 1; zero-shot) ----

BENCHMARKS = ("agieval", "bbh", "drop", "crass", "race", "gsm8k")
PAPER_RESULTS = {  # model -> benchmark -> score (percent); "avg" is the Figure 4 macro-average
    "Orca-2-7B": dict(agieval=45.10, bbh=45.93, drop=60.26, crass=84.31, race=80.79, gsm8k=47.23, avg=60.60),
    "Orca-2-7B w/ cautious sm": dict(agieval=43.97, bbh=42.80, drop=69.09, crass=88.32, race=75.82, gsm8k=55.72, avg=62.62),
    "Orca-2-13B": dict(agieval=49.93, bbh=50.18, drop=57.97, crass=86.86, race=82.87, gsm8k=59.14, avg=64.49),
    "Orca-2-13B w/ cautious sm": dict(agieval=48.18, bbh=50.01, drop=70.88, crass=87.59, race=79.16, gsm8k=65.73, avg=66.92),
    "LLaMA-2-Chat-13B": dict(agieval=38.85, bbh=33.60, drop=40.73, crass=61.31, race=62.69, gsm8k=25.09, avg=43.71),
    "WizardLM-13B": dict(agieval=38.25, bbh=38.47, drop=45.97, crass=67.88, race=62.77, gsm8k=48.60, avg=50.32),
    "LLaMA-2-Chat-70B": dict(agieval=46.70, bbh=44.68, drop=54.11, crass=74.82, race=68.79, gsm8k=52.01, avg=56.85),
    "WizardLM-70B": dict(agieval=48.73, bbh=51.08, drop=59.62, crass=86.13, race=78.96, gsm8k=73.24, avg=66.29),
    "Orca-1-13B": dict(agieval=45.69, bbh=47.84, drop=53.63, crass=90.15, race=81.76, gsm8k=26.46),
    "ChatGPT": dict(agieval=53.13, bbh=55.38, drop=64.39, crass=85.77, race=67.87, gsm8k=79.38),
    "GPT-4": dict(agieval=70.40, bbh=69.04, drop=71.59, crass=94.53, race=83.08, gsm8k=85.52),
}


# ---- command line: print the recipe, or chat with a checkpoint ----


@dataclass
class ChatConfig:
    model: str = ""              # Hugging Face-style model folder (config.json, weights, tokenizer.model)
    system: str = "cautious"     # key of SYSTEM_MESSAGES: "cautious" (the release's default) or "empty"
    max_new_tokens: int = 1024   # per answer (ORCA2.md 7 default)
    temperature: float = 0.0     # 0 = greedy
    top_p: float = 1.0           # nucleus sampling when temperature > 0
    device: str = ""             # "" = cuda when available, else cpu


def print_recipe() -> None:
    """The template rendered for an example, the system messages and the curriculum."""
    example = render_prompt(CAUTIOUS_SYSTEM_MESSAGE, "What is 2+2?")
    print("Template (model card), rendered with the cautious system message; <s> goes in front:")
    print(example)
    print("\nTraining target appended to it; the loss covers exactly this span:")
    print(repr(render_target("The answer is 4.")))
    print("\nA follow-up turn is appended to the previous answer as:", repr(render_followup("And 3+3?")))
    print(f"\nSpecial ids: {SPECIAL_IDS}; vocabulary {VOCAB_SIZE}; generation stops on {STOP_IDS}")
    print("\nSystem messages:")
    for name, message in SYSTEM_MESSAGES.items():
        print(f"  {name:9s} ({len(message)} chars) {message!r}")
    erased = "the cautious message" if ERASED_SYSTEM_MESSAGE == CAUTIOUS_SYSTEM_MESSAGE else repr(ERASED_SYSTEM_MESSAGE)
    print(f"  erased    prompt erasing replaces the teacher's system message by {erased}")
    print("\nCurriculum (progressive learning; each stage starts from the previous one's weights):")
    stages = paper_curriculum("FLAN.jsonl", "ORCA1_CHATGPT.jsonl", "ORCA1_GPT4.jsonl", "ORCA2.jsonl")
    for k, stage in enumerate(stages, 1):
        print(f"  {k}. {stage.name}: {stage.epochs} epochs, lr {stage.lr:g}, warmup {stage.warmup_ratio:.0%}, "
              f"cosine to {stage.min_lr_ratio:g} x lr")
        for s in stage.sources:
            system = "erased (generic message)" if s.erase else ("file's own" if s.system is None else repr(s.system))
            print(f"       {s.name} <- {s.path}, weight {s.weight:g}, system message: {system}")


def chat(cfg: ChatConfig) -> None:
    """Streamed multi-turn chat; later turns are appended with render_followup."""
    import torch  # imported here: the recipe itself needs neither torch nor the model code

    from data import Tokenizer
    from model import Transformer

    if cfg.system not in SYSTEM_MESSAGES:
        raise ValueError(f"--system must be one of {sorted(SYSTEM_MESSAGES)}, got {cfg.system!r}")
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tok = Tokenizer.from_pretrained(cfg.model)
    model = Transformer.from_pretrained(cfg.model, device=device,
                                        dtype=torch.bfloat16 if device.startswith("cuda") else None)
    model.eval()
    print(f"Chatting with {cfg.model} on {device}, {cfg.system} system message. "
          "/reset starts over, /exit or Ctrl-D quits.")
    history: list[int] = []  # token ids of the conversation so far
    while True:
        try:
            user = input("\nuser> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if user in ("/exit", "/quit"):
            return
        if user == "/reset" or not user:
            history = [] if user else history
            continue
        # The previous answer is closed with <|im_end|>, as in multi-turn training data.
        ids = history + [tok.im_end_id] + tok.encode_followup(user) if history else \
            tok.encode_prompt(SYSTEM_MESSAGES[cfg.system], user)
        if len(ids) + cfg.max_new_tokens > model.args.max_seq_len and history:
            print("[conversation too long for the context; starting over]")
            ids = tok.encode_prompt(SYSTEM_MESSAGES[cfg.system], user)
        new: list[int] = []
        shown = 0
        print("orca> ", end="", flush=True)

        def stream(step: list[int | None]) -> None:
            nonlocal shown
            if step[0] is None:
                return
            new.append(step[0])
            text = tok.decode(new, skip_special=True).removeprefix("\n")  # the answer starts after a newline
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                print(text[shown:], end="", flush=True)
                shown = len(text)

        out = model.generate([ids], cfg.max_new_tokens, stop_ids=tok.stop_ids, temperature=cfg.temperature,
                             top_p=cfg.top_p, pad_id=tok.pad_id, on_token=stream)[0]
        print(tok.decode(out, skip_special=True).removeprefix("\n")[shown:])
        history = ids + out


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the Orca 2 recipe, or chat with a checkpoint.")
    sub = parser.add_subparsers(dest="command")
    chat_parser = sub.add_parser("chat", help="interactive streamed chat with a model folder")
    for f in fields(ChatConfig):  # options map onto ChatConfig, defaults come from it
        chat_parser.add_argument(f"--{f.name}", type=type(f.default), default=f.default, required=f.name == "model",
                                 choices=sorted(SYSTEM_MESSAGES) if f.name == "system" else None)
    args = parser.parse_args()
    if args.command == "chat":
        chat(ChatConfig(**{f.name: getattr(args, f.name) for f in fields(ChatConfig)}))
    else:
        print_recipe()


if __name__ == "__main__":
    main()
