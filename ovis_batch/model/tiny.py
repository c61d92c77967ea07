"""A tiny random-weight Ovis2.5 checkpoint in the official layout, for tests and demos.

    ovis-batch make-tiny-model /tmp/tiny-ovis
    ovis-batch make-tiny-model /tmp/tiny-ovis-vllm --official-vocab --head-dim 32   # one vLLM runs, on CPU too

The folder holds what a released checkpoint holds (config.json with `llm_config` / `vit_config`, two
safetensors shards plus `model.safetensors.index.json`, a Qwen2 BPE tokenizer with the real Qwen3
special tokens, the chat template, preprocessor and generation configs) and loads through exactly the
same path as a real checkpoint. The tokenizer is trained with the `tokenizers` library on a few
sentences. THE WEIGHTS ARE RANDOM: every output is meaningless, and the folder's README and config say so.

Shapes follow the upstream parity fixture in tests/data (hidden 48, 3 LLM layers with head_dim 16 so
that attention width differs from the hidden size; a 3-layer 32-wide SigLIP2 NaViT with a 10x10
position table; tied word embeddings as in Ovis2.5-2B). A few embedding rows are rescaled so that
greedy decoding emits printable text and reaches `<|im_end|>` and `</think>` on random weights.
`--official-vocab` gives the tokenizer Qwen3's ids (vLLM hard-codes some), `--head-dim` another attention
head size (vLLM's CPU attention takes 32, 64, 80, ... only).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import torch

RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS (tiny test model): outputs are meaningless"

# The 26 Qwen3 added tokens in upstream id order, with upstream's `special` flags.
QWEN3_ADDED_TOKENS = [
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
]
# Qwen2/Qwen3 pre-tokenizer split pattern.
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
BASE_VOCAB = 600
LLM = {"hidden": 48, "layers": 3, "heads": 4, "kv_heads": 2, "head_dim": 16, "mlp": 96}
VIT = {"hidden": 32, "layers": 3, "heads": 2, "mlp": 64, "image_size": 160}
VISUAL_VOCAB = 132  # 128 from the head (32 * 2 * 2) + 4 indicator rows

# (substring of the parameter name, mean, std): first match wins. Residual outputs are drawn large so that
# the random residual stream is not dominated by the input embedding (greedy would echo the input).
INIT_RULES = [
    ("llm.model.embed_tokens.weight", 0.0, 1.0),
    ("post_layernorm.weight", 1.0, 0.5),
    ("post_layernorm.bias", 0.0, 0.5),
    ("llm.model.norm.weight", 1.0, 0.2),
    ("layernorm.weight", 1.0, 0.2),
    ("q_norm.weight", 1.0, 0.2),
    ("k_norm.weight", 1.0, 0.2),
    ("o_proj.weight", 0.0, 1.0),
    ("down_proj.weight", 0.0, 1.0),
    ("llm.model.layers", 0.0, 0.15),
    ("embeddings.patch_embedding.weight", 0.0, 0.05),
    ("embeddings.patch_embedding.bias", 0.0, 0.1),
    ("embeddings.position_embedding.weight", 0.0, 0.5),
    ("layer_norm1.weight", 1.0, 0.2),
    ("layer_norm2.weight", 1.0, 0.2),
    (".bias", 0.0, 0.1),
    ("visual_tokenizer.vit", 0.0, 0.12),
    ("visual_tokenizer.head.0.weight", 0.0, 0.06),
    ("visual_tokenizer.head.1.weight", 2.0, 0.5),
    ("vte.weight", 0.0, 1.0),
]


def _asset(name: str) -> str:
    return resources.files("ovis_batch.assets").joinpath(name).read_text(encoding="utf-8")


# Qwen3's vocabulary: byte-level BPE ids below 151643, then the added tokens from `<|endoftext|>` on.
OFFICIAL_BASE_VOCAB = 151643
OFFICIAL_VOCAB_SIZE = 151936


def _pad_base_vocab(tok, size: int):
    """The trained BPE with unreachable filler entries appended to its vocabulary up to `size`, so that
    the added tokens that follow take their official ids (engines such as vLLM hard-code some of them)."""
    from tokenizers import Tokenizer

    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), size):
        vocab[f"<|filler_{i}|>"] = i
    return Tokenizer.from_str(json.dumps(data))


def _write_tokenizer(folder: Path, template: str, *, official_vocab: bool = False) -> dict[str, int]:
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import Qwen2Tokenizer

    byte_level = {"add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(**byte_level),
        ]
    )
    tok.decoder = decoders.ByteLevel(**byte_level)
    trainer = trainers.BpeTrainer(
        vocab_size=BASE_VOCAB,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    tok.train_from_iterator([_asset("tiny_corpus.txt")] * 3, trainer)
    if official_vocab:
        tok = _pad_base_vocab(tok, OFFICIAL_BASE_VOCAB)
    for content, special in QWEN3_ADDED_TOKENS:
        added = AddedToken(
            content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special
        )
        (tok.add_special_tokens if special else tok.add_tokens)([added])
    fast = Qwen2Tokenizer(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=[c for c, special in QWEN3_ADDED_TOKENS[1:14] if special],
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    fast.chat_template = template
    fast.save_pretrained(str(folder))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}, indent=2))
    return {c: fast.convert_tokens_to_ids(c) for c, _ in QWEN3_ADDED_TOKENS} | {"__len__": len(fast)}


def _config(ids: dict[str, int], *, official_vocab: bool = False, head_dim: int = LLM["head_dim"]) -> dict:
    # Padded past the tokenizer, as Qwen's 151936 is.
    vocab = OFFICIAL_VOCAB_SIZE if official_vocab else (ids["__len__"] + 63) // 64 * 64
    llm_config = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": LLM["hidden"],
        "initializer_range": 0.02,
        "intermediate_size": LLM["mlp"],
        "max_position_embeddings": 40960,
        "max_window_layers": LLM["layers"],
        "num_attention_heads": LLM["heads"],
        "num_hidden_layers": LLM["layers"],
        "num_key_value_heads": LLM["kv_heads"],
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": vocab,
    }
    vit_config = {
        "model_type": "siglip2_navit",
        "attention_dropout": 0.0,
        "fullatt_block_indexes": None,
        "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": VIT["hidden"],
        "hidden_stride": 2,
        "image_size": VIT["image_size"],
        "intermediate_size": VIT["mlp"],
        "layer_norm_eps": 1e-06,
        "num_attention_heads": VIT["heads"],
        "num_channels": 3,
        "num_hidden_layers": VIT["layers"],
        "num_patches": -1,
        "patch_size": 16,
        "preserve_original_pe": True,
        "temporal_patch_size": 1,
        "torch_dtype": "float32",
        "use_rope": True,
        "window_size": 112,
    }
    return {
        "_comment": RANDOM_WEIGHTS_NOTE,
        "architectures": ["Ovis2_5"],
        "model_type": "ovis2_5",
        "conversation_formatter_class": "Qwen3ConversationFormatter",
        "hidden_size": LLM["hidden"],
        "vocab_size": vocab,
        "num_attention_heads": LLM["heads"],
        "max_position_embeddings": 40960,
        "llm_config": llm_config,
        "vit_config": vit_config,
        "torch_dtype": "float32",
        "use_cache": True,
        "visual_vocab_size": VISUAL_VOCAB,
        # As in the released config.json; without it transformers 5.19 takes any local folder for a
        # Mistral tokenizer and warns that its tokenisation is wrong.
        "transformers_version": "4.51.3",
    }


def _nonprintable_byte_ids(folder: Path) -> list[int]:
    """Ids of single-byte tokens whose byte is neither printable ASCII nor a newline."""
    # Byte-level BPE shows bytes as characters: printable Latin-1 bytes as themselves, the others as
    # chr(256 + k) in byte order.
    visible = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    hidden = [b for b in range(256) if b not in visible]
    char_to_byte = {chr(b): b for b in visible} | {chr(256 + k): b for k, b in enumerate(hidden)}
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(
        i
        for t, i in vocab.items()
        if len(t) == 1 and not (0x20 <= char_to_byte[t] <= 0x7E or char_to_byte[t] == 0x0A)
    )


def _filler_ids(folder: Path) -> list[int]:
    """Ids of the unreachable entries `_pad_base_vocab` added (none without the official vocabulary)."""
    vocab = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"]
    return sorted(i for t, i in vocab.items() if t.startswith("<|filler_"))


def _random_state(config_dict: dict, ids: dict[str, int], folder: Path, seed: int) -> dict[str, torch.Tensor]:
    from ovis_batch.model.ovis2_5 import Ovis2_5Config, Ovis2_5ForConditionalGeneration

    config = Ovis2_5Config(**{k: v for k, v in config_dict.items() if not k.startswith("_")})
    model = Ovis2_5ForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(seed)
    # Wider heads give o_proj a wider input: its draw shrinks so that attention adds to the residual stream
    # what it adds at the default head size (the scales above were tuned there).
    o_proj_scale = (LLM["head_dim"] / config.llm_config.head_dim) ** 0.5
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            mean, std = next((m, s) for key, m, s in INIT_RULES if key in name)
            if "llm." in name and "o_proj" in name:
                std *= o_proj_scale
            param.copy_(torch.randn(param.shape, generator=generator) * std + mean)
        emb = model.llm.model.embed_tokens.weight
        emb[ids["__len__"] :] = 0.0  # vocabulary padding rows are never produced
        emb[_filler_ids(folder)] = 0.0  # nor the official vocabulary's filler entries (tied: zero logits)
        shrink = [i for c, i in ids.items() if c not in ("<|im_end|>", "</think>", "__len__")]
        emb[shrink + _nonprintable_byte_ids(folder)] *= 0.05
        emb[ids["<|im_end|>"]] *= 2.2
        emb[ids["</think>"]] *= 2.0
    state = model.state_dict()
    state.pop("llm.lm_head.weight", None)  # tied to llm.model.embed_tokens.weight, as in the 2B release
    return {k: v.contiguous() for k, v in state.items()}


def write_sharded_safetensors(state: dict[str, torch.Tensor], folder: Path, shards: int = 2) -> None:
    """`model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`, as released checkpoints."""
    from safetensors.torch import save_file

    names = sorted(state)
    total = sum(t.numel() * t.element_size() for t in state.values())
    budget, groups, current, size = total / shards, [], [], 0
    for name in names:
        nbytes = state[name].numel() * state[name].element_size()
        if current and size + nbytes > budget and len(groups) < shards - 1:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    groups.append(current)
    weight_map = {}
    for k, group in enumerate(groups, start=1):
        filename = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: state[n] for n in group}, str(folder / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, filename))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@contextlib.contextmanager
def staged_checkpoint_folder(path: str | os.PathLike, *, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling folder to write a checkpoint into; renamed to `path` only when complete.

    An existing checkpoint at `path` is replaced only with `overwrite`; a non-empty folder that is not a
    checkpoint is never touched. On any error the staging folder is removed and `path` is unchanged.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        if (target / "config.json").is_file():
            raise FileExistsError(f"{target} already holds a checkpoint; pass overwrite=True to replace it")
        if any(target.iterdir()):
            raise FileExistsError(f"{target} exists and is not empty; choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def make_tiny_model(
    path: str | os.PathLike,
    *,
    seed: int = 0,
    overwrite: bool = False,
    official_vocab: bool = False,
    head_dim: int = LLM["head_dim"],
) -> Path:
    """Write the tiny checkpoint to `path` (atomically: a temporary sibling folder, then a rename).

    `official_vocab`: Qwen3's vocabulary size and special-token ids (151643 on), with filler entries
    the tokenizer never produces; vLLM's Ovis2.5 needs them (it hard-codes the image indicator ids).
    `head_dim`: the language model's attention head size (16 by default, as the parity fixture; vLLM's
    CPU attention takes 32, 64, 80, ... only).
    """
    with staged_checkpoint_folder(path, overwrite=overwrite) as staging:
        template = json.loads(_asset("ovis2_5_chat_template.json"))["chat_template"]
        ids = _write_tokenizer(staging, template, official_vocab=official_vocab)
        config = _config(ids, official_vocab=official_vocab, head_dim=head_dim)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        write_sharded_safetensors(_random_state(config, ids, staging, seed), staging)
        generation = {
            "bos_token_id": ids["<|endoftext|>"],
            "do_sample": True,
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
            "repetition_penalty": 1.05,
            "temperature": 0.6,
            "top_k": 20,
            "top_p": 0.95,
        }
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        preprocessor = {
            "image_processor_type": "SiglipImageProcessor",
            "processor_class": "SiglipProcessor",
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5],
            "resample": 2,
            "rescale_factor": 1 / 255,
            "size": {"height": 512, "width": 512},
        }
        (staging / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
        (staging / "README.md").write_text(
            f"# Tiny Ovis2.5 checkpoint: {RANDOM_WEIGHTS_NOTE}\n\n"
            f"Written by `ovis-batch make-tiny-model` (seed {seed}) in the official Ovis2.5 layout, for tests "
            "and demos. Nothing it generates means anything.\n"
        )
    return Path(path)
