"""Our side: ``EagleModel`` in megatron-core DDP + DistributedOptimizer, built by the trainer's own
setup (:func:`megatron_eagle.training.setup.build_training_state`) and stepped through
``training.step`` as the trainer steps it."""

from __future__ import annotations

import dataclasses
import os

import torch

from benchmarks.train.packs import Pack
from benchmarks.train.timing import Marks, instrument
from benchmarks.train.variants import Variant


def _apply_variant(v: Variant, device: torch.device, model) -> None:
    """The variant's model settings that the model config does not carry, on the bare model."""
    llm_cfg = model.language_model.config
    if v.recompute_llm_layers:
        llm_cfg.recompute_method, llm_cfg.recompute_num_layers = "block", v.recompute_llm_layers
    if v.swiglu is not None:
        llm_cfg.bias_activation_fusion = v.swiglu  # read by megatron's MLP at forward time


class OursSide:
    """The trainer's model, DDP and optimizer with a variant's settings, and the phase hooks."""

    def __init__(self, cfg, v: Variant, tp: int, device: torch.device, seq_len: int = 0, tiles: int = 0):
        from megatron_eagle.config import ParallelConfig
        from megatron_eagle.training.optimizer import OptimConfig
        from megatron_eagle.training.setup import build_training_state

        self.device, self.v, self.hooks = device, v, []
        if os.environ.get("BENCH_FAIL_RANK") == os.environ.get("RANK", "0"):  # tests of the failure path
            raise torch.OutOfMemoryError("BENCH_FAIL_RANK")
        from megatron_eagle.training.memory import estimate

        rv, rl = ("auto", "auto") if v.recompute_auto else (v.recompute_vision, v.recompute_llm)
        mc = dataclasses.replace(cfg, recompute_vision=rv, recompute_llm=rl, offload_vision=v.offload_vit,
                                 attention_backend=v.attention or cfg.attention_backend)
        par = ParallelConfig(tp=tp, sp=v.sp and tp > 1)
        optim = OptimConfig(lr=1e-5, grad_reduce_in_fp32=not v.grad_bf16, flat_adamw=v.flat_adam,
                            overlap_grad_reduce=v.overlap or v.overlap_grad, overlap_param_gather=v.overlap)
        state = build_training_state(mc, par, optim, chunk_tokens=2048,
                                     before_wrap=lambda model: _apply_variant(v, device, model), seq_len=seq_len or None)
        rv_used = state.memory.recompute_vision if v.recompute_auto and state.memory else rv
        rl_used = state.memory.recompute_llm if v.recompute_auto and state.memory else rl
        rv_used, rl_used = ("none" if rv_used == "auto" else rv_used), ("none" if rl_used == "auto" else rl_used)
        # the memory model's prediction for these packs (the most tiles among them) and settings
        self.memory = estimate(mc, par, optim, seq_len, tiles, dp=torch.distributed.get_world_size() // tp,
                               recompute_vision=rv_used, recompute_llm=rl_used, offload_vit=v.offload_vit,
                               llm_recompute_layers=v.recompute_llm_layers or None) if seq_len else None
        self.ddp, self.optimizer = state.ddp, state.optimizer
        self.marks = Marks(device.type == "cuda")
        m = self.ddp.module
        self.hooks = instrument(self.marks, m.vision_model, m.connector, m.language_model.decoder, m,
                                "hidden_states") if hasattr(m, "vision_model") else []
        self.params = sum(p.numel() for p in state.model.parameters())
        self.resolved = dict(swiglu=bool(m.language_model.config.bias_activation_fusion),
                             attention=mc.attention_backend, sp=par.sp,
                             precision="fp32-master" if optim.use_distributed_optimizer else "bf16-adam",
                             recompute_vision=rv_used, recompute_llm=rl_used)

    def config(self) -> dict:
        """The variant's options with the model's defaults filled in."""
        return {**self.v.options(), **self.resolved}

    def step(self, group: list[Pack]) -> float:
        from megatron_eagle.training.step import forward_backward, guarded_optimizer_step

        self.marks.reset()
        self.marks.mark("step_start")
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = forward_backward(self.ddp, [p.batch for p in group], self.device)
        self.marks.mark("bwd_end")
        guarded_optimizer_step(self.optimizer, 1.0)
        self.marks.mark("opt_end")
        return float(losses[0]) if losses else float("nan")

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []


def check_attention(device: torch.device) -> dict:
    """Packed GQA flash attention (forward and input grads) against per-segment SDPA in fp32:
    relative L2 errors, ``ok`` when all are under 2e-2."""
    from megatron_eagle.kernels.flash import FlashVarlen
    from megatron_eagle.kernels.reference import segment_sdpa

    if device.type != "cuda":
        return {"skipped": "cpu"}
    g = torch.Generator(device="cpu").manual_seed(0)
    lens = [700, 1, 2048, 333, 1500]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    t = sum(lens)
    q = torch.randn(t, 12, 128, generator=g).to(device, torch.bfloat16).requires_grad_()
    k = torch.randn(t, 2, 128, generator=g).to(device, torch.bfloat16).requires_grad_()
    v = torch.randn(t, 2, 128, generator=g).to(device, torch.bfloat16).requires_grad_()
    w = torch.randn(t, 12, 128, generator=g).to(device, torch.bfloat16)
    o = FlashVarlen().packed(q, k, v, cu, max(lens), True, 128 ** -0.5)
    if o is None:
        return {"error": "no flash kernel", "ok": False}
    grads = torch.autograd.grad((o.float() * w.float()).sum(), (q, k, v))
    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    r = segment_sdpa(q32, k32, v32, cu, True, 128 ** -0.5)
    rgrads = torch.autograd.grad((r * w.float()).sum(), (q32, k32, v32))
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    out = {"out": rel(o, r), "dq": rel(grads[0], rgrads[0]), "dk": rel(grads[1], rgrads[1]),
           "dv": rel(grads[2], rgrads[2])}
    out["ok"] = max(out.values()) < 2e-2
    return out
