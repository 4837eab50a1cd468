"""The copy-free qkv split and the strided-attention gradient layout it relies on (CPU parts)."""

import megatron.core.transformer.attention as megatron_attention
import pytest
import torch

from megatron_eagle.kernels import cudnn_strided
from megatron_eagle.kernels.cudnn_graphs import CudnnGraphs, CudnnUnsupported
from megatron_eagle.kernels.dispatch import AttentionKernels
from megatron_eagle.models.qkv_split import shared_buffer, split_along_dim
from megatron_eagle.patches import split_along_dim as split_patch

S, B, H, D = 5, 3, 4, 8  # ViT-like: one q head per group, per head [q | k | v]


def _mixed():
    g = torch.Generator().manual_seed(0)
    return torch.randn(S, B, H, 3 * D, generator=g, dtype=torch.float64, requires_grad=True)


def test_forward_equals_torch_split_and_separate_grads_concatenate():
    mixed = _mixed()
    ours = split_along_dim(mixed, 3, [D, D, D])
    ref = torch.split(mixed, [D, D, D], dim=3)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref))
    w = [torch.randn_like(t) for t in ours]
    g_ours = torch.autograd.grad(sum((t * wi).sum() for t, wi in zip(ours, w)), mixed)[0]
    g_ref = torch.autograd.grad(sum((t * wi).sum() for t, wi in zip(ref, w)), mixed)[0]
    assert torch.equal(g_ours, g_ref)


def test_unused_output_gets_zero_gradient():
    mixed = _mixed()
    q, k, v = split_along_dim(mixed, -1, [D, D, D])
    (g,) = torch.autograd.grad((q * 2).sum() + v.sum(), mixed)
    assert torch.equal(g[..., :D], torch.full_like(g[..., :D], 2.0))
    assert torch.equal(g[..., D:2 * D], torch.zeros_like(g[..., :D]))
    assert torch.equal(g[..., 2 * D:], torch.ones_like(g[..., :D]))


class _SharedGrads(torch.autograd.Function):
    """Identity on q/k/v whose backward returns the gradients as slices of one buffer (like cuDNN's)."""

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.q, ctx.k, ctx.v = q.detach(), k.detach(), v.detach()
        return q.clone(), k.clone(), v.clone()

    @staticmethod
    def backward(ctx, gq, gk, gv):
        dq, dk, dv = cudnn_strided.grad_buffers(
            ctx.q, ctx.k, ctx.v, cudnn_strided.packed_qkv_base(ctx.q, ctx.k, ctx.v))
        for dst, src in zip((dq, dk, dv), (gq, gk, gv)):
            dst.copy_(src)
        _SharedGrads.seen = dq
        return dq, dk, dv


def test_gradients_in_one_buffer_come_back_without_a_copy():
    mixed = _mixed()
    q, k, v = split_along_dim(mixed, 3, [D, D, D])
    assert cudnn_strided.packed_qkv_base(q, k, v)
    assert cudnn_strided.grad_layouts(q, k, v, True) == tuple((tuple(x.shape), x.stride()) for x in (q, k, v))
    outs = _SharedGrads.apply(q, k, v)
    w = [torch.randn_like(t) for t in outs]
    captured = {}
    mixed.register_hook(lambda g: captured.setdefault("g", g))
    (g,) = torch.autograd.grad(sum((t * wi).sum() for t, wi in zip(outs, w)), mixed)
    assert torch.equal(g, torch.cat(w, dim=3))
    # the split handed on the attention's buffer itself
    assert captured["g"].data_ptr() == _SharedGrads.seen.data_ptr()


def test_shared_buffer_rejects_misplaced_slices():
    buf = torch.randn(S, B, H, 3 * D)
    q, k, v = torch.split(buf, [D, D, D], dim=3)
    assert shared_buffer([q, k, v], buf.shape, 3, [D, D, D]).data_ptr() == buf.data_ptr()
    assert shared_buffer([q, v, k], buf.shape, 3, [D, D, D]) is None  # order swapped
    assert shared_buffer([q, k, None], buf.shape, 3, [D, D, D]) is None
    assert shared_buffer([q, k, v.clone()], buf.shape, 3, [D, D, D]) is None  # other storage
    wide = torch.randn(S, B, H, 4 * D)  # slices of a bigger row: strides differ from a [.., 3D] buffer
    assert shared_buffer(list(torch.split(wide, [D, D, D, D], dim=3))[:3], buf.shape, 3, [D, D, D]) is None


def test_packed_base_needs_disjoint_equal_strided_slices():
    buf = torch.randn(S, B, H, 3 * D)
    q, k, v = torch.split(buf, [D, D, D], dim=3)
    assert cudnn_strided.packed_qkv_base(q, k, v)
    assert not cudnn_strided.packed_qkv_base(q, q, v)  # overlapping
    assert not cudnn_strided.packed_qkv_base(q, k.contiguous(), v)
    gqa = torch.randn(S, B, 2, 3 * D)
    assert not cudnn_strided.packed_qkv_base(q, *torch.split(gqa, [D, D, D], dim=3)[1:])
    # separate tensors: contiguous gradient buffers
    sep = [torch.randn(S, B, H, D) for _ in range(3)]
    assert not cudnn_strided.packed_qkv_base(*sep)
    assert all(x.is_contiguous() for x in cudnn_strided.grad_buffers(*sep, False))


def test_megatron_uses_the_copy_free_split_and_cpu_attention_takes_sdpa(recwarn, monkeypatch):
    monkeypatch.setattr(megatron_attention, "SplitAlongDim", None)  # as without transformer-engine
    split_patch.install()
    assert megatron_attention.SplitAlongDim is split_along_dim
    q, k, v = (torch.randn(S, B, H, D) for _ in range(3))
    strided = cudnn_strided.CudnnStrided(CudnnGraphs())
    assert "CUDA" in strided.unusable_reason(q, k, v)
    with pytest.raises(CudnnUnsupported):
        strided(q, k, v, False, 0.5)
    out = AttentionKernels("cudnn").strided(q, k, v, False, 0.5)  # SDPA on CPU tensors
    ref = torch.nn.functional.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), scale=0.5)
    torch.testing.assert_close(out, ref.permute(2, 0, 1, 3))
    assert "empty" in strided.unusable_reason(*(torch.randn(S, 0, H, D) for _ in range(3)))
    assert not [w for w in recwarn if "cuDNN [s, b, h, d]" in str(w.message)]  # no warning on CPU
