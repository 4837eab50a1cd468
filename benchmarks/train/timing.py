"""Where a step's time goes: phase marks (CUDA events from module and tensor hooks), the bf16
matmul peak of the card, and one step under torch.profiler (GPU time per kernel category, the
GPU's idle gaps between kernels)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable, Optional

import torch


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


def median_seconds(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls: CUDA events on a GPU (the queue drained
    before and after each call), the host clock on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_peak_tflops(device: torch.device, n: int = 8192, reps: int = 10) -> Optional[float]:
    """bf16 TFLOP/s of an n x n x n matmul on this GPU (median of ``reps``); None on a CPU."""
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
    return dict(host_top=host_top, ops_top=ops_top, idle=gpu_idle(prof), total_ms=sum(kernels.values()),
                wall_ms=wall_ms, busy=sum(kernels.values()) / wall_ms,
                categories_ms=dict(sorted(cats.items(), key=lambda kv: -kv[1])),
                top=[(n[:160], round(ms, 2)) for n, ms in ranked])
