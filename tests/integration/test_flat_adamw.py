"""The flat fused AdamW step (training/flat_adamw.py) equals megatron's per-parameter path."""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed


def _build(dtype, flat):
    from megatron.core.distributed import finalize_model_grads

    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.models.eagle import build_model
    from megatron_eagle.runtime.distributed import init_model_parallel
    from megatron_eagle.training import flat_adamw
    from megatron_eagle.training.optimizer import OptimConfig, build_optimizer, wrap_ddp
    from tests.model_fixtures import tiny_model_config

    init_model_parallel(seed=7)
    cfg = tiny_model_config()
    cfg.params_dtype = dtype
    model = build_model(cfg, ParallelConfig())
    optim = OptimConfig(lr=1e-2, fused_adam=False, flat_adamw=flat, clip_grad=0.05)
    ddp = wrap_ddp(model, optim, bf16=dtype == "bfloat16")
    ddp.config.finalize_model_grads_func = finalize_model_grads
    opt = build_optimizer([ddp], optim, bf16=dtype == "bfloat16")
    parts = getattr(opt, "chained_optimizers", [opt])
    assert all((flat_adamw.installed(p) is not None) == flat for p in parts)
    assert sorted(g["wd_mult"] for g in opt.param_groups) == [0.0, 1.0]  # weights; biases and norms
    return cfg, model, ddp, opt, parts


def _optimizer_tensors(parts):
    out = []
    for p in parts:
        for group in p.optimizer.param_groups:
            for mp in group["params"]:
                st = p.optimizer.state[mp]
                out.append((mp, st["exp_avg"], st["exp_avg_sq"]))
    return out


def _train(rank, world, dtype):
    """Megatron's path (A) and the flat step (B) side by side in one process: every step starts
    both from the same weights and state (B is synced to A after each comparison)."""
    from megatron_eagle.training import flat_adamw
    from megatron_eagle.training.step import forward_backward, guarded_optimizer_step
    from tests.model_fixtures import mixed_pack

    cfg, model_a, ddp_a, opt_a, parts_a = _build(dtype, False)
    _, model_b, ddp_b, opt_b, parts_b = _build(dtype, True)
    model_b.load_state_dict(model_a.state_dict())
    main = lambda parts: [mp for p in parts for g in p.optimizer.param_groups for mp in g["params"]]  # noqa: E731
    for ma, mb in zip(main(parts_a), main(parts_b)):
        mb.data.copy_(ma)
    diffs = []
    for step in range(4):
        norms = []
        for opt, ddp in ((opt_a, ddp_a), (opt_b, ddp_b)):
            for g in opt.param_groups:  # what the scheduler does, plus a different LR per group
                g["weight_decay"] = 0.05 * g["wd_mult"]
                g["lr"] = 1e-2 * (step + 1) * (1.0 if g["wd_mult"] else 0.5)
            ddp.zero_grad_buffer()
            opt.zero_grad()
            forward_backward(ddp, [mixed_pack(cfg, seed=rank * 10 + step)], torch.device("cpu"))
            ok, norm = guarded_optimizer_step(opt, 0.05)
            assert ok
            norms.append(norm)
        # compare this step, then start the next one from A's values
        step_diff = {"norm": (norms[0], norms[1])}
        for name, i in (("master", 0), ("exp_avg", 1), ("exp_avg_sq", 2)):
            pairs = list(zip(_optimizer_tensors(parts_a), _optimizer_tensors(parts_b)))
            step_diff[name] = [(ta[i].detach().clone(), tb[i].detach().clone()) for ta, tb in pairs]
            for ta, tb in pairs:
                tb[i].data.copy_(ta[i])  # in place: B stays bound to its flat buffers
        pa, pb = model_a.state_dict(), model_b.state_dict()
        step_diff["params"] = {k: (pa[k].detach().float().clone(), pb[k].detach().float().clone())
                               for k in pa if torch.is_tensor(pa[k]) and pa[k].is_floating_point()}
        model_b.load_state_dict(pa)
        diffs.append(step_diff)
        if step == 1:  # what a checkpoint load does: new state tensors, re-bound at the next step
            for p in parts_b:
                p.optimizer.load_state_dict(p.optimizer.state_dict())
    for p in parts_b:
        f = flat_adamw.installed(p)
        assert f._still_bound() and f.step_count == 4
        for seg in f.segments:  # the optimizer's tensors really are views of the flat buffers
            for mp, a, b in seg.params:
                assert mp.data_ptr() == seg.master[a:b].data_ptr()
    return diffs


def _compare(diffs, dtype):
    assert len(diffs) == 4
    for step, d in enumerate(diffs):
        a, b = d["norm"]
        assert a == pytest.approx(b, rel=1e-6), step
        assert a > 0.05  # the clip coefficient was really applied
        for name in ("master", "exp_avg", "exp_avg_sq"):
            for ta, tb in d[name]:
                # one fused expression vs torch's per-op AdamW: fp32 rounding only
                torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-7 if name != "exp_avg_sq" else 1e-12,
                                           msg=f"step {step} {name}")
        for k, (ta, tb) in d["params"].items():
            if dtype == "bfloat16":  # at most one bf16 rounding step apart, and rarely
                assert (ta != tb).float().mean() < 1e-3, (step, k)
                torch.testing.assert_close(tb, ta, rtol=1e-2, atol=1e-6, msg=f"step {step} {k}")
            else:
                torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-7, msg=f"step {step} {k}")


@pytest.mark.parametrize("dtype,world", [("float32", 1), ("bfloat16", 1), ("bfloat16", 2)])
def test_flat_adamw_equals_megatron_step(dtype, world):
    """Same master weights, moments, params and grad norms as torch AdamW under megatron's
    DistributedOptimizer with clipping, over 4 steps with per-group LRs; at DP=2 each rank
    updates only its shard of every bucket. A mid-run state reload (new tensors) is re-bound."""
    out = run_distributed(_train, world, dtype, timeout=300)
    for r in range(world):
        _compare(out[r], dtype)
    if world == 2:  # each rank updated its own shards; the gathered params agree
        for k, (_, b0) in out[0][-1]["params"].items():
            torch.testing.assert_close(out[1][-1]["params"][k][1], b0, rtol=0, atol=0)


def _oom_at_bind(rank, world):
    import warnings

    from megatron_eagle.training import flat_adamw
    from megatron_eagle.training.step import forward_backward, guarded_optimizer_step
    from tests.model_fixtures import mixed_pack

    def no_memory(self):
        raise torch.OutOfMemoryError("test: no room for the flat buffers")

    flat_adamw.FlatAdamW._bind = no_memory
    out = {}
    for flat in (False, True):
        cfg, model, ddp, opt, parts = _build("bfloat16", flat)
        for step in range(3):
            for g in opt.param_groups:
                g["weight_decay"] = 0.05 * g["wd_mult"]
            ddp.zero_grad_buffer()
            opt.zero_grad()
            forward_backward(ddp, [mixed_pack(cfg, seed=step)], torch.device("cpu"))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert guarded_optimizer_step(opt, 0.05)[0]
            said = any("ran out of memory" in str(w.message) for w in caught)
            assert said == (flat and step == 0), (flat, step)
            if flat and step == 0:
                assert not any(flat_adamw.installed(p) is not None for p in parts)  # uninstalled after the OOM
        out[flat] = {k: v.detach().float().clone() for k, v in model.state_dict().items()
                     if torch.is_tensor(v) and v.is_floating_point()}
    return out


def test_flat_adamw_falls_back_to_megatron_when_binding_runs_out_of_memory():
    """An OOM while binding uninstalls the flat step: that step (clipped) and the later ones run
    megatron's path, with the same weights as a run that never had the flat step."""
    out = run_distributed(_oom_at_bind, 1, timeout=300)[0]
    for k in out[False]:
        torch.testing.assert_close(out[True][k], out[False][k], rtol=0, atol=0, msg=k)
