"""training/optimizer.py: the foreach grad-norm/scale stand-ins and the fused-AdamW switch."""

from __future__ import annotations

import torch

from tests.dist import run_distributed


def _fused_vs_foreach(rank, world):
    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.models.eagle import build_model
    from megatron_eagle.runtime.distributed import init_model_parallel
    from megatron_eagle.training.optimizer import OptimConfig, build_optimizer, use_fused_adamw, wrap_ddp
    from tests.model_fixtures import mixed_pack, tiny_model_config
    from megatron.core.distributed import finalize_model_grads
    from megatron_eagle.training.step import forward_backward, guarded_optimizer_step

    out = {}
    for fused in (False, True):
        init_model_parallel(seed=7)
        cfg = tiny_model_config()
        model = build_model(cfg, ParallelConfig())
        optim = OptimConfig(lr=1e-2, fused_adam=fused)
        ddp = wrap_ddp(model, optim, bf16=False)
        ddp.config.finalize_model_grads_func = finalize_model_grads
        opt = build_optimizer([ddp], optim, bf16=False)  # on CPU the default leaves torch's foreach path
        inner = [p.optimizer for p in getattr(opt, "chained_optimizers", [opt])]
        assert all(not g.get("fused") for o in inner for g in o.param_groups)
        if fused:
            assert use_fused_adamw(opt, require_cuda=False) >= 1
            assert all(g["fused"] and not g["foreach"] for o in inner for g in o.param_groups)
        for step in range(3):
            ddp.zero_grad_buffer()
            opt.zero_grad()
            forward_backward(ddp, [mixed_pack(cfg, seed=step)], torch.device("cpu"))
            assert guarded_optimizer_step(opt, 1.0)[0]
        out[fused] = {k: v.detach().clone() for k, v in model.state_dict().items() if v is not None
                      and torch.is_tensor(v)}
    return out


def test_fused_adamw_switch_matches_foreach():
    out = run_distributed(_fused_vs_foreach, 1, timeout=240)[0]
    assert out[False].keys() == out[True].keys()
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=1e-4, atol=2e-5, msg=k)  # rounding order
