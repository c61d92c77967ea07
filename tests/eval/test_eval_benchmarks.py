"""Benchmark scores by the field's rules, each against values worked out by hand in the test: MMBench
CircularEval, HallusionBench, POPE, MME, plain accuracy and short answers; error rows count as wrong."""

from __future__ import annotations

import pandas as pd
import pytest

from ovis_batch.eval.benchmarks import score_benchmark
from ovis_batch.eval.data import EvalInputError, Predictions

OPTIONS = ["a cat", "a dog", "a bus", "a car"]


def reference(index: str, answer: str, **extra) -> dict:
    row = {
        "id": index,
        "task": "mcq",
        "answer": answer,
        "answers": [],
        "option_letters": [],
        "options": [],
        "final_answer": True,
        "category": None,
        "l2_category": None,
        "split": None,
        "group": index,
        "is_main": True,
        "image_key": index,
        "set_id": None,
        "figure_id": None,
        "question_id": None,
    }
    return row | extra


def predictions(answers: dict[str, str | None]) -> Predictions:
    """Prediction rows as the caption job writes them; None makes an error row."""
    frame = pd.DataFrame(
        {
            "id": list(answers),
            "status": ["ok" if a is not None else "error" for a in answers.values()],
            "caption": list(answers.values()),
            "error_type": [None if a is not None else "not_an_image" for a in answers.values()],
        }
    )
    return Predictions(frame, None, [], {})


def metrics(result) -> dict[str, float]:
    return {m.name: m.value for m in result.metrics}


def mcq(index: str, answer: str, group: str, category: str, options: list[str] = OPTIONS) -> dict:
    letters = list("ABCD"[: len(options)])
    return reference(
        index,
        answer,
        option_letters=letters,
        options=options,
        group=group,
        is_main=index == group,
        category=category,
        l2_category="perception",
        split="dev",
    )


def test_mmbench_circular_eval_counts_a_group_only_when_every_rotation_is_right():
    # Group 1: four rotations, all right. Group 2: the third rotation is wrong. Group 3 (three options,
    # three rotations): the unrotated question is unparseable, the others right.
    refs, answers = [], {}
    for k, letter in enumerate("BADC"):
        refs.append(mcq(str(1 + k * 1_000_000), letter, "1", "scene"))
        answers[str(1 + k * 1_000_000)] = f"Final answer: {letter}"
    for k, (letter, said) in enumerate(zip("CBAD", "CBDD", strict=True)):
        refs.append(mcq(str(2 + k * 1_000_000), letter, "2", "scene"))
        answers[str(2 + k * 1_000_000)] = f"Looking closely... Final answer: ({said})"
    for k, letter in enumerate("ACB"):
        refs.append(mcq(str(3 + k * 1_000_000), letter, "3", "ocr", OPTIONS[:3]))
        answers[str(3 + k * 1_000_000)] = "I cannot tell." if k == 0 else f"Final answer: {letter}"
    result = score_benchmark("MMBench", "mcq", "mmbench-circular", predictions(answers), pd.DataFrame(refs))

    scores = metrics(result)
    assert scores["circular accuracy"] == pytest.approx(1 / 3)  # only group 1
    assert scores["vanilla accuracy"] == pytest.approx(2 / 3)  # unrotated: group 1 and 2 right, 3 not
    assert scores["accuracy over all rotations"] == pytest.approx(9 / 11)
    assert scores["unparseable rate"] == pytest.approx(1 / 11)
    assert result.counts["circular_groups"] == 3 and result.counts["unparseable"] == 1
    assert result.categories["scene"]["circular accuracy"] == 0.5  # groups 1 and 2
    assert result.categories["ocr"]["vanilla accuracy"] == 0.0
    group_two = result.items[result.items["id"] == "2000002"].iloc[0]
    assert group_two["extracted"] == "D" and group_two["correct"] == 0.0 and group_two["group_correct"] == 0.0


def test_plain_accuracy_error_rows_and_refusals_count_as_wrong():
    refs = [mcq(str(i), "A", str(i), "c1" if i < 3 else "c2") for i in range(1, 6)]
    answers = {
        "1": "A",  # right
        "2": "The answer is B",  # wrong
        "3": "I'm sorry, but without the image provided I cannot answer.",  # refusal: unparseable
        "4": None,  # error row: no answer at all
        "5": "Final answer: a cat",  # the option text of A: right
    }
    result = score_benchmark("AI2D", "mcq", "accuracy", predictions(answers), pd.DataFrame(refs))
    assert metrics(result)["accuracy"] == pytest.approx(2 / 5)
    assert result.counts == {"questions": 5, "answered": 4, "error_rows_scored_wrong": 1, "unparseable": 1}
    assert result.categories["c1"]["accuracy"] == 0.5 and result.categories["c2"][
        "accuracy"
    ] == pytest.approx(1 / 3)
    rules = dict(zip(result.items["id"], result.items["rule"], strict=True))
    assert (
        rules["3"] == "refusal"
        and rules["4"] == "error row"
        and rules["5"] == "the only option text contained"
    )


def yes_no(index: str, answer: str, **extra) -> dict:
    return reference(index, answer, task="yes_no", **extra)


def test_hallusionbench_question_figure_and_question_pair_accuracy():
    # chart, set 0: figure 0 asks q0 and q1 (both right); figure 1 asks q0 (wrong) and q1 (right).
    # map, set 0: figure 0 asks q0 (right). By hand:
    # question accuracy 4/5; figures (chart-0-0 ok, chart-0-1 not, map-0-0 ok) 2/3;
    # question pairs (chart-0-q0: wrong on figure 1, chart-0-q1 ok, map-0-q0 ok) 2/3.
    rows = [
        ("VS_chart_0_0_0_0", "chart", "0", "0", "0", "Yes", "Yes"),
        ("VS_chart_0_0_0_1", "chart", "0", "0", "1", "No", "Final answer: No"),
        ("VS_chart_0_0_1_0", "chart", "0", "1", "0", "No", "Final answer: Yes"),
        ("VS_chart_0_0_1_1", "chart", "0", "1", "1", "Yes", "yes."),
        ("VD_map_0_0_0_0", "map", "0", "0", "0", "No", "No, it is not."),
    ]
    refs = [
        yes_no(i, a, category=i[:2], l2_category=l2, set_id=s, figure_id=f, question_id=q)
        for i, l2, s, f, q, a, _ in rows
    ]
    answers = {i: said for i, *_, said in rows}
    result = score_benchmark(
        "HallusionBench", "yes_no", "hallusionbench", predictions(answers), pd.DataFrame(refs)
    )
    scores = metrics(result)
    assert scores["question accuracy (aAcc)"] == pytest.approx(4 / 5)
    assert scores["figure accuracy (fAcc)"] == pytest.approx(2 / 3)
    assert scores["question-pair accuracy (qAcc)"] == pytest.approx(2 / 3)
    assert result.breakdowns["l2-category"]["chart"]["figure accuracy (fAcc)"] == 0.5
    assert result.categories["VD"]["question accuracy (aAcc)"] == 1.0


def test_pope_precision_recall_f1_and_yes_ratio_per_split():
    # adversarial: truth Y, N, Y; said Y, Y, (unparseable -> counts as No)
    # popular: truth N, Y; said N, Y; the question "adversarial,popular" (truth Y, said Y) counts in both.
    rows = [
        ("1", "adversarial", "Yes", "Yes"),
        ("2", "adversarial", "No", "Yes, I think so"),
        ("3", "adversarial", "Yes", "Maybe."),
        ("4", "popular", "No", "No"),
        ("5", "popular", "Yes", "Final answer: yes"),
        ("6", "adversarial,popular", "Yes", "Yes"),
    ]
    refs = [yes_no(i, a, category=c) for i, c, a, _ in rows]
    result = score_benchmark(
        "POPE", "yes_no", "pope", predictions({i: s for i, *_, s in rows}), pd.DataFrame(refs)
    )
    # Over the 7 split rows: truth Y Y N Y N Y Y, said Y N Y Y N Y Y (unparseable as No):
    # tp = 4 (rows 1, 6, 5, 6), fp = 1 (row 2), fn = 1 (row 3); correct = 5 of 7; said yes 5 of 7.
    scores = metrics(result)
    assert scores["accuracy"] == pytest.approx(5 / 7)
    assert scores["precision"] == pytest.approx(4 / 5)
    assert scores["recall"] == pytest.approx(4 / 5)
    assert scores["F1"] == pytest.approx(4 / 5)
    assert scores["yes ratio"] == pytest.approx(5 / 7)
    adversarial = result.breakdowns["split"]["adversarial"]  # rows 1, 2, 3, 6: tp 2, fp 1, fn 1
    assert adversarial["n"] == 4
    assert adversarial["precision"] == pytest.approx(2 / 3) and adversarial["recall"] == pytest.approx(2 / 3)
    assert adversarial["accuracy"] == 0.5 and adversarial["yes ratio"] == 0.75
    popular = result.breakdowns["split"]["popular"]  # rows 4, 5, 6: all right
    assert popular["F1"] == 1.0 and popular["yes ratio"] == pytest.approx(2 / 3)
    assert result.counts["split_rows"] == 7 and result.counts["unparseable"] == 1


def test_mme_perception_and_cognition_sum_acc_and_acc_plus():
    # OCR: image o1 (both right), image o2 (one wrong): acc 75, acc+ 50 -> 125
    # color: image c1 (both wrong): acc 0, acc+ 0 -> 0
    # code_reasoning: image r1 (both right): 100 + 100 -> 200
    rows = [
        ("1", "OCR", "o1", "Yes", "Yes"),
        ("2", "OCR", "o1", "No", "No"),
        ("3", "OCR", "o2", "Yes", "Yes"),
        ("4", "OCR", "o2", "No", "Yes"),
        ("5", "color", "c1", "Yes", "No"),
        ("6", "color", "c1", "No", None),  # an error row
        ("7", "code_reasoning", "r1", "Yes", "Final answer: Yes"),
        ("8", "code_reasoning", "r1", "No", "Final answer: No"),
    ]
    refs = [yes_no(i, a, category=c, image_key=k) for i, c, k, a, _ in rows]
    result = score_benchmark(
        "MME", "yes_no", "mme", predictions({i: s for i, *_, s in rows}), pd.DataFrame(refs)
    )
    scores = metrics(result)
    assert scores["perception"] == pytest.approx(125.0)  # OCR + color (the other 8 categories absent)
    assert scores["cognition"] == pytest.approx(200.0)
    assert result.categories["OCR"] == {"n": 4, "acc": 75.0, "acc+": 50.0, "score": 125.0}
    assert result.categories["color"]["score"] == 0.0
    assert any("perception sums 2 of MME's 10 categories" in note for note in result.notes)
    assert result.counts["error_rows_scored_wrong"] == 1


def test_short_answers_use_the_vqa_scoring_and_error_rows_score_zero():
    annotators = ["two"] * 3 + ["2"] * 5 + ["three"] * 2  # normalised: 2 x8, 3 x2
    refs = [
        reference("1", str(annotators), task="short_answer", answers=annotators, final_answer=False),
        reference("2", "stop", task="short_answer", answers=["Stop"], final_answer=False),
        reference("3", "red", task="short_answer", answers=["red"], final_answer=False),
        reference("4", "3", task="short_answer", answers=["3", "three", "3"], final_answer=False),
    ]
    answers = {"1": "Two.", "2": "The sign says go", "3": None, "4": "There are three."}
    result = score_benchmark("TextVQA", "short_answer", "vqa", predictions(answers), pd.DataFrame(refs))
    # 1: "2" matches 8 of 10: every leave-one-out subset keeps >= 3 matches -> 1.0; 2: wrong -> 0;
    # 3: error row -> 0; 4: the number 3 matches all three, so each subset of two has 2 -> 2/3
    assert metrics(result)["VQA accuracy"] == pytest.approx((1 + 0 + 0 + 2 / 3) / 4)
    assert result.counts["error_rows_scored_wrong"] == 1
    assert result.breakdowns["answer type"]["number"]["VQA accuracy"] == pytest.approx(
        (1 + 2 / 3) / 2
    )  # 1, 4


def test_a_question_without_a_prediction_is_refused():
    refs = pd.DataFrame([mcq("1", "A", "1", "x"), mcq("2", "B", "2", "x")])
    with pytest.raises(
        EvalInputError, match=r"1 of 2 questions have no prediction row \(e\.g\. '2'\).*rerun"
    ):
        score_benchmark("X", "mcq", "accuracy", predictions({"1": "A"}), refs)


def test_a_scoring_for_another_task_is_refused():
    refs = pd.DataFrame([yes_no("1", "Yes")])
    with pytest.raises(EvalInputError, match="scoring 'mmbench-circular' is for mcq benchmarks, not yes_no"):
        score_benchmark("X", "yes_no", "mmbench-circular", predictions({"1": "Yes"}), refs)
