"""models/rope.py: the fused rotation expression and the cos/sin cache."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rope_expression_equals_megatron(dtype):
    """``rope.rotate_cos_sin`` (what is torch.compile'd on GPUs) is megatron's bshd rotation op for
    op: same outputs and input gradients, with partial rotary dims and mscale."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_eagle.models import rope

    g = torch.Generator().manual_seed(0)
    for d, rot, mscale in ((16, 16, 1.0), (16, 8, 0.7)):
        t = torch.randn(11, 1, 3, d, generator=g).to(dtype).requires_grad_()
        freqs = torch.randn(11, 1, 1, rot, generator=g)
        w = torch.randn(11, 1, 3, d, generator=g).to(dtype)
        cos, sin = ((f(freqs) * mscale).to(dtype) for f in (torch.cos, torch.sin))
        out = rope.rotate_cos_sin(t, cos, sin)
        ref = rope_utils._apply_rotary_pos_emb_bshd(t, freqs, mscale=mscale)
        assert torch.equal(out, ref)
        (ga,), (gb,) = (torch.autograd.grad((o.float() * w.float()).sum(), t) for o in (out, ref))
        assert torch.equal(ga, gb)


def test_packed_cos_sin_cache_hits_and_misses():
    """cos/sin are computed once per (freqs, cu_seqlens) pair; another pack, an in-place change or
    another dtype recomputes them."""
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_eagle.models import rope

    packed = rope.PackedRope(rope_utils._apply_rotary_pos_emb_thd)
    freqs = torch.randn(16, 1, 1, 8)
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    a = packed.cos_sin(freqs, cu, 12, torch.float32, 1.0)
    assert packed.cos_sin(freqs, cu, 12, torch.float32, 1.0)[0] is a[0]
    pos = rope.packed_positions(cu, 12)
    torch.testing.assert_close(a[0], torch.cos(freqs[pos]).reshape(12, 1, 8), rtol=0, atol=0)
    cu2 = torch.tensor([0, 5, 12], dtype=torch.int32)  # equal values, another pack
    assert packed.cos_sin(freqs, cu2, 12, torch.float32, 1.0)[0] is not a[0]
    b = packed.cos_sin(freqs, cu2, 12, torch.bfloat16, 1.0)
    assert b[0].dtype == torch.bfloat16
    freqs.mul_(2)  # in place: the version moves
    c = packed.cos_sin(freqs, cu2, 12, torch.bfloat16, 1.0)
    assert c[0] is not b[0] and not torch.equal(c[0], b[0])
