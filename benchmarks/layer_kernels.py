#!/usr/bin/env python
"""Sub-layer kernels at eagle2.5-2b's 8K shapes on one GPU: candidates for the non-GEMM time.

Each case times forward and forward+backward (CUDA events, warm-up, median of N) of the way the
model runs an op against candidate replacements, and checks each candidate's outputs and
input gradients against the model's:

- ViT attention (25 tiles x 1024 patches, 16 heads x 72): q/k/v split from megatron's fused qkv
  projection, through SDPA with each backend, with the head dim zero-padded to 80/96/128 (the
  kernels for 128 run about 2.4x faster backward than for 72), and through cuDNN frontend graphs;
- the same through cuDNN graphs on megatron's strided layouts with the copy-free qkv split (what the
  model runs: no output permute, no dq/dk/dv concatenation);
- bias-gradient column sums (the linears' ``grad.sum(0)``, the compiled bias-add backward, a GEMV);
- the ViT's qkv projection with its bias added after the GEMM or in its epilogue (``addmm``);
- LayerNorm [25.6K, 1152] and the residual add before it, native vs torch.compile'd (fused);
- RMSNorm [8192, 1536], native vs compiled;
- packed RoPE on q [8192, 12, 128] and k [8192, 2, 128], a compiled rotation with cos/sin per
  call vs cos/sin computed once per step.

    python benchmarks/layer_kernels.py --out benchmarks/results/layer_kernels.json
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import traceback
from pathlib import Path
from typing import Callable, Dict

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.records import git_commit, options, write_json  # noqa: E402
from benchmarks.train.timing import median_seconds  # noqa: E402


def time_ms(fn: Callable[[], None], reps: int, warmup: int = 3) -> float:
    """Median CUDA-event time of fn() in ms."""
    return median_seconds(fn, reps, warmup, torch.device("cuda")) * 1e3


def run_case(name: str, make_inputs: Callable[[], tuple], impls: Dict[str, Callable], reps: int) -> dict:
    """Time each impl fwd and fwd+bwd; compare outputs and grads with the first impl's."""
    out: dict = {"case": name, "impls": {}}
    ref = None
    for label, fn in impls.items():
        row: dict = {}
        try:
            inputs = make_inputs()
            leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
            res = fn(*inputs)
            res = res if isinstance(res, tuple) else (res,)
            grads_out = [torch.randn_like(r, generator=torch.Generator(r.device).manual_seed(7 + i))
                         for i, r in enumerate(res)]
            torch.autograd.backward(res, grads_out)
            got = [r.detach().float() for r in res] + [t.grad.detach().float() for t in leaves if t.grad is not None]
            if ref is None:
                ref = got
            else:
                row["max_abs_diff"] = max((g - r).abs().max().item() for g, r in zip(got, ref))
                row["max_rel_l2"] = max(((g - r).norm() / r.norm().clamp_min(1e-12)).item() for g, r in zip(got, ref))
            for t in leaves:
                t.grad = None

            def fwd():
                with torch.no_grad():
                    fn(*inputs)

            def fwd_bwd():
                r = fn(*inputs)
                torch.autograd.backward(r if isinstance(r, tuple) else (r,), grads_out)

            row["fwd_ms"] = time_ms(fwd, reps)
            row["fwd_bwd_ms"] = time_ms(fwd_bwd, reps)
            row["bwd_ms"] = row["fwd_bwd_ms"] - row["fwd_ms"]
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is a result too
            row = {"status": "error", "error": f"{type(e).__name__}: {e}"[:300], "trace": traceback.format_exc()[-800:]}
        out["impls"][label] = row
        print(f"{name:28s} {label:34s} " + (f"fwd {row['fwd_ms']:7.3f}  fwd+bwd {row['fwd_bwd_ms']:7.3f} ms  "
                                               f"rel.diff {row.get('max_rel_l2', 0):.1e}" if row["status"] == "ok"
                                               else row["error"][:150]), flush=True)
    return out


# ----------------------------------------------------------------------------- ViT attention

def vit_attention_case(tiles: int, reps: int) -> dict:
    s, h, d = 1024, 16, 72
    scale = 1.0 / math.sqrt(d)
    dev = torch.device("cuda")

    def make():
        g = torch.Generator(dev).manual_seed(0)
        qkv = torch.randn(s, tiles, h, 3 * d, device=dev, dtype=torch.bfloat16, generator=g, requires_grad=True)
        return (qkv,)

    def split(qkv):  # megatron's view: per head [q | k | v]
        return torch.split(qkv, [d, d, d], dim=-1)

    def sdpa(backend=None, pad: int = 0):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn(qkv):
            q, k, v = (x.permute(1, 2, 0, 3) for x in split(qkv))  # [b, h, s, d]
            if pad:
                q, k, v = (F.pad(x, (0, pad - d)) for x in (q, k, v))
            if backend is None:
                o = F.scaled_dot_product_attention(q, k, v, scale=scale)
            else:
                with sdpa_kernel([getattr(SDPBackend, backend)]):
                    o = F.scaled_dot_product_attention(q, k, v, scale=scale)
            if pad:
                o = o[..., :d]
            return o.permute(2, 0, 1, 3).reshape(s, tiles, h * d)
        return fn

    from megatron_eagle.kernels.cudnn_graphs import CudnnGraphs
    from megatron_eagle.kernels.cudnn_packed import CudnnPacked
    from megatron_eagle.kernels.cudnn_strided import CudnnStrided

    graphs = CudnnGraphs()  # one graph cache for every call, as in the model
    cudnn_packed_attention, cudnn_sbhd_attention = CudnnPacked(graphs), CudnnStrided(graphs)

    def cudnn_frontend(qkv):
        q, k, v = (x.transpose(0, 1).reshape(tiles * s, h, d) for x in split(qkv))  # [b*s, h, d]
        cu = torch.arange(0, tiles + 1, device=qkv.device, dtype=torch.int32) * s
        o = cudnn_packed_attention(q, k, v, cu, False, scale)
        return o.view(tiles, s, h * d).transpose(0, 1)

    def strided_cudnn(qkv):  # the model's path: copy-free split, cuDNN on megatron's strides
        from megatron_eagle.models.qkv_split import split_along_dim

        q, k, v = split_along_dim(qkv, 3, [d, d, d])
        return cudnn_sbhd_attention(q, k, v, False, scale).reshape(s, tiles, h * d)

    impls = {"sdpa (auto)": sdpa(), "cudnn strided, copy-free split (model)": strided_cudnn,
             "sdpa cudnn": sdpa("CUDNN_ATTENTION"),
             "sdpa flash": sdpa("FLASH_ATTENTION"), "sdpa efficient": sdpa("EFFICIENT_ATTENTION"),
             "sdpa cudnn pad 80": sdpa("CUDNN_ATTENTION", 80), "sdpa cudnn pad 96": sdpa("CUDNN_ATTENTION", 96),
             "sdpa cudnn pad 128": sdpa("CUDNN_ATTENTION", 128), "sdpa flash pad 96": sdpa("FLASH_ATTENTION", 96),
             "sdpa flash pad 128": sdpa("FLASH_ATTENTION", 128), "cudnn frontend ragged": cudnn_frontend}
    res = run_case(f"ViT attention x{tiles}", make, impls, reps)
    res["tflop_fwd"] = 4 * tiles * h * d * s * s / 1e12
    return res


# ----------------------------------------------------------------------------- linear + bias

def bias_gemm_case(tokens: int, reps: int) -> dict:
    """The ViT's qkv projection [T, 1152] -> [T, 3456] with bias: matmul then add vs the bias in the GEMM."""
    dev, k, n = torch.device("cuda"), 1152, 3456

    def make():
        g = torch.Generator(dev).manual_seed(0)
        x = torch.randn(tokens, k, device=dev, dtype=torch.bfloat16, generator=g, requires_grad=True)
        w = (torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) * k ** -0.5).requires_grad_()
        b = torch.randn(n, device=dev, dtype=torch.bfloat16, generator=g, requires_grad=True)
        return x, w, b

    return run_case("qkv linear + bias [T,1152]", make,
                    {"matmul, then + bias": lambda x, w, b: x @ w.t() + b,
                     "addmm (bias in the GEMM)": lambda x, w, b: torch.addmm(b, x, w.t())}, reps)


# ----------------------------------------------------------------------------- bias gradients

def colsum_cases(tokens: int, reps: int) -> list:
    """Bias gradients: column sums of a bf16 [T, N] gradient, as megatron's linear (``sum(0)``) and the
    compiled bias-add backward compute them, against a GEMV with a ones vector (fp32 accumulate)."""
    compiled = torch.compile(lambda g: g.sum(0))
    out = []
    for n in (1152, 3456, 4304):
        g = torch.randn(tokens, n, device="cuda", dtype=torch.bfloat16)
        ones = torch.ones(tokens, device="cuda", dtype=torch.bfloat16)
        ref = g.float().sum(0)
        impls = {"sum(0) (linear backward)": lambda: g.sum(0), "compiled sum (bias-add backward)": lambda: compiled(g),
                 "GEMV g.t() @ ones": lambda: g.t() @ ones, "sum(0, fp32 out)": lambda: g.sum(0, dtype=torch.float32)}
        row = {"case": f"bias grad colsum [{tokens},{n}]", "gbytes": g.numel() * 2 / 1e9, "impls": {}}
        for label, fn in impls.items():
            res = fn().float()
            ms = time_ms(fn, reps)
            row["impls"][label] = {"ms": ms, "GB/s": row["gbytes"] / ms * 1e3,
                                   "max_rel_err": ((res - ref).abs().max() / ref.abs().max()).item(), "status": "ok"}
            print(f"{row['case']:28s} {label:34s} {ms:7.4f} ms  {row['gbytes'] / ms * 1e3:6.0f} GB/s", flush=True)
        out.append(row)
    return out


# ----------------------------------------------------------------------------- norms

def _seeded_leaves(*shapes) -> tuple:
    """bf16 CUDA tensors requiring grad, the same values on every call (candidates see equal inputs)."""
    g = torch.Generator("cuda").manual_seed(0)
    return tuple(torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
                 for s in shapes)


def layernorm_cases(tokens: int, reps: int) -> list:
    c = 1152

    def make():  # a, residual, bias, weight, LayerNorm bias
        return _seeded_leaves((tokens, c), (tokens, c), (c,), (c,), (c,))

    def ln(a, r, bias, w, b):
        return F.layer_norm(a, (c,), w, b, 1e-6)

    def add_ln(a, r, bias, w, b):
        x = a + bias + r
        return x, F.layer_norm(x, (c,), w, b, 1e-6)

    comp_ln = torch.compile(ln, dynamic=True)
    comp_add_ln = torch.compile(add_ln, dynamic=True)
    return [run_case("LayerNorm [T,1152]", make, {"native": ln, "compiled": comp_ln}, reps),
            run_case("bias+residual+LayerNorm", make, {"native": add_ln, "compiled (fused)": comp_add_ln}, reps)]


def rmsnorm_case(tokens: int, reps: int) -> dict:
    c = 1536

    def make():  # x, residual, weight
        return _seeded_leaves((tokens, c), (tokens, c), (c,))

    def rms(x, r, w):
        return F.rms_norm(x, (c,), w, 1e-6)

    def add_rms(x, r, w):
        y = x + r
        return y, F.rms_norm(y, (c,), w, 1e-6)

    return [run_case("RMSNorm [8K,1536]", make, {"native": rms, "compiled": torch.compile(rms, dynamic=True)}, reps),
            run_case("residual+RMSNorm", make,
                     {"native": add_rms, "compiled (fused)": torch.compile(add_rms, dynamic=True)}, reps)]


# ----------------------------------------------------------------------------- RoPE

def rope_case(tokens: int, reps: int) -> dict:
    from megatron_eagle.models.rope import rotate_cos_sin

    dev, d = torch.device("cuda"), 128
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2, device=dev, dtype=torch.float32) / d))
    pos = torch.arange(tokens, device=dev, dtype=torch.float32) % 2048
    emb = torch.outer(pos, inv)
    freqs = torch.cat((emb, emb), dim=-1)[:, None, None, :]  # [t, 1, 1, d] as megatron passes it

    def make():
        g = torch.Generator(dev).manual_seed(0)
        qkv = torch.randn(tokens, 1, 2, 8 * d, device=dev, dtype=torch.bfloat16, generator=g, requires_grad=True)
        return (qkv,)

    def qk(qkv):  # megatron's GQA split: per group [6 q heads | k | v]
        q, k, _ = torch.split(qkv, [6 * d, d, d], dim=-1)
        return q.reshape(tokens, 1, 12, d), k

    def rotate(t, f):  # cos/sin computed inside each call's kernel
        return rotate_cos_sin(t, torch.cos(f).to(t.dtype), torch.sin(f).to(t.dtype))

    comp = torch.compile(rotate, dynamic=True)

    def per_call(qkv):
        q, k = qk(qkv)
        return comp(q, freqs), comp(k, freqs)

    comp_cs = torch.compile(rotate_cos_sin, dynamic=True)
    cos, sin = freqs.cos().to(torch.bfloat16), freqs.sin().to(torch.bfloat16)

    def cached(qkv):
        q, k = qk(qkv)
        return comp_cs(q, cos, sin), comp_cs(k, cos, sin)

    return run_case("RoPE q+k [8K]", make, {"compiled, cos/sin per call": per_call,
                                             "compiled, cos/sin once per pack (model)": cached}, reps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=25)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cases", nargs="+", default=["bias", "attention", "layernorm", "rmsnorm", "rope", "colsum"],
                    choices=["bias", "attention", "layernorm", "rmsnorm", "rope", "colsum"])
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a GPU")
        return 2
    torch.manual_seed(0)
    res = {"date": datetime.date.today().isoformat(), "commit": git_commit(), "config": options(args),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "cudnn": torch.backends.cudnn.version(), "cases": []}
    run = {"bias": lambda: [bias_gemm_case(args.tiles * 1024, args.reps)],
           "attention": lambda: [vit_attention_case(args.tiles, args.reps)],
           "layernorm": lambda: layernorm_cases(args.tiles * 1024, args.reps),
           "rmsnorm": lambda: rmsnorm_case(8192, args.reps), "rope": lambda: [rope_case(8192, args.reps)],
           "colsum": lambda: colsum_cases(args.tiles * 1024, args.reps)}
    for name in args.cases:
        res["cases"] += run[name]()
    if args.out:
        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
