"""FlashAttention-2 varlen kernels (GPU, fp16/bf16) through torch's aten ops.

:class:`FlashVarlen` holds the kernel's health in this process (whether it ran, or why it failed)
and serves both callers of the same op:

- :meth:`FlashVarlen.packed`: packed attention within sub-samples, differentiable through aten's
  own backward, with GQA inside the kernel (no repeated K/V heads); ``torch.nn.attention.varlen``
  as a fallback (its keywords differ across torch versions). None where no flash kernel runs.
- :meth:`FlashVarlen.block_forward` / :meth:`FlashVarlen.block_backward`: one block with its
  log-sum-exp, for context-parallel attention (layouts of :mod:`.reference`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Optional

import torch

try:  # torch >= 2.9 (signature differs across versions: feature-detect at call time)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except Exception:  # pragma: no cover
    _varlen_attn = None

log = logging.getLogger("megatron_eagle.attention")


def _flash_device(t: torch.Tensor) -> bool:
    return t.is_cuda


def _aten_forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale):
    """aten's varlen forward: (out [t, hq, d], lse [hq, t], rng state, unused, debug mask)."""
    return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False,
                                                   scale=scale)


class FlashVarlen:
    """FA2 varlen attention and its state: ``used`` once it ran, ``error`` once it refused."""

    def __init__(self):
        self.used = False
        self.error: Optional[str] = None
        self._rng: dict = {}  # device -> the (rng_state, unused) placeholders a forward returned (dropout 0)

    def status(self) -> str:
        """Which path flash calls took: "flash", "reference", or why not flash."""
        if self.error is not None:
            return f"reference (flash failed: {self.error})"
        return "flash" if self.used else "reference"

    # ------------------------------------------------------------------ packed, differentiable
    def packed(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
               max_seqlen: int, causal: bool, scale: float) -> Optional[torch.Tensor]:
        """Packed flash attention [t, hq, d]; None when no flash kernel takes these inputs."""
        if not _flash_device(q) or q.dtype not in (torch.float16, torch.bfloat16):
            return None
        cu = cu_seqlens.to(torch.int32)
        if self.error is None:
            try:
                out = _aten_forward(q, k, v, cu, cu, max_seqlen, max_seqlen, causal, scale)[0]
                self.used = True
                return out
            except torch.OutOfMemoryError:
                raise
            except (AttributeError, RuntimeError, TypeError) as e:  # op missing or refusing these inputs
                if self.used:
                    raise
                self.error = f"{type(e).__name__}: {e}"
                warnings.warn(f"aten flash varlen attention unavailable ({e}); using torch.nn.attention.varlen")
        if _varlen_attn is None:
            return None
        if q.shape[1] != k.shape[1]:  # not every torch version takes enable_gqa: expand kv heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        try:
            return _varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, scale=scale,
                                window_size=(-1, 0) if causal else (-1, -1))
        except TypeError:  # is_causal keyword instead of window_size
            return _varlen_attn(q, k, v, cu, cu, max_seqlen, max_seqlen, is_causal=causal, scale=scale)

    # ------------------------------------------------------------------ blocks with log-sum-exp
    def takes_blocks(self, q: torch.Tensor) -> bool:
        """Whether the block kernels may run on ``q`` (else the exact reference runs)."""
        return (self.error is None and _flash_device(q) and q.dtype in (torch.float16, torch.bfloat16)
                and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256)

    def refused(self, err: Exception) -> None:
        """Record that the block kernel failed: the exact reference runs from now on."""
        self.error = f"{type(err).__name__}: {err}"
        log.warning("cp attention: flash kernel unavailable (%s); using the exact reference path", self.error)

    def block_forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale) -> tuple[torch.Tensor, torch.Tensor]:
        out, lse, rng, unused, _ = _aten_forward(q.contiguous(), k.contiguous(), v.contiguous(), cu_q.to(torch.int32),
                                                 cu_k.to(torch.int32), max(int(max_q), 1), max(int(max_k), 1),
                                                 causal, scale)
        if lse.dim() != 2 or lse.shape[1] != q.shape[0]:  # older layouts pad lse per batch row
            raise RuntimeError(f"unexpected flash lse shape {tuple(lse.shape)}")
        self._rng.setdefault(q.device, (rng, unused))
        self.used = True
        return out, lse.float()

    def block_backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale):
        rng, unused = self._rng.get(q.device) or (torch.zeros(2, dtype=torch.int64, device=q.device),
                                                  torch.zeros((), dtype=torch.int64, device=q.device))
        return torch.ops.aten._flash_attention_backward(
            dout.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), lse.contiguous(),
            cu_q.to(torch.int32), cu_k.to(torch.int32), max(int(max_q), 1), max(int(max_k), 1), 0.0, causal,
            rng, unused, scale=scale)
