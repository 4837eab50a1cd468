"""Context-parallel attention on zigzag-split packed (THD) sequences, exact forward and backward.

Input: this rank's q ``[t, hq, d]``, k/v ``[t, hk, d]`` in the local layout of
:mod:`.cp_split` (per sub-sample: zigzag chunk r then chunk 2P−1−r), RoPE already applied.
Output: ``[t, hq, d]``, equal to un-split packed causal attention on those rows.

- **ring** (zigzag, P2P): K/V travel around the ring; step 0 is local causal attention, and at
  step s with K/V from rank ``src``: if ``src < r`` every local query sees the *front* halves of
  src's chunks, else only the local *back* halves see all of src's K/V (no masks needed). Blocks
  merge by log-sum-exp; the next K/V transfer runs while the current block computes. Backward
  re-circulates K/V and sends the dK/dV accumulators one hop behind, home after P steps.
- **allgather** (Llama 3 style): all-gather K/V; each local chunk attends the prefix of its
  sub-sample ending at the chunk (causal, bottom-right aligned). Backward reduce-scatters dK/dV.
- **ulysses**: all-to-all from [local tokens, all heads] to [the group's tokens, a share of the
  heads] (uneven head counts and GQA kv heads handled: kv heads a rank's query heads need are
  sent to it, duplicated if shared), full causal varlen attention, all-to-all back.
- **hybrid**: Ulysses inside groups of U ranks, then ring over the R groups: the U ranks'
  tokens form exactly the zigzag chunks (ρ, 2R−1−ρ) of a 2R-split, so the ring runs unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_eagle.kernels.dispatch import AttentionKernels
from megatron_eagle.parallel.comm import RingExchange, all_gather_rows, all_to_all_rows, reduce_scatter_rows
from megatron_eagle.parallel.cp_split import CPLayout, ranges


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


# ----------------------------------------------------------------------------- ring

@dataclass
class RingPlan:
    cu: torch.Tensor  # int32: ring-local boundaries (each sub-sample: front half, back half)
    cu_half: torch.Tensor
    max: int
    max_half: int
    front: torch.Tensor  # local rows of the front halves
    back: torch.Tensor  # local rows of the back halves


def ring_plan(cu_ring: torch.Tensor) -> RingPlan:
    cu = cu_ring.long()
    half = (cu[1:] - cu[:-1]) // 2
    mx = int((cu[1:] - cu[:-1]).max()) if len(half) else 0
    return RingPlan(cu=cu.to(torch.int32), cu_half=(cu // 2).to(torch.int32), max=mx, max_half=mx // 2,
                    front=ranges(cu[:-1], half), back=ranges(cu[:-1] + half, half))


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, group, ranks: list, rank: int, scale: float,
                kernels: AttentionKernels):
        n = len(ranks)
        p = plan
        out = torch.zeros(q.shape[:2] + v.shape[-1:], dtype=torch.float32, device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        comm = RingExchange(group, ranks, rank, tag=1)
        kv = torch.stack([k, v])
        for step in range(n):
            nxt = comm.start(kv) if step < n - 1 else None  # overlaps with this step's block
            src = (rank - step) % n
            kk, vv = kv[0], kv[1]
            if step == 0:
                o, l = kernels.block_forward(q, kk, vv, p.cu, p.cu, p.max, p.max, True, scale)
                merge_into(out, lse, o, l)
            elif src < rank:
                o, l = kernels.block_forward(q, kk[p.front], vv[p.front], p.cu, p.cu_half, p.max, p.max_half, False,
                                             scale)
                merge_into(out, lse, o, l)
            else:
                o, l = kernels.block_forward(q[p.back], kk, vv, p.cu_half, p.cu, p.max_half, p.max, False, scale)
                merge_into(out, lse, o, l, rows=p.back)
            if nxt is not None:
                comm.wait()
                kv = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (plan, group, ranks, rank, scale, kernels)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        p, group, ranks, rank, scale, kernels = ctx.args
        n = len(ranks)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv_comm = RingExchange(group, ranks, rank, tag=2)
        dkv_comm = RingExchange(group, ranks, rank, tag=3)
        kv = torch.stack([k, v])
        dkv_in = None
        for step in range(n):
            nxt = kv_comm.start(kv) if step < n - 1 else None
            src = (rank - step) % n
            kk, vv = kv[0], kv[1]
            if step == 0:
                dq_, dk_, dv_ = kernels.block_backward(dout, q, kk, vv, out, lse, p.cu, p.cu, p.max, p.max, True,
                                                       scale)
                dq += dq_
                blk = torch.stack([dk_, dv_]).float()
            elif src < rank:
                dq_, dk_, dv_ = kernels.block_backward(dout, q, kk[p.front], vv[p.front], out, lse, p.cu, p.cu_half,
                                                       p.max, p.max_half, False, scale)
                dq += dq_
                blk = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
                blk[:, p.front] = torch.stack([dk_, dv_]).float()
            else:
                b = p.back
                dq_, dk_, dv_ = kernels.block_backward(dout[b], q[b], kk, vv, out[b], lse[:, b], p.cu_half, p.cu,
                                                       p.max_half, p.max, False, scale)
                dq.index_add_(0, b, dq_.float())
                blk = torch.stack([dk_, dv_]).float()
            if dkv_in is not None:  # the accumulator for src's K/V, from the ranks that held it before
                dkv_comm.wait()
                blk = blk + dkv_in
            if nxt is not None:
                kv_comm.wait()
                kv = nxt
            dkv_in = dkv_comm.start(blk)
        dkv_comm.wait()  # after n hops each accumulator is back with the rank owning the K/V
        return dq.to(q.dtype), dkv_in[0].to(k.dtype), dkv_in[1].to(v.dtype), None, None, None, None, None, None


def ring_attention(q, k, v, plan: RingPlan, group, ranks: list, rank: int, scale: float,
                   kernels: AttentionKernels) -> torch.Tensor:
    if len(ranks) == 1:
        return kernels.varlen(q, k, v, plan.cu, plan.cu, plan.max, plan.max, True, scale)
    return _RingAttention.apply(q, k, v, plan, group, ranks, rank, scale, kernels)


# ----------------------------------------------------------------------------- all-gather KV

@dataclass
class GatherPlan:
    cu_q: torch.Tensor  # int32: every local chunk is its own query segment
    cu_k: torch.Tensor  # int32: its key segment = the sub-sample's prefix ending with the chunk
    kv_rows: torch.Tensor  # rows of the gathered (rank-major) K/V forming those prefixes
    max_q: int
    max_k: int


def gather_plan(layout: CPLayout) -> GatherPlan:
    P, r = layout.cp, layout.ctx.rank
    cu = layout.cu_global.long()
    c = (cu[1:] - cu[:-1]) // (2 * P)
    own, idx = layout.owner()
    row_of = own * layout.num_local + idx  # padded global position -> row of the gathered tensor
    chunk = torch.stack([c, c], 1).flatten()
    cu_q = torch.zeros(len(chunk) + 1, dtype=torch.long, device=cu.device)
    cu_q[1:] = torch.cumsum(chunk, 0)
    prefix = torch.stack([(r + 1) * c, (2 * P - r) * c], 1).flatten()
    starts = torch.stack([cu[:-1], cu[:-1]], 1).flatten()
    cu_k = torch.zeros_like(cu_q)
    cu_k[1:] = torch.cumsum(prefix, 0)
    return GatherPlan(cu_q.to(torch.int32), cu_k.to(torch.int32), row_of[ranges(starts, prefix)],
                      int(chunk.max()) if len(chunk) else 0, int(prefix.max()) if len(prefix) else 0)


class _AllGatherKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: GatherPlan, group, scale: float, kernels: AttentionKernels):
        every = all_gather_rows(torch.stack([k, v], 1), group)  # [P*t, 2, hk, d]
        sel = every.index_select(0, plan.kv_rows)
        o, lse = kernels.block_forward(q, sel[:, 0], sel[:, 1], plan.cu_q, plan.cu_k, plan.max_q, plan.max_k, True,
                                       scale)
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)  # gathered K/V is re-gathered in backward, not kept
        ctx.args = (plan, group, scale, kernels)
        return o

    @staticmethod
    def backward(ctx, dout):
        q, k, v, o, lse = ctx.saved_tensors
        plan, group, scale, kernels = ctx.args
        every = all_gather_rows(torch.stack([k, v], 1), group)
        sel = every.index_select(0, plan.kv_rows)
        dq, dks, dvs = kernels.block_backward(dout, q, sel[:, 0], sel[:, 1], o, lse, plan.cu_q, plan.cu_k,
                                              plan.max_q, plan.max_k, True, scale)
        d_every = torch.zeros(every.shape, dtype=torch.float32, device=q.device)
        d_every.index_add_(0, plan.kv_rows, torch.stack([dks, dvs], 1).float())
        d_local = reduce_scatter_rows(d_every, group)
        return dq.to(q.dtype), d_local[:, 0].to(k.dtype), d_local[:, 1].to(v.dtype), None, None, None, None


# ----------------------------------------------------------------------------- Ulysses (+ ring)

@dataclass
class UlyssesPlan:
    q_heads: list[tuple[int, int]]  # query heads [a, b) computed by each rank of the Ulysses group
    kv_heads: list[tuple[int, int]]  # kv heads [a, b) those query heads use
    kv_expand: Optional[torch.Tensor]  # per local query head, its kv head, when not a uniform GQA group
    perm: torch.Tensor  # gathered (rank-major) rows -> ascending global positions
    inv: torch.Tensor


def ulysses_plan(layout: CPLayout, hq: int, hk: int) -> UlyssesPlan:
    ctx = layout.ctx
    U, u = ctx.ulysses, ctx.intra_rank
    if hq < U:
        raise ValueError(f"Ulysses over {U} ranks needs at least {U} query heads per TP rank, got {hq}")
    rep = hq // hk
    sizes = [hq // U + (1 if j < hq % U else 0) for j in range(U)]
    q_heads, a = [], 0
    for s in sizes:
        q_heads.append((a, a + s))
        a += s
    kv_heads = [(a // rep, (b - 1) // rep + 1) for a, b in q_heads]
    (qa, qb), (ka, kb) = q_heads[u], kv_heads[u]
    need = torch.tensor([h // rep - ka for h in range(qa, qb)])
    nq, nk = qb - qa, kb - ka
    uniform = nq % nk == 0 and torch.equal(need, torch.arange(nk).repeat_interleave(nq // nk))
    base = ctx.rank - u  # CP rank of the group's first member
    gathered = torch.cat([layout.positions_of(base + j) for j in range(U)])
    perm = torch.argsort(gathered)
    return UlyssesPlan(q_heads, kv_heads, None if uniform else need.to(gathered.device), perm, torch.argsort(perm))


def _heads_to_seq(x: torch.Tensor, heads: list[tuple[int, int]], u: int, group) -> torch.Tensor:
    """[t, h, d] local tokens, all heads -> [U*t, h_u, d]: every rank's tokens (rank-major), heads of rank u."""
    t, d = x.shape[0], x.shape[-1]
    send = torch.cat([x[:, a:b].reshape(-1) for a, b in heads])
    counts = [t * (b - a) * d for a, b in heads]
    n_u = heads[u][1] - heads[u][0]
    got = all_to_all_rows(send, counts, [t * n_u * d] * len(heads), group)
    return got.view(len(heads) * t, n_u, d)


def _seq_to_heads(y: torch.Tensor, heads: list[tuple[int, int]], u: int, group) -> torch.Tensor:
    """Inverse of :func:`_heads_to_seq`: [U*t, h_u, d] -> [t, h, d]."""
    U = len(heads)
    t, n_u, d = y.shape[0] // U, y.shape[1], y.shape[2]
    got = all_to_all_rows(y.reshape(-1), [t * n_u * d] * U, [t * (b - a) * d for a, b in heads], group)
    parts = torch.split(got, [t * (b - a) * d for a, b in heads])
    return torch.cat([p.view(t, b - a, d) for p, (a, b) in zip(parts, heads)], dim=1)


def ulysses_attention(q, k, v, layout: CPLayout, scale: float, kernels: AttentionKernels) -> torch.Tensor:
    ctx = layout.ctx
    hq, hk = q.shape[1], k.shape[1]
    plan: UlyssesPlan = layout.cached(("ulysses", hq, hk), lambda: ulysses_plan(layout, hq, hk))
    u, g = ctx.intra_rank, ctx.intra_group
    qg = _heads_to_seq(q, plan.q_heads, u, g).index_select(0, plan.perm)
    kg = _heads_to_seq(k, plan.kv_heads, u, g).index_select(0, plan.perm)
    vg = _heads_to_seq(v, plan.kv_heads, u, g).index_select(0, plan.perm)
    if plan.kv_expand is not None:
        kg, vg = kg.index_select(1, plan.kv_expand), vg.index_select(1, plan.kv_expand)
    R = ctx.ring
    rp: RingPlan = layout.cached(("ring", R), lambda: ring_plan(layout.cu_global.long() // R))
    o = ring_attention(qg, kg, vg, rp, ctx.inter_group, ctx.inter_ranks or [0], ctx.inter_rank, scale, kernels)
    return _seq_to_heads(o.index_select(0, plan.inv), plan.q_heads, u, g)


# ----------------------------------------------------------------------------- dispatch

def cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: CPLayout, scale: float,
                 kernels: AttentionKernels) -> torch.Tensor:
    """Causal packed attention of this rank's rows over the whole (CP-split) pack, on ``kernels``' blocks."""
    ctx = layout.ctx
    if ctx.variant == "allgather":
        plan = layout.cached("gather", lambda: gather_plan(layout))
        return _AllGatherKV.apply(q, k, v, plan, ctx.group, scale, kernels)
    if ctx.ulysses == 1:
        plan = layout.cached(("ring", ctx.size), lambda: ring_plan(layout.cu_local.long()))
        return ring_attention(q, k, v, plan, ctx.group, ctx.ranks, ctx.rank, scale, kernels)
    return ulysses_attention(q, k, v, layout, scale, kernels)
