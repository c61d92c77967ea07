"""Lets vLLM read the official Ovis2.5 `config.json` without executing the checkpoint's code.

vLLM ships the Ovis2.5 model and its processor, but no config class for `model_type: ovis2_5`: on the
official layout it asks transformers for the checkpoint's remote `configuration_ovis2_5.py`, which we
never run. `register` gives transformers the project's own config classes for `ovis2_5` and
`siglip2_navit` instead (they read `llm_config` / `vit_config` exactly as the official file does).

vLLM calls `register` in every process it starts (front end, engine core, GPU workers) through the
`vllm.general_plugins` entry point declared in pyproject.toml; the caption job also calls it before it
builds an engine. It is never called in a process that also uses transformers' own `ovis2_5` classes
(converted checkpoints): `exist_ok=True` replaces that registration.
"""

from __future__ import annotations


def register() -> None:
    """Register the project's Ovis2.5 and SigLIP2-NaViT config classes with transformers' AutoConfig."""
    from transformers import AutoConfig

    from ovis_batch.model.ovis2_5 import Ovis2_5Config, Siglip2NavitConfig

    AutoConfig.register("siglip2_navit", Siglip2NavitConfig, exist_ok=True)
    AutoConfig.register("ovis2_5", Ovis2_5Config, exist_ok=True)
