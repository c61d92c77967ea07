"""Answer extraction on realistic model outputs, with and without thinking traces; VQA normalisation."""

from __future__ import annotations

import itertools
import random

import pytest

from ovis_batch.eval import answers as ans

CHOICES = ["a red car", "a blue bus", "a dark red truck", "a bicycle"]

TRACE = (
    "<think>\nThe image shows a vehicle. Option A is a red car, but the vehicle is large. Could it be B? "
    "The answer is probably B or C... The cargo bed suggests a truck, so C.\n</think>\n\n"
)
FORCED = (
    "<think>\nLet me compare A and B. A seems wrong.\n\nConsidering the limited time by the user, I have to give the "
    "solution based on the thinking directly now.\n</think>\n\n"
)


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("C", 2),
        ("C.", 2),
        ("(C)", 2),
        ("c", 2),
        ("**C**", 2),
        ("C) a dark red truck", 2),
        ("(C) a dark red truck", 2),
        ("C. a dark red truck", 2),
        ("The answer is C.", 2),
        ("Answer: (C)", 2),
        ("The correct option is C, the dark red truck.", 2),
        ("It is C, because the cargo bed is visible.", 2),
        ("I think C.", 2),
        ("a dark red truck", 2),
        ("The vehicle in the picture is a dark red truck.", 2),
        ("Option B? No. The final answer is C.", 2),
        ("A", 0),
        ("A. a red car", 0),
        ("a red car", 0),
        ("The answer is D: a bicycle", 3),
        # unparseable: no letter, two candidates, an article, an option out of range, nothing at all
        ("I cannot tell from the image.", None),
        ("B or C?", None),
        ("A man is standing next to it.", None),
        ("The answer is E.", None),
        ("", None),
        # the answer after a thinking trace; the trace itself mentions A, B and C
        (TRACE + "C", 2),
        (TRACE + "The answer is C.", 2),
        (FORCED + "B", 1),
        ("<think>\nA or B? Still thinking about C", None),  # trace cut off: no answer
        ("<think>\n\n</think>\n\nD<|im_end|>", 3),
    ],
)
def test_extract_choice(output, expected):
    answer, _ = ans.split_reasoning(output)
    assert ans.extract_choice(answer, CHOICES) == expected


def test_choice_ignores_a_separate_reasoning_column():
    """With thinking parsed by the runtime, the caption is the answer and the trace never reaches extraction."""
    caption, reasoning = "C", "A is a car, B a bus; the answer is B? no."
    assert ans.split_reasoning(caption) == ("C", None)
    assert ans.extract_choice(caption, CHOICES) == 2
    assert ans.extract_choice(reasoning, CHOICES) != 2  # which is why the trace must stay out


def test_option_text_prefers_the_longest_contained_option():
    choices = ["red", "dark red", "blue"]
    assert ans.extract_choice("It is dark red.", choices) == 1
    assert ans.extract_choice("Red.", choices) == 0
    assert ans.extract_choice("red or blue", choices) is None


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("Yes, there is a dog on the couch.", "yes"),
        ("No.", "no"),
        ("No, the man is not wearing a hat.", "no"),
        ("**No**", "no"),
        ("The answer is yes.", "yes"),
        ("There is no dog in the picture.", "no"),
        ("Nope", "no"),
        ("It is hard to say.", None),
        ("Yes and no.", None),
        (TRACE.replace("C.", "yes? no?") + "Yes, it is a truck.", "yes"),
        ("<think>\nmaybe yes, maybe no", None),
    ],
)
def test_extract_yes_no(output, expected):
    answer, _ = ans.split_reasoning(output)
    assert ans.extract_yes_no(answer) == expected


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("Two", "2"),
        ("two dogs.", "2 dogs"),
        ("The Red Car", "red car"),
        ("a dog", "dog"),
        ("none", "0"),
        ("dont know", "don't know"),
        ("isnt", "isn't"),
        ("its", "its"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("red-white", "red white"),
        ("yes , it is", "yes it is"),
        ("hot dog!", "hot dog"),
        ("  tennis\n", "tennis"),
        ("ten o'clock", "10 o'clock"),
    ],
)
def test_normalize_vqa_answer(raw, normalized):
    assert ans.normalize_vqa_answer(raw) == normalized


def oracle_vqa_accuracy(prediction, references):
    """Average over every subset that leaves one annotator out of min(1, matches in the subset / 3)."""
    if len(references) == 1:
        return float(prediction == references[0])
    subsets = list(itertools.combinations(range(len(references)), len(references) - 1))
    return sum(min(1.0, sum(prediction == references[i] for i in s) / 3) for s in subsets) / len(subsets)


def test_vqa_accuracy_matches_oracle():
    rng = random.Random(5)
    for _ in range(300):
        pool = ["2", "3", "red", "yes", "no"]
        refs = [rng.choice(pool) for _ in range(rng.choice([1, 2, 3, 5, 10]))]
        prediction = rng.choice(pool)
        assert ans.vqa_accuracy(prediction, refs) == pytest.approx(oracle_vqa_accuracy(prediction, refs))


def test_vqa_accuracy_known_values():
    assert ans.vqa_accuracy("2", ["2"] * 10) == 1.0
    assert ans.vqa_accuracy("2", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)  # 3 subsets with 2 matches
    assert ans.vqa_accuracy("4", ["2"] * 10) == 0.0
    assert ans.vqa_accuracy("2", ["2"]) == 1.0


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("B", 1),
        ("(b)", 1),
        ("b.", 1),
        (2, 2),
        ("3", 3),
        ("a bicycle", 3),
        ("A Bicycle", 3),
        ("Z", None),
        (9, None),
    ],
)
def test_resolve_reference_choice(answer, expected):
    assert ans.resolve_reference_choice(answer, CHOICES) == expected


def test_answer_types_and_majority():
    assert ans.vqa_answer_type(["yes", "yes", "no"]) == "yes/no"
    assert ans.vqa_answer_type(["2", "3", "2"]) == "number"
    assert ans.vqa_answer_type(["red", "2", "2", "red"]) == "other"  # tie: first seen wins
    assert ans.majority_answer(["b", "a", "a", "b"]) == "b"


@pytest.mark.parametrize(
    ("normalized", "expected"),
    [("2", "2"), ("there are 2", "2"), ("2 or 3", None), ("2 and 2", "2"), ("many", None)],
)
def test_extract_number(normalized, expected):
    assert ans.extract_number(normalized) == expected


def test_short_answer_strips_the_preamble():
    assert ans.short_answer("The answer is 3.") == "3."
    assert ans.short_answer("**Answer:** two") == "two"
    assert ans.short_answer("Three cats") == "Three cats"
