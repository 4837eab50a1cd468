#!/usr/bin/env python
"""LLM packed attention kernels on one GPU: FlashAttention-2 varlen vs cuDNN fused SDPA (ragged).

For realistic packs (8K and 32K tokens: one long sub-sample plus short ones, many 1-2K ones, many
~512 ones, a single full-length one), Qwen2.5-1.5B/7B-like GQA (12 query heads, 2 KV heads, d=128,
bf16, causal within sub-samples):

- correctness: out, dq, dk, dv of each kernel against per-segment SDPA in float32 (max abs and
  relative L2 error), FA2 and cuDNN side by side;
- speed: forward and forward+backward, CUDA events, warm-up then the median of N, model TFLOP/s
  (causal FLOPs within sub-samples: fwd 2 * 2 * hq * d * L(L+1)/2 per sub-sample, bwd 2.5x fwd);
- cuDNN graph cost: build seconds per graph, how many graphs a run of varied packs builds, and
  whether the time depends on the graph's (B, T) bucket (it should not: work is bounded by the
  real lengths through the padding mask);
- a non-causal check at ViT-like heads (16 x 72), since the same code path serves it.

    python benchmarks/attention_kernels.py --out benchmarks/results/attention_kernels.json
    python benchmarks/attention_kernels.py --totals 8192 --reps 5   # quicker
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.records import git_commit, options, write_json  # noqa: E402

HQ, HKV, D = 12, 2, 128
KINDS = ("long+short", "many-1-2K", "many-512", "single")


# ----------------------------------------------------------------------------- packs

def make_pack(total: int, kind: str, seed: int = 0) -> List[int]:
    """Sub-sample lengths summing to ``total``.

    long+short: one sub-sample of ~85% of the pack, then short ones (100-800 tokens);
    many-1-2K: 1024-2048 tokens each; many-512: 256-768 each; single: one of ``total``.
    """
    rng = random.Random(seed)
    if kind == "single":
        return [total]
    if kind == "long+short":
        lens, left = [int(total * 0.85)], total - int(total * 0.85)
        lo, hi = 100, 800
    elif kind == "many-1-2K":
        lens, left, lo, hi = [], total, 1024, 2048
    elif kind == "many-512":
        lens, left, lo, hi = [], total, 256, 768
    else:
        raise ValueError(kind)
    while left > 0:
        n = min(left, rng.randint(lo, hi))
        lens.append(n)
        left -= n
    return lens


def causal_flops(lens: List[int], hq: int = HQ, d: int = D, causal: bool = True) -> float:
    """Forward FLOPs of attention within sub-samples (QK^T and PV, 2 FLOPs per MAC)."""
    pairs = sum(n * (n + 1) / 2 if causal else n * n for n in lens)
    return 4.0 * hq * d * pairs


# ----------------------------------------------------------------------------- kernels

def _kernels():
    """The process's attention dispatcher (its cuDNN graph cache is what graph_builds counts)."""
    global _DISPATCH
    if _DISPATCH is None:
        from megatron_eagle.kernels.dispatch import AttentionKernels

        _DISPATCH = AttentionKernels("cudnn")
    return _DISPATCH


_DISPATCH = None


def fa2(q, k, v, cu, lens, causal, scale):
    out = _kernels().flash.packed(q, k, v, cu, max(lens), causal, scale)
    if out is None:
        raise RuntimeError("no flash kernel")
    return out


def cudnn_k(q, k, v, cu, lens, causal, scale, buckets=None):
    return _kernels().cudnn_packed(q, k, v, cu, causal, scale, buckets=buckets)


KERNELS: Dict[str, Callable] = {"fa2": fa2, "cudnn": cudnn_k}


def make_inputs(lens: List[int], hq: int, hkv: int, d: int, seed: int, device):
    g = torch.Generator(device=device).manual_seed(seed)
    t = sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g, device=device).to(torch.bfloat16).requires_grad_()
               for h in (hq, hkv, hkv))
    dout = torch.randn(t, hq, d, generator=g, device=device).to(torch.bfloat16)
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0).tolist()), dtype=torch.int32, device=device)
    return q, k, v, dout, cu


def reference(q, k, v, dout, cu, causal, scale):
    from megatron_eagle.kernels.reference import segment_sdpa

    q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
    # K/V heads repeated here (not enable_gqa), so SDPA can take its memory-efficient fp32 kernel
    # at 28K-token segments instead of the O(L^2)-memory math path; autograd sums the groups back.
    rep = q.shape[1] // k.shape[1]
    out = segment_sdpa(q32, k32.repeat_interleave(rep, 1), v32.repeat_interleave(rep, 1), cu, causal, scale)
    grads = torch.autograd.grad(out, (q32, k32, v32), dout.float())
    return [out.detach()] + list(grads)


def errors(got: List[torch.Tensor], ref: List[torch.Tensor]) -> dict:
    res = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        a = a.float()
        res[name] = {"max_abs": float((a - b).abs().max()), "rel_l2": float((a - b).norm() / b.norm().clamp_min(1e-30)),
                     "finite": bool(torch.isfinite(a).all())}
    return res


def run_kernel(fn, q, k, v, dout, cu, lens, causal, scale, **kw):
    out = fn(q, k, v, cu, lens, causal, scale, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    return [out.detach()] + list(grads)


def timed(fn: Callable[[], None], warmup: int, reps: int) -> dict:
    """Median / min milliseconds of ``fn`` over ``reps`` runs, each bracketed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for s, e in ev:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    ms = [s.elapsed_time(e) for s, e in ev]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "reps": reps}


def bench_kernel(fn, q, k, v, dout, cu, lens, causal, scale, warmup, reps, **kw) -> dict:
    def fwd():
        fn(q, k, v, cu, lens, causal, scale, **kw)

    def fwd_bwd():
        out = fn(q, k, v, cu, lens, causal, scale, **kw)
        torch.autograd.grad(out, (q, k, v), dout)

    flops = causal_flops(lens, q.shape[1], q.shape[2], causal)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    f = timed(fwd, warmup, reps)
    fb = timed(fwd_bwd, warmup, reps)
    peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    bwd_ms = fb["median_ms"] - f["median_ms"]
    return {"fwd_ms": f["median_ms"], "fwd_bwd_ms": fb["median_ms"], "bwd_ms": bwd_ms,
            "fwd_tflops": flops / f["median_ms"] / 1e9, "fwd_bwd_tflops": 3.5 * flops / fb["median_ms"] / 1e9,
            "bwd_tflops": 2.5 * flops / bwd_ms / 1e9 if bwd_ms > 0 else None, "peak_extra_mib": peak,
            "fwd_min_ms": f["min_ms"], "fwd_bwd_min_ms": fb["min_ms"]}


# ----------------------------------------------------------------------------- sections

def env_info() -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "torch_cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, sm=f"{p.major}.{p.minor}", mem_gib=round(p.total_memory / 2 ** 30, 1))
    try:
        import cudnn

        info.update(cudnn_frontend=cudnn.__version__, cudnn_backend=cudnn.backend_version_string())
    except Exception as e:
        info["cudnn_frontend_error"] = f"{type(e).__name__}: {e}"
    try:  # which libcudnn the process mapped (torch's bundled one, hopefully)
        with open("/proc/self/maps") as f:
            info["libcudnn"] = sorted({ln.split()[-1] for ln in f if "libcudnn.so" in ln})
    except OSError:
        pass
    return info


def case(lens: List[int], name: str, args, device, causal=True, hq=HQ, hkv=HKV, d=D) -> dict:
    scale = d ** -0.5
    rec = {"pack": name, "tokens": sum(lens), "segments": len(lens), "max_len": max(lens), "causal": causal,
           "heads": [hq, hkv, d], "tflop_fwd": causal_flops(lens, hq, d, causal) / 1e12}
    q, k, v, dout, cu = make_inputs(lens, hq, hkv, d, seed=len(lens), device=device)
    ref = reference(q, k, v, dout, cu, causal, scale) if sum(lens) <= args.ref_max_tokens else None
    for kname in args.kernels:
        fn = KERNELS[kname]
        try:
            got = run_kernel(fn, q, k, v, dout, cu, lens, causal, scale)
            r = {"err": errors(got, ref)} if ref is not None else {}
            if kname != "fa2" and "fa2" in rec:  # also vs FA2 itself
                fa = rec["fa2"].get("_got")
                if fa is not None:
                    r["vs_fa2"] = {n: e["rel_l2"] for n, e in errors(got, [x.float() for x in fa]).items()}
            if not args.no_timing:
                r.update(bench_kernel(fn, q, k, v, dout, cu, lens, causal, scale, args.warmup, args.reps))
            r["_got"] = got if kname == "fa2" else None
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)}
        rec[kname] = r
    for kname in args.kernels:
        rec[kname].pop("_got", None)
    if "fa2" in rec and "cudnn" in rec and "fwd_ms" in rec["fa2"] and "fwd_ms" in rec["cudnn"]:
        rec["speedup"] = {"fwd": rec["fa2"]["fwd_ms"] / rec["cudnn"]["fwd_ms"],
                          "bwd": rec["fa2"]["bwd_ms"] / rec["cudnn"]["bwd_ms"],
                          "fwd_bwd": rec["fa2"]["fwd_bwd_ms"] / rec["cudnn"]["fwd_bwd_ms"]}
    if ref is not None and "err" in rec.get("cudnn", {}):
        c, f = rec["cudnn"]["err"], rec.get("fa2", {}).get("err")
        # bf16 tolerance, and no worse than twice FA2's own error (plus a little) where FA2 ran
        rec["cudnn_ok"] = all(c[n]["finite"] and c[n]["rel_l2"] < 2e-2 and
                              (f is None or c[n]["rel_l2"] <= 2 * f[n]["rel_l2"] + 1e-3) for n in c)
    del q, k, v, dout, cu, ref
    torch.cuda.empty_cache()
    return rec


def bucket_scaling(total: int, args, device) -> dict:
    """cuDNN time with the default (B, T) bucket vs larger ones on the same pack."""
    from megatron_eagle.kernels import cudnn_packed as ca

    lens = make_pack(total, "long+short", seed=1)
    q, k, v, dout, cu = make_inputs(lens, HQ, HKV, D, seed=1, device=device)
    base = (ca.batch_bucket(len(lens)), ca.token_bucket(total))
    out = {"pack": f"{total // 1024}K long+short", "segments": len(lens), "rows": []}
    ref = None
    for B, T in (base, (8 * base[0], base[1]), (base[0], 4 * base[1]), (8 * base[0], 4 * base[1])):
        try:
            got = run_kernel(cudnn_k, q, k, v, dout, cu, lens, True, D ** -0.5, buckets=(B, T))
            same = None if ref is None else max(float((a.float() - b.float()).abs().max()) for a, b in zip(got, ref))
            ref = ref or got
            t = bench_kernel(cudnn_k, q, k, v, dout, cu, lens, True, D ** -0.5, args.warmup, args.reps,
                             buckets=(B, T))
            out["rows"].append({"B": B, "T": T, "fwd_ms": t["fwd_ms"], "bwd_ms": t["bwd_ms"],
                                "max_abs_diff_vs_default": same, "peak_extra_mib": t["peak_extra_mib"]})
        except Exception as e:
            out["rows"].append({"B": B, "T": T, "error": f"{type(e).__name__}: {e}"})
    return out


def graph_builds(args, device) -> dict:
    """Graph build cost, and how many graphs a run of varied packs builds."""
    graphs = _kernels().cudnn_graphs
    graphs.clear()
    lens = make_pack(8192, "many-1-2K", seed=7)
    q, k, v, dout, cu = make_inputs(lens, HQ, HKV, D, seed=7, device=device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run_kernel(cudnn_k, q, k, v, dout, cu, lens, True, D ** -0.5)
    torch.cuda.synchronize()
    first = {"first_call_s": time.perf_counter() - t0, "graphs": graphs.built, "build_s": graphs.build_s}
    graphs.clear()
    rng = random.Random(3)
    seq, t0 = [], time.perf_counter()
    for i in range(args.varied_packs):
        total = rng.choice([x for x in args.totals] + [int(args.totals[0] * 0.9)])
        lens = make_pack(total, rng.choice(KINDS), seed=100 + i)
        q, k, v, dout, cu = make_inputs(lens, HQ, HKV, D, seed=i, device=device)
        run_kernel(cudnn_k, q, k, v, dout, cu, lens, True, D ** -0.5)
        seq.append([total, len(lens)])
    torch.cuda.synchronize()
    return {"first_pack": first, "varied": {"packs": seq, "graphs_built": graphs.built,
                                            "build_s": graphs.build_s, "wall_s": time.perf_counter() - t0,
                                            "keys": sorted(str(k[:3]) for k in graphs.graphs)}}


def host_overhead(args, device, iters: int = 300) -> dict:
    """Wall microseconds per call on a tiny pack (1K tokens, 8 sub-samples), where the GPU work is
    negligible: the host-side cost of each kernel's Python path (matters where the step is CPU-bound)."""
    lens = [128] * 8
    q, k, v, dout, cu = make_inputs(lens, HQ, HKV, D, seed=11, device=device)
    out = {}
    for kname, fn in KERNELS.items():
        def fwd():
            fn(q, k, v, cu, lens, True, D ** -0.5)

        def fwd_bwd():
            torch.autograd.grad(fn(q, k, v, cu, lens, True, D ** -0.5), (q, k, v), dout)

        for label, f in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            for _ in range(10):
                f()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(iters):
                f()
            torch.cuda.synchronize()
            out[f"{kname}_{label}_us"] = (time.perf_counter() - t0) / iters * 1e6
    return out


def module_check(args, device) -> dict:
    """PackedCoreAttention (what the model runs) with backend="cudnn" vs "flash": same output and
    grads, no fallback warning."""
    import warnings

    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_eagle.kernels.dispatch import AttentionKernels
    from megatron_eagle.models import attention

    cfg = TransformerConfig(num_layers=1, hidden_size=HQ * D, num_attention_heads=HQ, num_query_groups=HKV,
                            kv_channels=D, attention_dropout=0.0, bf16=True)
    lens = make_pack(8192, "long+short", seed=2)
    q, k, v, dout, cu = make_inputs(lens, HQ, HKV, D, seed=2, device=device)
    psp = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens),
                          max_seqlen_kv=max(lens))
    res, outs = {}, {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for backend in ("flash", "cudnn"):
            core = attention.PackedCoreAttention(cfg, 1, AttnMaskType.causal, "self",
                                                 kernels=AttentionKernels(backend)).to(device)
            o = core(q, k, v, None, packed_seq_params=psp)
            outs[backend] = [o.detach()] + list(torch.autograd.grad(o, (q, k, v), dout.reshape(o.shape)))
    res["rel_l2_cudnn_vs_flash"] = {n: float((a.float() - b.float()).norm() / b.float().norm())
                                    for n, a, b in zip(("out", "dq", "dk", "dv"), outs["cudnn"], outs["flash"])}
    res["cudnn_warnings"] = [str(w.message) for w in seen if "cuDNN" in str(w.message)]
    return res


# ----------------------------------------------------------------------------- report

def fmt_table(cases: List[dict]) -> str:
    hdr = ("| pack | segs | max len | kernel | out rel | dq rel | dk rel | dv rel | fwd ms | bwd ms | "
           "fwd+bwd ms | fwd TF/s | bwd TF/s | speedup f/b |")
    lines = [hdr, "|" + "---|" * 14]
    for c in cases:
        for kname in ("fa2", "cudnn"):
            r = c.get(kname)
            if r is None:
                continue
            if "error" in r:
                lines.append(f"| {c['pack']} | {c['segments']} | {c['max_len']} | {kname} | error: {r['error'][:80]} |")
                continue
            e = r.get("err", {})
            rel = [f"{e[n]['rel_l2']:.2e}" if n in e else "-" for n in ("out", "dq", "dk", "dv")]
            sp = c.get("speedup")
            spd = f"{sp['fwd']:.2f}/{sp['bwd']:.2f}" if (sp and kname == "cudnn") else ""
            tm = [f"{r[x]:.2f}" if r.get(x) is not None else "-" for x in ("fwd_ms", "bwd_ms", "fwd_bwd_ms")]
            tf = [f"{r[x]:.0f}" if r.get(x) is not None else "-" for x in ("fwd_tflops", "bwd_tflops")]
            lines.append(f"| {c['pack']} | {c['segments']} | {c['max_len']} | {kname} | " + " | ".join(rel + tm + tf)
                         + f" | {spd} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--totals", type=int, nargs="+", default=[8192, 32768], help="pack lengths")
    ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    ap.add_argument("--kernels", nargs="+", default=["fa2", "cudnn"], choices=list(KERNELS))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--ref-max-tokens", type=int, default=32768, help="fp32 reference up to this pack length")
    ap.add_argument("--varied-packs", type=int, default=24, help="packs in the graph-count run (0: skip)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--skip-extras", action="store_true", help="no bucket scaling / graph count / non-causal")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/attention_kernels.json"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 1
    device = torch.device("cuda")
    torch.backends.cudnn.version()  # loads torch's bundled libcudnn before the frontend dlopens one
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "commit": git_commit(),
           "env": env_info(), "config": {"hq": HQ, "hkv": HKV, "d": D, "dtype": "bfloat16", **options(args)},
           "cases": []}
    print(json.dumps(res["env"], indent=1), flush=True)
    for total in args.totals:
        for kind in args.kinds:
            lens = make_pack(total, kind, seed=total + len(kind))
            rec = case(lens, f"{total // 1024}K {kind}", args, device)
            res["cases"].append(rec)
            print(json.dumps({k: v for k, v in rec.items()}, default=str), flush=True)
    if not args.skip_extras and "cudnn" in args.kernels:
        for name, fn in (("bucket_scaling", lambda: [bucket_scaling(t, args, device) for t in args.totals]),
                         ("graph_builds", lambda: graph_builds(args, device) if args.varied_packs else None),
                         ("host_overhead", lambda: host_overhead(args, device)),
                         ("module_check", lambda: module_check(args, device)),
                         ("non_causal_vit_heads", lambda: case(make_pack(8192, "many-1-2K", seed=5), "8K ViT-like",
                                                               args, device, causal=False, hq=16, hkv=16, d=72))):
            try:
                res[name] = fn()
            except Exception as e:
                res[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)}
            print(name, json.dumps(res[name], default=str), flush=True)
    graphs = _kernels().cudnn_graphs
    res["graphs_total"] = {"built": graphs.built, "build_s": graphs.build_s}
    print("\n" + fmt_table(res["cases"] + ([res["non_causal_vit_heads"]] if isinstance(
        res.get("non_causal_vit_heads"), dict) and "pack" in res["non_causal_vit_heads"] else [])))
    write_json(Path(args.out), res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
