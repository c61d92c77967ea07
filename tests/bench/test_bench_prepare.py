"""`bench prepare`: benchmark files in VLMEvalKit's TSV layout (and files of one's own) to the manifest
the caption job reads and the references scoring reads; bad files refused naming the row and column."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from bench_files import OPTION_TEXTS, circular_rows, photo_base64, rotate, write_tsv
from PIL import Image

from ovis_batch.bench.prepare import PrepareOptions, prepare_benchmark
from ovis_batch.bench.source import BenchmarkFileError
from ovis_batch.cli import main

FINAL = "End your response with 'Final answer: '."


def read(folder, name):
    return pq.read_table(folder / name).to_pandas().set_index("index" if name == "manifest.parquet" else "id")


@pytest.fixture
def mmbench(tmp_path, photos):
    """Two circular groups (four rotations each; group 3 has a hint), a question with two images, and
    one whose `image` is the index of the row whose image it shares (VLMEvalKit's space saving)."""
    rows = circular_rows(photos, 3)
    two = [photo_base64(photos["chelsea"], 40, 30), photo_base64(photos["coffee"], 60, 60)]
    base = {
        "question": "Which two things are shown?",
        "category": "pairs",
        "l2-category": "relation",
        "split": "dev",
    }
    rows.append(
        {
            "index": 7,
            "image": str(two),
            "A": "cat and coffee",
            "B": "two cats",
            "C": "a rocket",
            "answer": "A",
        }
        | base
    )
    rows.append({"index": 8, "image": "1", "A": "yes", "B": "no", "answer": "B"} | base)
    return write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows), rows, two


def test_prepare_writes_one_ovis_prompt_per_question_and_the_references(mmbench, tmp_path, capsys):
    path, rows, two = mmbench
    out = tmp_path / "prepared"
    assert main(["bench", "prepare", str(path), str(out)]) == 0
    assert "MMBench_DEV_EN: 14 questions, task mcq" in capsys.readouterr().out

    manifest, refs = read(out, "manifest.parquet"), read(out, "references.parquet")
    assert list(manifest.index) == [str(r["index"]) for r in rows]  # file order, every question
    # Group 3, rotation 1: the hint on its own line, then the question, the rotated options, the instruction.
    options, answer = rotate(OPTION_TEXTS, 3, 1)
    expected = (
        "The photo was taken outdoors.\nWhat is shown in picture 3?\n"
        + "\n".join(f"{letter}. {text}" for letter, text in zip("ABCD", options, strict=True))
        + f"\n{FINAL}"
    )
    assert manifest.loc["1000003", "prompt"] == expected
    assert refs.loc["1000003", "answer"] == "ABCD"[answer] and list(refs.loc["1000003", "options"]) == options
    assert (
        refs.loc["1000003", "group"] == "3"
        and not refs.loc["1000003", "is_main"]
        and refs.loc["3", "is_main"]
    )
    assert (
        manifest.loc["8", "prompt"] == f"Which two things are shown?\nA. yes\nB. no\n{FINAL}"
    )  # no C: no line
    assert refs["final_answer"].all()
    # Images: base64 decoded as is; the short value "1" is row 1's image.
    assert manifest.loc["2", "image"] == base64.b64decode(rows[4]["image"])
    assert manifest.loc["8", "image"] == manifest.loc["1", "image"]
    # Two images composed: scaled to the taller one's height (60), left to right: 80 + 60 wide.
    composed = np.asarray(Image.open(io.BytesIO(manifest.loc["7", "image"])))
    assert composed.shape == (60, 140, 3) and refs.loc["7", "images"] == 2
    second = np.asarray(Image.open(io.BytesIO(base64.b64decode(two[1]))).convert("RGB"))
    assert np.array_equal(composed[:, 80:], second)  # the taller image is pasted unchanged

    prepared = json.loads((out / "prepared.json").read_text())
    assert (prepared["task"], prepared["scoring"], prepared["circular_groups"]) == (
        "mcq",
        "mmbench-circular",
        5,
    )
    assert prepared["prompt"]["instruction"] == FINAL and prepared["prompt"]["answer_read_after_final_answer"]
    assert (
        prepared["images"]["questions_with_several"] == 1 and "side by side" in prepared["images"]["policy"]
    )
    assert prepared["source"]["sha256"] and prepared["questions"] == 14


def test_yes_no_benchmarks_get_their_prompt_and_scoring_from_the_name(tmp_path, photos):
    image = photo_base64(photos["astronaut"], 32, 32)
    rows = [
        {"index": "VS_chart_0_1_0_0", "image": image, "question": "Is the bar red?", "answer": "yes"},
        {"index": "VS_chart_0_1_1_0", "image": image, "question": "Is the bar red?", "answer": "No"},
    ]
    hallusion = tmp_path / "hallusion"
    prepare_benchmark(
        str(write_tsv(tmp_path / "HallusionBench.tsv", rows)), hallusion, PrepareOptions("HallusionBench")
    )
    manifest, refs = read(hallusion, "manifest.parquet"), read(hallusion, "references.parquet")
    assert manifest.loc["VS_chart_0_1_0_0", "prompt"] == f"Is the bar red? Please answer yes or no.\n{FINAL}"
    assert list(refs["answer"]) == ["Yes", "No"]
    assert refs.loc["VS_chart_0_1_1_0", ["set_id", "figure_id", "question_id"]].tolist() == ["1", "1", "0"]

    pope = tmp_path / "pope"
    prepared = prepare_benchmark(str(write_tsv(tmp_path / "POPE.tsv", rows)), pope, PrepareOptions("POPE"))
    assert (prepared["task"], prepared["scoring"]) == ("yes_no", "pope")
    assert read(pope, "manifest.parquet").loc["VS_chart_0_1_0_0", "prompt"] == f"Is the bar red?\n{FINAL}"


def test_mme_images_are_keyed_by_path_and_rows_without_an_image_are_counted(tmp_path, photos):
    image = photo_base64(photos["coffee"], 32, 32)
    rows = [
        {
            "index": 1,
            "image": image,
            "image_path": "OCR/1.png",
            "question": "Q1",
            "answer": "Yes",
            "category": "OCR",
        },
        {
            "index": 2,
            "image": "1",
            "image_path": "OCR/1.png",
            "question": "Q2",
            "answer": "No",
            "category": "OCR",
        },
        {"index": 3, "image": None, "image_path": None, "question": "Q3", "answer": "No", "category": "OCR"},
    ]
    prepared = prepare_benchmark(
        str(write_tsv(tmp_path / "MME.tsv", rows)), tmp_path / "mme", PrepareOptions("MME")
    )
    assert prepared["scoring"] == "mme" and prepared["questions"] == 2
    assert prepared["skipped_without_image"] == {"count": 1, "examples": ["3"]}
    assert list(read(tmp_path / "mme", "references.parquet")["image_key"]) == ["OCR/1.png", "OCR/1.png"]


def test_a_parquet_benchmark_of_ones_own_with_a_column_mapping(tmp_path, photos):
    buffer = io.BytesIO()
    Image.fromarray(photos["chelsea"]).resize((40, 40)).save(buffer, "JPEG")
    table = pa.table(
        {
            "qid": ["a", "b"],
            "picture": [buffer.getvalue(), buffer.getvalue()],
            "text": ["What animal is it?", "Pick one."],
            "gold": ["['cat', 'kitten']", "B"],
            "choices": [None, ["dog", "cat"]],
        }
    )
    pq.write_table(table, tmp_path / "inhouse.parquet")
    columns = {"index": "qid", "image": "picture", "question": "text", "answer": "gold"}
    out = tmp_path / "short"
    prepared = prepare_benchmark(
        str(tmp_path / "inhouse.parquet"),
        out,
        PrepareOptions("inhouse", task="short_answer", columns=columns),
    )
    assert prepared["scoring"] == "vqa"
    manifest, refs = read(out, "manifest.parquet"), read(out, "references.parquet")
    assert (
        manifest.loc["a", "prompt"]
        == "What animal is it?\nAnswer the question using a single word or phrase."
    )
    assert (
        list(refs.loc["a", "answers"]) == ["cat", "kitten"]
        and manifest.loc["a", "image"] == buffer.getvalue()
    )
    # The options as one list column: lettered A, B, ... (an mcq of its own).
    pq.write_table(table.slice(1), tmp_path / "inhouse_mcq.parquet")
    mcq = prepare_benchmark(
        str(tmp_path / "inhouse_mcq.parquet"),
        tmp_path / "mcq",
        PrepareOptions(
            "inhouse", columns=columns | {"options": "choices"}, instruction="Answer with a letter."
        ),
    )
    assert mcq["task"] == "mcq"
    prompt = read(tmp_path / "mcq", "manifest.parquet").loc["b", "prompt"]
    assert prompt == "Pick one.\nA. dog\nB. cat\nAnswer with a letter."


def test_ai2d_asks_for_the_letter_and_is_read_as_is(tmp_path, photos):
    rows = [
        {
            "index": 0,
            "image": photo_base64(photos["coffee"], 32, 32),
            "question": "Q?",
            "A": "x",
            "B": "y",
            "answer": "A",
        }
    ]
    prepared = prepare_benchmark(
        str(write_tsv(tmp_path / "AI2D_TEST.tsv", rows)), tmp_path / "ai2d", PrepareOptions("AI2D_TEST")
    )
    assert prepared["scoring"] == "accuracy"
    assert (
        prepared["prompt"]["instruction"]
        == "Answer with the option's letter from the given choices directly."
    )
    assert not read(tmp_path / "ai2d", "references.parquet")["final_answer"].any()


def good_rows(photos) -> list[dict]:
    return circular_rows(photos, 2)


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (
            lambda rows: [{k: v for k, v in r.items() if k != "answer"} for r in rows],
            r"has no `answer` column",
        ),
        (
            lambda rows: [*rows[:2], rows[2] | {"image": "###" + "not base64 at all " * 8}, *rows[3:]],
            r"row 3 \(index '2000001'\), column `image`: not valid base64",
        ),
        (
            lambda rows: [*rows[:4], rows[4] | {"answer": "E"}, *rows[5:]],
            r"row 5 \(index '2'\), column `answer`: 'E' names no option \(the options are \['A', 'B', 'C', 'D'\]\)",
        ),
        (
            lambda rows: [*rows, rows[0] | {"question": "again"}],
            r"duplicate index '1' in rows \[1, 9\] \(column `index`",
        ),
        (
            lambda rows: [*rows[:1], rows[1] | {"image": "123"}, *rows[2:]],
            r"row 2 \(index '1000001'\), column `image`: '123' is too short to be base64 and names no row",
        ),
        (
            lambda rows: [*rows[:6], rows[6] | {"question": None}, *rows[7:]],
            r"row 7 \(index '2000002'\), column `question`: empty",
        ),
        (
            lambda rows: [r for r in rows if r["index"] != 2],
            r"circular group\(s\) \['2'\] have rotated questions but no unrotated one",
        ),
    ],
    ids=[
        "missing answer column",
        "undecodable base64",
        "answer names no option",
        "duplicate index",
        "dangling image reference",
        "empty question",
        "circular group without its question",
    ],
)
def test_a_malformed_file_is_refused_naming_the_row_and_column(tmp_path, photos, capsys, break_it, message):
    path = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", break_it(good_rows(photos)))
    with pytest.raises(BenchmarkFileError, match=message):
        prepare_benchmark(str(path), tmp_path / "out", PrepareOptions("MMBench_DEV_EN"))
    assert not (tmp_path / "out" / "prepared.json").exists()
    assert main(["bench", "prepare", str(path), str(tmp_path / "out")]) == 2  # one line, no traceback
    assert capsys.readouterr().err.startswith(f"error: {path}")


def test_a_missing_file_and_an_unknown_format_are_refused(tmp_path):
    with pytest.raises(BenchmarkFileError, match="does not exist"):
        prepare_benchmark(str(tmp_path / "nope.tsv"), tmp_path / "out", PrepareOptions("x"))
    (tmp_path / "bench.csv").write_text("index,question\n1,q\n")
    with pytest.raises(BenchmarkFileError, match=r"expected a \.tsv file .* or a \.parquet file"):
        prepare_benchmark(str(tmp_path / "bench.csv"), tmp_path / "out", PrepareOptions("x"))
    frame = pd.DataFrame({"index": [1], "question": ["q"], "answer": ["x"]})
    frame.to_csv(tmp_path / "noimage.tsv", sep="\t", index=False)
    with pytest.raises(BenchmarkFileError, match="neither an `image` nor an `image_path` column"):
        prepare_benchmark(str(tmp_path / "noimage.tsv"), tmp_path / "out", PrepareOptions("x"))
