"""Benchmark answers: reasoning stripped, multiple-choice letters, yes/no, and VQA normalisation and accuracy.

Model outputs arrive either with the thinking trace already separated (the `reasoning` column, the
`caption` column holding only the answer) or with `<think>...</think>` still in the text; `split_reasoning`
handles the second case, so extraction only ever reads the answer part: a trace that weighs "B or C"
must not decide the letter.

Two sets of extraction rules live here:
- the project's own, for `ovis-batch evaluate`: `extract_choice` reads which option an answer picks,
  from the forms models actually write ("B", "(B)", "B) a red car", "The answer is B.", "**C**", or the
  option's text); `extract_yes_no` reads yes or no. Both return None when the answer does not say, and
  callers count that as unparseable (and wrong);
- VLMEvalKit's, for benchmark scores comparable with the published ones (`ovis-batch bench`):
  `final_answer_tail` (its Ovis2.5 wrapper keeps what follows "Final answer:"), `infer_choice` (its
  exact-matching MCQ rules, no LLM judge: refusal phrases, one option letter among the last words,
  "answer is X", the only option whose text the answer contains) and `yes_no_words` (its yes/no rule:
  "yes" without "no", or the reverse). These follow its rules exactly, quirks included, and are checked
  against values produced by its own functions (tests/eval/data/).

`normalize_vqa_answer` and `vqa_accuracy` follow the official VQA evaluation: punctuation handling, number
words to digits, articles dropped, the official contraction table (with its quirks, see
`VQA_CONTRACTIONS`), then accuracy min(1, matches / 3) averaged over the leave-one-annotator-out subsets.
One deliberate difference: the official script normalises only when the annotators disagree (its
annotation files are pre-normalised); here both sides are always normalised, so references from any
source compare fairly.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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
# VLMEvalKit's rules (exact matching, no LLM judge)
# --------------------------------------------------------------------------------------------------

# The closing instruction of VLMEvalKit's Ovis2.5 prompts; when a prompt carries it, the answer scored
# is what follows the last "Final answer:" (or "the final answer is").
FINAL_ANSWER_INSTRUCTION = "End your response with 'Final answer: '."
_FINAL_ANSWER = re.compile(r"the\s+final\s+answer\s+is|final\s+answer\s*:", re.IGNORECASE)
_FINAL_ANSWER_LEAD = re.compile(r"[:\s]*")

# Which rule of `infer_choice` decided (reported per item, so that a score can be audited).
RULE_REFUSAL = "refusal"
RULE_LETTER = "one option letter among the last four words"
RULE_NONE_OF_THEM = "letter Z (none of the options)"
RULE_ANSWER_IS = "'answer is X'"
RULE_OPTION_TEXT = "the only option text contained"
RULE_NO_MATCH = "no match"
_REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_LETTER_SEPARATORS = str.maketrans(dict.fromkeys(".()[],:;!*#{}", " "))
_ANSWER_IS_LETTER = re.compile(r"(?:correct\s+)?answer\s+is\s+\**([ABCD])\**", re.IGNORECASE)


@dataclass(frozen=True)
class ChoiceReading:
    """The option an answer picks under VLMEvalKit's rules, and the rule that decided."""

    letter: str | None  # None: unparseable (a refusal, "Z", or nothing matched), scored as wrong
    rule: str


def final_answer_tail(answer: str) -> str:
    """What follows the last "Final answer:" / "the final answer is" (colons and spaces after it dropped),
    or the whole answer when it has neither: how VLMEvalKit reads an Ovis2.5 answer to a prompt that
    ends with `FINAL_ANSWER_INSTRUCTION`."""
    found = list(_FINAL_ANSWER.finditer(answer))
    if not found:
        return answer
    tail = answer[found[-1].end() :]
    return tail[_FINAL_ANSWER_LEAD.match(tail).end() :]


def infer_choice(answer: str, options: Mapping[str, str]) -> ChoiceReading:
    """The option letter `answer` picks among `options` (letter -> text, in letter order), by VLMEvalKit's
    exact-matching rules, tried in order:

    1. a refusal phrase anywhere: unparseable;
    2. after turning `.()[],:;!*#{}` into spaces, exactly one option letter appears as a word, and its
       first appearance is among the last four words: that letter ("B", "(B)", "The answer is (B).");
       no option letter but a word "Z" (the judge's "none of them"): unparseable;
    3. "answer is X" with X one of A-D in either case ("The correct answer is **b**"), X an option;
    4. the answer, lower-cased and at most twice as long as all option texts together, contains exactly
       one option's text (lower-cased): that option.
    Anything else is unparseable (VLMEvalKit's exact matching then scores the question wrong).
    """
    for phrase in _REFUSALS:
        if phrase in answer:
            return ChoiceReading(None, RULE_REFUSAL)
    words = answer.translate(_LETTER_SEPARATORS).split()
    named = [letter for letter in options if letter in words]
    if len(named) == 1 and words.index(named[0]) > len(words) - 5:
        return ChoiceReading(named[0], RULE_LETTER)
    if not named and "Z" in words:
        return ChoiceReading(None, RULE_NONE_OF_THEM)
    stated = _ANSWER_IS_LETTER.search(answer)
    if stated and stated.group(1).upper() in options:
        return ChoiceReading(stated.group(1).upper(), RULE_ANSWER_IS)
    lowered = answer.lower()
    if len(lowered) <= 2 * sum(len(str(text)) for text in options.values()):
        contained = [letter for letter, text in options.items() if str(text).lower() in lowered]
        if len(contained) == 1:
            return ChoiceReading(contained[0], RULE_OPTION_TEXT)
    return ChoiceReading(None, RULE_NO_MATCH)


def yes_no_words(answer: str) -> str | None:
    """ "Yes" or "No" by VLMEvalKit's yes/no rule: lower-case, VQA punctuation, then the word "yes" without
    the word "no" (or the reverse); None when both or neither appear.

    (VLMEvalKit keeps a period right after a digit where the official VQA step removes it; no such period
    ever makes or unmakes the word "yes" or "no", so the official step serves here.)
    """
    words = strip_vqa_punctuation(answer.lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return None


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

# The official VQA evaluation's contraction table, entry for entry: a word spelled as a key becomes its value.
# Two quirks are kept on purpose, because scores must equal the official ones:
# - the official code lower-cases the answer before this case-sensitive lookup, so the keys with capitals
#   ("Im", "Ive", "Id've", "I'dve") never match: "im", "ive" and "id've" stay as they are;
# - "somebody'd" maps to "somebodyd" (the apostrophe is removed, the other way round from every other entry).
# Apostrophe-less words missing from the table ("shes", "lets", "couldntve") stay as they are too.
_CONTRACTIONS_TABLE = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've
hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd
howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've
it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've
mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't notve=not've
oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't
shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
somethingd=something'd somethingd've=something'd've something'dve=something'd've somethingll=something'll
thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're theres=there's
theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll theyre=they're theyve=they've
twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll
whatre=what're whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've
whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll
whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've
wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll
youre=you're youve=you've
"""
VQA_CONTRACTIONS: dict[str, str] = dict(entry.split("=", 1) for entry in _CONTRACTIONS_TABLE.split())
# The official code passes re.UNICODE (32) where `sub` takes its count: at most 32 periods are removed.
_PERIOD_STRIP_COUNT = 32


def strip_vqa_punctuation(text: str) -> str:
    """The official VQA punctuation step: each mark is deleted when it touches a space anywhere in the text
    (or the text has a digit,digit group), else replaced by a space; then periods not followed by a digit
    go (the first 32 of them, as in the official code)."""
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_digit_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_IN_NUMBER.sub("", out, count=_PERIOD_STRIP_COUNT)


def normalize_vqa_answer(answer: str) -> str:
    """The official VQA answer normalisation, applied to a prediction or a reference answer.

    Newlines and tabs become spaces; punctuation as `strip_vqa_punctuation`; then lower-case, number words
    become digits, articles go, and words in the official contraction table are replaced (see
    `VQA_CONTRACTIONS` for its quirks).
    """
    text = strip_vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [VQA_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
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


@dataclass(frozen=True)
class VqaScore:
    """How one short answer scores against its normalised reference answers."""

    answer_type: str  # "yes/no", "number" or "other" (from the majority reference)
    extracted: str  # what was compared: yes/no, the one number, or the normalised answer ("" if none)
    accuracy: float  # VQA accuracy
    exact_match: float  # 1.0 when `extracted` is the most common reference answer
    unparseable: bool  # a yes/no or number question whose answer says neither


def score_vqa_answer(answer: str, references: Sequence[str]) -> VqaScore:
    """Score one answer against normalised references (`normalize_vqa_answer`): yes/no questions read yes
    or no from the answer, number questions its one number, the others compare the normalised answer."""
    answer_type = vqa_answer_type(references)
    if answer_type == "yes/no":
        extracted = extract_yes_no(answer) or ""
    elif answer_type == "number":
        extracted = extract_number(normalize_vqa_answer(short_answer(answer))) or ""
    else:
        extracted = normalize_vqa_answer(short_answer(answer))
    return VqaScore(
        answer_type,
        extracted,
        vqa_accuracy(extracted, references),
        float(extracted == majority_answer(references)),
        extracted == "",
    )
