"""Reading answers out of model outputs as a careful grader does, and scoring them (ORCA2.md 7), without torch.

    python answers.py "She sells 9 eggs at $2: 9 * 2 = 18. Answer: $18" 18   # prints: rule, answer read, correct
"""

import functools
import re
import string
from decimal import Decimal

import cli
from benchmarks import LETTERS, Item

# ---- conclusions: where an output says its answer ----

END_OF_TURN = re.compile(r"<\|im_(?:start|end)\|>")  # the model invents a next turn: the rest is not its answer
# "answer is", "correct option:", "####" (GSM8K), "\boxed{"; not the verb "answer"; "is not (A), it is (C)" reads (C)
CUE = re.compile(r"(?:(?<!wrong )(?<!this )\banswer(?:\s+to\s+(?:the|this)\s+question)?"
                 r"|\b(?:correct|best|right|final)\s+(?:option|choice))"
                 r"\s*(?:(?:is|must\s+be|should\s+be|will\s+be|(?P<conditional>would|could|might)\s+be)\b|[:=])"
                 r"(?:\s*not\b[^.;\n]{0,80}?[,;]\s*(?:it\s+is|but)\b)?|####|\\boxed\{"
                 r"|^[ \t#]*(?:final\s+)?answer[ \t]*$", re.I | re.M)  # the last: a heading "**Final Answer**"
HYPOTHETICAL = re.compile(r"\b(?:if|suppose|supposing|assuming|imagine|otherwise|unless|instead)\b", re.I)
CONDITIONAL = re.compile(r"\b(?:would|could|might)\b|'d\b", re.I)  # with HYPOTHETICAL: another case imagined
SENTENCE_END = re.compile(r"(?<!\b[A-Z])(?<!\bSt)(?<!\bMr)(?<!\bDr)(?<!\bJr)[.!?](?:\s|$)|\n")  # not "T. J.", "St."
PHRASE_MAX = 500  # characters: answers are short, and a runaway line must not make reading quadratic
REFUSAL = re.compile(r"\b(?:cannot|can't|can not|unable to)\s+(?:be\s+)?determined?\b", re.I)


@functools.lru_cache(maxsize=16)  # the rules ask about the same output many times: split it once
def hypothetical_sentences(text: str) -> list[tuple[int, int]]:
    ends = [m.end() for m in SENTENCE_END.finditer(text)] + [len(text)]
    spans = zip([0, *ends], ends)
    return [(s, e) for s, e in spans if HYPOTHETICAL.search(text, s, e) and CONDITIONAL.search(text, s, e)]


def hypothetical(text: str, pos: int) -> bool:
    return any(start <= pos < end for start, end in hypothetical_sentences(text))


def conclusions(text: str) -> list[int]:
    cues = [m for m in CUE.finditer(text) if not hypothetical(text, m.start())]
    plain = [m for m in cues if not m["conditional"]]
    return [m.end() for m in (plain or cues)]


def phrase_at(text: str, pos: int, paragraph: bool = False) -> tuple[str, int]:
    """(phrase, offset): the rest of the cue's line, else the next non-empty line (or paragraph, for lists)."""
    ends_line = re.compile(r"[ \t:]*(?:\n|$)").match(text, pos) is not None
    pos = re.compile(r"[\s:]*" if ends_line else r"[ \t:]*").match(text, pos).end()
    end = re.compile(r"\n\s*\n" if paragraph and ends_line else r"\n").search(text, pos, pos + PHRASE_MAX)
    return text[pos:end.start() if end else pos + PHRASE_MAX], pos


def last_sentence(text: str) -> tuple[str, int]:
    limit = len(text.rstrip())
    starts = [0] + [m.end() for m in SENTENCE_END.finditer(text) if m.end() < limit]
    start = len(text) - len(text[starts[-1]:].lstrip())
    return text[start:].strip(), start


def first_read(text: str, read, otherwise: tuple[str | None, int]) -> tuple[str | None, int]:
    """What read() finds after the last conclusion naming an answer, else `otherwise` (none after a refusal)."""
    reads = (read(*phrase_at(text, pos)) for pos in reversed(conclusions(text)))  # lazily, the last first
    return next(filter(None, reads), None) or ((None, -1) if REFUSAL.search(text) else otherwise)


# ---- numbers ----

WORD_VALUE = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                         "thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split())}
WORD_VALUE |= {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
WORD = "(?:" + "|".join([*WORD_VALUE, "hundred", "thousand"]) + ")"
NUMBER = re.compile(  # one number as written: a LaTeX fraction, digits (sign, currency, thousands), or words
    r"\\[dt]?frac\{(?P<num>-?\d+(?:\.\d+)?)\}\{(?P<den>-?\d+(?:\.\d+)?)\}"
    r"|(?<![\w.])(?P<digits>-?[$＄€£]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+))(?!\w)"
    rf"|\b(?P<words>{WORD}(?:[\s-]+(?:and\s+)?{WORD})*)\b", re.I)
LEAD_CLAUSE = re.compile(  # a clause before the answer ("After selling it for $200,000, he made $70,000"), or ""
    r"(?:(?:after|when|if|since|because|by|once|before|while|with)\b(?:[^,\n]|,\d{3})*,\s*)?", re.I)
EXPLANATION = re.compile(r"\s\(|\s(?:because|since|as|where)\b|,\s*(?:which|who|where|because|since|as|according)\b"
                         r"|;|" + SENTENCE_END.pattern, re.I)  # where the explanation after an answer begins
RESTATED = re.compile(r"\s\(\s*(\S+)(?:\s+[a-z]+)?\s*\)", re.I)  # "(160 minutes)": one number and its unit
NUMBER_HEDGE = re.compile(r"\d\s*%?(?:\s+[a-z]+)?\s+or\s+[$]?-?\d", re.I)  # "45 or 315", "45 miles or 315 miles"


def canon_number(s: str) -> str | None:
    """'$1,234.50' -> '1234.5', '18.00' -> '18'; None when s is not a number."""
    s = re.sub(r"[$＄€£,\s]", "", s)
    if not re.fullmatch(r"-?(?:\d+(?:\.\d+)?|\.\d+)", s):
        return None
    return str(int(Decimal(s))) if Decimal(s) == int(Decimal(s)) else str(Decimal(s).normalize())


def number_value(m: re.Match) -> str | None:
    if m["den"]:
        return canon_number(str(Decimal(m["num"]) / Decimal(m["den"]))) if Decimal(m["den"]) else None
    if m["digits"]:
        return canon_number(m["digits"])
    total, current = 0, 0
    for w in re.findall(r"[a-z]+", m["words"].lower()):  # "two thousand three hundred and five"
        if w == "thousand":
            total, current = total + max(current, 1) * 1000, 0
        else:
            current = max(current, 1) * 100 if w == "hundred" else current + WORD_VALUE.get(w, 0)
    return str(total + current)


def numbers_in(text: str, start: int = 0) -> list[re.Match]:
    found = list(NUMBER.finditer(text, start))
    return [m for m in found if not m["words"]] or found


def result_span(s: str) -> tuple[int, int]:
    """Where a calculation's result is in s: after its last "=" ("9 * 2 = 18"), before it in "18 = 9 * 2"."""
    first, last = s.find("="), s.rfind("=")  # -1, -1 without one: all of s
    answer_first = first >= 0 and len(numbers_in(s[:first])) == 1 and len(numbers_in(s[last + 1:])) > 1
    return (0, first) if answer_first else (last + 1, len(s))


def read_number(phrase: str, at: int) -> tuple[str | None, int] | None:
    cut = EXPLANATION.search(phrase)
    main = phrase[:cut.start()] if cut else phrase
    if NUMBER_HEDGE.search(main):
        return None, -1
    start, end = result_span(main)
    found = numbers_in(main[:end], max(LEAD_CLAUSE.match(main).end(), start))
    restated = RESTATED.match(phrase, cut.start()) if cut and len(found) > 1 else None  # "2 h and 40 min (160 min)"
    if restated and NUMBER.fullmatch(restated[1]):
        return number_value(NUMBER.fullmatch(restated[1])), at + restated.start(1)
    return (number_value(found[0]), at + found[0].start()) if found else None


# ---- options (letters) and labels (yes/no) ----

LABEL = re.compile(r"(?:either\s+)?(?:(?:option|choice)\s+)?(?:\((?P<paren>[A-R])\)"
                   r"|(?P<bare>[A-R])(?=\s*(?:[).:,;}\]\"'$]|$)))", re.I)  # "(B)", "(b)", "B)", "B.", "option B"
LETTER_HEDGE = re.compile(r"\s*(?:,|/|or\b|and\b)\s*(?:[Oo]ption\s+)?(?:\([A-Ra-r]\)|[A-R]\b)")  # "(C) or (A)"
LETTER_VERDICT = re.compile(  # "Option C is correct", "(C) ... is the best", "which is option A", "we pick (B)"
    r"(?:\b(?i:option|choice)\s+\(?(?P<word>[A-R])\b\)?|\((?P<paren>[A-Ra-r])\)|\b(?P<bare>[A-R])(?=\s+is\b))"
    r"(?:(?!\b(?i:option|choice)\b)[^.\n();]){0,80}?"  # its text, but no other option ("(A) and (B) ...")
    r"\bis\s+(?:the\s+)?(?i:correct|right|best)\b"
    r"|\b(?i:(?:is|be)\s+(?:option|choice)|pick|choose|select|go\s+with)\s+(?i:option\s+)?\(?(?P<is>[A-R])\b")
LISTED = re.compile(r"\(([A-R])\)|^\s*([A-R])[.)](?:\s|$)|\b[Oo]ption\s+([A-R])\b", re.M)  # "(B)", "B. ..."


def plain(s: str) -> str:  # words only, lowercased, padded: option texts compare so ("$5 m+4 p$" ~ "$5m+4p$")
    return " " + " ".join(re.findall(r"\w+", s.lower())) + " "


def read_letter(phrase: str, at: int, letters: str, options: list[str]) -> tuple[str | None, int] | None:
    """A letter label ("(B)", "B.", "option B"), else the option the phrase is (spaces aside) or only contains."""
    label = LABEL.match(phrase)  # its one named group ("paren" or "bare") is the letter
    if label and label[label.lastgroup].upper() in letters:
        hedge = LETTER_HEDGE.match(phrase, label.end())
        return (None, -1) if hedge else (label[label.lastgroup].upper(), at + label.start(label.lastgroup))
    texts = {x: plain(o) for x, o in zip(letters, options) if plain(o).strip()}
    said = plain(phrase).replace(" ", "")
    same = [x for x, o in texts.items() if said in (o.replace(" ", ""), x.lower() + o.replace(" ", ""))]
    inside = [x for x, o in texts.items() if o in plain(phrase)]
    named = same[0] if len(same) == 1 else inside[0] if len(inside) == 1 else None
    return (named, at) if named else None


def extract_choice(text: str, letters: str, options: list[str]) -> tuple[str | None, int]:
    """The option named by the last conclusion, else the only letter mentioned, else in the last sentence."""
    hits = [(pos, read_letter(*phrase_at(text, pos), letters, options)) for pos in conclusions(text)]
    for m in LETTER_VERDICT.finditer(text):  # each alternative has one group: the last matched is the letter
        if m[m.lastindex].upper() in letters and not hypothetical(text, m.start()):
            hits.append((m.start(), (m[m.lastindex].upper(), m.start(m.lastindex))))
    hits = [(pos, found) for pos, found in hits if found]
    if hits:
        return max(hits, key=lambda h: h[0])[1]
    listed = [(m[m.lastindex], m.start(m.lastindex)) for m in LISTED.finditer(text)]
    if listed:  # options listed, none concluded: one letter listed (maybe often) is the answer, several are none
        return listed[0] if len({x for x, _ in listed}) == 1 and listed[0][0] in letters else (None, -1)
    found = None if REFUSAL.search(text) else read_letter(*last_sentence(text), letters, options)
    return found or (None, -1)


# A word meaning yes (index 0 of the labels: True/Yes/valid/yes) or no; "not" right before it flips the meaning.
MEANING = re.compile(r"(?P<neg>(?:\bnot|n't|\bnever)\s+)?\b(?:(?P<yes>yes|true|plausible|valid|honest|truthful"
                     r"|tell(?:s|ing)?\s+the\s+truth|(?:return(?:s|ed)?\s+to|(?:back|end\s+up)\s+at)\s+the\s+start\w*)"
                     r"|(?P<no>no|false|implausible|invalid|dishonest|lies|lying|liar))\b", re.I)
LABEL_AFTER = re.compile(r"\s*(?:[.,;:!)\"'\]]|$|or\b)")  # "yes"/"no" stand alone as labels: "so no, we"


def meanings(text: str, start: int, end: int):  # yields (offset, 0 for yes / 1 for no)
    for m in MEANING.finditer(text, start, end):  # the last group matched is "yes" or "no", after "neg"
        word = m[m.lastgroup].lower()
        if word in ("yes", "no") and not LABEL_AFTER.match(text, m.end()):
            continue
        flip = bool(m["neg"]) and word not in ("yes", "no", "true", "false")
        yield m.start() if flip else m.start(m.lastgroup), int(m.lastgroup == "no") ^ flip


def extract_label(text: str, labels: list[str]) -> tuple[str | None, int]:
    """A label by meaning: after the last conclusion its first word or one meaning, else the last meaning."""
    def read(phrase: str, at: int) -> tuple[str | None, int] | None:
        found = list(meanings(text, at, at + len(phrase)))
        first = bool(found) and not re.search(r"\w", text[at:found[0][0]])
        hedged = first and re.match(r"\w+\s+or\b", text[found[0][0]:])  # "Yes or no", "true or false"
        if (first or len({v for _, v in found}) == 1) and not hedged:
            return labels[found[0][1]], found[0][0]
        return (None, -1) if found else None
    found = [(pos, v) for pos, v in meanings(text, 0, len(text)) if not hypothetical(text, pos)]
    hedged = len(found) > 1 and re.fullmatch(r"\w+\s+or\s+", text[found[-2][0]:found[-1][0]])  # "True or False"
    return first_read(text, read, (labels[found[-1][1]], found[-1][0]) if found and not hedged else (None, -1))


# ---- free-form answers: DROP, bracket and word sequences ----
# A DROP answer as drop_v0_dev writes one: no aside or explanation; a calculation's result; a lone number without
# its unit ("In 1085") or sentence ("The longest was 53 yards"), but kept in a phrase ("Super Bowl 50").

MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
US_DATE = re.compile(rf"\b({MONTHS})\s+(\d{{1,2}})(?:st|nd|rd|th)?\b(?:,?\s+(\d{{3,4}})\b)?")  # "September 30, 1686"
PARENTHESIS = re.compile(r"\s*\([^()]*\)")  # "France (29%) and Italy (20%)": asides inside the answer
SCORE = re.compile(r"(?<![\w.])\d+[-–]\d+(?!\w)")  # "7-7" is one answer (drop_v0_dev writes scores so)
TEXT_HEDGE = re.compile(r"\d\S*\s+or\s+[^,;]*?\d")  # numbers or dates: "April 1, 1991 or April 25, 1991"
BEFORE_NUMBER = re.compile(r"(?:(?:in|about|around|approximately|roughly|nearly|almost|only|exactly)\s+)?", re.I)
UNIT = re.compile(r"(?:%|-|\s+)?(?:(?!and\b|or\b|of\b|to\b|than\b)[a-z]+\s*){0,2}")  # "46 yards", "5 field goals"
COPULA = re.compile(r"\b(?:is|was|were|are)\b")  # a sentence, "The score was tied 7-7": read its number
SPAN_COMMA = re.compile(r"\s*,(?!\d{3}\b)\s*(?:and\s+)?")  # "Jones, Washington" -> "Jones and Washington"


def read_text(phrase: str, at: int) -> tuple[str | None, int] | None:
    lead = len(phrase) - len(phrase.lstrip(" \"'*"))
    head = PARENTHESIS.sub("", phrase[lead:])
    head = EXPLANATION.split(head, 1)[0].rstrip(" \"'*.,:}$")  # the explanation goes
    if TEXT_HEDGE.search(head):
        return None, -1
    start, end = result_span(head)
    head = head[start:end].strip()
    head = US_DATE.sub(lambda m: f"{m[2]} {m[1]}" + (f" {m[3]}" if m[3] else ""), head)
    scores = list(SCORE.finditer(head))
    found = scores or numbers_in(head)
    if len(found) == 1:
        first = BEFORE_NUMBER.fullmatch(head[:found[0].start()]) and UNIT.fullmatch(head[found[0].end():])
        sentence = COPULA.search(head) and not re.search(r"\S\s+[A-Z]", head)  # no name in it
        if first or sentence:
            return (found[0][0] if scores else number_value(found[0])), at + lead
    return (SPAN_COMMA.sub(" and ", head), at + lead) if head else None


BRACKETS = re.compile(r"[()\[\]{}<>]")
SEQUENCE_START = re.compile(r":|\b(?:is|are)\b")  # without a cue: "Sorted: ...", "The rest of the sequence is ) >"


def extract_sequence(text: str, kind: str, task: str) -> tuple[str | None, int]:
    starts = conclusions(text) or [m.end() for m in SEQUENCE_START.finditer(text)] or [last_sentence(text)[1]]
    block, at = phrase_at(text, starts[-1], paragraph=True)
    if kind == "words":
        words = [w.strip(".;:\"'*()[]") for w in re.split(r"[\s,]+", block.lower())]
        words = [w for w in words if w and not w.isdigit()]  # "1. built" -> "built"
        return (" ".join(words), at) if words else (None, -1)
    brackets = BRACKETS.findall(block)
    given = BRACKETS.findall(task.rsplit("Input:", 1)[-1]) if "Input:" in task else []
    if given and brackets[:len(given)] == given and len(brackets) > len(given):
        brackets = brackets[len(given):]
    elif set(brackets) - set(")]}>"):  # the whole sequence, input unknown: its closing tail
        brackets = list(re.search(r"[)\]}>]*$", "".join(brackets))[0])
    return (" ".join(brackets), at) if brackets else (None, -1)


# ---- the API (benchmark items, synth.py's golds) and scoring; DROP as simple-evals' drop_metric ----


def extract(item: Item, output: str) -> tuple[str | None, int]:
    """(the answer a grader reads in the output by the item's kind, its offset in output; -1 when None)."""
    # markdown bold and code marks blanked, the Unicode minus made "-": same length, so offsets stay true
    text = END_OF_TURN.split(output, 1)[0].replace("**", "  ").replace("`", " ").replace("\u2212", "-")
    if item.kind == "choice":
        return extract_choice(text, LETTERS[:len(item.choices)], item.choices)
    if item.kind == "binary":
        return extract_label(text, list(item.choices))
    if item.kind == "number":  # without a conclusion: the last number in digits outside hypothetical sentences
        digits = [m for m in NUMBER.finditer(text) if m["digits"] and not hypothetical(text, m.start())]
        return first_read(text, read_number, (number_value(digits[-1]), digits[-1].start()) if digits else (None, -1))
    if item.kind in ("dyck", "words"):
        return extract_sequence(text, item.kind, item.text)
    return first_read(text, read_text, read_text(*last_sentence(text)) or (None, -1))  # else the last sentence


def extract_answer(item: Item, output: str) -> str | None:
    """The answer a grader reads in a model output, or None (format not OK)."""
    return extract(item, output)[0]


def answer_rule(gold: str) -> str:
    """How an answer is checked against this gold: "number", "letter" (A-R, also "(B)") or "text"."""
    if canon_number(gold) is not None:
        return "number"
    return "letter" if re.fullmatch(r"\s*(?:\([A-R]\)|[A-R])\s*", gold) else "text"


def check_answer(output: str, gold: str, rule: str) -> tuple[str | None, bool]:
    """(the answer read as benchmark items of that kind are read, whether it equals the gold)."""
    kind = {"number": "number", "letter": "choice", "text": "drop"}[rule]  # text: DROP's normalised equality
    golds = [gold] if kind == "drop" else gold.strip(" ()")
    item = Item("check", "", "", "", "", golds, kind, [""] * len(LETTERS) if kind == "choice" else [])
    answer = extract_answer(item, output)
    return answer, score_answer(item, answer)["correct"]


def is_number(text: str) -> bool:
    """Whether float() reads text, the official test for a number token."""
    try:
        float(text)
        return True
    except ValueError:
        return False


def drop_normalize(text: str) -> str:
    """The official normalisation, token by token: lower, punctuation (not in numbers), numbers, articles."""
    toks = re.split(" |-", text.lower())  # the official tokeniser splits on spaces and hyphens only
    toks = [t if is_number(t) else "".join(c for c in t if c not in string.punctuation) for t in toks]
    toks = [str(float(t)) if is_number(t) else t for t in toks]
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", " ".join(toks)).split())  # articles, empty tokens go


def drop_metrics(prediction: str | None, golds: list[str]) -> tuple[float, float]:
    """(EM, F1 in 0..1) of one predicted string: the best over the non-blank golds, F1 rounded as the official."""
    if prediction is None:
        return 0.0, 0.0
    em, f1 = 0.0, 0.0
    pred = set((said := drop_normalize(prediction)).split())  # each string normalised once
    for gold in [drop_normalize(g) for g in golds if g.strip()]:  # blank golds are skipped, as the official does
        em = max(em, float(said == gold))
        bag = set(gold.split())
        numbers = {w for w in bag if is_number(w)}  # a gold with numbers scores only if one of them is predicted
        if numbers and not numbers & pred:
            continue
        p = len(pred & bag) / len(pred) if pred else 1.0
        r = len(pred & bag) / len(bag) if bag else 1.0
        score = 2 * p * r / (p + r) if p + r else 0.0
        f1 = max(f1, round(100 * score, 2) / 100)  # rounded on the official 0-100 scale
    return em, f1


def score_answer(item: Item, extracted: str | None) -> dict:
    """{'correct': bool} (+ 'em', 'f1' for DROP) for an extracted answer against the item's gold."""
    if item.kind == "drop":
        em, f1 = drop_metrics(extracted, item.gold)
        return {"correct": em == 1.0, "em": em, "f1": f1}
    golds = {"number": canon_number(item.gold), "dyck": " ".join(BRACKETS.findall(item.gold)),
             "words": " ".join(item.gold.lower().split())}  # as the extraction writes them
    return {"correct": extracted is not None and extracted == golds.get(item.kind, item.gold)}


if __name__ == "__main__":
    output, gold = cli.demo_args(__doc__, 2)  # --help, or anything but OUTPUT GOLD, shows the docstring
    rule = answer_rule(gold)
    print(rule, *check_answer(output, gold, rule))
