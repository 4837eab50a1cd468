"""Split of the fused qkv projection whose backward skips the concatenation when it can.

megatron-core splits ``mixed_qkv`` [s, b, groups, (q + k + v) * d] into query, key and value views
with ``torch.split`` (or transformer-engine's ``SplitAlongDim`` when TE is installed). Autograd's
backward of ``torch.split`` concatenates dq, dk and dv into a new tensor: for the ViT that is a
[25K, 3456] copy per layer (6.7 ms of an H100 step at 8K).

:func:`split_along_dim` is the same split. Its backward returns the buffer the three gradients
already live in, without copying, when they are the matching slices of one contiguous buffer shaped
like ``mixed_qkv`` (what :mod:`megatron_eagle.kernels.cudnn_strided` writes). Otherwise it
concatenates, exactly like ``torch.split``. Like TE's ``SplitAlongDim``, which megatron uses when TE
is importable; this one takes its place when TE is not.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def _contiguous_strides(shape: Sequence[int]) -> tuple:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def shared_buffer(grads: Sequence[Optional[torch.Tensor]], shape: torch.Size, dim: int,
                  sizes: Sequence[int]) -> Optional[torch.Tensor]:
    """The contiguous tensor of ``shape`` whose slices along ``dim`` (of ``sizes``) are exactly
    ``grads``, as a view of their common storage; None if they are not laid out that way."""
    if any(g is None for g in grads) or len({g.dtype for g in grads}) != 1:
        return None
    first = grads[0]
    strides = _contiguous_strides(shape)
    storage = first.untyped_storage()
    base = first.storage_offset()
    offset = 0
    for g, size in zip(grads, sizes):
        expect_shape = list(shape)
        expect_shape[dim] = size
        if (list(g.shape) != expect_shape or g.stride() != strides or g.device != first.device
                or g.untyped_storage().data_ptr() != storage.data_ptr()
                or g.storage_offset() != base + offset * strides[dim]):
            return None
        offset += size
    numel = 1
    for n in shape:
        numel *= n
    if base + numel > storage.nbytes() // first.element_size():
        return None
    return first.as_strided(shape, strides, base)


class _SplitAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mixed: torch.Tensor, dim: int, sizes: tuple):
        ctx.dim, ctx.sizes, ctx.shape = dim, sizes, mixed.shape
        return tuple(torch.split(mixed, list(sizes), dim=dim))

    @staticmethod
    def backward(ctx, *grads):
        buf = shared_buffer(grads, ctx.shape, ctx.dim, ctx.sizes)
        if buf is None:
            ref = next(g for g in grads if g is not None)
            parts = []
            for g, size in zip(grads, ctx.sizes):
                if g is None:
                    shape = list(ctx.shape)
                    shape[ctx.dim] = size
                    g = ref.new_zeros(shape)
                parts.append(g)
            buf = torch.cat(parts, dim=ctx.dim)
        return buf, None, None


def split_along_dim(mixed: torch.Tensor, dim: int, sizes: Sequence[int]) -> tuple:
    """``torch.split(mixed, sizes, dim)`` whose backward reuses the gradients' shared buffer."""
    if dim < 0:
        dim += mixed.dim()
    return _SplitAlongDim.apply(mixed, dim, tuple(int(s) for s in sizes))
