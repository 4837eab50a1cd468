#!/usr/bin/env python
"""GPU check of patches/wgrad_fusion.py: the fused fp32-accumulating weight-gradient GEMM against
a float64 reference, for fp32 and bf16 grad buffers (prints relative errors; exit 1 if off)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megatron_eagle.patches.wgrad_fusion import available, wgrad_gemm_accum_fp16, wgrad_gemm_accum_fp32  # noqa: E402


def main() -> int:
    dev = torch.device("cuda")
    print("available:", available(dev))
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(4099, 2, 1152, generator=g).to(dev, torch.bfloat16)
    dy = torch.randn(4099, 2, 4304, generator=g).to(dev, torch.bfloat16)
    base = torch.randn(4304, 1152, generator=g).to(dev)
    ref = base.double() + dy.reshape(-1, 4304).double().t() @ x.reshape(-1, 1152).double()
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
