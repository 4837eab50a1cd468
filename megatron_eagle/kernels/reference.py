"""Exact packed (varlen) attention on any device: the reference and fallback of every kernel.

- :func:`segment_sdpa`: ``scaled_dot_product_attention`` on each sub-sample (memory O(max_len²) per
  segment at worst, never O(total²)); differentiable through autograd.
- :func:`ref_block_fwd` / :func:`ref_block_bwd`: one varlen *block* that also returns the log-sum-exp,
  the building block of context-parallel attention. Query segment i attends key segment i
  (``cu_q``/``cu_k`` boundaries), causal with the mask aligned bottom-right (query j of a segment
  with ``sq`` queries and ``sk`` keys sees keys ``<= j + sk - sq``), as flash-attention does. The
  backward takes the *final* output and log-sum-exp of each query row (after merging all blocks),
  so ring attention's per-step backward is exact.

Layouts: q ``[t, hq, d]``, k/v ``[t, hk, d]`` (GQA: ``hq % hk == 0``, query head h uses kv head
``h // (hq/hk)``), lse ``[hq, t]`` float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segment_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                 causal: bool, scale: float) -> torch.Tensor:
    """Exact packed attention: SDPA on each [start, end) segment. q/k/v are [t, h, d]."""
    gqa = q.shape[1] != k.shape[1]
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qs, ks, vs = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=scale, enable_gqa=gqa)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


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
