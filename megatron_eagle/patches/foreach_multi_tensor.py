"""megatron-core's local multi-tensor fallbacks -> torch foreach kernels (grad norm and clipping).

Without apex/transformer-engine megatron computes the grad norm and scales gradients with per-tensor
Python loops (``megatron.core.utils.local_multi_tensor_*``); its l2 norm turns every per-tensor norm
into a Python float (one host sync each). These drop-ins take the same arguments and run one foreach
kernel, without host syncs. Only the local fallbacks are replaced, never apex's or TE's kernels.
"""

from __future__ import annotations

import torch
from megatron.core import utils
from megatron.core.optimizer import clip_grads
from megatron.core.optimizer import optimizer as megatron_optimizer

from megatron_eagle.patches.targets import require

TARGETS = ("megatron.core.utils:local_multi_tensor_l2_norm", "megatron.core.utils:local_multi_tensor_scale",
           "megatron.core.optimizer.clip_grads:l2_norm_impl",
           "megatron.core.optimizer.clip_grads:multi_tensor_scale_impl",
           "megatron.core.optimizer.optimizer:multi_tensor_scale_impl")


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Drop-in for amp_C.multi_tensor_l2norm: one foreach norm, no host syncs."""
    tensors = [t for tl in tensor_lists for t in tl]
    if not tensors:
        return torch.zeros(1, dtype=torch.float32, device=noop_flag.device), None
    norms = torch._foreach_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Drop-in for amp_C.multi_tensor_scale (dst = src * scale) with foreach kernels."""
    src, dst = tensor_lists[0], tensor_lists[1]
    if not src:
        return
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def check() -> None:
    require(*TARGETS)


def install() -> None:
    for module, name, local, mine in (
            (clip_grads, "l2_norm_impl", utils.local_multi_tensor_l2_norm, foreach_l2_norm),
            (clip_grads, "multi_tensor_scale_impl", utils.local_multi_tensor_scale, foreach_scale),
            (megatron_optimizer, "multi_tensor_scale_impl", utils.local_multi_tensor_scale, foreach_scale)):
        if getattr(module, name) is local:
            setattr(module, name, mine)
