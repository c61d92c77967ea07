"""Benchmark answer reading agrees with VLMEvalKit's own functions, response by response, and the VQA
normalisation follows the official contraction table with its quirks.

The table (data/vlmevalkit_cases.py) holds responses of the kinds models give, each naming the rule it
exercises; data/vlmevalkit_golden.json holds what VLMEvalKit's functions (commit recorded there) make of
each, produced by data/make_vlmevalkit_golden.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from ovis_batch.bench.prompts import build_prompt
from ovis_batch.eval import answers as ans

DATA = Path(__file__).parent / "data"
sys.path.insert(0, str(DATA))
import vlmevalkit_cases as cases  # noqa: E402

GOLDEN = json.loads((DATA / "vlmevalkit_golden.json").read_text())
RULES = {
    "letter": ans.RULE_LETTER,
    "answer is": ans.RULE_ANSWER_IS,
    "option text": ans.RULE_OPTION_TEXT,
    "refusal": ans.RULE_REFUSAL,
    "none of them": ans.RULE_NONE_OF_THEM,
    "no match": ans.RULE_NO_MATCH,
}


def read(response: str, final: bool) -> str:
    """The reading chain of a benchmark answer: trace split off, then the text after "Final answer:"."""
    answer, _ = ans.split_reasoning(response)
    return ans.final_answer_tail(answer) if final else answer


def test_the_golden_was_made_from_this_table():
    assert [g["response"] for g in GOLDEN["choice"]] == [c[1] for c in cases.CHOICE_CASES]
    assert [g["response"] for g in GOLDEN["yes_no"]] == [c[1] for c in cases.YES_NO_CASES]
    assert len(cases.CHOICE_CASES) + len(cases.YES_NO_CASES) >= 40
    assert {c[4] for c in cases.CHOICE_CASES} == set(RULES)  # every rule is exercised
    assert GOLDEN["ovis25_final_answer_instruction"] == ans.FINAL_ANSWER_INSTRUCTION


@pytest.mark.parametrize(
    ("what", "response", "options", "final", "rule", "golden"),
    [(*case, g["vlmevalkit"]) for case, g in zip(cases.CHOICE_CASES, GOLDEN["choice"], strict=True)],
    ids=[f"{c[4]}: {c[0]}" for c in cases.CHOICE_CASES],
)
def test_infer_choice_agrees_with_vlmevalkit(what, response, options, final, rule, golden):
    reading = ans.infer_choice(read(response, final), cases.OPTIONS[options])
    assert reading.rule == RULES[rule], what
    # VLMEvalKit answers a letter, "Z" (refusal, none of them) or False (nothing matched); the last two
    # are unparseable here, and both score the question wrong.
    assert reading.letter == (golden if golden not in (None, "Z") else None)
    if rule in ("refusal", "none of them"):
        assert golden == "Z"


@pytest.mark.parametrize(
    ("what", "response", "final", "golden"),
    [(*case, g["vlmevalkit"]) for case, g in zip(cases.YES_NO_CASES, GOLDEN["yes_no"], strict=True)],
    ids=[c[0] for c in cases.YES_NO_CASES],
)
def test_yes_no_words_agree_with_vlmevalkit(what, response, final, golden):
    assert (ans.yes_no_words(read(response, final)) or "Unknown") == golden, what


@pytest.mark.parametrize(
    ("answer", "tail"),
    [
        ("Final answer: B", "B"),
        ("It is red.\nFinal answer:  C.", "C."),
        ("final answer:: (A)", "(A)"),
        ("The final answer is D", "D"),
        ("Final answer: A. Hmm.\nFinal answer: B", "B"),
        ("No marker at all", "No marker at all"),
        ("The final answer: is unclear", "is unclear"),
    ],
)
def test_final_answer_tail_keeps_what_follows_the_last_marker(answer, tail):
    assert ans.final_answer_tail(answer) == tail


def test_ovis_prompts_end_with_the_instruction_the_reading_looks_for():
    prompt = build_prompt("What is it?", ans.FINAL_ANSWER_INSTRUCTION, options={"A": "x", "B": "y"})
    assert prompt == "What is it?\nA. x\nB. y\nEnd your response with 'Final answer: '."
    assert ans.FINAL_ANSWER_INSTRUCTION in prompt


# --------------------------------------------------------------------------------------------------
# the official VQA contraction table
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        # the official code lower-cases before its case-sensitive lookup: these keys never match
        ("im", "im"),
        ("Im", "im"),
        ("ive", "ive"),
        ("Ive", "ive"),
        ("id've", "id've"),
        ("i'dve", "i'dve"),
        # what the table maps (its keys are the apostrophe-less spellings)
        ("dont", "don't"),
        ("Dont", "don't"),
        ("wont", "won't"),
        ("couldnt've", "couldn't've"),
        ("youre", "you're"),
        ("oclock", "o'clock"),
        # spellings the table does not hold stay as they are
        ("shes", "shes"),
        ("lets", "lets"),
        ("couldntve", "couldntve"),
        ("its", "its"),
        # its one reversed entry
        ("somebody'd", "somebodyd"),
    ],
)
def test_vqa_contractions_follow_the_official_table(raw, normalized):
    assert ans.normalize_vqa_answer(raw) == normalized


def test_every_lower_case_key_maps_and_every_capitalised_key_is_dead():
    for key, value in ans.VQA_CONTRACTIONS.items():
        if key == key.lower():
            assert ans.normalize_vqa_answer(key) == value.lower() or key == "somebody'd"
        else:
            # lower-cased first, the word is looked up as it now is: a lower-case twin maps, none exists
            assert key.lower() not in ans.VQA_CONTRACTIONS
            assert ans.normalize_vqa_answer(key) == key.lower()


def test_at_most_32_periods_are_removed_as_in_the_official_code():
    assert ans.strip_vqa_punctuation("." * 40) == "." * 8
    assert ans.strip_vqa_punctuation("a.b 3.5") == "ab 3.5"
