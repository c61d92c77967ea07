"""Ovis2.5 as a transformers-compatible PyTorch model, written for this project.

What lives here: the configuration classes, the SigLIP2 NaViT vision tower over packed variable-resolution
images, the visual head and visual embedding table (VTE), and the splicing of visual embeddings into
transformers' own Qwen3 causal LM. Parameter names follow the official checkpoints
(`llm.*`, `visual_tokenizer.vit.vision_model.*`, `visual_tokenizer.head.{0,1}.*`, `vte.weight`), so the
published safetensors load as they are, without `trust_remote_code`.

What does not live here: tokenisation, prompts, image decoding, generation policy (thinking budget) and
checkpoint loading; see `runtime.py`, `prompts.py`, `preprocess.py` and `checkpoint.py`.

Data layout of the vision input (as upstream's): `pixel_values` is `[sum of patches, 3*16*16]` without a
batch axis, rows ordered by 2x2 merge block, and `grid_thws` is `[n_images, 3]` = (t, h, w) in patches.
Images are kept apart by their lengths (varlen attention), never by a dense mask over the whole pack.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, PreTrainedModel, Qwen3ForCausalLM
from transformers.activations import ACT2FN
from transformers.configuration_utils import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

try:  # transformers >= 5.22 declares sub-configs with specs; older releases with a plain class dict
    from transformers.configuration_utils import SubConfigSpec
except ImportError:
    SubConfigSpec = None

# Placeholder ids used in prompt id sequences (upstream's convention, kept so that prompt ids compare).
IMAGE_PLACEHOLDER_ID = -200
VISUAL_ATOM_ID = -300
IMAGE_START_ID, IMAGE_END_ID, VIDEO_START_ID, VIDEO_END_ID = -301, -302, -303, -304
INDICATOR_IDS = (IMAGE_START_ID, IMAGE_END_ID, VIDEO_START_ID, VIDEO_END_ID)


@strict
class Siglip2NavitConfig(PreTrainedConfig):
    """The native-resolution SigLIP2 vision tower of Ovis2.5 (`vit_config` in config.json)."""

    model_type = "siglip2_navit"
    base_config_key = "vit_config"

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 512
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    hidden_stride: int = 2
    window_size: int = 112
    fullatt_block_indexes: str | None = None
    temporal_patch_size: int = 1
    preserve_original_pe: bool = True
    use_rope: bool = True
    num_patches: int = -1


@strict
class Ovis2_5Config(PreTrainedConfig):
    """The whole model: `llm_config` (Qwen3), `vit_config` (SigLIP2 NaViT) and the visual vocabulary."""

    model_type = "ovis2_5"
    # Both declarations say the same; which one transformers reads depends on its release (5.19, which
    # vLLM's CPU build accepts, reads `sub_configs`; 5.22 on, `sub_configs_defaults`).
    if SubConfigSpec is None:
        sub_configs = {"llm_config": AutoConfig, "vit_config": Siglip2NavitConfig}
    else:
        sub_configs_defaults = {
            "llm_config": SubConfigSpec(config_class=AutoConfig, model_type="qwen3"),
            "vit_config": SubConfigSpec(config_class=Siglip2NavitConfig),
        }

    llm_config: dict | PreTrainedConfig | None = None
    vit_config: dict | PreTrainedConfig | None = None
    visual_vocab_size: int = 65536
    hidden_size: int | None = None
    conversation_formatter_class: str | None = None

    def __post_init__(self, **kwargs):
        # Built here rather than by transformers, whose releases before 5.22 leave dicts as they are
        # (a config object passes through unchanged in every release).
        if not isinstance(self.llm_config, PreTrainedConfig):
            llm = self.llm_config or {}
            self.llm_config = CONFIG_MAPPING[llm.get("model_type", "qwen3")](**llm)
        if not isinstance(self.vit_config, PreTrainedConfig):
            self.vit_config = Siglip2NavitConfig(**(self.vit_config or {}))
        super().__post_init__(**kwargs)


# ---------------------------------------------------------------------------------------------------- vision


def _block_order(x: torch.Tensor, h: int, w: int, stride: int) -> torch.Tensor:
    """Reorder a raster `[h*w, ...]` tensor into 2x2-merge-block order (block row, block col, row, col)."""
    rest = x.shape[1:]
    x = x.reshape(h // stride, stride, w // stride, stride, *rest)
    return x.transpose(1, 2).reshape(h * w, *rest)


class Siglip2VisionEmbeddings(nn.Module):
    """Patch embedding plus the learned position table, resized per image (bicubic) and block-ordered."""

    def __init__(self, config: Siglip2NavitConfig) -> None:
        super().__init__()
        self.config = config
        dim, patch = config.hidden_size, config.patch_size
        if config.num_patches > 0:  # flattened-patch variant (SigLIP2 naflex)
            self.patch_embedding = nn.Linear(config.num_channels * patch * patch, dim)
            table_side = math.isqrt(config.num_patches)
        else:
            self.patch_embedding = nn.Conv2d(config.num_channels, dim, kernel_size=patch, stride=patch)
            table_side = config.image_size // patch
        self.table_side = table_side
        if config.preserve_original_pe:
            self.position_embedding = nn.Embedding(table_side * table_side, dim)

    def forward(self, pixel_values: torch.Tensor, grid_thws: list[tuple[int, int, int]]) -> torch.Tensor:
        weight = self.patch_embedding.weight
        c, p = self.config.num_channels * self.config.temporal_patch_size, self.config.patch_size
        if isinstance(self.patch_embedding, nn.Conv2d):
            embeds = self.patch_embedding(pixel_values.view(-1, c, p, p).to(weight.dtype)).flatten(1)
        else:
            embeds = self.patch_embedding(pixel_values.to(weight.dtype))
        if not self.config.preserve_original_pe:
            return embeds
        side, stride = self.table_side, self.config.hidden_stride
        table = self.position_embedding.weight.reshape(side, side, -1).permute(2, 0, 1)[None]
        per_image = []
        for t, h, w in grid_thws:
            pe = F.interpolate(table, size=(h, w), mode="bicubic", align_corners=False)
            pe = _block_order(pe[0].flatten(1).transpose(0, 1), h, w, stride)
            per_image.append(pe.repeat(t, 1))
        return embeds + torch.cat(per_image).to(embeds.dtype)


class VisionRotaryEmbedding(nn.Module):
    """2D rotary angles: half the rotary dims follow the patch row, half the patch column."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        dim = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def rebuilt(self) -> VisionRotaryEmbedding:
        return VisionRotaryEmbedding(self.head_dim, self.theta)

    def forward(
        self, grid_thws: list[tuple[int, int, int]], stride: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.inv_freq.device
        positions = []
        for t, h, w in grid_thws:
            rows = torch.arange(h, device=device)[:, None].expand(h, w).reshape(-1, 1)
            cols = torch.arange(w, device=device)[None, :].expand(h, w).reshape(-1, 1)
            rc = _block_order(torch.cat([rows, cols], dim=1), h, w, stride)
            positions.append(rc.repeat(t, 1))
        pos = torch.cat(positions).float()
        angles = (pos[:, :, None] * self.inv_freq[None, None, :]).flatten(1)  # [n, 2 * dim/2]
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos(), angles.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [n, heads, head_dim]; cos/sin: [n, head_dim]. Computed in float32 as upstream does."""
    xf = x.float()
    out = xf * cos[:, None, :] + _rotate_half(xf) * sin[:, None, :]
    return out.to(x.dtype)


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def packed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: list[int], use_flash: bool | None = None
) -> torch.Tensor:
    """Full attention within each image of a packed sequence. q, k, v: [n, heads, head_dim] -> [n, heads*hd].

    On CUDA with flash-attn installed this is one varlen kernel call. Otherwise images of equal length
    are stacked and go through one SDPA call per distinct length: no `[n, n]` mask is ever built, and a
    batch of same-sized photos costs a single call.
    """
    n, heads, head_dim = q.shape
    flash = _flash_attn_varlen() if (use_flash is not False and q.is_cuda) else None
    if flash is not None and q.dtype in (torch.float16, torch.bfloat16):
        cu = torch.tensor([0, *lengths], device=q.device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        out = flash(q, k, v, cu, cu, max(lengths), max(lengths))
        return out.reshape(n, heads * head_dim)
    out = torch.empty_like(q)
    starts = [0]
    for length in lengths:
        starts.append(starts[-1] + length)
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        by_length.setdefault(length, []).append(starts[i])
    for length, image_starts in by_length.items():
        index = torch.cat([torch.arange(s, s + length, device=q.device) for s in image_starts])

        def gather(x: torch.Tensor, index: torch.Tensor = index, length: int = length) -> torch.Tensor:
            return x[index].view(-1, length, heads, head_dim).transpose(1, 2)

        o = F.scaled_dot_product_attention(gather(q), gather(k), gather(v))
        out[index] = o.transpose(1, 2).reshape(-1, heads, head_dim)
    return out.reshape(n, heads * head_dim)


class Siglip2Attention(nn.Module):
    def __init__(self, config: Siglip2NavitConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = dim // self.num_heads
        self.use_rope = config.use_rope
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, hidden: torch.Tensor, lengths: list[int], rotary: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        n = hidden.shape[0]
        q = self.q_proj(hidden).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(n, self.num_heads, self.head_dim)
        v = self.v_proj(hidden).view(n, self.num_heads, self.head_dim)
        if self.use_rope:
            cos, sin = rotary
            q, k = _apply_rotary(q, cos, sin), _apply_rotary(k, cos, sin)
        return self.out_proj(packed_attention(q, k, v, lengths))


class Siglip2MLP(nn.Module):
    def __init__(self, config: Siglip2NavitConfig) -> None:
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class Siglip2EncoderLayer(nn.Module):
    def __init__(self, config: Siglip2NavitConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = Siglip2Attention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Siglip2MLP(config)

    def forward(
        self, hidden: torch.Tensor, lengths: list[int], rotary: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.layer_norm1(hidden), lengths, rotary)
        return hidden + self.mlp(self.layer_norm2(hidden))


class Siglip2Encoder(nn.Module):
    def __init__(self, config: Siglip2NavitConfig) -> None:
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList([Siglip2EncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.rotary_pos_emb = VisionRotaryEmbedding(config.hidden_size // config.num_attention_heads)
        self.gradient_checkpointing = False

    def forward(self, hidden: torch.Tensor, grid_thws: list[tuple[int, int, int]]) -> torch.Tensor:
        rotary = self.rotary_pos_emb(grid_thws, self.config.hidden_stride)
        lengths = [h * w for t, h, w in grid_thws for _ in range(t)]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden = torch.utils.checkpoint.checkpoint(
                    layer, hidden, lengths, rotary, use_reentrant=False
                )
            else:
                hidden = layer(hidden, lengths, rotary)
        return hidden


class Siglip2VisionTransformer(nn.Module):
    def __init__(self, config: Siglip2NavitConfig) -> None:
        super().__init__()
        self.embeddings = Siglip2VisionEmbeddings(config)
        self.encoder = Siglip2Encoder(config)
        # Present in the checkpoints but unused: the visual head reads the encoder output before it.
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, grid_thws: list[tuple[int, int, int]]) -> torch.Tensor:
        return self.encoder(self.embeddings(pixel_values, grid_thws), grid_thws)


class Siglip2NavitModel(nn.Module):
    def __init__(self, config: Siglip2NavitConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = Siglip2VisionTransformer(config)

    def forward(self, pixel_values: torch.Tensor, grid_thws: list[tuple[int, int, int]]) -> torch.Tensor:
        return self.vision_model(pixel_values, grid_thws)


class VisualTokenizer(nn.Module):
    """Vision tower -> 2x2 merge -> head (Linear, LayerNorm) -> softmax over the visual vocabulary."""

    def __init__(self, config: Siglip2NavitConfig, visual_vocab_size: int) -> None:
        super().__init__()
        self.vit = Siglip2NavitModel(config)
        merged = config.hidden_size * config.hidden_stride**2
        # The head LayerNorm keeps torch's default eps (1e-5), as upstream does: not the ViT's 1e-6.
        self.head = nn.Sequential(
            nn.Linear(merged, visual_vocab_size - len(INDICATOR_IDS), bias=False),
            nn.LayerNorm(visual_vocab_size - len(INDICATOR_IDS)),
        )

    def encode(self, pixel_values: torch.Tensor, grid_thws: list[tuple[int, int, int]]) -> torch.Tensor:
        """Encoder features with each 2x2 block concatenated: `[visual tokens, 4 * vit hidden]`."""
        features = self.vit(pixel_values, grid_thws)
        merge = self.vit.config.hidden_stride**2
        return features.reshape(features.shape[0] // merge, -1)

    def forward(self, pixel_values: torch.Tensor, grid_thws: list[tuple[int, int, int]]) -> torch.Tensor:
        """Probabilities over the visual vocabulary, with zero columns for the 4 indicator rows."""
        logits = self.head(self.encode(pixel_values, grid_thws))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(logits.dtype)
        return F.pad(probs, (0, len(INDICATOR_IDS)))


class Ovis2_5PreTrainedModel(PreTrainedModel):
    config_class = Ovis2_5Config
    base_model_prefix = "ovis2_5"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen3DecoderLayer", "Siglip2EncoderLayer"]
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module: nn.Module) -> None:
        # Checkpoints always carry every tensor; random init is the tiny factory's job (seeded, explicit).
        pass


class Ovis2_5ForConditionalGeneration(Ovis2_5PreTrainedModel):
    """Ovis2.5: Qwen3 language model fed with text embeddings and probabilistic visual embeddings."""

    def __init__(self, config: Ovis2_5Config) -> None:
        super().__init__(config)
        vit_config = config.vit_config
        if vit_config.fullatt_block_indexes:
            raise ValueError(
                f"vit_config.fullatt_block_indexes={vit_config.fullatt_block_indexes!r}: window attention in "
                "the vision tower is not implemented (every released Ovis2.5 checkpoint uses full attention)."
            )
        if config.hidden_size is not None and config.hidden_size != config.llm_config.hidden_size:
            raise ValueError(
                f"config.json: hidden_size {config.hidden_size} != llm_config.hidden_size "
                f"{config.llm_config.hidden_size}; the checkpoint's config is inconsistent."
            )
        self.llm = Qwen3ForCausalLM(config.llm_config)
        self.visual_tokenizer = VisualTokenizer(vit_config, config.visual_vocab_size)
        self.vte = nn.Embedding(config.visual_vocab_size, config.llm_config.hidden_size)
        self.post_init()

    # -------------------------------------------------------------------------------- transformers hooks

    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.llm.get_output_embeddings()

    # -------------------------------------------------------------------------------- multimodal pieces

    def visual_embeddings(
        self, pixel_values: torch.Tensor, grid_thws: list[tuple[int, int, int]]
    ) -> torch.Tensor:
        """VTE output for a pack of images: `[visual tokens, hidden]`, the probability-weighted table rows."""
        probs = self.visual_tokenizer(pixel_values, grid_thws)
        return probs.to(self.vte.weight.dtype) @ self.vte.weight

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        grid_thws: list[tuple[int, int, int]] | None = None,
        visual_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text embeddings with image positions overwritten: indicators by VTE rows, atoms by visual embeds.

        `input_ids` may hold the negative placeholder ids; atoms take the visual embeddings in packed order
        (row-major over the batch), so images must be packed in the order their placeholders appear.
        """
        embed = self.get_input_embeddings()
        embeds = embed(input_ids.clamp(min=0))
        atoms = input_ids == VISUAL_ATOM_ID
        n_atoms = int(atoms.sum())
        if visual_embeds is None and n_atoms:
            visual_embeds = self.visual_embeddings(pixel_values, grid_thws)
        if n_atoms != (0 if visual_embeds is None else visual_embeds.shape[0]):
            raise ValueError(
                f"prompt has {n_atoms} visual atom positions but the images give "
                f"{0 if visual_embeds is None else visual_embeds.shape[0]} visual embeddings"
            )
        indicator_rows = self.vte.weight[self.config.visual_vocab_size - len(INDICATOR_IDS) :]
        is_indicator = input_ids <= IMAGE_START_ID
        if bool(is_indicator.any()):
            which = (IMAGE_START_ID - input_ids).clamp(0, len(INDICATOR_IDS) - 1)
            embeds = torch.where(is_indicator[..., None], indicator_rows[which].to(embeds.dtype), embeds)
        if n_atoms:
            embeds = embeds.masked_scatter(atoms[..., None], visual_embeds.to(embeds.dtype))
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        grid_thws: torch.Tensor | list[tuple[int, int, int]] | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs,
    ):
        """Training / scoring forward: the LLM's causal-LM output on the spliced embeddings."""
        if isinstance(grid_thws, torch.Tensor):
            grid_thws = [tuple(int(v) for v in row) for row in grid_thws.tolist()]
        inputs_embeds = self.embed_inputs(input_ids, pixel_values, grid_thws)
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            labels=labels,
            **kwargs,
        )
