#!/usr/bin/env python
"""Training throughput: our megatron-core step against a plain-PyTorch HF baseline (issue 8).

Both sides train on the same synthetic mixed image/video/text packs, on the same card, in one run:

- **ours**: ``EagleModel`` (bf16) in megatron-core DDP + DistributedOptimizer, one micro-batch per
  step through ``training.step.forward_backward`` and ``guarded_optimizer_step``, exactly as the
  trainer runs it. Variants switch optimizations on and off (``ours+rc-vit+swiglu`` ...).
- **hf**: transformers' ``SiglipVisionModel`` + pixel shuffle + ``mlp1`` + ``Qwen2ForCausalLM``
  (``EagleHFReference``) in bf16 with SDPA, full bf16 logits upcast to fp32 for the loss (what
  ``Qwen2ForCausalLM`` does), ``clip_grad_norm_`` and ``torch.optim.AdamW(fused=True)`` on the
  bf16 params. ``hf`` packs padding-free: ``position_ids`` restart per sub-sample, from which
  transformers builds a block-diagonal causal mask for SDPA (exact packed semantics; SDPA then
  runs a masked kernel over the whole pack). ``hf+nomask`` drops ``position_ids``: one causal
  sequence per pack, so attention crosses sub-samples (wrong semantics, but SDPA's fastest
  path); ``hf+gc`` adds transformers' gradient checkpointing.

Reported per variant: tokens/s, MFU against 989 TFLOP/s and against the bf16 matmul peak
measured in the same run (8192^3), peak memory, and the step split into ViT, LLM forward,
LLM backward, loss and optimizer (CUDA events from module/tensor hooks; means over the timed
steps). Model FLOPs are ``training.flops.step_flops`` (the trainer's count: LM head on
supervised tokens only, attention within sub-samples) for both sides. A side that runs out of
memory is recorded with ``null`` numbers.

    # one GPU, the whole sweep
    python benchmarks/train_throughput.py --preset eagle2.5-2b --seq-len 8192 \\
        --variants hf hf+nomask ours ours+rc-vit --out benchmarks/results/train_throughput.json
    # several GPUs (torchrun per layout), ours only
    python benchmarks/train_throughput.py --preset eagle2.5-2b --seq-len 8192 --layouts 1x1 2x1 2x2 \\
        --variants ours+rc-vit
    # CPU smoke test
    python benchmarks/train_throughput.py --preset tiny --seq-len 256 --steps 2 --warmup 1

Variant tokens after ``ours``: ``rc-vit`` (full ViT recompute), ``rc-llm`` (full LLM recompute),
``rc-llm-sel`` (selective: core attention), ``rc-llm-N`` (recompute N LLM layers, block method),
``swiglu`` / ``no-swiglu`` (megatron's fused SwiGLU, torch.compile; the default on GPUs),
``foreach-adam`` (torch's multi-tensor AdamW instead of fused), ``offload-vit`` (ViT activations saved on the CPU), ``grad-bf16`` (bf16 grad
buffers), ``overlap`` (also overlap the param all-gather with the forward; ``no-overlap-grad``: the grad
reduce-scatter after the backward instead of during it, the default before the fourth session),
``sp`` (sequence parallelism when TP > 1), ``cudnn-attn`` / ``flash-attn`` (the LLM's packed
attention on cuDNN's fused SDPA through cudnn-frontend / on FlashAttention-2), ``no-flat-adam``
(megatron's per-parameter AdamW step, clip and param copy instead of the flat fused one),
``no-bias-gemm`` (qkv/connector biases added after the GEMM, megatron's way). On both sides ``mbN`` accumulates gradients
over N packs per optimizer step (the per-module phases are then not reported).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

DATASHEET_TFLOPS = 989.0
IGNORE = -100


# ----------------------------------------------------------------------------- variants

@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    side: str  # "ours" | "hf"
    recompute_vision: str = "none"
    recompute_llm: str = "none"
    recompute_llm_layers: int = 0
    swiglu: Optional[bool] = None  # None: the model's default (fused on GPUs)
    fused_adam: bool = True
    offload_vit: bool = False
    grad_bf16: bool = False
    overlap: bool = False
    overlap_grad: bool = True  # the grad reduce-scatter overlapped with the backward (the trainer's default)
    sp: bool = False
    vit_fusion: Optional[bool] = None  # None: the model's default (fused bias-GELU / bias-add on GPUs)
    llm_bda_fusion: Optional[bool] = None  # None: the model's default (unfused residual add: no biases)
    profile: bool = False  # one extra step under torch.profiler: GPU time per kernel category
    fused_rope: bool = True  # the torch.compile'd RoPE rotation on GPUs (False: megatron's eager ops)
    wgrad_fusion: bool = True  # weight-grad GEMMs accumulate into the fp32 grad buffer (training/wgrad_fusion.py)
    flat_adam: bool = True  # one fused AdamW + clip + bf16 copy per bucket (training/flat_adamw.py)
    bias_gemm: bool = True  # qkv / connector biases added in the GEMM epilogue (models/linear.py)
    micro_batches: int = 1  # packs per optimizer step (gradient accumulation), both sides
    attention: Optional[str] = None  # None: the config's attention_backend ("cudnn": kernels/cudnn_packed.py)
    doc_mask: bool = True  # hf
    grad_ckpt: bool = False  # hf


# Variant tokens that set one field (``ours+rc-vit+no-swiglu``...); ``rc-llm-N`` is parsed apart.
OURS_TOKENS = {
    "rc-vit": ("recompute_vision", "full"), "rc-llm": ("recompute_llm", "full"),
    "rc-llm-sel": ("recompute_llm", "selective"), "swiglu": ("swiglu", True), "no-swiglu": ("swiglu", False),
    "no-vitfuse": ("vit_fusion", False), "llm-bdf": ("llm_bda_fusion", True), "prof": ("profile", True),
    "no-fused-rope": ("fused_rope", False), "no-wgrad-fusion": ("wgrad_fusion", False),
    "foreach-adam": ("fused_adam", False), "offload-vit": ("offload_vit", True),
    "grad-bf16": ("grad_bf16", True), "overlap": ("overlap", True), "sp": ("sp", True),
    "overlap-grad": ("overlap_grad", True), "no-overlap-grad": ("overlap_grad", False),
    "no-flat-adam": ("flat_adam", False), "no-bias-gemm": ("bias_gemm", False),
    "cudnn-attn": ("attention", "cudnn"),
    "flash-attn": ("attention", "flash"),
}
HF_TOKENS = {"nomask": ("doc_mask", False), "gc": ("grad_ckpt", True)}


def parse_variant(name: str) -> Variant:
    side, *tokens = name.split("+")
    if side not in ("ours", "hf"):
        raise ValueError(f"variant {name!r}: must start with 'ours' or 'hf'")
    table = OURS_TOKENS if side == "ours" else HF_TOKENS
    kw: dict = {}
    for t in tokens:
        if t in table:
            field, value = table[t]
            kw[field] = value
        elif side == "ours" and t.startswith("rc-llm-") and t[7:].isdigit():
            kw["recompute_llm"], kw["recompute_llm_layers"] = "full", int(t[7:])
        elif t.startswith("mb") and t[2:].isdigit() and int(t[2:]) >= 1:
            kw["micro_batches"] = int(t[2:])
        else:
            raise ValueError(f"variant {name!r}: unknown {side} option {t!r} ({', '.join(table)})")
    return Variant(name=name, side=side, **kw)


# ----------------------------------------------------------------------------- synthetic packs

@dataclasses.dataclass
class Pack:
    batch: object  # PackedBatch
    lens: list[int]  # sub-sample lengths (no padding)
    tiles: int
    supervised: int
    kinds: dict


def make_pack(cfg, seq_len: int, seed: int, mix=(0.5, 0.35, 0.15), max_frames: int = 64) -> Pack:
    """One pack of exactly ``seq_len`` tokens, no padding: images of 1-13 tiles (IAP grid + thumbnail),
    videos of 8-``max_frames`` frames (one tile + 6 wrapper tokens each), text-only samples; random ids
    with <IMG_CONTEXT> runs for the visual tokens and random tiles. Each sample's text is 60% prompt
    before the media and 40% answer after it; only the answer is supervised."""
    from megatron_eagle.batch import pack_samples

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    tpt, img_id, vocab = cfg.tokens_per_tile, cfg.image_token_id, cfg.llm.vocab_size
    size = cfg.vision.image_size
    scale = tpt / 256  # the tiny preset has 16-token tiles: scale text lengths with them
    min_text = 8

    def text_len(median: float, sigma: float) -> int:
        return max(min_text, int(round(rng.lognormvariate(math.log(median * scale), sigma))))

    def rand_ids(n: int) -> torch.Tensor:
        ids = torch.randint(10, vocab, (n,), generator=g)
        return torch.where(ids == img_id, ids + 1, ids)

    samples, pixels, lens = [], [], []
    tiles_total, kinds = 0, {"image": 0, "video": 0, "text": 0}
    remaining = seq_len
    while remaining > 0:
        kind = rng.choices(("image", "video", "text"), weights=mix)[0]
        text = text_len(1200, 1.0) if kind == "text" else text_len(250, 0.9)
        frames, wrap = [], 0  # tiles per visual item; wrapper tokens per item
        if kind == "image":
            grid = rng.choice([1, 1, 2, 3, 4, 4, 6, 6, 8, 9, 12, 12, 12])
            n = grid + 1 if grid > 1 else 1
            while n > 1 and n * tpt + 2 + text > remaining:
                n -= 1
            frames, wrap = [n], 2
        elif kind == "video":
            n = min(rng.randint(8, max_frames), (remaining - text) // (tpt + 6))
            frames, wrap = [1] * n, 6
            if n < 8:
                frames = []
        visual = sum(frames) * tpt + len(frames) * wrap
        if frames and visual + text > remaining:
            frames, visual = [], 0
        if not frames:
            kind = "text"
        text = min(text, remaining - visual)
        if remaining - visual - text < 2 * min_text:  # too little left for another sample: fill the pack
            text = remaining - visual
        prompt = (text * 6) // 10
        parts = [rand_ids(prompt)] if prompt else []
        for n in frames:
            parts += [rand_ids(wrap - 1), torch.full((n * tpt,), img_id), rand_ids(1)]
        if text - prompt:
            parts.append(rand_ids(text - prompt))
        ids = torch.cat(parts)
        lab = torch.full_like(ids, IGNORE)
        if text - prompt:
            lab[-(text - prompt):] = ids[-(text - prompt):]
        n_tiles = sum(frames)
        samples.append((ids, lab))
        pixels.append(torch.randn(n_tiles, 3, size, size, generator=g))
        lens.append(ids.numel())
        tiles_total += n_tiles
        kinds[kind] += 1
        remaining -= ids.numel()
    assert sum(lens) == seq_len, (sum(lens), seq_len)
    batch = pack_samples(samples, pixels, (3, size, size))
    return Pack(batch=batch, lens=lens, tiles=tiles_total, supervised=int((batch.labels >= 0).sum()), kinds=kinds)


# ----------------------------------------------------------------------------- timing

class Marks:
    """Named points in the step: CUDA events on GPU, host clock on CPU. First mark of a name wins."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.points: dict[str, object] = {}

    def reset(self) -> None:
        self.points = {}

    def mark(self, name: str) -> None:
        if name in self.points:
            return
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.points[name] = ev
        else:
            self.points[name] = time.perf_counter()

    def ms(self, a: str, b: str) -> Optional[float]:
        if a not in self.points or b not in self.points:
            return None
        if self.cuda:
            return float(self.points[a].elapsed_time(self.points[b]))
        return (self.points[b] - self.points[a]) * 1e3

    def phases(self) -> dict[str, Optional[float]]:
        p = dict(
            vit_fwd=self.ms("vit_fwd_start", "vit_fwd_end"),
            llm_fwd=self.ms("llm_fwd_start", "llm_fwd_end"),
            loss_fwd=self.ms("llm_fwd_end", "fwd_end"),
            loss_bwd=self.ms("fwd_end", "llm_bwd_start"),
            llm_bwd=self.ms("llm_bwd_start", "llm_bwd_end"),
            vit_bwd=self.ms("vit_bwd_start", "bwd_end"),
            optimizer=self.ms("bwd_end", "opt_end"),
            total=self.ms("step_start", "opt_end"),
        )
        known = [v for k, v in p.items() if k != "total" and v is not None]
        p["other"] = p["total"] - sum(known) if p["total"] is not None else None
        return p


def _hook_tensor(t, fn: Callable[[], None]) -> None:
    if isinstance(t, torch.Tensor) and t.requires_grad:
        t.register_hook(lambda g: (fn(), None)[1])


def instrument(marks: Marks, vit, connector, llm, whole, llm_input_kw: str) -> list:
    """Hooks that mark the phase boundaries; returns the handles."""
    hs = []
    hs.append(vit.register_forward_pre_hook(lambda m, a: marks.mark("vit_fwd_start")))

    def conn_done(m, a, out):
        marks.mark("vit_fwd_end")
        _hook_tensor(out, lambda: marks.mark("vit_bwd_start"))
    hs.append(connector.register_forward_hook(conn_done))

    def llm_start(m, args, kwargs):
        marks.mark("llm_fwd_start")
        x = kwargs.get(llm_input_kw, args[0] if args else None)
        _hook_tensor(x, lambda: marks.mark("llm_bwd_end"))
    hs.append(llm.register_forward_pre_hook(llm_start, with_kwargs=True))

    def llm_done(m, a, out):
        marks.mark("llm_fwd_end")
        out = getattr(out, "last_hidden_state", out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        _hook_tensor(out, lambda: marks.mark("llm_bwd_start"))
    hs.append(llm.register_forward_hook(llm_done))
    if whole is not None:
        hs.append(whole.register_forward_hook(lambda m, a, o: marks.mark("fwd_end")))
    return hs


# ----------------------------------------------------------------------------- sides

def flops_of(cfg, pack: Pack) -> float:
    from megatron_eagle.config import FreezeConfig
    from megatron_eagle.training.flops import step_flops

    return step_flops(cfg, FreezeConfig(), pack.lens, pack.tiles, pack.supervised)


class OursSide:
    def __init__(self, cfg, v: Variant, tp: int, device: torch.device):
        self.device, self.v = device, v
        self.hooks, self._patches = [], []
        try:
            self._build(cfg, v, tp, device)
        except BaseException:
            self.close()  # a build that fails (OOM) must not leave its patches behind
            raise

    def _build(self, cfg, v: Variant, tp: int, device: torch.device):
        from megatron.core.distributed import finalize_model_grads

        from megatron_eagle.config import ParallelConfig
        from megatron.core.models.common.embeddings import rope_utils
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear

        from megatron_eagle.models import connector, rope, specs
        from megatron_eagle.models.eagle import build_model
        from megatron_eagle.training.optimizer import OptimConfig, build_optimizer, wrap_ddp

        if os.environ.get("BENCH_FAIL_RANK") == os.environ.get("RANK", "0"):  # tests of the failure path
            raise torch.OutOfMemoryError("BENCH_FAIL_RANK")
        mc = dataclasses.replace(cfg, recompute_vision=v.recompute_vision, recompute_llm=v.recompute_llm,
                                 attention_backend=v.attention or cfg.attention_backend)
        par = ParallelConfig(tp=tp, sp=v.sp and tp > 1)
        if not v.bias_gemm:  # megatron's matmul, then the bias add as its own pass
            self._patch(specs, "BiasInGemmColumnParallelLinear", ColumnParallelLinear)
            self._patch(connector, "BiasInGemmColumnParallelLinear", ColumnParallelLinear)
        model = build_model(mc, par, chunk_tokens=2048)
        llm_cfg = model.language_model.config
        if v.recompute_llm_layers:
            llm_cfg.recompute_method, llm_cfg.recompute_num_layers = "block", v.recompute_llm_layers
        if v.swiglu is not None:
            llm_cfg.bias_activation_fusion = v.swiglu  # read by megatron's MLP at forward time
        if v.llm_bda_fusion is not None:
            llm_cfg.bias_dropout_fusion = v.llm_bda_fusion  # read by the layers at forward time
        if v.vit_fusion is False:  # the ViT before fusion: bias add, GELU(tanh), bias + residual apart
            vit_cfg = model.vision_model.config
            vit_cfg.bias_activation_fusion = vit_cfg.bias_dropout_fusion = False
            for layer in model.vision_model.encoder.layers:
                layer.mlp.activation_func = functools.partial(torch.nn.functional.gelu, approximate="tanh")
        if v.offload_vit:
            vit_forward = model.vision_model.forward

            def offloaded(*a, **k):
                with torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda"):
                    return vit_forward(*a, **k)
            model.vision_model.forward = offloaded
        if not v.fused_rope:  # megatron's eager ops on the packed positions
            original = rope_utils._apply_rotary_pos_emb_thd.original
            self._patch(rope_utils, "_apply_rotary_pos_emb_thd", rope.PackedRope(original, fused=False))
        optim = OptimConfig(lr=1e-5, fused_adam=v.fused_adam, grad_reduce_in_fp32=not v.grad_bf16,
                            wgrad_fusion=v.wgrad_fusion, flat_adamw=v.flat_adam,
                            overlap_grad_reduce=v.overlap or v.overlap_grad, overlap_param_gather=v.overlap)
        bf16 = mc.params_dtype == "bfloat16"
        self.ddp = wrap_ddp(model, optim, bf16)
        self.ddp.config.finalize_model_grads_func = finalize_model_grads
        self.ddp.config.no_sync_func = self.ddp.no_sync
        self.optimizer = build_optimizer([self.ddp], optim, bf16)
        self.optimizer.reload_model_params()
        self.marks = Marks(device.type == "cuda")
        m = self.ddp.module
        self.hooks = instrument(self.marks, m.vision_model, m.connector, m.language_model.decoder, m,
                                "hidden_states") if hasattr(m, "vision_model") else []
        self.params = sum(p.numel() for p in model.parameters())

    def _patch(self, mod, name, value):
        self._patches.append((mod, name, getattr(mod, name)))
        setattr(mod, name, value)

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

    def close(self):
        for h in self.hooks:
            h.remove()
        for mod, name, old in reversed(self._patches):
            setattr(mod, name, old)
        self._patches = []


class HFSide:
    def __init__(self, cfg, v: Variant, device: torch.device):
        from megatron_eagle.convert.reference import EagleHFReference

        self.device, self.v, self.cfg = device, v, cfg
        dtype = torch.bfloat16 if cfg.params_dtype == "bfloat16" else torch.float32
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                ref = EagleHFReference(cfg, attn_implementation="sdpa")
        finally:
            torch.set_default_dtype(old)
        ref.to(device=device, dtype=dtype).train()
        if v.grad_ckpt:
            kw = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
            ref.language_model.gradient_checkpointing_enable(**kw)
            ref.vision_model.vision_model.gradient_checkpointing_enable(**kw)
        self.ref = ref
        self.params = [p for p in ref.parameters() if p.requires_grad]
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(self.params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05,
                                     fused=fused or None)
        self.marks = Marks(device.type == "cuda")
        self.hooks = instrument(self.marks, ref.vision_model.vision_model, ref.mlp1, ref.language_model.model, None,
                                "inputs_embeds")

    def step(self, group: list[Pack]) -> float:
        import torch.nn.functional as F

        self.marks.reset()
        self.marks.mark("step_start")
        self.opt.zero_grad(set_to_none=True)
        losses = []
        for pack in group:  # gradient accumulation over the micro-batches
            b = pack.batch
            emb = self.ref.input_embeds(b.tokens, b.pixel_values)
            pos = b.position_ids.unsqueeze(0) if self.v.doc_mask else None
            hidden = self.ref.language_model.model(inputs_embeds=emb, position_ids=pos,
                                                   use_cache=False).last_hidden_state
            logits = self.ref.language_model.lm_head(hidden)[0]
            ce = F.cross_entropy(logits.float(), b.labels, ignore_index=IGNORE, reduction="none")
            loss = (ce * b.loss_weights).sum()
            self.marks.mark("fwd_end")
            (loss / len(group)).backward()
            losses.append(float(loss.detach()))
        self.marks.mark("bwd_end")
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.marks.mark("opt_end")
        return losses[0]

    def close(self):
        for h in self.hooks:
            h.remove()


# ----------------------------------------------------------------------------- measuring

def matmul_peak_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> Optional[float]:
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    return 2 * n ** 3 / statistics.median(times) / 1e12


def check_attention(device: torch.device) -> dict:
    """Packed GQA flash attention (forward and input grads) against per-segment SDPA in fp32."""
    from megatron_eagle.kernels.flash import FlashVarlen
    from megatron_eagle.kernels.reference import segment_sdpa

    if device.type != "cuda":
        return {"skipped": "cpu"}
    g = torch.Generator(device="cpu").manual_seed(0)
    lens = [700, 1, 2048, 333, 1500]
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    t = sum(lens)
    out = {}
    q = torch.randn(t, 12, 128, generator=g).to(device, torch.bfloat16).requires_grad_()
    k = torch.randn(t, 2, 128, generator=g).to(device, torch.bfloat16).requires_grad_()
    v = torch.randn(t, 2, 128, generator=g).to(device, torch.bfloat16).requires_grad_()
    w = torch.randn(t, 12, 128, generator=g).to(device, torch.bfloat16)
    flash = FlashVarlen()
    o = flash.packed(q, k, v, cu, max(lens), True, 128 ** -0.5)
    if o is None:
        out["gqa_native"] = {"error": "no flash kernel"}
    else:
        grads = torch.autograd.grad((o.float() * w.float()).sum(), (q, k, v))
        q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
        r = segment_sdpa(q32, k32, v32, cu, True, 128 ** -0.5)
        rgrads = torch.autograd.grad((r * w.float()).sum(), (q32, k32, v32))
        rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
        out["gqa_native"] = {"out": rel(o, r), "dq": rel(grads[0], rgrads[0]), "dk": rel(grads[1], rgrads[1]),
                             "dv": rel(grads[2], rgrads[2])}
    out["aten_flash"] = flash.status()
    out["native_ok"] = "error" not in out["gqa_native"] and max(out["gqa_native"].values()) < 2e-2
    return out


KERNEL_CATEGORIES = (  # first match wins; names of flash/cuBLAS/CUTLASS/NCCL/torch kernels
    ("attention", ("flash", "fmha", "sdpa", "attention", "attn")),
    ("gemm", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90_", "sm80_")),
    ("nccl", ("nccl",)),
    ("optimizer", ("adam", "multi_tensor", "foreach", "l2norm")),  # not "fused_": inductor's triton_poi_fused_*
    ("norm", ("layer_norm", "layernorm", "rms", "norm_kernel")),
    ("conv", ("conv", "implicit_gemm", "winograd")),
    ("copy/cat", ("copy", "cat", "index", "gather", "scatter", "memcpy", "memset", "fill")),
)


def gpu_idle(prof, top: int = 20, min_us: float = 20.0) -> dict:
    """Where the GPU waited: gaps between consecutive kernels (merged busy intervals) longer than
    ``min_us``, in step order buckets of 10% and the largest ones with the kernels around them."""
    ks = sorted(((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("## ")),
                key=lambda x: x[0])
    if not ks:
        return {}
    t0, gaps, end, prev = ks[0][0], [], ks[0][1], ks[0][2]
    for a, b, name in ks[1:]:
        if a - end > min_us:
            gaps.append(((a - end) / 1e3, (end - t0) / 1e3, prev[:70], name[:70]))
        if b > end:
            end, prev = b, name
    span = (end - t0) / 1e3
    deciles = [0.0] * 10
    for g, at, _, _ in gaps:
        deciles[min(9, int(10 * at / span))] += g
    return dict(span_ms=span, idle_ms=sum(g[0] for g in gaps), gaps=len(gaps),
                idle_by_tenth_ms=[round(x, 2) for x in deciles],
                largest=[(round(g, 3), round(at, 1), p, n) for g, at, p, n in sorted(gaps, key=lambda x: -x[0])[:top]])


def profile_step(side, group: list, top: int = 60) -> dict:
    """One step under torch.profiler: GPU time per kernel category and the top kernels (ms)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    host = os.environ.get("BENCH_PROFILE_CPU") == "1"  # also the host side: where launch time goes
    shapes = os.environ.get("BENCH_PROFILE_SHAPES") == "1"  # which op (and input shapes) launched what
    acts = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if host or shapes else [])
    with profile(activities=acts, record_shapes=shapes) as prof:
        t0 = time.perf_counter()
        side.step(group)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1e3
    kernels = {}
    for e in prof.events():
        # with host ops recorded, GPU-side user annotations (inductor's "## Call CompiledFxGraph ..")
        # come as CUDA events too: they span kernels already counted
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("## "):
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time_total / 1e3
    cats: dict[str, float] = {}
    for name, ms in kernels.items():
        low = name.lower()
        cat = next((c for c, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "elementwise/other")
        cats[cat] = cats.get(cat, 0.0) + ms
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
    host_top = None
    if host:
        ops = [a for a in prof.key_averages() if a.self_cpu_time_total > 0]
        ops.sort(key=lambda a: -a.self_cpu_time_total)
        host_top = [(a.key[:120], round(a.self_cpu_time_total / 1e3, 2), a.count) for a in ops[:30]]
    ops_top = None
    if shapes:  # GPU time of each host op (with its input shapes), excluding its children's
        ops = [a for a in prof.key_averages(group_by_input_shape=True) if a.self_device_time_total > 0]
        ops.sort(key=lambda a: -a.self_device_time_total)
        ops_top = [(a.key[:80], str(a.input_shapes)[:200], round(a.self_device_time_total / 1e3, 2), a.count)
                   for a in ops[:60]]
    # busy < 1: the GPU waited for the host (launch overhead, syncs) for part of the step
    return dict(host_top=host_top, ops_top=ops_top, idle=gpu_idle(prof), total_ms=sum(kernels.values()), wall_ms=wall_ms,
                busy=sum(kernels.values()) / wall_ms,
                categories_ms=dict(sorted(cats.items(), key=lambda kv: -kv[1])),
                top=[(n[:160], round(ms, 2)) for n, ms in ranked])


def measure(side_factory, packs: list[Pack], cfg, warmup: int, steps: int, device: torch.device,
            n_gpus: int, dp: int, peak: Optional[float]) -> dict:
    """Build a side, run warmup + timed steps; numbers or an OOM record."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_alloc = torch.cuda.memory_allocated()
    side, res = None, {}
    t_build = time.perf_counter()
    try:
        side = side_factory()
        build_s = time.perf_counter() - t_build
        n_micro = side.v.micro_batches
        groups = [[packs[(i * n_micro + j) % len(packs)] for j in range(n_micro)] for i in range(warmup + steps)]
        step_s, phases, losses = [], [], []
        for i in range(warmup + steps):
            t0 = time.perf_counter()
            losses.append(side.step(groups[i]))
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - t0
            if i >= warmup:
                ph = side.marks.phases()
                if n_micro > 1:  # the per-module marks see only the first micro-batch
                    ph = {n: (t if n in ("total", "optimizer") else None) for n, t in ph.items()}
                step_s.append((ph["total"] / 1e3) if ph["total"] is not None else wall)
                phases.append(ph)
        timed = [p for g in groups[warmup:] for p in g]
        total_t = sum(step_s)
        flops = sum(flops_of(cfg, p) for p in timed)
        tokens = sum(sum(p.lens) for p in timed)
        res = dict(status="ok", step_s=total_t / steps, step_s_all=step_s, tokens_per_s=tokens * dp / total_t,
                   tokens_per_s_per_gpu=tokens * dp / total_t / n_gpus,
                   mfu=flops * dp / (total_t * n_gpus * DATASHEET_TFLOPS * 1e12),
                   mfu_measured_peak=(flops * dp / (total_t * n_gpus * peak * 1e12)) if peak else None,
                   achieved_tflops_per_gpu=flops * dp / total_t / n_gpus / 1e12,
                   phases_ms={k: (statistics.mean([p[k] for p in phases if p[k] is not None])
                                  if any(p[k] is not None for p in phases) else None) for k in phases[0]},
                   losses=losses, build_s=build_s)
        if isinstance(getattr(side, "params", None), int):  # ours: this rank's parameters, and whether the
            res["params"] = side.params                        # flat AdamW step is still bound (not fallen back)
            parts = getattr(side.optimizer, "chained_optimizers", [side.optimizer])
            from megatron_eagle.training import flat_adamw

            res["flat_adamw_active"] = any(flat_adamw.installed(p) is not None for p in parts)
        if cuda and getattr(getattr(side, "v", None), "profile", False):
            res["kernels"] = profile_step(side, groups[0])
    except torch.OutOfMemoryError as e:
        res = dict(status="oom", error=str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001 - record and go on with the next variant
        res = dict(status="error", error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-3000:])
    if cuda:
        res["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30 if res["status"] == "ok" else None
        res["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2 ** 30
    else:
        res["peak_gib"] = None
    if side is not None:
        side.close()
    del side
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        res["leaked_gib"] = (torch.cuda.memory_allocated() - base_alloc) / 2 ** 30
    return res


# ----------------------------------------------------------------------------- drivers

def device_label(device: torch.device, n: int) -> str:
    if device.type != "cuda":
        return f"cpu ({os.cpu_count()} cores)"
    return f"{n}x {torch.cuda.get_device_name(device)}"


def worker(args) -> list[dict]:
    """Run every (seq_len, variant) in this process (all ranks of one layout)."""
    from megatron.core import parallel_state as ps

    from megatron_eagle.config import preset_model_config
    from megatron_eagle.runtime.distributed import init_distributed, init_model_parallel, shutdown

    rt = init_distributed()
    tp = args.tp
    init_model_parallel(tp=tp, seed=1234)
    dp = rt.world_size // tp
    dp_rank = ps.get_data_parallel_rank()
    device = rt.device
    if args.mem_cap_gib and device.type == "cuda":  # emulate a smaller card (an 80 GB H100 on an H200)
        total = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gib / total), device)
    cfg = preset_model_config(args.preset)
    cfg.params_dtype = "bfloat16" if device.type == "cuda" or args.bf16_cpu else "float32"
    variants = [parse_variant(v) for v in args.variants]
    t_start = time.time()
    peak = matmul_peak_tflops(device) if rt.rank == 0 or device.type == "cuda" else None
    attn = check_attention(device) if args.check_attention else {}
    log = (lambda *a: print(*a, flush=True)) if rt.rank == 0 else (lambda *a: None)
    log(f"# device {device_label(device, rt.world_size)}  torch {torch.__version__}  matmul peak "
        f"{peak and round(peak, 1)} TFLOP/s  attention check {attn}")
    meta = dict(device=device_label(device, rt.world_size), torch=torch.__version__, matmul_peak_tflops=peak,
                attention_check=attn, mem_cap_gib=args.mem_cap_gib or None)
    results = []
    for seq_len in args.seq_len:
        # Same packs on every DP rank by default: synthetic packs differ in cost by up to 1.5x, and the
        # slowest rank sets the step, so distinct packs measure their imbalance rather than the
        # parallel overhead (the loader balances real packs across ranks: BENCHMARKS.md, "Packing").
        rank_seed = 1000 * dp_rank if args.rank_packs == "distinct" else 0
        packs = [make_pack(cfg, seq_len, seed=rank_seed + i) for i in range(args.packs)]
        if device.type == "cuda":
            packs = [dataclasses.replace(p, batch=p.batch.to(device)) for p in packs]
        desc = dict(tiles=[p.tiles for p in packs], subsamples=[len(p.lens) for p in packs],
                    supervised=[p.supervised for p in packs], kinds=[p.kinds for p in packs],
                    gflop=[round(flops_of(cfg, p) / 1e9, 1) for p in packs])
        log(f"# seq {seq_len}: packs {desc}")
        for v in variants:
            if v.side == "hf" and rt.world_size > 1:
                continue
            if args.time_budget_s and time.time() - t_start > args.time_budget_s:
                res = dict(status="skipped", error="time budget")
            elif v.side == "hf":
                res = measure(lambda: HFSide(cfg, v, device), packs, cfg, args.warmup, args.steps, device,
                              rt.world_size, dp, peak)
            else:
                res = measure(lambda: OursSide(cfg, v, tp, device), packs, cfg, args.warmup, args.steps, device,
                              rt.world_size, dp, peak)
            res.update(variant=v.name, side=v.side, seq_len=seq_len, preset=args.preset, world=rt.world_size,
                       tp=tp, dp=dp, packs=desc, **meta)
            results.append(res)
            if args.worker_out is not None:  # every rank keeps its own record: a failing rank ends the launch
                Path(f"{args.worker_out}.rank{rt.rank}").write_text(json.dumps(results))
                if res["status"] not in ("ok", "skipped") and rt.world_size > 1:
                    print(f"rank {rt.rank}: {v.name} {res['status']}: {res.get('error')}", flush=True)
                    os._exit(3)
            log(summary_line(res))
            if "kernels" in res:
                k = res["kernels"]
                log(f"#   kernels {k['total_ms']:.1f} ms: " + ", ".join(f"{c} {ms:.1f}" for c, ms in
                                                              k["categories_ms"].items()))
                log(f"#   GPU busy {100 * k['busy']:.0f}% of the profiled step's {k['wall_ms']:.0f} ms")
                idle = k.get("idle") or {}
                if idle:
                    log(f"#   GPU idle {idle['idle_ms']:.1f} ms in {idle['gaps']} gaps over {idle['span_ms']:.0f} ms; "
                        f"by tenth of the step: {idle['idle_by_tenth_ms']}")
                    for g, at, before, after in idle["largest"][:12]:
                        log(f"#     gap {g:7.3f} ms at {at:6.1f} ms  after {before[:50]}  before {after[:50]}")
                for name, ms in k["top"][:12]:
                    log(f"#     {ms:8.2f} ms  {name[:110]}")
                for name, ms, count in k.get("host_top") or []:
                    log(f"#     host {ms:8.2f} ms  x{count:<5d} {name[:100]}")
                for name, shp, ms, count in k.get("ops_top") or []:
                    log(f"#     op {ms:8.2f} ms  x{count:<5d} {name[:60]} {shp[:150]}")
    shutdown()
    return results if rt.rank == 0 else []


def summary_line(r: dict) -> str:
    head = f"{r['variant']:40s} seq {r['seq_len']:6d} {r['status']:7s}"
    if r["status"] != "ok":
        return f"{head} {r.get('error', '')}"
    peak = f"{r['peak_gib']:5.1f}" if r.get("peak_gib") is not None else "   - "
    ph = " ".join(f"{k} {v:.0f}" for k, v in (r.get("phases_ms") or {}).items() if v is not None)
    return (f"{head} {r['tokens_per_s']:9.0f} tok/s  mfu {100 * r['mfu']:5.1f}%  peak {peak} GiB  "
            f"step {r['step_s'] * 1e3:7.1f} ms  {ph}  loss {r['losses'][0]:.3f}"
            + ("" if r.get("flat_adamw_active") is None else f"  flat AdamW {'on' if r['flat_adamw_active'] else 'OFF'}"))


def launch(args, n: int, tp: int, seq: int, variants: list[str]) -> list[dict]:
    """One torchrun launch of ``n`` processes (TP ``tp``) running ``variants`` at ``seq``."""
    with tempfile.TemporaryDirectory() as tmp:
        wout = Path(tmp) / "worker.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               str(Path(__file__).resolve()), "--preset", args.preset, "--tp", str(tp), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--packs", str(args.packs), "--rank-packs", args.rank_packs,
               "--worker-out", str(wout),
               "--seq-len", str(seq), "--variants", *variants]
        if args.bf16_cpu:
            cmd.append("--bf16-cpu")
        if args.mem_cap_gib:
            cmd += ["--mem-cap-gib", str(args.mem_cap_gib)]
        print(f"# launch {n}x{tp} seq {seq}: {' '.join(variants)}", flush=True)
        t0 = time.time()
        try:
            rc = subprocess.run(cmd, timeout=args.launch_timeout_s).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        return collect_launch(Path(tmp), n, tp, [seq], variants, args.preset,
                              f"launch exit {rc} after {time.time() - t0:.0f}s")


def collect_launch(tmp: Path, n: int, tp: int, seqs: list[int], variants: list[str], preset: str,
                   why: str) -> list[dict]:
    """One record per variant of a torchrun launch: rank 0's, unless some rank ran out of memory
    (then that rank's: the others only see a broken collective), or another rank's failure
    record, or the launch's exit status when no rank got to the variant."""
    per_rank = {}
    for f in tmp.glob("worker.json.rank*"):
        per_rank[int(f.name.rsplit("rank", 1)[1])] = json.loads(f.read_text())
    first = next(iter(per_rank.get(0, [])), None) or next((r for recs in per_rank.values() for r in recs), {})
    meta = {k: first[k] for k in ("device", "torch", "matmul_peak_tflops") if k in first}
    got = []
    for seq in seqs:
        for v in variants:
            recs = {rank: r for rank, rs in per_rank.items() for r in rs if r["seq_len"] == seq and r["variant"] == v}
            rec = recs.get(0)
            bad = sorted(recs.items(), key=lambda kv: (kv[1]["status"] != "oom", kv[0]))
            if bad and bad[0][1]["status"] == "oom":
                rec = dict(bad[0][1], error=f"rank {bad[0][0]}: {bad[0][1].get('error')}")
            elif rec is None and recs:
                rank, rec = min(recs.items())
                rec = dict(rec, error=f"rank {rank}: {rec.get('error')}")
            if rec is None:
                rec = dict(meta, variant=v, side="ours", seq_len=seq, preset=preset, world=n, tp=tp, dp=n // tp,
                           device=meta.get("device", f"{n} GPUs"), status="error", error=why)
            got.append(rec)
    return got


def pair_runs(results: list[dict], date: str, command: str) -> list[dict]:
    """One run record per ours-variant result, paired with the HF baselines of its seq_len."""
    runs = []
    hf = {(r["seq_len"], r["variant"]): r for r in results if r["side"] == "hf"}
    for r in results:
        if r["side"] != "ours":
            continue
        base = hf.get((r["seq_len"], "hf"), {})
        if base.get("status") != "ok" and hf.get((r["seq_len"], "hf+gc"), {}).get("status") == "ok":
            base = hf[(r["seq_len"], "hf+gc")]  # plain HF ran out of memory: compare with checkpointing
        alt = hf.get((r["seq_len"], "hf+nomask"), {})
        ok = r["status"] == "ok"
        hok = base.get("status") == "ok"
        run = dict(device=r["device"], date=date, preset=r["preset"], seq_len=r["seq_len"], world=r["world"],
                   tp=r["tp"], dp=r["dp"], ours_variant=r["variant"], hf_variant=base.get("variant"),
                   ours_status=r["status"], hf_status=base.get("status", "not_run"),
                   ours_tokens_per_s=r.get("tokens_per_s") if ok else None,
                   hf_tokens_per_s=base.get("tokens_per_s") if hok else None,
                   ours_mfu=r.get("mfu") if ok else None, hf_mfu=base.get("mfu") if hok else None,
                   ours_mfu_measured_peak=r.get("mfu_measured_peak") if ok else None,
                   hf_mfu_measured_peak=base.get("mfu_measured_peak") if hok else None,
                   ours_peak_gib=r.get("peak_gib") if ok else None, hf_peak_gib=base.get("peak_gib") if hok else None,
                   hf_nomask_tokens_per_s=alt.get("tokens_per_s") if alt.get("status") == "ok" else None,
                   hf_nomask_mfu=alt.get("mfu") if alt.get("status") == "ok" else None,
                   hf_nomask_peak_gib=alt.get("peak_gib") if alt.get("status") == "ok" else None,
                   speedup_vs_hf=(r["tokens_per_s"] / base["tokens_per_s"]) if ok and hok else None,
                   ours_phases_ms=r.get("phases_ms"), hf_phases_ms=base.get("phases_ms"),
                   ours_error=r.get("error"), hf_error=base.get("error"),
                   matmul_peak_tflops=r.get("matmul_peak_tflops"), torch=r.get("torch"), command=command)
        runs.append(run)
    for (seq, name), h in hf.items():  # HF-only seq lens still get a record
        if not any(x["seq_len"] == seq for x in runs) and name == "hf":
            runs.append(dict(device=h["device"], date=date, preset=h["preset"], seq_len=seq, world=1, tp=1, dp=1,
                             ours_variant=None, hf_variant=name, ours_status="not_run", hf_status=h["status"],
                             ours_tokens_per_s=None, hf_tokens_per_s=h.get("tokens_per_s"), ours_mfu=None,
                             hf_mfu=h.get("mfu"), ours_peak_gib=None, hf_peak_gib=h.get("peak_gib"),
                             command=command))
    return runs


def append_json(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(old + records, indent=1) + "\n")


def markdown(results: list[dict]) -> str:
    """One row per result; with several layouts, scaling efficiency = tokens/s per GPU over the
    same variant's on one GPU. ``prof`` variants add the profiled step's GPU kernel time."""
    single = {(r["seq_len"], r["variant"]): r for r in results
              if r.get("world", 1) == 1 and r["status"] == "ok"}
    lines = ["| variant | GPUs x TP | seq | status | tokens/s | tokens/s/GPU | scaling eff. | MFU (989) | "
             "MFU (measured peak) | peak GiB | step ms | ViT f/b | LLM f/b | loss f/b | optim | other | "
             "GPU kernel ms |",
             "|" + "---|" * 17]
    f = lambda x, d=0: "-" if x is None else f"{x:.{d}f}"  # noqa: E731
    for r in results:
        ph = r.get("phases_ms") or {}
        ok = r["status"] == "ok"
        one = single.get((r["seq_len"], r["variant"]))
        eff = (r["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]) if ok and one else None
        lines.append(
            f"| {r['variant']} | {r.get('world', 1)}x{r.get('tp', 1)} | {r['seq_len']} | {r['status']} | "
            f"{f(r.get('tokens_per_s')) if ok else '-'} | {f(r.get('tokens_per_s_per_gpu')) if ok else '-'} | "
            f"{f(100 * eff, 0) + '%' if eff else '-'} | "
            f"{f(100 * r['mfu'], 1) + '%' if ok else '-'} | "
            f"{f(100 * r['mfu_measured_peak'], 1) + '%' if ok and r.get('mfu_measured_peak') else '-'} | "
            f"{f(r.get('peak_gib'), 1)} | {f(r['step_s'] * 1e3, 1) if ok else '-'} | "
            f"{f(ph.get('vit_fwd'))}/{f(ph.get('vit_bwd'))} | {f(ph.get('llm_fwd'))}/{f(ph.get('llm_bwd'))} | "
            f"{f(ph.get('loss_fwd'))}/{f(ph.get('loss_bwd'))} | {f(ph.get('optimizer'))} | {f(ph.get('other'))} | "
            # GPU time of the profiled step (``prof``): unlike wall time, not moved by host stalls
            f"{f((r.get('kernels') or {}).get('total_ms'), 1)} |")
    return "\n".join(lines) + "\n"


def median_table(results: list[dict]) -> str:
    """Per (layout, seq, variant) over its repeated runs: median, min and max tokens/s, median MFU
    and, for profiled variants, the median GPU kernel time."""
    groups: dict = {}
    for r in results:
        if r["status"] == "ok":
            groups.setdefault((r.get("world", 1), r.get("tp", 1), r["seq_len"], r["variant"]), []).append(r)
    lines = ["| variant | GPUs x TP | seq | runs | median tokens/s | min-max | median MFU | median GPU kernel ms |",
             "|" + "---|" * 8]
    for (world, tp, seq, variant), rs in groups.items():
        tps = [r["tokens_per_s"] for r in rs]
        kern = [r["kernels"]["total_ms"] for r in rs if r.get("kernels")]
        lines.append(f"| {variant} | {world}x{tp} | {seq} | {len(rs)} | {statistics.median(tps):.0f} | "
                     f"{min(tps):.0f}-{max(tps):.0f} | {100 * statistics.median(r['mfu'] for r in rs):.1f}% | "
                     f"{f'{statistics.median(kern):.1f}' if kern else '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="eagle2.5-2b")
    ap.add_argument("--seq-len", type=int, nargs="+", default=[8192])
    ap.add_argument("--variants", nargs="+", default=["hf", "ours"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--packs", type=int, default=3, help="distinct packs per seq len, cycled")
    ap.add_argument("--rank-packs", choices=["same", "distinct"], default="same",
                    help="DP ranks train the same packs (default: scaling measures the parallel overhead) "
                         "or each its own (adds the synthetic packs' cost imbalance)")
    ap.add_argument("--layouts", nargs="+", default=None,
                    help="GPUSxTP per torchrun launch, e.g. 1x1 2x1 4x1 2x2 4x4 (default: this process only)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--check-attention", action="store_true", help="check packed GQA flash attention first")
    ap.add_argument("--time-budget-s", type=float, default=0, help="skip variants started after this")
    ap.add_argument("--launch-timeout-s", type=float, default=600)
    ap.add_argument("--bf16-cpu", action="store_true", help="bf16 params on CPU too (smoke tests)")
    ap.add_argument("--mem-cap-gib", type=float, default=0,
                    help="cap each process's GPU memory (79.18 = what an H100 80GB gives torch)")
    ap.add_argument("--out", type=Path, default=None, help="append run records to this JSON list")
    ap.add_argument("--raw-out", type=Path, default=None, help="append per-variant results to this JSON list")
    ap.add_argument("--md-out", type=Path, default=None, help="write a markdown table")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the variant list this many times, round robin, and add a table of medians: "
                         "host stalls move single runs by several percent on shared hosts")
    ap.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for v in args.variants:
        parse_variant(v)
    args.variants = [v for _ in range(max(1, args.repeat)) for v in args.variants]
    command = "python benchmarks/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)

    if args.layouts:
        results, t_start = [], time.time()
        ours = [v for v in args.variants if v.startswith("ours")]
        for layout in args.layouts:
            n, tp = (int(x) for x in layout.split("x"))
            for seq in args.seq_len:
                todo = list(ours)
                while todo:  # a failed variant ends its launch: relaunch for the ones after it
                    if args.time_budget_s and time.time() - t_start > args.time_budget_s:
                        results += [dict(variant=v, side="ours", seq_len=seq, preset=args.preset, world=n, tp=tp,
                                         dp=n // tp, status="skipped", error="time budget", device=f"{n} GPUs")
                                    for v in todo]
                        break
                    got = launch(args, n, tp, seq, todo)
                    tried = {r["variant"] for r in got if "launch exit" not in str(r.get("error"))}
                    if not tried:  # nothing ran: keep the launch's failure records, go on
                        results += got
                        break
                    results += [r for r in got if r["variant"] in tried]
                    todo = [v for v in todo if v not in tried]
    else:
        results = worker(args)
        if args.worker_out is not None:
            return 0

    table = markdown(results) + (("\n" + median_table(results)) if args.repeat > 1 else "")
    print(table, flush=True)
    if args.raw_out:
        append_json(args.raw_out, [dict(r, date=args.date, command=command) for r in results])
    if args.out:
        append_json(args.out, pair_runs(results, args.date, command))
    if args.md_out:
        args.md_out.parent.mkdir(parents=True, exist_ok=True)
        args.md_out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
