#!/usr/bin/env python
"""GPU check of patches/wgrad_fusion.py: the fused fp32-accumulating weight-gradient GEMM against
a float64 reference, for fp32 and bf16 grad buffers (prints relative errors; exit 1 if off).
On a CPU it checks the unfused fallback.

    python benchmarks/check_wgrad_fusion.py                                  # GPU
    python benchmarks/check_wgrad_fusion.py --device cpu --shape 257 64 96   # CPU smoke test
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_eagle.patches.wgrad_fusion import available, wgrad_gemm_accum_fp16, wgrad_gemm_accum_fp32  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", type=int, nargs=3, default=[4099, 1152, 4304], metavar=("TOKENS", "IN", "OUT"),
                    help="tokens per micro-batch (2 micro-batches), input and output features")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    t, d_in, d_out = args.shape
    print("available:", available(dev))
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(t, 2, d_in, generator=g).to(dev, torch.bfloat16)
    dy = torch.randn(t, 2, d_out, generator=g).to(dev, torch.bfloat16)
    base = torch.randn(d_out, d_in, generator=g).to(dev)
    ref = base.double() + dy.reshape(-1, d_out).double().t() @ x.reshape(-1, d_in).double()
    ok = True
    for name, fn, buf, tol in (("fp32", wgrad_gemm_accum_fp32, base.clone(), 1e-4),
                               ("bf16", wgrad_gemm_accum_fp16, base.clone().bfloat16(), 1e-2)):
        fn(x, dy, buf)
        rel = float((buf.double() - ref).norm() / ref.norm())
        ok = ok and rel < tol
        print(f"{name}: relative error {rel:.2e} (limit {tol:.0e})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
