"""models/rope.py: the sync-free packed RoPE against megatron's (on an initialised process group)."""

from __future__ import annotations

import torch

from tests.dist import run_distributed


def _packed_rope_cases(rank, world):
    from megatron_eagle.runtime.distributed import init_model_parallel

    init_model_parallel()
    return _rope_cases()


def _rope_cases():
    """Sync-free packed RoPE against megatron's per-segment loop (needs a CP group of size 1): the
    cos/sin-once path (twice: the second call reads the cache) and, not fused, megatron's ops."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_eagle.models import rope

    installed = rope_utils._apply_rotary_pos_emb_thd  # the runtime start installed the patch
    assert isinstance(installed, rope.PackedRope)
    original = installed.original
    fused, eager = rope.PackedRope(original), rope.PackedRope(original, fused=False)
    g = torch.Generator().manual_seed(1)
    cp = ps.get_context_parallel_group()
    cases = []
    for rot_pct in (1.0, 0.5):
        emb = RotaryEmbedding(kv_channels=16, rotary_percent=rot_pct, rotary_base=10000)
        for lens in ([5, 1, 17, 9], [32], [1, 1, 1], [7, 25]):
            cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
            for dtype in (torch.float32, torch.bfloat16):
                t = torch.randn(sum(lens), 3, 16, generator=g).to(dtype)
                for max_len in (max(lens), sum(lens)):  # megatron's "exact" case when freqs cover every position
                    freqs = emb(max_len, packed_seq=True)
                    want = original(t, cu, freqs, cp_group=cp)
                    for _ in range(2):
                        cases.append((fused(t, cu, freqs, cp_group=cp), want))
                    cases.append((eager(t, cu, freqs, cp_group=cp), want))
    pos = rope.packed_positions(torch.tensor([0, 3, 4, 9], dtype=torch.int32), 9)
    return cases, pos.tolist()


def test_packed_rope_equals_megatron():
    cases, pos = run_distributed(_packed_rope_cases, 1, timeout=120)[0]
    assert pos == [0, 1, 2, 0, 0, 1, 2, 3, 4]
    for got, want in cases:
        torch.testing.assert_close(got, want, rtol=0, atol=0)
