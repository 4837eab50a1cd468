"""Explicit patches of megatron-core and torch, installed once at runtime start.

Importing the library patches nothing. :func:`install_all` (called by
:func:`megatron_eagle.runtime.distributed.init_distributed`, which every entry point that builds a
model runs first) checks the megatron-core version, then installs each patch. Every patch module
has ``TARGETS`` (the attributes it replaces), ``check()`` (raises
:class:`~.targets.PatchTargetMissing` when a target is gone) and an idempotent ``install()``.

| module                   | replaces                                              | why                              |
|--------------------------|-------------------------------------------------------|----------------------------------|
| ``cpu_bridge``           | torch.cuda calls, megatron's CUDA RNG state (no CUDA) | megatron-core on CPU with gloo   |
| ``rope_thd``             | ``rope_utils._apply_rotary_pos_emb_thd``              | packed RoPE without host syncs   |
| ``split_along_dim``      | ``attention.SplitAlongDim`` (when TE is absent)       | qkv split without a concat       |
| ``distrib_optimizer``    | two ``DistributedOptimizer`` methods                  | torch AdamW checkpoint load      |
| ``foreach_multi_tensor`` | megatron's local multi-tensor l2 norm / scale         | grad norm and clip without syncs |
| ``wgrad_fusion``         | apex's ``fused_weight_gradient_mlp_cuda`` (if absent) | weight grads into ``main_grad``  |
"""

from __future__ import annotations

from typing import Optional

from megatron_eagle.patches import (
    cpu_bridge,
    distrib_optimizer,
    foreach_multi_tensor,
    rope_thd,
    split_along_dim,
    wgrad_fusion,
)
from megatron_eagle.patches.targets import PatchTargetMissing

SUPPORTED_MEGATRON = ("0.16", "0.17")  # [lowest, first unsupported), setup.py's megatron-core>=0.16,<0.17
PATCHES = (cpu_bridge, rope_thd, split_along_dim, distrib_optimizer, foreach_multi_tensor, wgrad_fusion)

__all__ = ["PATCHES", "PatchTargetMissing", "SUPPORTED_MEGATRON", "UnsupportedMegatron", "check_all",
           "check_megatron_version", "install_all"]


class UnsupportedMegatron(RuntimeError):
    """The installed megatron-core is outside the range these patches were written for."""


def megatron_version() -> str:
    from megatron.core import package_info

    return package_info.__version__


def check_megatron_version(version: Optional[str] = None) -> None:
    """Raise :class:`UnsupportedMegatron` naming ``version`` (default: the installed one) and the range."""
    from packaging.version import Version

    version = version or megatron_version()
    low, high = SUPPORTED_MEGATRON
    if not Version(low) <= Version(Version(version).base_version) < Version(high):  # 0.17.0rc1 counts as 0.17
        raise UnsupportedMegatron(f"megatron-core {version} is installed; megatron_eagle supports "
                                  f">={low},<{high} (its patches of megatron-core are written for that range)")


def check_all() -> None:
    """Every patch's targets exist (raises :class:`PatchTargetMissing` naming the first missing one)."""
    for patch in PATCHES:
        patch.check()


def install_all() -> None:
    """Check the megatron-core version and every target, then install every patch (idempotent)."""
    check_megatron_version()
    check_all()
    for patch in PATCHES:
        patch.install()
