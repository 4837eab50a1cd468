"""models/transformer_configs.py: the fused elementwise path (a GPU's default) equals the unfused one."""

from __future__ import annotations

import torch

from tests.dist import run_distributed


def _fused_vs_unfused(rank, world):
    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.models import transformer_configs
    from megatron_eagle.models.eagle import EagleModel
    from megatron_eagle.runtime.distributed import init_model_parallel
    from tests.model_fixtures import mixed_pack, tiny_model_config

    init_model_parallel()
    cfg = tiny_model_config()
    batch = mixed_pack(cfg)
    out = {}
    for fuse in (False, True):
        transformer_configs._fuse_elementwise = lambda fuse=fuse: fuse  # what a GPU gets
        torch.manual_seed(0)
        model = EagleModel(cfg, ParallelConfig())
        vit = model.vision_model.config
        out[f"cfg{fuse}"] = (vit.bias_activation_fusion, vit.bias_dropout_fusion, vit.activation_func,
                             model.language_model.config.bias_dropout_fusion)
        loss = model(batch)
        loss = loss.sum() if loss.dim() else loss
        loss.backward()
        out[fuse] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


def test_fused_elementwise_path_equals_unfused():
    """The GPU default (megatron's fused bias+GELU(tanh), bias+residual add and SwiGLU) computes the
    same loss and gradients as the unfused CPU path: run both on the CPU (TorchScript) and compare."""
    import torch.nn.functional as F

    out = run_distributed(_fused_vs_unfused, 1, timeout=180)[0]
    assert out["cfgTrue"][:2] == (True, True) and out["cfgTrue"][2] is F.gelu and out["cfgTrue"][3] is False
    assert out["cfgFalse"][:2] == (False, False) and out["cfgFalse"][2] is not F.gelu
    (l0, g0), (l1, g1) = out[False], out[True]
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    assert g0.keys() == g1.keys() and any("vision_model" in k for k in g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)
