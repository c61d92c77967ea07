"""Lets vLLM read the official Ovis2.5 `config.json` without executing the checkpoint's code, and ties
the lifetime of an engine started by the project to the process that started it.

vLLM ships the Ovis2.5 model and its processor, but no config class for `model_type: ovis2_5`: on the
official layout it asks transformers for the checkpoint's remote `configuration_ovis2_5.py`, which we
never run. `register` gives transformers the project's own config classes for `ovis2_5` and
`siglip2_navit` instead (they read `llm_config` / `vit_config` exactly as the official file does).

vLLM calls `register` in every process it starts (front end, engine core, GPU workers) through the
`vllm.general_plugins` entry point declared in pyproject.toml; the caption job also calls it before it
builds an engine. It is never called in a process that also uses transformers' own `ovis2_5` classes
(converted checkpoints): `exist_ok=True` replaces that registration.

In the engine-core process of an engine the project started (`VllmEngine` sets `END_WITH_PARENT_ENV`),
`register` also asks Linux to end it when the process that started it dies: a replica actor killed
outright (Ctrl-C of the job, a lost driver) runs no Python code on its way out, and the engine would
otherwise run on for good, holding its memory. SIGKILL, because vLLM's engine core does not finish its
own SIGTERM shutdown once its front end is gone; its workers notice it go and exit.
"""

from __future__ import annotations

import os
import sys

END_WITH_PARENT_ENV = "OVIS_BATCH_VLLM_END_WITH_PARENT"
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def register() -> None:
    """Register the project's Ovis2.5 and SigLIP2-NaViT config classes with transformers' AutoConfig."""
    from transformers import AutoConfig

    from ovis_batch.model.ovis2_5 import Ovis2_5Config, Siglip2NavitConfig

    AutoConfig.register("siglip2_navit", Siglip2NavitConfig, exist_ok=True)
    AutoConfig.register("ovis2_5", Ovis2_5Config, exist_ok=True)
    if os.environ.get(END_WITH_PARENT_ENV) == "1":
        end_engine_core_with_parent()


def end_engine_core_with_parent() -> None:
    """In vLLM's engine-core process on Linux: SIGKILL when its parent dies (a no-op elsewhere).

    Linux sends it when the parent's thread that started this process ends: `VllmEngine` is built on
    a thread that lives as long as its process (a Ray actor's main thread).
    """
    import multiprocessing

    parent = multiprocessing.parent_process()
    if sys.platform != "linux" or parent is None:
        return
    if not multiprocessing.current_process().name.startswith("EngineCore"):
        return
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if not parent.is_alive():  # it died before the request was made: nothing will send the signal
        os.kill(os.getpid(), signal.SIGKILL)
