"""`ovis-batch evaluate` end to end: a predictions folder like the batch job's -> report folder.

The predictions are synthetic but follow the output contract (shards, error rows, reasoning traces,
embeddings, metadata, `_run.json` and a hidden temporary part that must be skipped). A later test will
run the real batch job on the tiny model first, once the pipeline lands.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from eval_case_data import VARIED_CAPTIONS
from eval_outputs import METADATA, write_predictions, write_references, write_text_embeddings

from ovis_batch.cli import main
from ovis_batch.eval.answers import vqa_accuracy
from ovis_batch.eval.caption_metrics import score_captions
from ovis_batch.eval.ptb_tokenizer import java_available, ptb_tokenize_many
from ovis_batch.eval.retrieval import retrieval_recall

CATEGORIES = ["people", "animals", "places"]
ERRORS = [
    ("decode_error", "cannot identify image file"),
    ("decode_error", "truncated JPEG"),
    ("too_small", "20x20"),
]


@pytest.fixture(autouse=True)
def _no_java_for_meteor(monkeypatch):
    """METEOR takes ~15 s of JVM start-up; here it is skipped the way a machine without Java skips it."""
    import shutil

    which = shutil.which
    monkeypatch.setattr("shutil.which", lambda name: None if name == "java" else which(name))


def caption_run(tmp_path: Path, tweak: str = "") -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    rows, refs = [], []
    for i, (hypothesis, references) in enumerate(VARIED_CAPTIONS):
        rows.append(
            {
                "image_id": f"img{i:03d}",
                "status": "ok",
                "caption": hypothesis + tweak,
                "reasoning": "I see a scene and describe it." if i % 3 == 0 else None,
                "thinking_truncated": i == 3,
                "embedding": rng.normal(size=8).tolist(),
            }
        )
        refs.append({"image_id": f"img{i:03d}", "references": references, "category": CATEGORIES[i % 3]})
    rows[4]["caption"] = "<think>\nA sign, red.\n</think>\n\n" + rows[4]["caption"]  # trace left inline
    for j, (error_type, message) in enumerate(ERRORS):
        rows.append(
            {"image_id": f"err{j}", "status": "error", "error_type": error_type, "error_message": message}
        )
        refs.append({"image_id": f"err{j}", "references": ["A photo."], "category": "people"})
    out = write_predictions(tmp_path / f"out{tweak and '-tweak'}", rows)
    return out, write_references(tmp_path / "refs.parquet", refs)


def evaluate(*args: str) -> int:
    return main(["evaluate", *args])


def read_report(report: Path) -> tuple[dict, str]:
    return json.loads((report / "metrics.json").read_text()), (report / "report.md").read_text()


def test_captions_report_is_complete_and_consistent(tmp_path):
    out, refs = caption_run(tmp_path)
    report = tmp_path / "report"
    assert evaluate("--predictions", str(out), "--references", str(refs), "--report", str(report)) == 0
    metrics, markdown = read_report(report)

    assert metrics["task"] == "captions"
    assert metrics["inputs"]["prediction_files"] == 3  # _run.json and the hidden temporary part are skipped
    assert metrics["inputs"]["prediction_metadata"]["ovis_batch"]["model"]["name"] == "tiny-ovis"
    assert metrics["counts"]["scored"] == len(VARIED_CAPTIONS)
    assert metrics["counts"]["error_rows_excluded"] == len(ERRORS)
    assert metrics["errors_by_type"] == {"decode_error": 2, "too_small": 1}
    assert metrics["health"]["summary"]["reasoning_inline_in_caption"] == 1
    assert metrics["health"]["summary"]["thinking_truncated"] == 1

    # every score carries its scale and tokenizer, headline and per category
    for name, entry in metrics["metrics"].items():
        assert {"value", "scale", "tokenizer", "n"} <= set(entry), name
    assert metrics["metrics"]["CIDEr-D"]["scale"].startswith("0-10")
    assert metrics["metrics"]["BLEU-4"]["tokenizer"] == "ptb-python"
    assert set(metrics["categories"]) == set(CATEGORIES)
    for row in metrics["categories"].values():
        assert all({"value", "scale", "tokenizer"} <= set(v) for v in row["metrics"].values())
    assert metrics["metrics"]["METEOR"]["value"] is None
    assert "Java" in metrics["metrics"]["METEOR"]["note"]

    # the numbers are the metrics of the ok rows only: error rows are not scored as empty captions
    hypotheses = ptb_tokenize_many([h for h, _ in VARIED_CAPTIONS])
    references = [ptb_tokenize_many(r) for _, r in VARIED_CAPTIONS]
    expected = score_captions(hypotheses, references, with_meteor=False).corpus
    for name in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert metrics["metrics"][name]["value"] == pytest.approx(expected[name], abs=1e-12)
    with_errors_as_empty = score_captions(
        hypotheses + [""] * len(ERRORS), references + [["a photo"]] * len(ERRORS), with_meteor=False
    ).corpus
    assert with_errors_as_empty["CIDEr-D"] != pytest.approx(expected["CIDEr-D"], abs=1e-6)

    # report.md says what produced the predictions, shows the metrics.json values, links plots that exist
    assert "tiny-ovis; weights ab12ab12ab12; RANDOM WEIGHTS" in markdown
    for name, entry in metrics["metrics"].items():
        shown = "skipped" if entry["value"] is None else f"{entry['value']:.4f}"
        assert re.search(rf"\| {re.escape(name)}\s+\|\s+{re.escape(shown)} \|", markdown), name
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(linked) == sorted(metrics["files"]["plots"])
    assert {"plots/metric_by_category.png", "plots/lengths.png", "plots/errors.png"} <= set(linked)
    for plot in linked:
        assert (report / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = pd.read_parquet(report / "scores.parquet")
    assert len(scores) == len(VARIED_CAPTIONS) and set(scores["category"]) == set(CATEGORIES)
    assert scores["CIDEr-D"].mean() == pytest.approx(metrics["metrics"]["CIDEr-D"]["value"])


def test_compare_shows_deltas(tmp_path):
    out, refs = caption_run(tmp_path)
    first, second = tmp_path / "night1", tmp_path / "night2"
    assert evaluate("--predictions", str(out), "--references", str(refs), "--report", str(first)) == 0
    tweaked, _ = caption_run(tmp_path, tweak=" in the photo")
    args = ["--predictions", str(tweaked), "--references", str(refs), "--report", str(second)]
    assert evaluate(*args, "--compare", str(first)) == 0
    before, _ = read_report(first)
    after, markdown = read_report(second)
    deltas = after["comparison"]["deltas"]
    for name in ("BLEU-4", "ROUGE-L", "CIDEr-D"):
        expected = after["metrics"][name]["value"] - before["metrics"][name]["value"]
        assert deltas[name]["delta"] == pytest.approx(expected)
        assert f"{expected:+.4f}" in markdown
    assert deltas["error rate"]["delta"] == 0
    assert "Δ vs previous" in markdown and str(first) in markdown


def test_java_tokenizer_needs_java_and_says_so(tmp_path, capsys):
    out, refs = caption_run(tmp_path)
    args = ["--predictions", str(out), "--references", str(refs), "--report", str(tmp_path / "r")]
    assert evaluate(*args, "--tokenizer", "java") == 2
    assert "--tokenizer java" in capsys.readouterr().err


@pytest.mark.skipif(java_available() is not None, reason=f"needs Java: {java_available()}")
def test_java_tokenizer_gives_the_same_scores_but_is_not_compared_with_python(tmp_path, monkeypatch):
    monkeypatch.undo()  # Java back on PATH for the tokenizer; METEOR stays off
    out, refs = caption_run(tmp_path)
    base = ["--predictions", str(out), "--references", str(refs), "--no-meteor"]
    assert evaluate(*base, "--report", str(tmp_path / "py")) == 0
    assert (
        evaluate(
            *base,
            "--report",
            str(tmp_path / "java"),
            "--tokenizer",
            "java",
            "--compare",
            str(tmp_path / "py"),
        )
        == 0
    )
    python, _ = read_report(tmp_path / "py")
    java, markdown = read_report(tmp_path / "java")
    assert "n/a" in markdown  # the delta column says the scores are not comparable
    for name in ("BLEU-4", "ROUGE-L", "CIDEr-D"):
        assert java["metrics"][name]["value"] == pytest.approx(python["metrics"][name]["value"], abs=1e-12)
        assert java["metrics"][name]["tokenizer"] == "ptb-java"
        assert not java["comparison"]["deltas"][name]["comparable"]
    assert "not comparable" in java["comparison"]["deltas"]["CIDEr-D"]["note"]


def test_unmatched_ids_fail_with_counts_unless_partial(tmp_path, capsys):
    out, _ = caption_run(tmp_path)
    refs = write_references(
        tmp_path / "fewer.parquet",
        [{"image_id": f"img{i:03d}", "references": r} for i, (_, r) in enumerate(VARIED_CAPTIONS[:15])]
        + [{"image_id": "lost", "references": ["A lost image."]}],
    )
    args = ["--predictions", str(out), "--references", str(refs), "--report", str(tmp_path / "r")]
    assert evaluate(*args) == 2
    message = capsys.readouterr().err
    assert "8 prediction ids have no reference" in message and "1 reference ids have no prediction" in message
    assert "--allow-partial" in message

    assert evaluate(*args, "--allow-partial") == 0
    metrics, _ = read_report(tmp_path / "r")
    assert metrics["counts"]["unmatched_prediction_ids"] == 8
    assert metrics["counts"]["unmatched_reference_ids"] == 1
    assert metrics["counts"]["scored"] == 15


def test_empty_references_name_the_ids(tmp_path, capsys):
    out, _ = caption_run(tmp_path)
    rows = [{"image_id": f"img{i:03d}", "references": r} for i, (_, r) in enumerate(VARIED_CAPTIONS)]
    rows[2]["references"] = []
    rows[7]["references"] = None
    refs = write_references(tmp_path / "bad.parquet", rows)
    args = [
        "--predictions",
        str(out),
        "--references",
        str(refs),
        "--report",
        str(tmp_path / "r"),
        "--allow-partial",
    ]
    assert evaluate(*args) == 2
    message = capsys.readouterr().err
    assert "'img002'" in message and "'img007'" in message and "empty or missing `references`" in message


def test_missing_id_column_says_which_option_to_use(tmp_path, capsys):
    out, refs = caption_run(tmp_path)
    args = ["--predictions", str(out), "--references", str(refs), "--report", str(tmp_path / "r")]
    assert evaluate(*args, "--id-column", "uid") == 2
    assert "--id-column" in capsys.readouterr().err


def vqa_run(tmp_path: Path) -> tuple[Path, Path, list[float]]:
    questions = [
        # (model output, reasoning column, annotator answers, category)
        ("Yes, there is a dog.", None, ["yes"] * 10, "presence"),
        (
            "<think>\nI count two, maybe three.\n</think>\n\nThere are two.",
            None,
            ["2"] * 6 + ["3"] * 4,
            "counting",
        ),
        ("2", "Counting: one, two. Maybe three?", ["2"] * 2 + ["3"] * 8, "counting"),
        ("No", "It looks empty but could be yes.", ["yes"] * 9 + ["no"], "presence"),
        ("The answer is red.", None, ["red"] * 7 + ["dark red"] * 3, "color"),
        ("I am not sure.", None, ["blue"] * 10, "color"),
        ("<think>\nHmm, yes or no... truncated", None, ["no"] * 10, "presence"),
    ]
    rows = [
        {"image_id": f"q{i}", "status": "ok", "caption": out, "reasoning": trace, "embedding": [0.0] * 8}
        for i, (out, trace, _, _) in enumerate(questions)
    ]
    rows.append({"image_id": "q-err", "status": "error", "error_type": "timeout", "error_message": "slow"})
    refs = [{"image_id": f"q{i}", "answers": a, "category": c} for i, (_, _, a, c) in enumerate(questions)]
    refs.append({"image_id": "q-err", "answers": ["yes"] * 10, "category": "presence"})
    expected = [
        1.0,
        vqa_accuracy("2", ["2"] * 6 + ["3"] * 4),
        vqa_accuracy("2", ["2"] * 2 + ["3"] * 8),
        0.3,
        1.0,
        0.0,
        0.0,
    ]
    out = write_predictions(tmp_path / "vqa-out", rows, shards=2)
    return out, write_references(tmp_path / "vqa-refs.parquet", refs), expected


def test_vqa_report(tmp_path):
    out, refs, expected = vqa_run(tmp_path)
    report = tmp_path / "vqa-report"
    assert evaluate("--predictions", str(out), "--references", str(refs), "--report", str(report)) == 0
    metrics, markdown = read_report(report)
    assert metrics["task"] == "vqa"
    assert metrics["metrics"]["VQA accuracy"]["value"] == pytest.approx(np.mean(expected))
    assert metrics["metrics"]["unparseable rate"]["value"] == pytest.approx(1 / 7)  # the cut-off trace
    assert metrics["counts"]["error_rows_excluded"] == 1
    assert set(metrics["breakdowns"]["answer type"]) == {"yes/no", "number", "other"}
    assert metrics["categories"]["counting"]["metrics"]["VQA accuracy"]["value"] == pytest.approx(
        np.mean(expected[1:3])
    )
    assert "## By answer type" in markdown and "## By category" in markdown
    scores = pd.read_parquet(report / "scores.parquet").set_index("id")
    assert scores.loc["q1", "extracted"] == "2" and scores.loc["q6", "unparseable"]


def test_mcq_report_and_malformed_choices(tmp_path, capsys):
    choices = ["a cat", "a dog", "a bird", "a fish"]
    outputs = ["B", "<think>\nA? or C?\n</think>\n\nThe answer is (C).", "a fish", "It could be A or B.", "D"]
    answers = ["B", "C", 3, "A", "a bird"]
    rows = [
        {"image_id": f"m{i}", "status": "ok", "caption": o, "reasoning": None, "embedding": [0.0] * 8}
        for i, o in enumerate(outputs)
    ]
    refs = [{"image_id": f"m{i}", "choices": choices, "answer": str(a)} for i, a in enumerate(answers)]
    out = write_predictions(tmp_path / "mcq-out", rows, shards=1)
    good = write_references(tmp_path / "mcq.parquet", refs)
    report = tmp_path / "mcq-report"
    assert evaluate("--predictions", str(out), "--references", str(good), "--report", str(report)) == 0
    metrics, _ = read_report(report)
    assert metrics["task"] == "mcq"
    assert metrics["metrics"]["accuracy"]["value"] == pytest.approx(3 / 5)
    assert metrics["metrics"]["unparseable rate"]["value"] == pytest.approx(1 / 5)

    refs[1]["choices"] = ["only one"]
    refs[4]["answer"] = "a horse"
    bad = write_references(tmp_path / "mcq-bad.parquet", refs)
    assert evaluate("--predictions", str(out), "--references", str(bad), "--report", str(tmp_path / "x")) == 2
    assert "'m1'" in capsys.readouterr().err
    refs[1]["choices"] = choices
    bad = write_references(tmp_path / "mcq-bad2.parquet", refs)
    assert evaluate("--predictions", str(out), "--references", str(bad), "--report", str(tmp_path / "x")) == 2
    assert "'m4'" in capsys.readouterr().err


def test_retrieval_report(tmp_path):
    rng = np.random.default_rng(4)
    images = rng.normal(size=(12, 8)).astype(np.float32)
    text_image = np.repeat(np.arange(12), 3)
    texts = images[text_image] + 0.8 * rng.normal(size=(36, 8)).astype(np.float32)
    rows = [
        {"image_id": f"r{i:02d}", "status": "ok", "caption": "x", "embedding": images[i].tolist()}
        for i in range(12)
    ]
    rows.append({"image_id": "r99", "status": "error", "error_type": "decode_error", "error_message": "bad"})
    out = write_predictions(tmp_path / "ret-out", rows, shards=2)
    order = rng.permutation(36)  # file order does not matter
    ids = [f"r{text_image[j]:02d}" for j in order] + ["r99"]
    emb = write_text_embeddings(
        tmp_path / "texts.parquet",
        ids,
        [f"caption {j}" for j in order] + ["lost"],
        np.vstack([texts[order], texts[:1]]),
        metadata=METADATA,
    )
    report = tmp_path / "ret-report"
    args = ["--predictions", str(out), "--references", str(emb), "--report", str(report), "--block-mib", "1"]
    assert evaluate(*args) == 0
    metrics, markdown = read_report(report)
    expected = retrieval_recall(images, texts, text_image)
    assert metrics["task"] == "retrieval"
    for k in (1, 5, 10):
        assert metrics["metrics"][f"image->text R@{k}"]["value"] == pytest.approx(expected.image_to_text[k])
        assert metrics["metrics"][f"text->image R@{k}"]["value"] == pytest.approx(expected.text_to_image[k])
    assert metrics["counts"]["error_rows_excluded"] == 1
    assert "plots/recall.png" in markdown and (report / "plots" / "recall.png").exists()
    assert "share model weights and strategy (last_token)" in markdown


def test_retrieval_refuses_texts_embedded_another_way(tmp_path, capsys):
    rows = [
        {"image_id": f"r{i}", "status": "ok", "caption": "x", "embedding": [float(i)] * 8} for i in range(3)
    ]
    out = write_predictions(tmp_path / "o", rows, shards=1)
    other = dict(METADATA, embedding={"strategy": "vte_mean", "dim": 8})
    texts = write_text_embeddings(
        tmp_path / "t.parquet", ["r0", "r1", "r2"], ["a", "b", "c"], np.eye(3, 8), other
    )
    assert (
        evaluate("--predictions", str(out), "--references", str(texts), "--report", str(tmp_path / "r")) == 2
    )
    message = capsys.readouterr().err
    assert "different models or strategies" in message and "'vte_mean'" in message


def test_evaluation_imports_neither_torch_nor_ray():
    code = (
        "import sys, ovis_batch.eval.tasks, ovis_batch.eval.report, workflows.evaluate;"
        "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_retrieval_names_ok_rows_without_embedding(tmp_path, capsys):
    rows = [{"image_id": f"r{i}", "status": "ok", "caption": "x", "embedding": [1.0] * 8} for i in range(3)]
    rows[1]["embedding"] = None
    out = write_predictions(tmp_path / "o", rows, shards=1)
    texts = write_text_embeddings(
        tmp_path / "t.parquet", ["r0", "r1", "r2"], ["a", "b", "c"], np.ones((3, 8))
    )
    assert (
        evaluate("--predictions", str(out), "--references", str(texts), "--report", str(tmp_path / "r")) == 2
    )
    message = capsys.readouterr().err
    assert "1 ok prediction rows have no embedding: 'r1'" in message
