"""The Orca 2 recipe in one place: template, special tokens, system messages, strategies, curriculum, paper numbers.

    python orca2.py            # print the recipe

Everything specific to Orca 2 (arXiv 2311.11045) rather than to LLaMA-2 training lives here and nowhere else, in
the standard library only. "Published" facts come from the paper or the release files; the rest are this project's
defaults where the authors are silent (../shared/docs/ORCA2.md).
"""

import sys
from dataclasses import dataclass
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parent.parent / "shared" / "data"  # beside the checkout; see its README.md

# ---- chat template and special tokens (published: model card, added_tokens.json) ----

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "[PAD]"
BOS, EOS, UNK = "<s>", "</s>", "<unk>"
# The release's vocabulary: LLaMA-2's 32000 pieces plus three added tokens.
SPECIAL_IDS = {UNK: 0, BOS: 1, EOS: 2, PAD: 32000, IM_START: 32001, IM_END: 32002}
VOCAB_SIZE = 32003

# The template as parts: IM_START / IM_END become one control id each, "{name}" is filled in, the rest is text.
# PROMPT is the model card's f-string, character for character; it ends right after "assistant", no newline.
PROMPT = (IM_START, "system\n", "{system}", IM_END, "\n", IM_START, "user\n", "{user}", IM_END, "\n",
          IM_START, "assistant")
FOLLOWUP = ("\n", IM_START, "user\n", "{user}", IM_END, "\n", IM_START, "assistant")  # a later turn, no second <s>
TARGET = ("\n", "{response}", IM_END)  # the supervised span of an assistant turn (ORCA2.md 5.1)


def is_field(part: str) -> bool:
    return part.startswith("{") and part.endswith("}")


def render(template: tuple[str, ...], **values: str) -> str:
    """The template's parts joined, each "{name}" replaced by values[name]."""
    return "".join(values[p[1:-1]] if is_field(p) else p for p in template)


def render_prompt(system: str, user: str) -> str:
    return render(PROMPT, system=system, user=user)


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

# ---- strategies: the detailed instructions the teacher answers under (ORCA2.md 2.2; the paper's are unpublished) ----

# Every instruction ends by asking for a last line "Answer: ...", so synth.py can check the teacher's answers.
ANSWER_LINE = ('End your response with a last line "Answer: " followed by the final answer alone: a number, an '
               "option letter, or a short phrase.")
STRATEGIES = {  # name -> the system instruction; synth.py picks one per task group, prompt erasing removes it
    "step-by-step": "You are a careful problem solver. Solve the task step by step: break it into small steps and "
                    "write one step per line, each saying what is computed or deduced and its result, so that every "
                    "step follows from the task or from earlier steps. Check the result against the question "
                    "before you conclude. " + ANSWER_LINE,
    "recall-reason-generate": "You are a knowledgeable assistant. First recall: list, one per line, the facts, rules "
                              "or definitions the task depends on. Then reason: combine them step by step, saying "
                              "which recalled fact each step uses. Then generate the answer from that reasoning "
                              "alone. " + ANSWER_LINE,
    "recall-then-generate": "You are a knowledgeable assistant. First recall the facts that decide the task: write "
                            "them one per line, in the order in which they lead to the answer, each as a short "
                            "statement taken from the task or from what you know. Then give the answer that those "
                            "facts imply, without further discussion. " + ANSWER_LINE,
    "extract-generate": "You answer questions about a given text. First extract: quote, one per line, the exact "
                        "sentences, names or numbers of the text that the answer depends on, and nothing else. Then "
                        "generate the answer from those quotes only, computing with the numbers if the question "
                        "asks for it. " + ANSWER_LINE,
    "explain-then-answer": "You are a patient teacher. First explain in a few sentences what the task is asking, "
                           "which rule or idea decides it and how that rule applies to this case, so that a student "
                           "could reach the answer alone. Then state the answer. " + ANSWER_LINE,
    "guess-and-check": "You solve puzzles by trying answers. Propose a candidate answer, check it against every "
                       "condition of the task one by one, and when a condition fails, say which and propose a "
                       "better candidate; stop when every condition holds. " + ANSWER_LINE,
    "direct": "Answer directly, without explanation or working: write a single line \"Answer: \" followed by the "
              "final answer alone: a number, an option letter, or a short phrase."}

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
    sources: list[Source]     # mixed together, then packed
    epochs: int               # published per stage
    lr: float                 # peak learning rate (not published; paper_curriculum's default is ORCA2.md 5.4's)
    warmup_ratio: float = 0.03  # linear warmup over this share of the stage's steps, then cosine decay to
    min_lr_ratio: float = 0.1   # min_lr_ratio * lr; restarted per stage (not published)


def paper_curriculum(flan: str, orca1_chatgpt: str, orca1_gpt4: str, orca2: str, lr: float = 2e-5) -> list[Stage]:
    """The three published stages, each starting from the previous one's weights."""
    return [Stage("flan", [Source("flan-v2", flan, system=EMPTY_SYSTEM_MESSAGE)], epochs=1, lr=lr),
            Stage("orca1-chatgpt", [Source("orca1-chatgpt", orca1_chatgpt)], epochs=3, lr=lr),
            Stage("orca1-gpt4+orca2", [Source("orca1-gpt4", orca1_gpt4), Source("orca2", orca2, erase=True)],
                  epochs=4, lr=lr)]


# ---- the paper's results (ORCA2.md section 8, Table 1; zero-shot) ----

BENCHMARKS = ("agieval", "bbh", "drop", "crass", "race", "gsm8k")
PAPER_TABLE = {  # model -> score (percent) per benchmark, in BENCHMARKS order, then the Figure 4 average
    "Orca-2-7B": (45.10, 45.93, 60.26, 84.31, 80.79, 47.23, 60.60),
    "Orca-2-7B w/ cautious sm": (43.97, 42.80, 69.09, 88.32, 75.82, 55.72, 62.62),
    "Orca-2-13B": (49.93, 50.18, 57.97, 86.86, 82.87, 59.14, 64.49),
    "Orca-2-13B w/ cautious sm": (48.18, 50.01, 70.88, 87.59, 79.16, 65.73, 66.92),
    "LLaMA-2-Chat-13B": (38.85, 33.60, 40.73, 61.31, 62.69, 25.09, 43.71),
    "WizardLM-13B": (38.25, 38.47, 45.97, 67.88, 62.77, 48.60, 50.32),
    "LLaMA-2-Chat-70B": (46.70, 44.68, 54.11, 74.82, 68.79, 52.01, 56.85),
    "WizardLM-70B": (48.73, 51.08, 59.62, 86.13, 78.96, 73.24, 66.29),
    "Orca-1-13B": (45.69, 47.84, 53.63, 90.15, 81.76, 26.46, None),
    "ChatGPT": (53.13, 55.38, 64.39, 85.77, 67.87, 79.38, None),
    "GPT-4": (70.40, 69.04, 71.59, 94.53, 83.08, 85.52, None)}
PAPER_RESULTS = {model: dict(zip((*BENCHMARKS, "avg"), row)) for model, row in PAPER_TABLE.items()}


# ---- command line: print the recipe ----


def print_recipe() -> None:
    """The template rendered for an example, the system messages, the strategies and the curriculum."""
    print("Template (model card) with the cautious system message; <s> goes in front:")
    print(render_prompt(CAUTIOUS_SYSTEM_MESSAGE, "What is 2+2?"))
    print(f"\nThe loss covers exactly the span appended: {render(TARGET, response='The answer is 4.')!r}")
    print(f"A follow-up turn comes after the answer: {render(FOLLOWUP, user='And 3+3?')!r}")
    print(f"Special ids: {SPECIAL_IDS}; vocabulary {VOCAB_SIZE}")
    print(f"\nSystem messages: {list(SYSTEM_MESSAGES)}; prompt erasing puts the generic one, the cautious message, "
          "in the teacher's place")
    print("\nStrategies (the teacher's detailed instructions; synth.py picks one per task group):")
    for name, text in STRATEGIES.items():
        print(f"  {name:24s} {text[:88]}...")
    print("\nCurriculum (progressive learning; each stage starts from the previous one's weights):")
    stages = paper_curriculum("FLAN.jsonl", "ORCA1_CHATGPT.jsonl", "ORCA1_GPT4.jsonl", "ORCA2.jsonl")
    for k, stage in enumerate(stages, 1):
        print(f"  {k}. {stage.name}: {stage.epochs} epochs, lr {stage.lr:g}, warmup {stage.warmup_ratio:.0%}, "
              f"cosine to {stage.min_lr_ratio:g} x lr; sources {stage.sources}")


if __name__ == "__main__":
    if sys.argv[1:]:  # the recipe takes no options; --help (or anything else) shows what it is
        print(__doc__)
        raise SystemExit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    print_recipe()
