"""The module a fine-tuning run trains: Ovis2.5 plus a learnable temperature, computing both losses.

`FinetuneModel.forward` takes one collated batch (see `data.PairCollator`) and returns the weighted
loss with its parts. Everything happens inside this one `forward`, so that DDP and DeepSpeed see a
single call per step. The vision tower runs once per batch; its visual embeddings feed every loss.

- Generation: next-token cross-entropy on the caption tokens (and the closing `<|im_end|>`); prompt and
  image positions carry label -100. Logits are computed only where a label is, not over the ~2000
  image positions of a 1792x1024 photo (a `[tokens, 151936]` float tensor per row otherwise). The value
  equals the loss `Ovis2_5ForConditionalGeneration.forward(labels=...)` returns.
- Contrastive: symmetric InfoNCE between the image and the caption embeddings of the runtime's
  strategy (`OvisModel.embed_images` / `embed_texts`), computed differentiably: `last_token` is the
  final hidden state of the last token of the one-word-summary prompts; `vte_mean` is the mean visual
  embedding against the mean input embedding of the caption tokens. Negatives are the other pairs of
  the batch on the same device. The temperature is learned as CLIP learns it: `logit_scale = log(1/T)`,
  kept at or below log(100) (T >= 0.01).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ovis_batch.model.preprocess import normalize_patches

MAX_LOGIT_SCALE = math.log(100.0)
IGNORE = -100


@dataclass
class FinetuneOutput(ModelOutput):
    """The weighted loss, and its parts (detached) for logging."""

    loss: torch.Tensor | None = None
    generation_loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    temperature: torch.Tensor | None = None


def info_nce(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: row i of `image` matches row i of `text`; every other row is a negative."""
    image = F.normalize(image.float(), dim=-1)
    text = F.normalize(text.float(), dim=-1)
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * image @ text.T
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def caption_loss(llm, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions of right-padded rows."""
    hidden = llm.model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask), use_cache=False
    ).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != IGNORE
    logits = llm.lm_head(hidden[:, :-1][keep]).float()
    return F.cross_entropy(logits, targets[keep])


def last_token_states(llm, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Final hidden state (after the last norm) of each right-padded row's last real token."""
    hidden = llm.model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=_positions(mask), use_cache=False
    ).last_hidden_state
    last = mask.sum(dim=1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class FinetuneModel(nn.Module):
    """Ovis2.5 (`.ovis`, saved with the official names) plus the InfoNCE temperature (`.logit_scale`)."""

    def __init__(
        self,
        ovis: nn.Module,
        *,
        generation_weight: float,
        contrastive_weight: float,
        embedding: str,
        temperature: float,
    ) -> None:
        super().__init__()
        self.ovis = ovis
        self.generation_weight, self.contrastive_weight = generation_weight, contrastive_weight
        self.embedding = embedding
        weight = ovis.vte.weight
        self.logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / temperature), dtype=torch.float32, device=weight.device),
            requires_grad=contrastive_weight > 0,
        )

    @property
    def config(self):
        """The Ovis config (the Trainer reads a few fields of its model's config)."""
        return self.ovis.config

    def forward(
        self,
        pixel_values: torch.Tensor,
        grid_thws: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        image_query_ids: torch.Tensor | None = None,
        image_query_mask: torch.Tensor | None = None,
        text_ids: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
    ) -> FinetuneOutput:
        ovis = self.ovis
        grids = [tuple(int(v) for v in row) for row in grid_thws.tolist()]
        pixels = normalize_patches(pixel_values, ovis.vte.weight.dtype)
        visual = ovis.visual_embeddings(pixels, grids)
        loss = torch.zeros((), device=visual.device)
        out = FinetuneOutput()
        if self.generation_weight > 0:
            embeds = ovis.embed_inputs(input_ids, visual_embeds=visual)
            out.generation_loss = caption_loss(ovis.llm, embeds, attention_mask, labels)
            loss = loss + self.generation_weight * out.generation_loss
        if self.contrastive_weight > 0:
            image = self.image_vectors(visual, grids, image_query_ids, image_query_mask)
            text = self.text_vectors(text_ids, text_mask)
            out.contrastive_loss = info_nce(image, text, self.logit_scale)
            loss = loss + self.contrastive_weight * out.contrastive_loss
        out.loss = loss
        out.generation_loss = _detached(out.generation_loss)
        out.contrastive_loss = _detached(out.contrastive_loss)
        out.temperature = (-self.logit_scale.detach().clamp(max=MAX_LOGIT_SCALE)).exp()
        return out

    def image_vectors(
        self,
        visual: torch.Tensor,
        grids: list[tuple[int, int, int]],
        query_ids: torch.Tensor | None,
        query_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Unnormalised image embeddings `[images, hidden]`, as `OvisModel.embed_images` defines them."""
        if self.embedding == "vte_mean":
            merge = self.ovis.config.vit_config.hidden_stride**2
            tokens = [t * h * w // merge for t, h, w in grids]
            return torch.stack([v.float().mean(0) for v in visual.split(tokens)])
        embeds = self.ovis.embed_inputs(query_ids, visual_embeds=visual)
        return last_token_states(self.ovis.llm, embeds, query_mask)

    def text_vectors(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Unnormalised caption embeddings `[captions, hidden]`, as `OvisModel.embed_texts` defines them."""
        embeds = self.ovis.get_input_embeddings()(text_ids)
        if self.embedding == "vte_mean":
            weights = text_mask[..., None].float()
            return (embeds.float() * weights).sum(1) / weights.sum(1)
        return last_token_states(self.ovis.llm, embeds, text_mask)


def _detached(value: torch.Tensor | None) -> torch.Tensor | None:
    return None if value is None else value.detach()
