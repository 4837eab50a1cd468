"""LayerNorm with a one-pass backward: a Triton kernel on GPUs, the same math in torch elsewhere.

torch's native LayerNorm backward runs two kernels over the activations: one for the input
gradient and one (``GammaBetaBackward``) for the weight and bias gradients. For the ViT's 55
LayerNorms over [25K, 1152] at 8K packs that is 10.2 ms of an H100 step, about 3x what reading
x and dy once and writing dx once costs (BENCHMARKS.md, fourth session). The kernel below does it
in one pass: each program walks a run of row tiles, writes dx, and keeps partial column sums of
dy·x̂ and dy in registers; the partials ([programs, N] fp32, a few MB) are summed by torch.

The forward stays torch's ``native_layer_norm`` (it returns the per-row mean and 1/std the
backward needs). Where Triton is missing (CPU, the default CPU wheels), for shapes the kernel
does not take, or if the kernel disagrees with the torch math when first used on a device (one
warning), the torch path runs. ``FastLayerNorm`` is an ``nn.LayerNorm``: same parameters and
state dict.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

try:  # GPU builds of torch ship Triton; CPU wheels do not
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None

ENABLED = True  # benchmarks switch the kernel off to measure against torch's backward
MAX_N = 8192  # one row of the widest tile must fit the registers of one program
_checked: dict = {}  # device index -> whether the kernel agreed with the torch math there


if triton is not None:
    @triton.jit
    def _ln_bwd_kernel(DY, X, W, Mean, Rstd, DX, PartDW, PartDB, M, N, tiles_per_prog,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_N)
        cmask = cols < N
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        db = tl.zeros([BLOCK_N], dtype=tl.float32)
        for i in range(tiles_per_prog):
            rows = (pid * tiles_per_prog + i) * BLOCK_M + tl.arange(0, BLOCK_M)
            rmask = rows < M
            mask = rmask[:, None] & cmask[None, :]
            offs = rows[:, None].to(tl.int64) * N + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(Mean + rows, mask=rmask, other=0.0)
            rstd = tl.load(Rstd + rows, mask=rmask, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            wdy = dy * w[None, :]
            c1 = tl.sum(xhat * wdy, axis=1) / N
            c2 = tl.sum(wdy, axis=1) / N
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
        tl.store(PartDW + pid * N + cols, dw, mask=cmask)
        tl.store(PartDB + pid * N + cols, db, mask=cmask)


def backward_torch(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db) of LayerNorm in fp32 torch ops: the kernel's math, row by row; x/dy [M, N]."""
    xf, dyf = x.float(), dy.float()
    xhat = (xf - mean.reshape(-1, 1)) * rstd.reshape(-1, 1)
    wdy = dyf * w.float()
    c1 = (xhat * wdy).mean(dim=1, keepdim=True)
    c2 = wdy.mean(dim=1, keepdim=True)
    dx = (wdy - (xhat * c1 + c2)) * rstd.reshape(-1, 1)
    return dx.to(x.dtype), (dyf * xhat).sum(0).to(w.dtype), dyf.sum(0).to(w.dtype)


def backward_triton(dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same on the GPU in one kernel pass (plus a small sum over the per-program partials)."""
    m, n = x.shape
    block_n = triton.next_power_of_2(n)
    block_m = max(1, min(16, 8192 // block_n))
    tiles = triton.cdiv(m, block_m)
    progs = max(1, min(tiles, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count))
    per_prog = triton.cdiv(tiles, progs)
    progs = triton.cdiv(tiles, per_prog)
    dx = torch.empty_like(x)
    part_dw = torch.empty(progs, n, dtype=torch.float32, device=x.device)
    part_db = torch.empty(progs, n, dtype=torch.float32, device=x.device)
    _ln_bwd_kernel[(progs,)](dy, x, w, mean, rstd, dx, part_dw, part_db, m, n, per_prog,
                             BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_n >= 2048 else 4)
    return dx, part_dw.sum(0).to(w.dtype), part_db.sum(0).to(w.dtype)


def kernel_agrees(device: torch.device) -> bool:
    """Run the kernel once on this device against :func:`backward_torch` (odd sizes, bf16); warn
    and return False if it fails or disagrees, so LayerNorm keeps torch's backward."""
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _checked:
        return _checked[idx]
    ok, why = False, ""
    try:
        g = torch.Generator(device).manual_seed(0)
        m, n = 301, 1152
        x = torch.randn(m, n, device=device, generator=g).to(torch.bfloat16)
        dy = torch.randn(m, n, device=device, generator=g).to(torch.bfloat16)
        w = (1 + 0.1 * torch.randn(n, device=device, generator=g)).to(torch.bfloat16)
        _, mean, rstd = torch.native_layer_norm(x, (n,), w, None, 1e-6)
        got, want = backward_triton(dy, x, w, mean, rstd), backward_torch(dy, x, w, mean, rstd)
        errs = [float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)) for a, b in zip(got, want)]
        ok = all(e < 2e-2 for e in errs)
        why = f"relative errors {errs}"
    except Exception as e:  # noqa: BLE001 - any failure means: use torch's backward
        why = f"{type(e).__name__}: {e}"
    if not ok:
        warnings.warn(f"Triton LayerNorm backward disabled on {device} ({why}); using torch's")
    _checked[idx] = ok
    return ok


def _use_kernel(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> bool:
    return (ENABLED and triton is not None and x.is_cuda and weight is not None and bias is not None
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and x.shape[-1] <= MAX_N
            and kernel_agrees(x.device))


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, use_triton):
        n = x.shape[-1]
        x2 = x.reshape(-1, n).contiguous()
        out, mean, rstd = torch.native_layer_norm(x2, (n,), weight, bias, eps)
        ctx.save_for_backward(x2, weight, mean, rstd)
        ctx.shape, ctx.use_triton = x.shape, use_triton
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        fn = backward_triton if ctx.use_triton else backward_torch
        dx, dw, db = fn(dy.reshape(x2.shape).contiguous(), x2, weight, mean, rstd)
        return dx.view(ctx.shape), dw, db, None, None


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               use_triton: Optional[bool] = None) -> torch.Tensor:
    """LayerNorm over the last dim with the one-pass backward (``use_triton`` None: where it runs)."""
    if use_triton is None:
        use_triton = _use_kernel(x, weight, bias)
    return _LayerNormFn.apply(x, weight, bias, eps, use_triton)


class FastLayerNorm(torch.nn.LayerNorm):
    """``nn.LayerNorm`` whose backward is the one-pass kernel on GPUs (torch's own elsewhere)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) == 1 and _use_kernel(x, self.weight, self.bias):
            return layer_norm(x, self.weight, self.bias, self.eps, use_triton=True)
        return super().forward(x)
