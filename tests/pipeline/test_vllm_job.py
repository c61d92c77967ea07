"""The real vLLM engine (GPU only): the whole caption job with `engine: vllm` on a random-weight
checkpoint, and its agreement with `engine: hf` on the same rows.

    python -m pytest -q -m gpu tests/pipeline/test_vllm_job.py      # on a GPU machine with .[vllm]

Skipped without CUDA or without vLLM; tests/pipeline/test_vllm_stage.py covers the same stage, requests
and budget logic on CPU with a runtime-backed engine.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ovis_batch.model.vllm_engine import vllm_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not vllm_available(), reason="needs vLLM (pip install -e '.[vllm]')"),
]


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory):
    from ovis_batch.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny", official_vocab=True)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, photos):
    folder = tmp_path_factory.mktemp("manifest")
    rows = []
    for i, (name, size) in enumerate(
        [("astronaut", (1792, 1024)), ("chelsea", (640, 448)), ("coffee", (900, 600))]
    ):
        buffer = io.BytesIO()
        Image.fromarray(photos[name]).resize(size).save(buffer, "JPEG", quality=92)
        rows.append({"image_id": f"r{i}", "image": buffer.getvalue()})
    rows.append({"image_id": "broken", "image": b"not an image"})
    pq.write_table(pa.Table.from_pylist(rows), folder / "manifest.parquet")
    return folder / "manifest.parquet"


def run(manifest, output, model, engine, *extra):
    from workflows.caption import run_caption

    overrides = [f"engine={engine}", "gpus_per_replica=1", "dtype=float32", "max_new_tokens=48", *extra]
    run_caption(str(manifest), str(output), str(model), overrides=overrides, quiet=True)
    table = pq.read_table(output).sort_by("image_id")
    return {r["image_id"]: r for r in table.to_pylist()}


@pytest.mark.parametrize("thinking", [[], ["thinking=true", "thinking_budget=8"]], ids=["plain", "budget"])
def test_caption_job_with_vllm_matches_hf(tmp_path, manifest, official_tiny, thinking):
    hf = run(manifest, tmp_path / "hf", official_tiny, "hf", "embedding=vte_mean", *thinking)
    ours = run(manifest, tmp_path / "vllm", official_tiny, "vllm", "embedding=vte_mean", *thinking)
    assert sorted(ours) == sorted(hf) == ["broken", "r0", "r1", "r2"]
    assert ours["broken"]["status"] == "error" and ours["broken"]["error_type"] == "not_an_image"
    identical = 0
    for i in ("r0", "r1", "r2"):
        a, b = hf[i], ours[i]
        assert b["status"] == "ok" and b["prompt_tokens"] == a["prompt_tokens"]
        assert b["visual_tokens"] == a["visual_tokens"]
        assert b["embedding"] == pytest.approx(a["embedding"], abs=1e-5)  # the same runtime computes both
        identical += (b["caption"], b["reasoning"]) == (a["caption"], a["reasoning"])
    # Greedy float32 on the same weights: kernels differ, so a near-tie may flip a token; most rows agree.
    assert identical >= 2, f"only {identical} of 3 rows agree between hf and vllm"
