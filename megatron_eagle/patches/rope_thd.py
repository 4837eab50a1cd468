"""megatron-core's unfused THD RoPE -> :class:`~megatron_eagle.models.rope.PackedRope` (no host syncs at CP = 1).

megatron's ``apply_rotary_pos_emb`` looks ``_apply_rotary_pos_emb_thd`` up in its module at call
time, so replacing the module attribute reroutes every packed-sequence RoPE call.
"""

from __future__ import annotations

import inspect

from megatron.core.models.common.embeddings import rope_utils

from megatron_eagle.models.rope import PackedRope
from megatron_eagle.patches.targets import PatchTargetMissing, require

TARGETS = ("megatron.core.models.common.embeddings.rope_utils:_apply_rotary_pos_emb_thd",
           "megatron.core.models.common.embeddings.rope_utils:_apply_rotary_pos_emb_bshd")
_PARAMETERS = ["t", "cu_seqlens", "freqs", "rotary_interleaved", "multi_latent_attention", "mscale", "cp_group"]


def check() -> None:
    require(*TARGETS)
    fn = rope_utils._apply_rotary_pos_emb_thd
    params = list(inspect.signature(fn.original if isinstance(fn, PackedRope) else fn).parameters)
    if params != _PARAMETERS:
        raise PatchTargetMissing(f"rope_utils._apply_rotary_pos_emb_thd takes {params}, the patch expects "
                                 f"{_PARAMETERS}")


def install() -> None:
    if not isinstance(rope_utils._apply_rotary_pos_emb_thd, PackedRope):
        rope_utils._apply_rotary_pos_emb_thd = PackedRope(rope_utils._apply_rotary_pos_emb_thd)
