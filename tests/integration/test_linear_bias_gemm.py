"""models/linear.py: the qkv projections' bias added inside the GEMM equals megatron's
matmul-then-add, in the whole model (ViT and LLM qkv biases), forward and every gradient, with
TP=1 and with TP=2 + sequence parallelism on real gloo processes."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed


def _case(rank, world, tp):
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.models import connector, specs
    from megatron_eagle.models.eagle import EagleModel
    from megatron_eagle.models.linear import BiasInGemmColumnParallelLinear
    from megatron_eagle.runtime.distributed import init_model_parallel
    from tests.model_fixtures import mixed_pack, tiny_model_config

    init_model_parallel(tp=tp)
    cfg = tiny_model_config()
    cfg.llm.qkv_bias = True
    batch = mixed_pack(cfg, pad_to_multiple=tp)
    out = {}
    for fused in (False, True):
        for mod in (specs, connector):  # the layers' qkv and the connector's fc1
            mod.BiasInGemmColumnParallelLinear = BiasInGemmColumnParallelLinear if fused else ColumnParallelLinear
        try:
            torch.manual_seed(0)
            model = EagleModel(cfg, ParallelConfig(tp=tp, sp=tp > 1))
        finally:
            for mod in (specs, connector):
                mod.BiasInGemmColumnParallelLinear = BiasInGemmColumnParallelLinear
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # megatron zero-initialises biases: make them matter
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        n_fused = sum(isinstance(m, BiasInGemmColumnParallelLinear) and m.bias is not None for m in model.modules())
        loss = model(batch)
        loss = loss.sum() if loss.dim() else loss
        loss.backward()
        out[fused] = (n_fused, float(loss), {k: p.grad.clone() for k, p in model.named_parameters()
                                              if p.grad is not None})
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_bias_in_gemm_equals_megatron_linear(tp):
    for r in run_distributed(_case, tp, tp, timeout=240):
        (n0, l0, g0), (n1, l1, g1) = r[False], r[True]
        assert n0 == 0 and n1 > 0  # the fused class is in use, on linears that have a bias
        assert abs(l1 - l0) <= 1e-5 * abs(l0), (l0, l1)
        assert g0.keys() == g1.keys() and any("linear_qkv.bias" in k for k in g1)
        assert any("connector.fc1.bias" in k for k in g1)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)
