"""Reading answers out of free-form model outputs, and scoring them (ORCA2.md 7), without torch.

    python answers.py "Let me think... 9 * 2 = 18. Answer: 18" --kind=number --gold=18

Shared by evaluate.py (benchmark scores) and synth.py (checking a teacher's answers when choosing strategies).
"""

import math
import re
import string
from decimal import Decimal, InvalidOperation

from benchmarks import LETTERS, Item

# ---- answer extraction ----
# Rules, tried in order; the first that finds an answer wins, None means "format not OK". A cue is "answer" or
# "correct/best/right/final answer/option/choice", then "is", "would be", "should be" or a colon; "answer" alone
# (the verb) is not a cue. The LAST cue in the output counts.

CUE = (r"\b(?i:(?:final\s+)?answer(?:\s+to\s+(?:the|this)\s+question)?|(?:correct|best|right|final)\s+(?:answer|option|choice))"
       r"\s*(?i:(?:is|would\s+be|should\s+be)\b|[:=])")
SEP = r"\s*[:=]?\s*"
CHOICE_CUE = re.compile(CUE + SEP + r"(?:(?i:option|choice)\s*)?(?:\(([A-R])\)|\b([A-R])(?=[.,:;)\]'\"]|[ \t]*$|\s+[-–(]|\s+because\b))", re.M)
LEADING_LETTER = re.compile(r"\s*(?:\(([A-R])\)|([A-R])(?:[.):]|\s*$))")
TEXT_CUE = re.compile(CUE + SEP + r"(.+)")
NUMBER = r"-?\$?\d(?:[\d,]*\d)?(?:\.\d+)?"
NUMBER_CUE = re.compile(r"(?:####|" + CUE + r")" + SEP + r"[^\n\d-]{0,40}?(" + NUMBER + ")")


def clean(output: str) -> str:
    return output.replace("**", "").strip()  # markdown bold around answers


def after_last_cue(text: str) -> str | None:
    """The rest of the line after the last cue (the next line when the cue ends its line)."""
    hits = [m.group(1).strip() for m in TEXT_CUE.finditer(text) if m.group(1).strip()]
    return hits[-1] if hits else None


def extract_choice(output: str, options: list[str]) -> str | None:
    """A letter: cue + letter, a leading "(B)"/"B.", the only "(X)" mentioned, or the only option text quoted."""
    text, letters = clean(output), LETTERS[:len(options)]
    hits = [a or b for a, b in CHOICE_CUE.findall(text) if (a or b) in letters]
    if hits:
        return hits[-1]
    m = LEADING_LETTER.match(text)
    if m and (m.group(1) or m.group(2)) in letters:
        return m.group(1) or m.group(2)
    quoted = {x for x in re.findall(r"\(([A-R])\)", text) if x in letters}
    if len(quoted) == 1:
        return quoted.pop()
    for span in (after_last_cue(text), text):  # option text after the cue first, then anywhere
        if span:
            found = {letters[i] for i, o in enumerate(options) if o.strip() and
                     re.search(r"(?<!\w)" + re.escape(" ".join(o.split())) + r"(?!\w)", " ".join(span.split()), re.I)}
            if len(found) == 1:
                return found.pop()
    return None


def extract_label(output: str, labels: tuple[str, ...]) -> str | None:
    """One of the labels (case-insensitive): after the last cue, as the first word, or the only one mentioned."""
    text, words = clean(output), "(?i:(" + "|".join(labels) + r"))\b"
    spelling = {label.lower(): label for label in labels}
    hits = re.findall(CUE + SEP + r"[\"'(]*" + words, text)
    if hits:
        return spelling[hits[-1].lower()]
    first = re.match(r"\s*[\"'(]*" + words, text)
    if first:
        return spelling[first.group(1).lower()]
    found = {w.lower() for w in re.findall(r"\b" + words, text)}
    return spelling[found.pop()] if len(found) == 1 else None


def canon_number(s: str) -> str | None:
    """'$1,234.50' -> '1234.5', '18.00' -> '18'; None when s is not a number."""
    try:
        d = Decimal(s.replace("$", "").replace(",", "").strip())
    except InvalidOperation:
        return None
    return str(int(d)) if d == d.to_integral_value() else str(d.normalize())


def extract_number(output: str) -> str | None:
    """The first number after the last cue ("####" counts), else the last number in the output; canonical."""
    text = clean(output)
    hits = NUMBER_CUE.findall(text) or re.findall(NUMBER, text)
    return canon_number(hits[-1]) if hits else None


def extract_tail(output: str) -> str | None:
    """Free text after the last cue, else the output itself when it is a single line."""
    text = clean(output)
    tail = after_last_cue(text)
    if tail is None:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) != 1:
            return None
        tail = lines[0]
    return tail.strip().strip("*\"'`").removesuffix(".").strip() or None


def extract_answer(item: Item, output: str) -> str | None:
    """The answer found in a model output by the item's format rules, or None (format not OK)."""
    if item.kind == "choice":
        return extract_choice(output, item.choices)
    if item.kind == "binary":
        return extract_label(output, tuple(item.choices))
    if item.kind == "number":
        return extract_number(output)
    tail = extract_tail(output)  # drop, dyck, words
    if tail is None:
        return None
    if item.kind == "dyck":  # the bracket characters only, space-separated like the gold
        return " ".join(re.findall(r"[()\[\]{}<>]", tail)) or None
    if item.kind == "words":
        return " ".join(w for w in (w.strip(".;:\"`*()[]") for w in re.split(r"[\s,]+", tail.lower())) if w) or None
    # DROP: currency signs and thousands separators off numbers (the official metric would read "1,000.5" as 10005)
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", re.sub(r"[$€£](?=\d)", "", tail))


def extract(item: Item, output: str) -> tuple[str | None, int]:
    """(answer, character offset in output where it was read; -1 when there is no answer)."""
    answer = extract_answer(item, output)
    return answer, (output.rfind(answer) if answer is not None else -1)


# ---- metrics: DROP (official normalisation and span alignment) ----


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def drop_normalize(text: str) -> str:
    """The official DROP normalisation, token by token: lower, punctuation (not in numbers), numbers, articles."""
    out = []
    for tok in re.split(" |-", text):  # the official tokeniser splits on spaces and hyphens
        tok = tok.lower()
        tok = tok if _is_number(tok) else "".join(c for c in tok if c not in set(string.punctuation))
        tok = str(float(tok)) if _is_number(tok) else tok
        tok = " ".join(re.sub(r"\b(a|an|the)\b", " ", tok).split())
        if tok.strip():
            out.append(tok)
    return " ".join(out).strip()


def drop_spans(answer: str) -> list[str]:
    """Split an answer into spans on ", " / ", and " / " and ": the full dev file joins multi-span golds with " and "."""
    spans = [s for s in re.split(r"\s*,\s+(?:and\s+)?|\s+and\s+", answer.strip()) if s.strip()]
    return spans or [answer]


def _bag_f1(pred: set[str], gold: set[str]) -> float:
    common = len(pred & gold)
    p = common / len(pred) if pred else 1.0
    r = common / len(gold) if gold else 1.0
    return 0.0 if p == 0.0 and r == 0.0 else 2 * p * r / (p + r)


def _numbers_match(gold: set[str], pred: set[str]) -> bool:
    """Official rule: a gold span with numbers scores only against a predicted span sharing one of them."""
    gold_nums = {w for w in gold if _is_number(w)}
    return not gold_nums or bool(gold_nums & {w for w in pred if _is_number(w)})


def best_assignment(scores: list[list[float]]) -> float:
    """Largest total of a one-to-one matching of rows to columns (Kuhn-Munkres with potentials, exact, O(n^2 m))."""
    if not scores or not scores[0]:
        return 0.0
    if len(scores) > len(scores[0]):
        scores = [list(col) for col in zip(*scores)]
    n, m = len(scores), len(scores[0])
    cost = [[-s for s in row] for row in scores]  # maximise the score = minimise its negative
    u, v, match, way = [0.0] * (n + 1), [0.0] * (m + 1), [0] * (m + 1), [0] * (m + 1)  # 1-based; match[col] = row
    for i in range(1, n + 1):  # add row i, then grow an alternating path to a free column
        match[0], j0 = i, 0
        minv, used = [math.inf] * (m + 1), [False] * (m + 1)
        while match[j0]:
            used[j0], i0, delta, j1 = True, match[j0], math.inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    cur = cost[i0 - 1][j - 1] - u[i0] - v[j]
                    if cur < minv[j]:
                        minv[j], way[j] = cur, j0
                    if minv[j] < delta:
                        delta, j1 = minv[j], j
            for j in range(m + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    minv[j] -= delta
            j0 = j1
        while j0:  # flip the path
            j1 = way[j0]
            match[j0], j0 = match[j1], j1
    return sum(scores[match[j] - 1][j - 1] for j in range(1, m + 1) if match[j])


def drop_em_f1(pred_spans: list[str], gold_spans: list[str]) -> tuple[float, float]:
    """Official get_metrics: EM on the set of normalised spans; F1 = optimal span alignment / max(#spans), rounded."""
    pred = [drop_normalize(s) for s in pred_spans]
    gold = [drop_normalize(s) for s in gold_spans]
    em = float(set(pred) == set(gold) and len(pred) == len(gold))
    pb, gb = [set(s.split()) for s in pred], [set(s.split()) for s in gold]
    scores = [[_bag_f1(p, g) if _numbers_match(g, p) else 0.0 for p in pb] for g in gb]
    return em, round(best_assignment(scores) / max(len(pb), len(gb)), 2)


def drop_metrics(prediction: str | None, golds: list[str]) -> tuple[float, float]:
    """(EM, F1) of a predicted answer string: the best over the gold alternatives, as the official scorer."""
    if prediction is None:
        return 0.0, 0.0
    pairs = [drop_em_f1(drop_spans(prediction), drop_spans(g)) for g in golds]
    return max(p[0] for p in pairs), max(p[1] for p in pairs)


# ---- scoring and summary ----


def score_answer(item: Item, extracted: str | None) -> dict:
    """{'correct': bool} (+ 'em', 'f1' for DROP) for an extracted answer against the item's gold."""
    if item.kind == "drop":
        em, f1 = drop_metrics(extracted, item.gold)
        return {"correct": em == 1.0, "em": em, "f1": f1}
    if extracted is None:
        return {"correct": False}
    if item.kind == "number":
        return {"correct": extracted == canon_number(item.gold)}
    gold = " ".join(item.gold.lower().split()) if item.kind == "words" else item.gold
    return {"correct": extracted == gold}

