"""Shared fixtures: the upstream parity fixture, a tiny checkpoint written by our own factory, real photos.

Nothing here downloads: the tiny checkpoint is written into a temporary folder once per session, and the
photos come from scikit-image's bundled data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

UPSTREAM = Path(__file__).parent / "data" / "ovis25_upstream_tiny"


@pytest.fixture(scope="session", autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def upstream_dir() -> Path:
    return UPSTREAM


@pytest.fixture(scope="session")
def upstream_reference() -> dict:
    return json.loads((UPSTREAM / "reference.json").read_text())


@pytest.fixture(scope="session")
def upstream_tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(UPSTREAM / "reference.safetensors")


@pytest.fixture(scope="session")
def upstream_model():
    """The upstream fixture checkpoint, loaded through the public API (fp32, CPU)."""
    import ovis_batch

    return ovis_batch.load_model(UPSTREAM / "checkpoint", device="cpu")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from ovis_batch.model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("ckpt") / "tiny-ovis", seed=0)


@pytest.fixture(scope="session")
def vllm_checkpoint(tmp_path_factory) -> Path:
    """The tiny checkpoint a real vLLM runs: Qwen3's token ids and a head size its CPU attention takes.
    Seed 2: on the photos below, greedy rows end inside a thinking budget, close `</think>` inside it,
    or run past it (the vLLM tests assert that each occurs)."""
    from ovis_batch.model.tiny import make_tiny_model

    folder = tmp_path_factory.mktemp("vllm-ckpt") / "tiny-ovis-vllm"
    return make_tiny_model(folder, seed=2, official_vocab=True, head_dim=32)


@pytest.fixture(scope="session")
def vllm_replica_device() -> str:
    """The device the installed vLLM runs on; skips without vLLM, or with its CUDA build and no GPU."""
    from ovis_batch.model.vllm_engine import vllm_device

    device = vllm_device()
    if device is None:
        pytest.skip(
            "needs vLLM: the .venv-vllm environment (README.md), or pip install -e '.[vllm]' on a GPU"
        )
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("vLLM's CUDA build needs a GPU")
    return device


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    import ovis_batch

    return ovis_batch.load_model(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """Real photographs shipped with scikit-image (RGB uint8)."""
    from skimage import data

    return {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee": data.coffee()}


def _kill_process_tree(job) -> None:
    """SIGKILL a command started with `start_new_session=True` and every process it started (Ray's GCS,
    raylet, workers) at once: a lost machine."""
    import contextlib
    import signal

    import psutil  # a dependency of Ray

    processes = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)
    job.wait()


@pytest.fixture
def kill_process_tree():
    """The function that kills a running job and everything it started, as a lost machine would."""
    return _kill_process_tree
