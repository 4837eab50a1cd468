"""Context parallelism on 2 gloo processes: every variant equals CP=1 (forward and all gradients).

One spawn runs everything (process start-up dominates on CPU): attention-level checks of each
variant on awkward sub-sample lengths (1, not divisible by 2*cp, tail padding, GQA and head
counts that do not split evenly), then the whole Eagle model (ViT data-parallel inside the CP
group, routed embeddings, RoPE, loss reduction) against the single-rank model on three packs,
including one where a CP rank holds only padding and unsupervised tokens.
"""

from __future__ import annotations

import pytest
import torch


def test_variant_validation_names_the_fix():
    from megatron_eagle.config import ConfigError, ParallelConfig
    from megatron_eagle.config import ulysses_degree

    # Eagle 2.5's rule U = gcd(heads, cp) inside a node: Qwen2.5-7B (28 heads) cp=8 -> U4 x R2
    assert ulysses_degree(ParallelConfig(cp=8, cp_variant="hybrid"), 28, local_gpus=8) == 4
    assert ulysses_degree(ParallelConfig(cp=8, cp_variant="hybrid"), 12, local_gpus=8) == 4
    assert ulysses_degree(ParallelConfig(cp=8, tp=2, cp_variant="hybrid"), 12, local_gpus=8) == 2
    assert ulysses_degree(ParallelConfig(cp=4, cp_variant="ulysses"), 12) == 4
    assert ulysses_degree(ParallelConfig(cp=4, cp_variant="ring"), 12) == 1
    bad = [(dict(cp=8, cp_variant="ulysses"), 4, "cp_variant"),  # more ranks than heads
           (dict(cp=8, cp_variant="hybrid", cp_ulysses=3), 12, "cp_ulysses"),  # does not divide cp
           (dict(cp=4, cp_variant="ring", cp_ulysses=2), 12, "cp_ulysses")]  # only for hybrid
    for kw, heads, field in bad:
        with pytest.raises(ConfigError, match="Fix:") as e:
            ulysses_degree(ParallelConfig(**kw), heads)
        assert e.value.field == f"parallel.{field}"


def test_split_pads_per_subsample_and_for_sequence_parallel():
    from megatron_eagle.parallel.cp_split import padded_lengths, zigzag_positions

    assert padded_lengths(torch.tensor([1, 7, 8, 0]), cp=2, sp_tp=1).tolist() == [4, 8, 8]
    # local share 6+4 = 10 tokens is not a multiple of tp=8: a padding segment of 2*cp*3 makes it 16
    n = padded_lengths(torch.tensor([9, 5]), cp=2, sp_tp=8)
    assert n.tolist() == [12, 8, 12] and int(n.sum()) // 2 % 8 == 0
    cu = torch.tensor([0, 8, 12])
    assert zigzag_positions(cu, 2, 0).tolist() == [0, 1, 6, 7, 8, 11]
    assert zigzag_positions(cu, 2, 1).tolist() == [2, 3, 4, 5, 9, 10]


def test_vision_shares_and_routing():
    """Tiles split by count; every visual token goes to the owner of its slot, in slot order."""
    from megatron_eagle.parallel.vision_cp import route_counts, tile_shares

    assert tile_shares(5, 2) == [(0, 3), (3, 5)]
    assert tile_shares(1, 4) == [(0, 1), (1, 1), (1, 1), (1, 1)]
    dest = torch.tensor([0, 1, 1, 0, 1, 0])  # owner of slots 0..5, 2 tokens per tile, 3 tiles
    shares = tile_shares(3, 2)  # rank 0 encodes tiles 0-1 (slots 0-3), rank 1 tile 2 (slots 4-5)
    send, recv, order = route_counts(dest, shares, 2, rank=0)
    assert send == [2, 2] and recv == [2, 1] and order.tolist() == [0, 3, 1, 2]
    send, recv, order = route_counts(dest, shares, 2, rank=1)
    assert send == [1, 1] and recv == [2, 1] and order.tolist() == [1, 0]


def test_local_tiles_takes_a_whole_pack_or_exactly_this_ranks_share():
    from megatron_eagle.parallel.vision_cp import local_tiles, tile_shares

    pack = torch.arange(5.0).view(5, 1, 1, 1)
    shares = tile_shares(5, 2)
    assert local_tiles(pack, 5, shares[1]).flatten().tolist() == [3.0, 4.0]  # whole pack: sliced here
    assert local_tiles(pack, 5, shares[0], tile_offset=0).flatten().tolist() == [0.0, 1.0, 2.0]
    assert local_tiles(pack[3:], 5, shares[1], tile_offset=3).flatten().tolist() == [3.0, 4.0]  # pre-sliced
    assert local_tiles(pack[:0], 1, tile_shares(1, 2)[1], tile_offset=1).numel() == 0
    for pv, off, share in [(pack[3:], 2, shares[1]), (pack[3:], 3, shares[0]), (pack[:4], None, shares[0])]:
        with pytest.raises(ValueError, match="tiles"):
            local_tiles(pv, 5, share, tile_offset=off)
