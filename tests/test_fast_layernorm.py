"""models/fast_layernorm.py: the one-pass LayerNorm backward's math (what the Triton kernel
computes, run here as torch ops) equals torch's LayerNorm autograd, and the module is a drop-in
``nn.LayerNorm`` (same state dict, torch's path where the kernel cannot run)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_eagle.models import fast_layernorm as fl


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(7, 3, 48), (5, 1152), (1, 33)])
def test_one_pass_backward_equals_torch(dtype, tol, shape):
    g = torch.Generator().manual_seed(0)
    n = shape[-1]
    x = (torch.randn(*shape, generator=g) * 3 + 1).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(n, generator=g)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(n, generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(*shape, generator=g).to(dtype)
    out = fl.layer_norm(x, w, b, 1e-6, use_triton=False)
    got = torch.autograd.grad(out, (x, w, b), dy)
    ref_out = F.layer_norm(x.float(), (n,), w.float(), b.float(), 1e-6)
    want = torch.autograd.grad(ref_out, (x, w, b), dy.float())
    torch.testing.assert_close(out.float(), ref_out, rtol=tol, atol=tol)
    for a, e, name in zip(got, want, ("dx", "dw", "db")):
        assert a.dtype == dtype and a.shape == e.shape, name
        rel = float((a.float() - e).norm() / e.norm())
        assert rel < tol, (name, rel)


def test_module_is_a_drop_in_layernorm():
    torch.manual_seed(0)
    ref = torch.nn.LayerNorm(64, eps=1e-6)
    fast = fl.FastLayerNorm(64, eps=1e-6)
    fast.load_state_dict(ref.state_dict())
    assert isinstance(fast, torch.nn.LayerNorm) and fast.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(4, 9, 64, requires_grad=True)
    assert torch.equal(fast(x), ref(x))  # CPU: torch's own path


def test_vit_norms_use_it():
    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.models.transformer_configs import vision_transformer_config
    from megatron_eagle.models.norm import Norm
    from tests.model_fixtures import tiny_model_config

    cfg = tiny_model_config()
    tc = vision_transformer_config(cfg.vision, cfg, ParallelConfig())
    norm = Norm(tc, cfg.vision.hidden_size, eps=1e-6)
    assert isinstance(norm, fl.FastLayerNorm) and norm.weight.sequence_parallel is False
