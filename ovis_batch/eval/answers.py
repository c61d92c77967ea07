"""Benchmark answers: reasoning stripped, multiple-choice letters, yes/no, and VQA normalisation and accuracy.

Model outputs arrive either with the thinking trace already separated (the `reasoning` column, the
`caption` column holding only the answer) or with `<think>...</think>` still in the text; `split_reasoning`
handles the second case, so extraction only ever reads the answer part: a trace that weighs "B or C"
must not decide the letter.

`extract_choice` reads which option an answer picks, from the forms models actually write ("B",
"(B)", "B) a red car", "The answer is B.", "**C**", or the option's text); `extract_yes_no` reads yes or
no. Both return None when the answer does not say, and callers count that as unparseable (and wrong).

`normalize_vqa_answer` and `vqa_accuracy` follow the official VQA evaluation: punctuation handling, number
words to digits, articles dropped, contractions restored, then accuracy min(1, matches / 3) averaged over
the leave-one-annotator-out subsets. One deliberate difference: the official script normalises only when
the annotators disagree (its annotation files are pre-normalised); here both sides are always normalised,
so references from any source compare fairly.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
_SPECIAL_TOKENS = re.compile(r"<\|(?:im_end|im_start|endoftext)\|>")


def split_reasoning(text: str | None) -> tuple[str, str | None]:
    """(answer, reasoning) of a raw model output that may still contain `<think>...</think>`.

    The answer is what follows the first `</think>` (as Ovis2.5 defines it); a `<think>` that is never
    closed means the trace was cut off and there is no answer. Text without tags is all answer.
    """
    if text is None:
        return "", None
    text = _SPECIAL_TOKENS.sub("", text)
    close = text.find(THINK_CLOSE)
    if close >= 0:
        reasoning = text[:close].replace(THINK_OPEN, "", 1).strip()
        return text[close + len(THINK_CLOSE) :].strip(), reasoning
    open_at = text.find(THINK_OPEN)
    if open_at >= 0:
        return text[:open_at].strip(), text[open_at + len(THINK_OPEN) :].strip()
    return text.strip(), None


# --------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------

LETTERS = string.ascii_uppercase

_MARKDOWN = re.compile(r"\*\*|__|`|^#+\s*", re.MULTILINE)
# "answer is B", "Answer: (C)", "the correct option would be D", "choice B"
_EXPLICIT = re.compile(
    r"\b(?:answer|option|choice)s?\b(?:\s+(?:is|would\s+be|should\s+be|must\s+be))?\s*[:：]?\s*"
    r"[\(\[]?([A-Za-z])[\)\]]?(?=$|[\s.,;:!?)\]])",
    re.IGNORECASE,
)
_LEADING_LETTER = re.compile(r"^[\(\[]?([A-Za-z])(?:[\)\]][.:]?|[.:])(?:\s|$)")
_BRACKETED_LETTER = re.compile(r"[\(\[]([A-Z])[\)\]]")
_STANDALONE_LETTER = re.compile(r"(?<![\w'])([A-Z])(?![\w'])")


def extract_choice(answer: str, choices: Sequence[str]) -> int | None:
    """Index of the option that `answer` picks among `choices` (labelled A, B, ...), or None.

    Tried in order: the answer is just a letter; an explicit statement ("the answer is B"; the last one
    wins, since models restate their final choice at the end); a leading "B)" / "(B)" / "B."; exactly one
    bracketed letter; the option's text; exactly one capital letter standing alone ("It is C, because
    ...", not "A" or "I" used as a word). Two candidates ("B or C") make the answer unparseable.
    """
    n = len(choices)
    text = _MARKDOWN.sub("", answer).strip()
    if not text:
        return None

    bare = text.strip(" \t\n.,;:!?()[]{}'\"")
    if len(bare) == 1 and bare.upper() in LETTERS[:n]:
        return LETTERS.index(bare.upper())

    explicit = [m.group(1) for m in _EXPLICIT.finditer(text) if _letter_in_range(m.group(1), n)]
    explicit = [letter for letter in explicit if not _is_article(text, letter)]
    if explicit:
        return LETTERS.index(explicit[-1].upper())

    leading = _LEADING_LETTER.match(text)
    if leading and _letter_in_range(leading.group(1), n):
        return LETTERS.index(leading.group(1).upper())

    bracketed = {m.group(1) for m in _BRACKETED_LETTER.finditer(text) if _letter_in_range(m.group(1), n)}
    if len(bracketed) == 1:
        return LETTERS.index(bracketed.pop())

    by_text = _match_option_text(text, choices)
    if by_text is not None:
        return by_text

    standalone = {
        m.group(1)
        for m in _STANDALONE_LETTER.finditer(text)
        if _letter_in_range(m.group(1), n) and not _used_as_word(text, m)
    }
    return LETTERS.index(standalone.pop()) if len(standalone) == 1 else None


def resolve_reference_choice(answer: object, choices: Sequence[str]) -> int | None:
    """The index a reference `answer` designates: a letter ("B", "(B)"), a 0-based index, or option text."""
    if isinstance(answer, (int,)) and not isinstance(answer, bool):
        return answer if 0 <= answer < len(choices) else None
    if not isinstance(answer, str):
        return None
    text = answer.strip()
    letter = text.strip("()[]. ")
    if len(letter) == 1 and letter.upper() in LETTERS[: len(choices)]:
        return LETTERS.index(letter.upper())
    if text.isdigit():
        index = int(text)
        return index if index < len(choices) else None
    normalized = [_normalize_option(c) for c in choices]
    target = _normalize_option(text)
    return normalized.index(target) if normalized.count(target) == 1 else None


def _letter_in_range(letter: str, n: int) -> bool:
    return letter.upper() in LETTERS[:n]


def _is_article(text: str, letter: str) -> bool:
    # "the answer is A man on a horse": a capital A followed by a lower-case word is the article
    return letter == "A" and re.search(r"\bis\s+A\s+[a-z]", text) is not None


_CONJUNCTIONS = frozenset(["and", "or", "nor", "vs", "versus", "but"])


def _used_as_word(text: str, found: re.Match[str]) -> bool:
    letter = found.group(1)
    rest = text[found.end(1) :]
    following = re.match(r"\s+([a-z]+)", rest)
    return letter in ("A", "I") and following is not None and following.group(1) not in _CONJUNCTIONS


def _normalize_option(text: str) -> str:
    text = text.lower().strip()
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())


def _match_option_text(text: str, choices: Sequence[str]) -> int | None:
    """The option whose text the answer is, or the only option whose text it contains."""
    answer = _normalize_option(text)
    options = [_normalize_option(c) for c in choices]
    exact = [i for i, option in enumerate(options) if option and option == answer]
    if len(exact) == 1:
        return exact[0]
    contained = [
        i
        for i, option in enumerate(options)
        if option and re.search(rf"(?<!\w){re.escape(option)}(?!\w)", answer)
    ]
    # an option contained in a longer contained option ("red" in "dark red") does not count
    contained = [i for i in contained if not any(j != i and options[i] in options[j] for j in contained)]
    return contained[0] if len(contained) == 1 else None


# --------------------------------------------------------------------------------------------------
# Yes / no
# --------------------------------------------------------------------------------------------------

_YES = frozenset(["yes", "yeah", "yep", "true", "correct"])
_NO = frozenset(["no", "nope", "false", "incorrect"])


def extract_yes_no(answer: str) -> str | None:
    """ "yes" or "no" from an answer ("Yes, there is a dog." -> "yes"), or None when it says neither."""
    words = re.findall(r"[a-z']+", _MARKDOWN.sub("", answer).lower())
    if not words:
        return None
    # the first word decides, unless its clause says both ("Yes and no.")
    first_clause = set(re.findall(r"[a-z']+", re.split(r"[.,;:!?]", _MARKDOWN.sub("", answer).lower())[0]))
    if words[0] in _YES:
        return None if first_clause & _NO else "yes"
    if words[0] in _NO:
        return None if first_clause & _YES else "no"
    stated = re.search(r"\banswer\s*(?:is|:)\s*\W*(yes|no)\b", answer, re.IGNORECASE)
    if stated:
        return stated.group(1).lower()
    found = {"yes" if w in _YES else "no" for w in words if w in ("yes", "no")}
    return found.pop() if len(found) == 1 else None


# --------------------------------------------------------------------------------------------------
# VQA normalisation and accuracy
# --------------------------------------------------------------------------------------------------

_VQA_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_IN_NUMBER = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = frozenset(["a", "an", "the"])
_ANSWER_PREFIX = re.compile(r"^(?:the\s+)?(?:final\s+|short\s+)?answer\s*(?:is|:)\s*", re.IGNORECASE)

# Contractions as the VQA annotations spell them. Annotators (and models) often drop the apostrophes;
# every apostrophe-less variant maps back, except variants that are words themselves ("its", "well").
_CONTRACTIONS_TEXT = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't "
    "he'd he'd've he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've "
    "she's should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd "
    "someone'd've someone'll someone's something'd something'd've something'll that's there'd "
    "there'd've there're there's they'd they'd've they'll they're they've 'twas wasn't we'd've we've "
    "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who're "
    "who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've "
    "you'd you'd've you'll you're you've"
)
_CONTRACTIONS = tuple(_CONTRACTIONS_TEXT.split())
_NOT_CONTRACTIONS = frozenset(["its", "well", "were", "wed", "hell", "shell", "ill", "id", "lets", "shed"])


def _contraction_map() -> dict[str, str]:
    mapping: dict[str, str] = {}
    for canonical in _CONTRACTIONS:
        apostrophes = [i for i, ch in enumerate(canonical) if ch == "'"]
        for mask in range(1, 1 << len(apostrophes)):
            dropped = {apostrophes[b] for b in range(len(apostrophes)) if mask >> b & 1}
            variant = "".join(ch for i, ch in enumerate(canonical) if i not in dropped)
            if variant not in _NOT_CONTRACTIONS:
                mapping.setdefault(variant, canonical)
    return mapping


_CONTRACTION_MAP = _contraction_map()


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation, applied to a prediction or a reference answer.

    Lower-case; each punctuation mark is deleted when it touches a space anywhere in the answer (or the
    answer has a digit,digit group), else replaced by a space; periods not followed by a digit go;
    number words become digits; articles go; apostrophe-less contractions get their apostrophes back.
    """
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    out = _PERIOD_NOT_IN_NUMBER.sub("", out)
    words = [_NUMBER_WORDS.get(w, w) for w in out.split()]
    words = [_CONTRACTION_MAP.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def short_answer(answer: str) -> str:
    """The answer with a leading "The answer is" / "Answer:" removed (models add it despite the prompt)."""
    return _ANSWER_PREFIX.sub("", _MARKDOWN.sub("", answer).strip()).strip()


def extract_number(normalized: str) -> str | None:
    """The one number in a normalised answer ("there are 2" -> "2"), or None when there is none or several."""
    numbers = re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\w.])", normalized)
    return numbers[0] if len(set(numbers)) == 1 else None


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of a normalised prediction against normalised annotator answers.

    With n >= 2 answers: the mean over the n leave-one-out subsets of min(1, matches in the subset / 3),
    as the official evaluation does with its 10 annotators. With one answer: exact match.
    """
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    if len(references) == 1:
        return float(prediction == references[0])
    matches = sum(prediction == ref for ref in references)
    total = 0.0
    for ref in references:
        in_subset = matches - (prediction == ref)
        total += min(1.0, in_subset / 3.0)
    return total / len(references)


def majority_answer(references: Sequence[str]) -> str:
    """The most frequent answer (the first seen among equals)."""
    counts = Counter(references)
    best = max(counts.values())
    return next(ref for ref in references if counts[ref] == best)


def vqa_answer_type(references: Sequence[str]) -> str:
    """ "yes/no", "number" or "other", from the majority reference answer, as the VQA breakdowns use."""
    majority = majority_answer(references)
    if majority in ("yes", "no"):
        return "yes/no"
    if re.fullmatch(r"\d+(?:\.\d+)?", majority):
        return "number"
    return "other"
