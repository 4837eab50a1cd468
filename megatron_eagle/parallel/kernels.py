"""Packed (varlen) attention blocks that return the log-sum-exp, forward and backward.

Every context-parallel variant is built from two calls:

- ``block_fwd(q, k, v, cu_q, cu_k, ...) -> (out, lse)``: query segment i attends key segment i
  (``cu_q``/``cu_k`` boundaries), causal with the mask aligned bottom-right (query j of a
  segment with ``sq`` queries and ``sk`` keys sees keys ``<= j + sk - sq``), as flash-attention does.
- ``block_bwd(dout, q, k, v, out, lse, ...) -> (dq, dk, dv)``: the gradient of one block given
  the *final* output and log-sum-exp of each query row (after merging all blocks), so ring
  attention's per-step backward is exact.

Layouts: q ``[t, hq, d]``, k/v ``[t, hk, d]`` (GQA: ``hq % hk == 0``, query head h uses kv head
``h // (hq/hk)``), lse ``[hq, t]`` float32. Kernels: on CUDA with fp16/bf16, torch's varlen
flash ops (``aten._flash_attention_forward/backward``); otherwise (CPU, fp32, or if the flash op
refuses the inputs) an exact reference that materialises one segment's scores at a time.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger("megatron_eagle.cp")
_FLASH_BROKEN: Optional[str] = None  # set once the flash op fails; the reference path is used after that


def _pairs(cu: torch.Tensor) -> list[tuple[int, int]]:
    b = cu.tolist()
    return list(zip(b[:-1], b[1:]))


def _expand_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    """[h, s, d] with hk heads -> hq heads (GQA repeat)."""
    return x if x.shape[0] == hq else x.repeat_interleave(hq // x.shape[0], dim=0)


def _fold_kv(x: torch.Tensor, hk: int) -> torch.Tensor:
    """Gradient [hq, s, d] -> [hk, s, d]: sum over the query heads sharing a kv head."""
    hq = x.shape[0]
    return x if hq == hk else x.reshape(hk, hq // hk, *x.shape[1:]).sum(1)


def _scores(qs: torch.Tensor, ks: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """[h, sq, d] x [h, sk, d] -> masked scores [h, sq, sk] (fp32)."""
    s = torch.matmul(qs, ks.transpose(1, 2)) * scale
    if causal:
        sq, sk = s.shape[1], s.shape[2]
        i = torch.arange(sq, device=s.device).unsqueeze(1)
        j = torch.arange(sk, device=s.device).unsqueeze(0)
        s = s.masked_fill(j > i + (sk - sq), float("-inf"))
    return s


def _segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor):
    """Per non-empty (query, key) segment pair: the row ranges and fp32 [h, s, d] q, k, v (kv heads
    repeated to the query heads)."""
    hq = q.shape[1]
    for (a, b), (c, e) in zip(_pairs(cu_q), _pairs(cu_k)):
        if b <= a or e <= c:
            continue
        yield (a, b, c, e, q[a:b].transpose(0, 1).float(), _expand_kv(k[c:e].transpose(0, 1).float(), hq),
               _expand_kv(v[c:e].transpose(0, 1).float(), hq))


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """softmax(s) from its log-sum-exp; rows without keys (lse -inf) give 0."""
    return torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse).unsqueeze(-1))


def ref_block_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                  causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact reference: fp32 output [t, hq, d] and lse [hq, t]; rows without keys get out 0, lse -inf."""
    tq, hq, d = q.shape
    out = q.new_zeros((tq, hq, v.shape[-1]), dtype=torch.float32)
    lse = q.new_full((hq, tq), float("-inf"), dtype=torch.float32)
    for a, b, c, e, qs, ks, vs in _segments(q, k, v, cu_q, cu_k):
        s = _scores(qs, ks, causal, scale)
        l = torch.logsumexp(s, dim=-1)  # [h, sq]
        p = _probs(s, l)
        out[a:b] = torch.matmul(p, vs).transpose(0, 1)
        lse[:, a:b] = l
    return out, lse


def ref_block_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact reference backward (fp32 grads), using the given (merged) ``out`` and ``lse``."""
    hk = k.shape[1]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for a, b, c, e, qs, ks, vs in _segments(q, k, v, cu_q, cu_k):
        do = dout[a:b].transpose(0, 1).float()
        o = out[a:b].transpose(0, 1).float()
        p = _probs(_scores(qs, ks, causal, scale), lse[:, a:b])
        dv[c:e] += _fold_kv(torch.matmul(p.transpose(1, 2), do), hk).transpose(0, 1)
        dp = torch.matmul(do, vs.transpose(1, 2))
        ds = p * (dp - (do * o).sum(-1, keepdim=True))
        dq[a:b] += (torch.matmul(ds, ks) * scale).transpose(0, 1)
        dk[c:e] += _fold_kv(torch.matmul(ds.transpose(1, 2), qs) * scale, hk).transpose(0, 1)
    return dq, dk, dv


# ----------------------------------------------------------------------------- GPU flash path

def _flash_ok(q: torch.Tensor, backend: str) -> bool:
    return (backend in ("auto", "flash") and _FLASH_BROKEN is None and q.is_cuda
            and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)


def _disable_flash(err: Exception) -> None:
    global _FLASH_BROKEN
    _FLASH_BROKEN = f"{type(err).__name__}: {err}"
    log.warning("cp attention: flash kernel unavailable (%s); using the exact reference path", _FLASH_BROKEN)


_FLASH_USED = False


def flash_status() -> str:
    """Which kernel path the CP blocks took in this process: "flash", "reference", or why not flash."""
    if _FLASH_BROKEN is not None:
        return f"reference (flash failed: {_FLASH_BROKEN})"
    return "flash" if _FLASH_USED else "reference"


_RNG: dict = {}  # device -> the (rng_state, unused) placeholders the forward returned (dropout 0: never read)


def _flash_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    out, lse, rng, unused, _ = torch.ops.aten._flash_attention_forward(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_q.to(torch.int32), cu_k.to(torch.int32),
        max(int(max_q), 1), max(int(max_k), 1), 0.0, causal, False, scale=scale)
    if lse.dim() != 2 or lse.shape[1] != q.shape[0]:  # older layouts pad lse per batch row
        raise RuntimeError(f"unexpected flash lse shape {tuple(lse.shape)}")
    _RNG.setdefault(q.device, (rng, unused))
    return out, lse


def _flash_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
    rng, unused = _RNG.get(q.device) or (torch.zeros(2, dtype=torch.int64, device=q.device),
                                         torch.zeros((), dtype=torch.int64, device=q.device))
    dq, dk, dv = torch.ops.aten._flash_attention_backward(
        dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous(),
        cu_q.to(torch.int32), cu_k.to(torch.int32), max(int(max_q), 1), max(int(max_k), 1), 0.0, causal,
        rng, unused, scale=scale)
    return dq, dk, dv


# ----------------------------------------------------------------------------- dispatch

def block_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
              max_q: int, max_k: int, causal: bool, scale: float,
              backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(out [t, hq, d], lse [hq, t] fp32) of one varlen block; see the module docstring."""
    global _FLASH_USED
    if q.shape[0] == 0 or k.shape[0] == 0:
        return (q.new_zeros((q.shape[0], q.shape[1], v.shape[-1])),
                q.new_full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32))
    if _flash_ok(q, backend):
        try:
            out, lse = _flash_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale)
            _FLASH_USED = True
            return out, lse.float()
        except Exception as e:  # noqa: BLE001 - any refusal: fall back to the exact path
            _disable_flash(e)
    return ref_block_fwd(q, k, v, cu_q, cu_k, causal, scale)


def block_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int, causal: bool,
              scale: float, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of one block given the merged ``out``/``lse`` of its query rows."""
    if q.shape[0] == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if _flash_ok(q, backend):
        try:
            return _flash_bwd(dout.to(q.dtype), q, k, v, out.to(q.dtype), lse, cu_q, cu_k, max_q, max_k,
                              causal, scale)
        except Exception as e:  # noqa: BLE001
            _disable_flash(e)
    return ref_block_bwd(dout, q, k, v, out, lse, cu_q, cu_k, causal, scale)


def merge_into(out: torch.Tensor, lse: torch.Tensor, blk_out: torch.Tensor, blk_lse: torch.Tensor,
               rows: Optional[torch.Tensor] = None) -> None:
    """Online-softmax merge of a block's (out, lse) into fp32 accumulators, in place.

    ``rows`` selects the accumulator rows the block covers (None: all). Rows whose two lse are
    both -inf stay 0 / -inf (no NaN)."""
    o_acc = out if rows is None else out.index_select(0, rows)
    l_acc = lse if rows is None else lse.index_select(1, rows)
    new = torch.logaddexp(l_acc, blk_lse)
    finite = torch.isfinite(new)
    safe = torch.where(finite, new, torch.zeros_like(new))
    a = torch.where(finite, torch.exp(l_acc - safe), torch.zeros_like(new)).t().unsqueeze(-1)
    b = torch.where(finite, torch.exp(blk_lse - safe), torch.zeros_like(new)).t().unsqueeze(-1)
    merged = o_acc * a + blk_out.float() * b
    if rows is None:
        out.copy_(merged)
        lse.copy_(new)
    else:
        out.index_copy_(0, rows, merged)
        lse.index_copy_(1, rows, new)


class VarlenAttention(torch.autograd.Function):
    """Packed causal/bidirectional attention (no CP) with an exact backward through the blocks."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float, backend: str):
        out, lse = block_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale, backend = ctx.args
        dq, dk, dv = block_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, backend)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int, causal: bool, scale: float, backend: str = "auto") -> torch.Tensor:
    return VarlenAttention.apply(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, backend)
