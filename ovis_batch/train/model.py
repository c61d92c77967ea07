"""The module a fine-tuning run trains: Ovis2.5 computing both losses, and the learned temperature.

`FinetuneModel.forward` takes one collated batch (see `data.PairCollator`) and returns the weighted
loss with its parts. Everything happens inside this one `forward`, so that DDP and DeepSpeed see a
single call per step. The vision tower runs once per batch; its visual embeddings feed every loss.

`FinetuneModel` registers the Ovis2.5 parts (`llm`, `visual_tokenizer`, `vte`) as its own children, so
its parameter names are exactly the official ones: what DDP, DeepSpeed's ZeRO files and the saved
safetensors hold is the released model's layout and nothing else. The InfoNCE temperature therefore
lives outside the module (`LearnedTemperature`, with its own small optimizer, stepped by the Trainer;
see `trainer.py`): a `logit_scale` tensor among the weights would make every checkpoint one that
`load_model` refuses.

- Generation: next-token cross-entropy on the caption tokens (and the closing `<|im_end|>`); prompt and
  image positions carry label -100. Logits are computed only where a label is, not over the ~2000
  image positions of a 1792x1024 photo (a `[tokens, 151936]` float tensor per row otherwise). The value
  equals the loss `Ovis2_5ForConditionalGeneration.forward(labels=...)` returns.
- Contrastive: symmetric InfoNCE between the image and the caption embeddings of the runtime's
  strategy (`OvisModel.embed_images` / `embed_texts`), computed differentiably: `last_token` is the
  final hidden state of the last token of the one-word-summary prompts; `vte_mean` is the mean visual
  embedding against the mean input embedding of the caption tokens. Negatives are the other pairs of
  the batch on the same device. The temperature is learned as CLIP learns it: `logit_scale = log(1/T)`,
  kept at or below log(100) (T >= 0.01), by AdamW at the run's learning rate and schedule.
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
    logits = logit_scale.clamp(max=MAX_LOGIT_SCALE).exp() * (image @ text.T)
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


class LearnedTemperature:
    """The InfoNCE `logit_scale = log(1/T)` and its AdamW, outside the model (see the module docstring)."""

    def __init__(
        self, temperature: float, device: torch.device | str, *, betas: tuple[float, float], eps: float
    ) -> None:
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / temperature), device=device))
        self.optimizer = torch.optim.AdamW([self.logit_scale], betas=betas, eps=eps, weight_decay=0.0)

    @property
    def value(self) -> float:
        """The temperature itself, T = exp(-logit_scale) (at least 0.01)."""
        return math.exp(-min(float(self.logit_scale.detach()), MAX_LOGIT_SCALE))

    def step(self, learning_rate: float, world_size: int = 1) -> None:
        """One AdamW step with the gradient averaged over the processes (as DDP averages the model's)."""
        grad = self.logit_scale.grad
        if grad is None:
            return
        if world_size > 1:
            torch.distributed.all_reduce(grad)
            grad /= world_size
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state(self) -> dict[str, float]:
        """Exact floats (a float32 value is exact as a Python float, and in JSON): the value and Adam's state."""
        record = {"logit_scale": float(self.logit_scale.detach()), "temperature": self.value}
        adam = self.optimizer.state.get(self.logit_scale)
        if adam:
            record |= {
                "adam_step": float(adam["step"]),
                "adam_exp_avg": float(adam["exp_avg"]),
                "adam_exp_avg_sq": float(adam["exp_avg_sq"]),
            }
        return record

    def load(self, record: dict[str, float]) -> None:
        with torch.no_grad():
            self.logit_scale.fill_(record["logit_scale"])
        if "adam_step" in record:
            like = self.logit_scale.detach()
            self.optimizer.state[self.logit_scale] = {
                "step": torch.tensor(record["adam_step"]),
                "exp_avg": torch.full_like(like, record["adam_exp_avg"]),
                "exp_avg_sq": torch.full_like(like, record["adam_exp_avg_sq"]),
            }


class FinetuneModel(nn.Module):
    """Ovis2.5 under its official parameter names, computing the run's losses in one forward."""

    def __init__(
        self,
        ovis: nn.Module,
        *,
        generation_weight: float,
        contrastive_weight: float,
        embedding: str,
        temperature: LearnedTemperature | None = None,
    ) -> None:
        super().__init__()
        if contrastive_weight > 0 and temperature is None:
            raise ValueError("the contrastive loss needs a LearnedTemperature")
        # The parts, registered here under their official names; `ovis` (for its methods) is not registered.
        self.llm, self.visual_tokenizer, self.vte = ovis.llm, ovis.visual_tokenizer, ovis.vte
        object.__setattr__(self, "ovis", ovis)
        self.generation_weight, self.contrastive_weight = generation_weight, contrastive_weight
        self.embedding = embedding
        self.temperature = temperature

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
            out.contrastive_loss = info_nce(image, text, self.temperature.logit_scale.to(visual.device))
            loss = loss + self.contrastive_weight * out.contrastive_loss
            out.temperature = torch.tensor(self.temperature.value, device=visual.device)
        out.loss = loss
        out.generation_loss = _detached(out.generation_loss)
        out.contrastive_loss = _detached(out.contrastive_loss)
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
