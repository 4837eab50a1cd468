"""models/loss.py: the LM-head chunk's GEMM dtype (fp32 exact, bf16 GEMM with fp32 cross-entropy)."""

from __future__ import annotations

import torch

from tests.dist import run_distributed


def _chunk_ce_cases(rank, world):
    import torch.nn.functional as F

    from megatron_eagle.models import loss
    from megatron_eagle.runtime.distributed import init_model_parallel

    init_model_parallel()
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(64, 32, generator=g), torch.randn(100, 32, generator=g) * 0.3
    y = torch.randint(0, 100, (64,), generator=g)
    hb, wb = h.bfloat16(), w.bfloat16()
    return dict(ref=F.cross_entropy(h.double() @ w.double().t(), y, reduction="none"),
                fp32=loss._chunk_ce(h, w, y), bf16=loss._chunk_ce(hb, wb, y),
                bf16_ref=F.cross_entropy((hb @ wb.t()).float(), y, reduction="none"))


def test_chunk_ce_gemm_dtype():
    """fp32 weights: the exact fp32 GEMM; bf16 weights: bf16 GEMM, fp32 cross-entropy."""
    r = run_distributed(_chunk_ce_cases, 1, timeout=120)[0]
    assert r["fp32"].dtype == r["bf16"].dtype == torch.float32
    torch.testing.assert_close(r["fp32"].double(), r["ref"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r["bf16"], r["bf16_ref"])
    assert float((r["bf16"].double() - r["ref"]).abs().max()) < 0.1
