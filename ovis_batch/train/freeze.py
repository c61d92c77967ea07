"""Which parameters of Ovis2.5 a fine-tuning run trains: freeze specs resolved against one model.

A spec selects parameter names (`plan_trainable`); the selection is then narrowed to the parameters the
chosen loss can reach, because a trainable tensor that never gets a gradient only stalls distributed
training (DDP waits for its gradient) and inflates the count printed to the user:

- `vte`: the visual embedding table, plus the visual head (Linear + LayerNorm) when asked;
- `top:K`: the top K LLM layers, the final norm and lm_head (when asked; in tied models such as the 2B,
  lm_head *is* the token embedding table, so the input embeddings train with it);
- `bottom:K`: the K LLM layers nearest the input (allowed, with a warning: it tends to erase general
  ability);
- `vision+top:K`: the whole visual side (vision tower, visual head, VTE) plus `top:K`;
- `all`: everything.

The vision tower's `post_layernorm` is never trained: the visual head reads the encoder output before
it (OVIS_FACTS.md), so it gets no gradient. The functions work on parameter names and sizes only, so
they run on a meta-device model to check a spec before any weight is read.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from ovis_batch.errors import UsageError
from ovis_batch.train.settings import FreezeSpec

_LLM_LAYER = re.compile(r"^llm\.model\.layers\.(\d+)\.")
_UNUSED = "visual_tokenizer.vit.vision_model.post_layernorm."
EMBED_TOKENS = "llm.model.embed_tokens.weight"
LM_HEAD = "llm.lm_head.weight"


class FreezeError(UsageError, ValueError):
    """A freeze spec that does not fit the model or leaves nothing to train; says what to change."""


@dataclass(frozen=True)
class TrainablePlan:
    """The parameters a run trains, and what to tell the user about the choice."""

    spec: FreezeSpec
    trainable: tuple[str, ...]
    trainable_count: int
    total_count: int
    warnings: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def share(self) -> float:
        return self.trainable_count / self.total_count if self.total_count else 0.0

    def describe(self) -> str:
        """The lines printed before training: count and share, then notes and warnings."""
        lines = [
            f"freeze {self.spec}: training {self.trainable_count:,} of {self.total_count:,} parameters "
            f"({100 * self.share:.2f}%) in {len(self.trainable)} tensors"
        ]
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def _selected(name: str, spec: FreezeSpec, layers: int, head: bool, lm_head: bool, tied: bool) -> bool:
    layer = _LLM_LAYER.match(name)
    index = int(layer.group(1)) if layer else None
    top = index is not None and index >= layers - spec.layers
    # A tied lm_head is listed once, under the embedding's name.
    head_name = EMBED_TOKENS if tied else LM_HEAD
    top_extras = name.startswith("llm.model.norm.") or (lm_head and name == head_name)
    vision = name.startswith(("visual_tokenizer.", "vte."))
    if spec.kind == "all":
        return True
    if spec.kind == "vte":
        return name == "vte.weight" or (head and name.startswith("visual_tokenizer.head."))
    if spec.kind == "top":
        return top or top_extras
    if spec.kind == "bottom":
        return index is not None and index < spec.layers
    if spec.kind == "vision+top":
        return vision or top or top_extras
    raise AssertionError(f"unknown freeze kind {spec.kind!r}")


def _reachable(name: str, loss: str, embedding: str, tied: bool) -> bool:
    """Whether the loss has a gradient path to the parameter (see the module docstring)."""
    if name.startswith(_UNUSED):
        return False
    if loss != "contrastive":
        return True  # the generation loss runs everything but post_layernorm
    if embedding == "last_token":
        return name != LM_HEAD or tied  # hidden states after the final norm; lm_head unused unless tied
    # vte_mean: mean visual embedding against mean token embedding of the caption; no LLM layer runs.
    return name.startswith(("visual_tokenizer.", "vte.")) or name == EMBED_TOKENS


def plan_trainable(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    spec: FreezeSpec,
    *,
    num_layers: int,
    tied_embeddings: bool,
    loss: str,
    embedding: str,
    train_visual_head: bool = False,
    train_lm_head: bool = True,
) -> TrainablePlan:
    """Resolve `spec` against a model's parameters (tied ones listed once, as `named_parameters` gives)."""
    if spec.layers > num_layers:
        raise FreezeError(
            f"freeze spec {spec} names {spec.layers} LLM layers but the model has {num_layers}; "
            f"use K <= {num_layers} (or `all`)"
        )
    params = list(named_parameters)
    total = sum(p.numel() for _, p in params)
    chosen = [
        (n, p)
        for n, p in params
        if _selected(n, spec, num_layers, train_visual_head, train_lm_head, tied_embeddings)
    ]
    trainable = [(n, p) for n, p in chosen if _reachable(n, loss, embedding, tied_embeddings)]
    unreachable = [n for n, _ in chosen if not _reachable(n, loss, embedding, tied_embeddings)]
    if not trainable:
        raise FreezeError(
            f"freeze spec {spec} with loss {loss!r}"
            + (f" (embedding {embedding!r})" if loss == "contrastive" else "")
            + " leaves nothing trainable: "
            + (
                f"the loss reaches none of the {len(chosen)} selected tensors"
                if chosen
                else "it selects no parameter"
            )
            + "; choose another --freeze or --loss"
        )
    warnings, notes = [], []
    if spec.kind == "bottom":
        warnings.append(
            f"bottom:{spec.layers} trains the layers nearest the input; this tends to erase the model's "
            "general ability. Prefer top:K or vte unless that is what you want."
        )
    if spec.kind in ("top", "vision+top", "all") and tied_embeddings and train_lm_head:
        notes.append(
            "lm_head is tied to the token embedding table in this model: training it trains the input "
            "embeddings too (set train_lm_head: false to keep both frozen)"
        )
    if loss != "generation":
        notes.append("the contrastive loss's temperature (one value, outside the model) is learned too")
    outside = [n for n in unreachable if not n.startswith(_UNUSED)]
    if outside:
        notes.append(
            f"{len(outside)} selected tensors get no gradient from loss {loss!r} and stay frozen "
            f"(e.g. {outside[0]})"
        )
    return TrainablePlan(
        spec=spec,
        trainable=tuple(n for n, _ in trainable),
        trainable_count=sum(p.numel() for _, p in trainable),
        total_count=total,
        warnings=tuple(warnings),
        notes=tuple(notes),
    )


def apply_trainable(module: nn.Module, plan: TrainablePlan) -> None:
    """Set `requires_grad` on every parameter of `module` from the plan; names must all exist."""
    names = dict(module.named_parameters())
    missing = sorted(set(plan.trainable) - set(names))
    if missing:
        raise FreezeError(f"the model has no parameter(s) {missing[:3]}; the plan was made for another model")
    trainable = set(plan.trainable)
    for name, param in names.items():
        param.requires_grad_(name in trainable)
