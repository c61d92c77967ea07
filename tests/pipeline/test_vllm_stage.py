"""The caption job with `engine: vllm` on a CPU machine: settings and refusals before any work, and the
vLLM model stage (the async actor's `__call__`) against the `hf` stage on the same decoded rows.

The engine inside the stage is `RuntimeEngine` (tests/model/test_vllm_engine.py): it answers requests as
vLLM's Ovis2.5 does, computed by the project's runtime, so everything around the engine is the code a
GPU replica runs.
"""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from ovis_batch.config import CaptionConfig, ConfigError, load_config
from ovis_batch.model import vllm_engine
from ovis_batch.model.vllm_engine import EngineError, vllm_token_ids
from ovis_batch.pipeline.job import plan_caption_job
from ovis_batch.pipeline.stages import CaptionPredictor, VllmCaptionPredictor

sys.path.insert(0, str(Path(__file__).parents[1] / "model"))
from test_vllm_engine import RuntimeEngine, engine_model


def test_engine_setting_defaults_to_hf_and_rejects_impossible_combinations():
    assert CaptionConfig().engine == "hf"
    assert load_config(CaptionConfig, None, ["engine=vllm", "gpus_per_replica=1"]).engine == "vllm"
    with pytest.raises(ConfigError, match="gpus_per_replica: 1"):
        load_config(CaptionConfig, None, ["engine=vllm"])
    with pytest.raises(ConfigError, match="GPUs only"):
        load_config(CaptionConfig, None, ["engine=vllm", "gpus_per_replica=1", "device=cpu"])
    with pytest.raises(ConfigError, match="engine"):
        load_config(CaptionConfig, None, ["engine=tgi"])
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
        load_config(CaptionConfig, None, ["vllm_gpu_memory_utilization=1.5"])


def test_engine_decides_outputs_so_resume_compares_it():
    settings = load_config(CaptionConfig, None, ["engine=vllm", "gpus_per_replica=1"])
    assert settings.generation_settings()["engine"] == "vllm"


@pytest.fixture
def manifest(tmp_path, photos):
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    Image.fromarray(photos["chelsea"]).save(buffer, "JPEG")
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "image": [buffer.getvalue()]}), path)
    return path


def vllm_settings() -> CaptionConfig:
    return load_config(CaptionConfig, None, ["engine=vllm", "gpus_per_replica=1"])


def test_without_vllm_the_job_stops_before_any_work(tmp_path, manifest, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: False)
    output = tmp_path / "out"
    with pytest.raises(EngineError, match=r"pip install -e '\.\[vllm\]'.*engine: hf"):
        plan_caption_job(str(manifest), str(output), str(tiny_checkpoint), vllm_settings())
    assert not output.exists()  # nothing written, nothing to refuse on the next run


def test_a_vocabulary_vllm_would_misread_stops_the_job(tmp_path, manifest, tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    with pytest.raises(EngineError, match="<ovis_image_start>"):
        plan_caption_job(str(manifest), str(tmp_path / "out"), str(tiny_checkpoint), vllm_settings())


def test_a_native_layout_folder_stops_the_job(tmp_path, manifest, tiny_checkpoint, monkeypatch):
    """vLLM reads the official config only: the native layout is refused with the command that converts it."""
    pytest.importorskip("transformers.models.ovis2_5", reason="reading the native layout needs 5.25")
    from ovis_batch.checkpoints.consolidate import consolidate_checkpoint

    native = consolidate_checkpoint(tiny_checkpoint, tmp_path / "native", output_layout="native")
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    output = tmp_path / "out"
    with pytest.raises(EngineError, match=r"official Ovis2\.5 layout.*checkpoint consolidate"):
        plan_caption_job(str(manifest), str(output), str(native), vllm_settings())
    assert not output.exists()


def test_without_a_gpu_the_job_stops_before_any_work(tmp_path, manifest, monkeypatch):
    from ovis_batch.model.tiny import make_tiny_model

    official = make_tiny_model(tmp_path / "official", official_vocab=True)
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    output = tmp_path / "out"
    with pytest.raises(EngineError, match="needs a CUDA GPU"):
        plan_caption_job(str(manifest), str(output), str(official), vllm_settings())
    assert not output.exists()
    # On a cluster the driver may have no GPU: the check moves to the start of the run.
    plan = plan_caption_job(str(manifest), str(output), str(official), vllm_settings(), address="auto")
    assert plan.remaining == 1


def test_outputs_written_before_the_engine_setting_resume_as_hf(tmp_path, manifest, tiny_checkpoint):
    import json

    output = tmp_path / "out"
    plan_caption_job(str(manifest), str(output), str(tiny_checkpoint), CaptionConfig())
    job_file = output / "_job.json"
    job = json.loads(job_file.read_text())
    del job["generation"]["engine"]
    job_file.write_text(json.dumps(job))
    plan_caption_job(str(manifest), str(output), str(tiny_checkpoint), CaptionConfig())  # not refused


def test_vllm_stage_gives_the_hf_stages_rows(tiny_checkpoint, tiny_model, photos):
    """Same decoded rows through both model stages: the same captions, reasoning, counts and error rows."""
    from test_stages import decode_stage, jpeg_bytes

    data = jpeg_bytes(photos["chelsea"])
    batch = pa.table({"image_id": ["cat", "broken", "cat2"], "image": [data, b"not an image", data]})
    decoded = decode_stage(min_pixels=448 * 448, max_pixels=1792 * 1792)(batch)
    decoded = decoded.set_column(
        decoded.schema.get_field_index("prompt"), "prompt", pa.array(["Describe.", "Describe.", "Why?"])
    )
    generation = {"max_new_tokens": 60, "thinking": True, "thinking_budget": 5}
    common = {
        "id_column": "image_id",
        "passthrough": [],
        "dtype": "auto",
        "generation": generation,
        "embedding": "vte_mean",
        "embedding_dim": tiny_model.hidden_size,
    }
    hf = CaptionPredictor(
        model_source=str(tiny_checkpoint), device="cpu", batch_visual_tokens=10_000, batch_rows=8, **common
    )(decoded)
    image_token_id = vllm_token_ids(tiny_model.tokenizer)["<image>"]
    stage = VllmCaptionPredictor.__new__(VllmCaptionPredictor)  # the engine is the only part swapped
    stage.model = engine_model(tiny_model, RuntimeEngine(tiny_model, image_token_id), image_token_id)
    stage.id_column, stage.passthrough = "image_id", []
    stage.generation, stage.embedding, stage.embedding_dim = generation, "vte_mean", tiny_model.hidden_size
    ours = asyncio.run(stage(decoded))
    assert ours.schema == hf.schema
    columns = ["image_id", "status", "error_type", "caption", "reasoning", "thinking_truncated"]
    columns += ["prompt_tokens", "output_tokens", "reasoning_tokens", "visual_tokens", "finish_reason"]
    assert ours.select(columns).to_pylist() == hf.select(columns).to_pylist()
    assert [r["status"] for r in ours.to_pylist()] == ["ok", "error", "ok"]
    for a, b in zip(hf.column("embedding").to_pylist(), ours.column("embedding").to_pylist(), strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(b, a, atol=1e-6)
