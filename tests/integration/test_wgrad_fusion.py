"""patches/wgrad_fusion.py: weight gradients accumulated by the GEMM equal DDP's accumulation."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed


def _wgrad_fusion_case(rank, world, tp):
    from megatron.core.distributed import finalize_model_grads  # noqa: F401  (megatron import order)

    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.models.eagle import EagleModel
    from megatron_eagle.runtime.distributed import init_model_parallel
    from megatron_eagle.training.optimizer import OptimConfig, enable_wgrad_fusion, wrap_ddp
    from tests.model_fixtures import mixed_pack, tiny_model_config

    init_model_parallel(tp=tp)
    cfg = tiny_model_config()
    batch = mixed_pack(cfg, pad_to_multiple=tp)
    out = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = EagleModel(cfg, ParallelConfig(tp=tp, sp=tp > 1))
        ddp = wrap_ddp(model, OptimConfig(), bf16=False)
        n = enable_wgrad_fusion(model, fused)
        ddp.zero_grad_buffer()
        for _ in range(2):  # two micro-batches: the buffer accumulates
            loss = ddp(batch)
            (loss.sum() if loss.dim() else loss).backward()
        out[fused] = (n, {name: p.main_grad.clone() for name, p in model.named_parameters() if p.requires_grad})
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_wgrad_fusion_accumulates_like_ddp_hooks(tp):
    """Weight gradients written by the GEMM into main_grad (gradient_accumulation_fusion with the
    torch-native stand-in for apex) equal DDP's separate accumulation, over two micro-batches,
    with TP and sequence parallelism."""
    out = run_distributed(_wgrad_fusion_case, tp, tp, timeout=240)
    for r in out:
        (n0, g0), (n1, g1) = r[False], r[True]
        assert n1 == n0 > 0
        assert g0.keys() == g1.keys()
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)
        assert any(float(g.abs().sum()) > 0 for k, g in g1.items() if "linear_fc1.weight" in k)
