"""Helpers for the context-parallel tests: awkward packs and attention-level CP-vs-reference runs."""

from __future__ import annotations

import torch

from megatron_eagle.batch import IGNORE_INDEX, PackedBatch, loss_weights_for

# sub-sample lengths: 1s, lengths not divisible by 2*cp, a long one, tail padding as its own segment
AWKWARD_LENGTHS = [1, 7, 13, 2, 30, 1, 5, 19]


def text_pack(lengths, vocab: int = 512, seed: int = 0, supervised_from: int = 0) -> PackedBatch:
    """A text-only pack; the first ``supervised_from`` sub-samples have no supervised token."""
    g = torch.Generator().manual_seed(seed)
    toks, labs, pos = [], [], []
    for i, n in enumerate(lengths):
        ids = torch.randint(10, vocab, (n,), generator=g)
        lab = torch.full((n,), IGNORE_INDEX)
        if i >= supervised_from and n > 1:
            lab[:-1] = ids[1:]
            lab[: n // 3] = IGNORE_INDEX
        toks.append(ids)
        labs.append(lab)
        pos.append(torch.arange(n))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    labels = torch.cat(labs)
    return PackedBatch(tokens=torch.cat(toks), labels=labels, loss_weights=loss_weights_for(labels, cu),
                       position_ids=torch.cat(pos), cu_seqlens=cu, pixel_values=torch.zeros(0, 3, 8, 8),
                       max_seqlen=max(lengths))


def reference_attention(q, k, v, cu, scale):
    """Independent reference: torch SDPA per sub-sample (autograd)."""
    from megatron_eagle.kernels.reference import segment_sdpa

    return segment_sdpa(q, k, v, cu, True, scale)


def attention_case(variant: str, cp: int, lengths, hq: int, hk: int, d: int = 8, seed: int = 0,
                   ulysses: int = 0, tp: int = 1) -> dict:
    """Run one CP attention variant on this rank and the reference; return max |diff| of out, dq, dk, dv
    (CP gradients summed over the CP group). Call inside a process group with CP == cp."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.kernels.dispatch import AttentionKernels
    from megatron_eagle.parallel.cp_attention import cp_attention
    from megatron_eagle.parallel.cp_split import split_batch
    from megatron_eagle.parallel.groups import build_cp_context

    par = ParallelConfig(tp=tp, cp=cp, cp_variant=variant, cp_ulysses=ulysses)
    ctx = build_cp_context(par, num_heads=hq * tp)
    batch = text_pack(lengths, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    T = batch.num_tokens
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (hq, hk, hk))
    w = torch.randn(T, hq, d, generator=g)
    scale = d ** -0.5
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out = reference_attention(*ref_in, batch.cu_seqlens, scale)
    (ref_out * w).sum().backward()

    layout = split_batch(batch, ctx)
    Tp = int(layout.cu_global[-1])

    def padded(x):  # original rows at their padded positions, random rows where padding was inserted
        out = torch.randn(Tp, *x.shape[1:], generator=g)
        out[layout.dst] = x
        return out

    leaves = [padded(x).requires_grad_() for x in (q, k, v)]
    wp = torch.zeros(Tp, hq, d)
    wp[layout.dst] = w
    loc = [x[layout.positions] for x in leaves]
    out = cp_attention(*loc, layout, scale, AttentionKernels())
    (out * wp[layout.positions]).sum().backward()
    full = layout.gather_full(out.detach())
    res = {"out": (full - ref_out.detach()).abs().max().item()}
    for name, leaf, ref in zip(("dq", "dk", "dv"), leaves, ref_in):
        grad = leaf.grad.clone()
        dist.all_reduce(grad, group=ps.get_context_parallel_group())
        res[name] = (grad[layout.dst] - ref.grad).abs().max().item()
        pad = torch.ones(Tp, dtype=torch.bool)
        pad[layout.dst] = False
        res[name + "_pad"] = grad[pad].abs().max().item() if bool(pad.any()) else 0.0
    res["scale"] = ref_out.detach().abs().max().item()
    return res


def awkward_mixed_pack(cfg, seed: int = 0, pad_to_multiple: int = 16) -> PackedBatch:
    """Images/frames and text with random lengths (1-token samples, lengths not divisible by 2*cp,
    a sample without supervision) and tail padding as its own segment."""
    from megatron_eagle.batch import pack_samples

    g = torch.Generator().manual_seed(seed)
    tpt, img, vocab = cfg.tokens_per_tile, cfg.image_token_id, cfg.llm.vocab_size
    rnd = lambda n: torch.randint(10, vocab, (n,), generator=g)  # noqa: E731
    samples, tiles = [], []
    for before, n_tiles, after, sup in [(3, 1, 6, 4), (1, 0, 0, 0), (2, 0, 9, 0), (1, 3, 2, 2), (5, 0, 1, 1),
                                        (2, 1, 11, 7)]:
        ids = torch.cat([rnd(before), torch.full((n_tiles * tpt,), img), rnd(after)])
        lab = torch.full_like(ids, IGNORE_INDEX)
        if sup:
            lab[-sup:] = ids[-sup:]
        samples.append((ids, lab))
        tiles.append(torch.randn(n_tiles, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g))
    shape = (3, cfg.vision.image_size, cfg.vision.image_size)
    return pack_samples(samples, tiles, shape, pad_to_multiple=pad_to_multiple)


def lopsided_pack(vocab: int = 512) -> PackedBatch:
    """Lengths [1, 2, 8]: with cp=2, rank 1 holds only padding, unsupervised tokens and
    nothing supervised (supervision sits in zigzag chunk 0 of the last sub-sample)."""
    b = text_pack([1, 2, 8], vocab=vocab, seed=3, supervised_from=3)
    labels = b.labels.clone()
    labels[1] = b.tokens[2]  # sample 2: token 0 -> token 1 (last token of a 2-token sample has none)
    labels[3] = b.tokens[4]  # sample 3, position 0 (chunk 0 of 4 with cp=2)
    labels[4] = b.tokens[5]
    b.labels = labels
    b.loss_weights = loss_weights_for(labels, b.cu_seqlens)
    return b


def one_tile_pack(cfg) -> PackedBatch:
    """One tile whose 16 visual slots all sit in zigzag chunk 0 at cp=2: rank 1 neither encodes
    a tile nor owns a slot, yet must take part in the routing all-to-all."""
    from megatron_eagle.batch import pack_samples

    g = torch.Generator().manual_seed(7)
    tpt = cfg.tokens_per_tile
    n_after = 3 * (tpt + 1) + tpt  # chunk size (tpt + 1) with cp=2: slots 1..tpt in chunk 0
    ids = torch.cat([torch.randint(10, 500, (1,), generator=g), torch.full((tpt,), cfg.image_token_id),
                     torch.randint(10, 500, (n_after - tpt,), generator=g)])
    lab = torch.full_like(ids, IGNORE_INDEX)
    lab[-5:] = ids[-5:]
    size = cfg.vision.image_size
    return pack_samples([(ids, lab)], [torch.randn(1, 3, size, size, generator=g)], (3, size, size))


def share_of(batch: PackedBatch, cfg, cp: int, rank: int):
    """``batch`` as the training loader hands it to CP rank ``rank``: a LoaderBatch carrying only that
    rank's contiguous tile share (``tile_offset``), token side unchanged."""
    import dataclasses

    from megatron_eagle.data.loading.pack_builder import LoaderBatch
    from megatron_eagle.parallel.vision_cp import tile_shares

    n = int(batch.pixel_values.shape[0])
    lo, hi = tile_shares(n, cp)[rank]
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    fields.update(pixel_values=batch.pixel_values[lo:hi].clone(), tile_offset=lo)
    starts = torch.nonzero(batch.tokens == cfg.image_token_id).squeeze(1)[::cfg.tokens_per_tile]
    return LoaderBatch(**fields, tile_positions=starts, sample_ids=torch.zeros(batch.cu_seqlens.numel() - 1, 2,
                                                                                dtype=torch.long),
                       pack_tiles=n)
