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
