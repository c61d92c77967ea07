"""Loading checkpoints in the official layout, the tiny factory, and every bad checkpoint the issue names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import ovis_batch
from ovis_batch.cli import main as cli
from ovis_batch.model.checkpoint import CheckpointError, resolve_source


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def test_tiny_factory_writes_the_official_layout(tiny_checkpoint):
    files = {p.name for p in tiny_checkpoint.iterdir()}
    assert {
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.json",
        "preprocessor_config.json",
        "generation_config.json",
        "README.md",
    } <= files
    assert not any(name.endswith(".py") for name in files)
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config["model_type"] == "ovis2_5" and "RANDOM" in config["_comment"]
    assert {"llm_config", "vit_config", "visual_vocab_size"} <= set(config)
    assert "RANDOM WEIGHTS" in (tiny_checkpoint / "README.md").read_text()
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index.values()) == {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert "llm.lm_head.weight" not in index  # tied, as in the 2B release
    assert {"vte.weight", "visual_tokenizer.head.0.weight", "llm.model.embed_tokens.weight"} <= set(index)
    assert any(k.startswith("visual_tokenizer.vit.vision_model.encoder.layers.2.") for k in index)


def test_tiny_factory_is_deterministic_and_refuses_to_overwrite(tiny_checkpoint, tmp_path):
    again = ovis_batch.make_tiny_model(tmp_path / "again", seed=0)
    other = ovis_batch.make_tiny_model(tmp_path / "other", seed=1)
    name = "model-00001-of-00002.safetensors"
    with (
        safe_open(tiny_checkpoint / name, "pt") as a,
        safe_open(again / name, "pt") as b,
        safe_open(other / name, "pt") as c,
    ):
        key = next(iter(a.keys()))
        assert torch.equal(a.get_tensor(key), b.get_tensor(key))
        assert not torch.equal(a.get_tensor(key), c.get_tensor(key))
    with pytest.raises(FileExistsError, match="already holds a checkpoint"):
        ovis_batch.make_tiny_model(again)
    assert ovis_batch.make_tiny_model(again, overwrite=True) == again


def test_make_tiny_model_command(tmp_path, capsys):
    assert cli(["make-tiny-model", str(tmp_path / "m")]) == 0
    assert "RANDOM-WEIGHT" in capsys.readouterr().out
    model = ovis_batch.load_model(tmp_path / "m")
    assert model.module.llm.config.num_hidden_layers == 3


def test_make_tiny_model_for_vllm_head_size_and_official_vocabulary(tmp_path, tiny_model):
    """`--official-vocab --head-dim 32`: Qwen3's ids, a head size vLLM's CPU attention takes, filler
    entries that greedy decoding never picks, and attention adding what it adds at the default size."""
    assert cli(["make-tiny-model", str(tmp_path / "v"), "--official-vocab", "--head-dim", "32"]) == 0
    model = ovis_batch.load_model(tmp_path / "v")
    llm = model.module.llm
    assert (llm.config.head_dim, llm.config.vocab_size) == (32, 151936)
    assert model.tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645
    fillers = [i for t, i in model.tokenizer.get_vocab().items() if t.startswith("<|filler_")]
    assert len(fillers) > 150_000 and not llm.model.embed_tokens.weight[fillers].any()
    default = tiny_model.module.llm.model.layers[0].self_attn.o_proj.weight
    wider = llm.model.layers[0].self_attn.o_proj.weight
    assert wider.shape[1] == 2 * default.shape[1]
    # Twice the inputs at 1/sqrt(2) the spread: the same output scale (within sampling error).
    assert wider.std().item() * 2**0.5 == pytest.approx(default.std().item(), rel=0.05)


def test_loaded_weights_equal_the_files(tiny_model, tiny_checkpoint):
    state = tiny_model.module.state_dict()
    for shard in sorted(tiny_checkpoint.glob("*.safetensors")):
        with safe_open(shard, "pt") as fh:
            for key in fh.keys():  # noqa: SIM118
                assert torch.equal(state[key], fh.get_tensor(key)), key


def test_bfloat16_load(tiny_checkpoint):
    model = ovis_batch.load_model(tiny_checkpoint, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert model.module.visual_tokenizer.head[0].weight.dtype == torch.bfloat16
    # rotary frequencies stay float32 whatever the weights' dtype
    assert (
        model.module.visual_tokenizer.vit.vision_model.encoder.rotary_pos_emb.inv_freq.dtype == torch.float32
    )


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        ovis_batch.load_model(ckpt)


def test_missing_shard_is_named(ckpt):
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors"):
        ovis_batch.load_model(ckpt)


def test_truncated_shard(ckpt):
    shard = ckpt / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model-00001-of-00002\.safetensors is truncated"):
        ovis_batch.load_model(ckpt)


def test_corrupt_shard(ckpt):
    shard = ckpt / "model-00002-of-00002.safetensors"
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        ovis_batch.load_model(ckpt)


def test_unknown_model_type(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["model_type"] = "llava"
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'llava' is not supported"):
        ovis_batch.load_model(ckpt)


def test_tokenizer_without_chat_template(ckpt):
    for name in ("chat_template.json", "chat_template.jinja"):
        (ckpt / name).unlink(missing_ok=True)
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="no chat template"):
        ovis_batch.load_model(ckpt)


def test_missing_tokenizer(ckpt):
    (ckpt / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        ovis_batch.load_model(ckpt)


def test_weights_that_do_not_match_the_config(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["vit_config"]["num_hidden_layers"] = 4
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"do not match its config\.json: 16 missing"):
        ovis_batch.load_model(ckpt)


def test_source_that_is_neither_folder_nor_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing folder nor a hub id"):
        ovis_batch.load_model(tmp_path / "no" / "such" / "dir")


def test_hub_ids_fetch_data_files_only(monkeypatch, tmp_path):
    """The ordinary hub path, checked without a network: no code files are ever requested."""
    import huggingface_hub

    seen = {}

    def fake_snapshot_download(repo_id, allow_patterns):
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_source("AIDC-AI/Ovis2.5-2B") == tmp_path
    assert seen["repo_id"] == "AIDC-AI/Ovis2.5-2B"
    assert "*.safetensors" in seen["allow_patterns"] and not any(".py" in p for p in seen["allow_patterns"])
