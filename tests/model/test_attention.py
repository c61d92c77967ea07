"""Packed vision attention: images kept apart by their lengths, never by a dense mask over the pack."""

from __future__ import annotations

import pytest
import torch

from ovis_batch.model.ovis2_5 import packed_attention


def dense_oracle(q, k, v, lengths):
    """Naive: one full attention per image, written out with softmax."""
    outs, start = [], 0
    for n in lengths:
        qi, ki, vi = (x[start : start + n].transpose(0, 1) for x in (q, k, v))  # [heads, n, d]
        weights = torch.softmax(qi @ ki.transpose(1, 2) / qi.shape[-1] ** 0.5, dim=-1)
        outs.append((weights @ vi).transpose(0, 1).reshape(n, -1))
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("lengths", [[16], [16, 16, 16], [4, 36, 16, 36, 4], [100, 1]])
def test_packed_attention_matches_per_image_attention(lengths):
    generator = torch.Generator().manual_seed(sum(lengths))
    n = sum(lengths)
    q, k, v = (torch.randn(n, 2, 8, generator=generator) for _ in range(3))
    torch.testing.assert_close(
        packed_attention(q, k, v, lengths), dense_oracle(q, k, v, lengths), atol=1e-5, rtol=1e-5
    )


def test_images_do_not_see_each_other():
    q, k, v = (torch.randn(20, 2, 8) for _ in range(3))
    base = packed_attention(q, k, v, [8, 12])
    v2 = v.clone()
    v2[8:] += 100.0  # change only the second image
    changed = packed_attention(q, k, v2, [8, 12])
    torch.testing.assert_close(changed[:8], base[:8])
    assert not torch.allclose(changed[8:], base[8:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flash_varlen_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn")
    lengths = [64, 256, 64, 1024]
    q, k, v = (torch.randn(sum(lengths), 16, 72, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    flash = packed_attention(q, k, v, lengths, use_flash=True)
    sdpa = packed_attention(q, k, v, lengths, use_flash=False)
    torch.testing.assert_close(flash.float(), sdpa.float(), atol=2e-2, rtol=2e-2)
    reference = dense_oracle(q.float(), k.float(), v.float(), lengths)
    torch.testing.assert_close(flash.float(), reference, atol=3e-2, rtol=3e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bfloat16_generation_close_to_cpu(upstream_dir):
    import ovis_batch

    cpu = ovis_batch.load_model(upstream_dir / "checkpoint", device="cpu")
    gpu = ovis_batch.load_model(upstream_dir / "checkpoint", device="cuda", dtype=torch.float32)
    from PIL import Image

    image = Image.open(upstream_dir / "img0_shapes_96x96.png")
    a = cpu.next_token_logits([image], "Describe.")
    b = gpu.next_token_logits([image], "Describe.")
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    import numpy as np

    np.testing.assert_allclose(cpu.embed_images([image]), gpu.embed_images([image]), atol=1e-4)
