"""The resumable loader on a really prepared dataset: coverage, pack limits, exact resume with any
worker count, epochs, bad data, fsspec URLs, CP/SP padding, CP tile shares (each CP rank decodes only
its share; the replica agrees on bad sub-samples), TP broadcast and a tiny model forward."""

from __future__ import annotations

import logging
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from megatron_eagle.config import ConfigError, preset_model_config
from megatron_eagle.data.loading.loader import StageLoader, needs_data, needs_media
from megatron_eagle.data.loading.pack_builder import check_batch
from megatron_eagle.data.shards import load_index
from tests.loader_fixtures import (L, corrupt_member, data, loader, reference, same_batch, same_stream,  # noqa: F401
                                   stream, write_curriculum)


def test_every_sample_at_most_once_packs_fit_and_only_assistant_tokens_supervised(data, reference):
    ld = loader(data)
    plan = ld.epoch_plan(0)
    assert ld.dp_size == 2 and ld.micro_batches == 2 and ld.total_steps == plan.stats["steps"] >= 5
    records = load_index(data["prepared"])
    seen = [tuple(s) for rank in reference for step in rank for b in step for s in b.sample_ids.tolist()]
    assert len(seen) == len(set(seen))  # at most once per epoch, across ranks
    planned = {int(i) for i in plan.source_index[plan.packs.samples]}
    assert {i for _, i in seen} == planned
    # over-long samples are dropped by the plan and counted, never truncated
    long_row = next(i for i, r in enumerate(records) if r["id"] == "long")
    assert plan.stats["dropped"] == 1 and plan.source_index[plan.dropped_samples].tolist() == [long_row]
    assert len(planned) + 1 + plan.stats["dropped_tail"] == len(records)
    img = ld.pack_cfg.image_token_id
    for rank in reference:
        assert len(rank) == ld.total_steps and all(len(step) == 2 for step in rank)
        for step in rank:
            for b in step:
                check_batch(b, ld.pack_cfg)
                assert b.num_tokens <= L
                cu = b.cu_seqlens.tolist()
                for (s, e), (_, idx) in zip(zip(cu[:-1], cu[1:]), b.sample_ids.tolist()):
                    assert b.position_ids[s:e].tolist() == list(range(e - s))
                    # shifted labels: each supervised target is the next token; all assistant tokens
                    lab, tok = b.labels[s:e], b.tokens[s:e]
                    sup = lab != -100
                    assert int(sup.sum()) == records[idx]["supervised_tokens"]
                    assert torch.equal(lab[:-1][sup[:-1]], tok[1:][sup[:-1]]) and lab[-1] == -100
                    assert not bool((lab == img).any())
                assert torch.isclose(b.loss_weights.sum(), torch.tensor(1.0))
                # tiles land on their <IMG_CONTEXT> runs
                tpt = ld.pack_cfg.tokens_per_tile
                assert all(b.tokens[p:p + tpt].eq(img).all() for p in b.tile_positions.tolist())


def test_epochs_replan_with_a_new_seed_and_resume_across_them(data, reference):
    from megatron_eagle.data.packing.plan import PlanSpec, make_plan
    from megatron_eagle.data.packing.plan_index import table_from_prepared

    model = preset_model_config("tiny")
    table, _ = table_from_prepared([data["prepared"]], L, model)
    spec = PlanSpec(L, dp=2, micro_batches=1, cost_model="tiny", seed=5)
    plan_for = lambda e: make_plan(table, replace(spec, seed=spec.seed + e))  # noqa: E731
    n0 = plan_for(0).stats["steps"]
    mk = lambda **kw: StageLoader("s", plan_for, [data["prepared"]], data["tok"], model, dp_rank=0,  # noqa: E731
                                  total_steps=2 * n0 + 1, num_workers=0, **kw)
    full = stream(mk())
    assert len(full) == 2 * n0 + 1
    ids = [[tuple(s) for step in full[e * n0:(e + 1) * n0] for b in step for s in b.sample_ids.tolist()]
           for e in range(2)]
    assert all(len(x) == len(set(x)) for x in ids) and ids[0] != ids[1]
    assert same_stream(stream(mk(start_step=n0 - 1)), full[n0 - 1:])


def test_bad_media_is_blanked_logged_and_counted(data, reference, tmp_path, caplog):
    from megatron_eagle.batch import loss_weights_for
    from megatron_eagle.data.loading.pack_builder import BLANK_FLOAT, ROW_BLANKED

    bad = tmp_path / "bad"
    shutil.copytree(data["prepared"], bad)
    records = load_index(bad)
    rank0 = {i for step in reference[0] for b in step for _, i in b.sample_ids.tolist()}
    victim = next(i for i, r in enumerate(records) if r["media"] and r["media"][0]["type"] == "image" and i in rank0)
    rec = records[victim]
    corrupt_member(bad, rec, rec["media"][0]["member"])
    cur = write_curriculum(tmp_path / "cur.yaml", bad, seq_len=L)
    ld = loader(data, 0, cur=cur)
    assert ld.fingerprint() == loader(data).fingerprint()
    with caplog.at_level(logging.WARNING, logger="megatron_eagle.loader"):
        got = stream(ld)
    m = ld.metrics()
    assert m["loader_errors"] == 1 and m["rejected"] == [f"mix: {rec['shard']}:{rec['key']}"]
    assert any(rec["key"] in r.getMessage() and rec["shard"] in r.getMessage() for r in caplog.records)
    from megatron_eagle.data.loading.loader import REJECTED_NAMES_KEPT

    for r in range(REJECTED_NAMES_KEPT + 5):  # a long run never reset keeps a bounded list of names
        ld._reject([(0, r)], torch.tensor([ROW_BLANKED]))
    m = ld.metrics()
    assert m["loader_errors"] == REJECTED_NAMES_KEPT + 6 and len(m["rejected"]) == REJECTED_NAMES_KEPT
    hit = 0
    for a, b in zip(got, reference[0]):
        for x, y in zip(a, b):
            ids = y.sample_ids[:, 1].tolist()
            if victim not in ids:
                assert same_batch(x, y)
                continue
            # the sub-sample stays in the pack (token side unchanged on every rank) but contributes nothing
            hit += 1
            check_batch(x, ld.pack_cfg)
            k = ids.index(victim)
            assert torch.equal(x.sample_ids, y.sample_ids) and x.row_status.tolist()[k] == ROW_BLANKED
            for f in ("tokens", "position_ids", "cu_seqlens", "tile_positions"):
                assert torch.equal(getattr(x, f), getattr(y, f)), f
            s, e = x.cu_seqlens[k].item(), x.cu_seqlens[k + 1].item()
            labels = y.labels.clone()
            labels[s:e] = -100
            assert torch.equal(x.labels, labels) and torch.equal(x.loss_weights, loss_weights_for(labels, x.cu_seqlens))
            mine = (x.tile_positions >= s) & (x.tile_positions < e)
            assert bool(mine.any()) and bool((x.pixel_values[mine] == BLANK_FLOAT).all())
            assert torch.equal(x.pixel_values[~mine], y.pixel_values[~mine])
    assert hit == 1


def test_fsspec_url_reads_the_same_batches(data, reference, tmp_path):
    cur = write_curriculum(tmp_path / "cur.yaml", "file://" + str(data["prepared"]), seq_len=L)
    ld = loader(data, 0, cur=cur, cache_dir=str(tmp_path / "cache"))
    assert ld.sources[0].reader().url is not None
    assert same_stream(stream(ld, steps=3), reference[0][:3])


def test_text_only_stages_uint8_pixels_and_needs_data(data, reference):
    from megatron_eagle.models.vision import normalize_pixels

    assert [needs_data(r, 4) for r in range(4)] == [True, False, False, True]
    assert [needs_media(r, 4) for r in range(4)] == [True, False, False, False]
    ref = reference[0][:2]
    text = stream(loader(data, 0, pp_rank=1), steps=2)
    for a, b in zip(text, ref):
        for x, y in zip(a, b):
            assert x.pixel_values.shape[0] == 0 and torch.equal(x.tokens, y.tokens)
            assert torch.equal(x.cu_seqlens, y.cu_seqlens) and torch.equal(x.loss_weights, y.loss_weights)
    raw = stream(loader(data, 0, pixel_dtype="uint8"), steps=2)
    for a, b in zip(raw, ref):
        for x, y in zip(a, b):
            normalized = replace(x, pixel_values=normalize_pixels(x.pixel_values))
            assert x.pixel_values.dtype == torch.uint8 and same_batch(normalized, y)


def test_cp_and_sequence_parallel_padding(data, tmp_path):
    cur = write_curriculum(tmp_path / "cur.yaml", data["prepared"], seq_len=L,
                           parallel={"tp": 2, "pp": 1, "cp": 2, "sp": True})
    ld = loader(data, 1, cur=cur, world_size=8)
    assert ld.pack_cfg.pad_to_multiple == 4 and ld.pack_cfg.cp == 2
    for step in stream(ld, steps=3):
        for b in step:
            check_batch(b, ld.pack_cfg)  # every segment a multiple of 2*cp, the pack of 4
            assert b.num_tokens % 4 == 0 and (torch.diff(b.cu_seqlens) % 4 == 0).all()
    fixed = stream(loader(data, 1, cur=cur, world_size=8, fixed_length=True), steps=1)[0]
    assert all(b.num_tokens == L for b in fixed)


def tile_media(builder, batch) -> list[tuple[int, int, bool]]:
    """(segment, medium, is video frame) of every pack tile, from the ADS plans (no decoding)."""
    from megatron_eagle.data.loading.pack_builder import media_tiles
    from megatron_eagle.data.media.ads import VideoPlan, plan_sample

    out = []
    for k, (ds, idx) in enumerate(batch.sample_ids.tolist()):
        src = builder.sources[ds]
        for i, mp in enumerate(plan_sample(src.index[idx], L, src.ads).plan.media):
            out += [(k, i, isinstance(mp, VideoPlan))] * media_tiles(mp)
    return out


TOKEN_SIDE = ("tokens", "labels", "loss_weights", "position_ids", "cu_seqlens", "max_seqlen", "tile_positions",
              "sample_ids", "row_status", "pack_tiles")


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_ranks_decode_only_their_share_and_the_shares_make_the_cp1_pack(data, tmp_path, cp):
    from megatron_eagle.data.loading.loader import rank_schedule
    from megatron_eagle.data.loading.pack_builder import PackBuilder
    from megatron_eagle.parallel.vision_cp import tile_shares

    cur = write_curriculum(tmp_path / "cur.yaml", data["prepared"], seq_len=L, parallel={"tp": 1, "pp": 1, "cp": cp})
    ranks = [loader(data, 0, cur=cur, world_size=2 * cp, cp_rank=r) for r in range(cp)]
    cfg = ranks[0].pack_cfg
    assert cfg.cp_rank == 0 and ranks[-1].pack_cfg.cp_rank == cp - 1
    cp1 = PackBuilder(ranks[0].sources, data["tok"], replace(cfg, cp=1, pad_to_multiple=1, cp_rank=None))
    sched = rank_schedule(ranks[0].epoch_plan(0), 0)
    split_media = video_split = 0
    for item in range(len(sched.offsets) - 1):
        rows = sched.rows(item)
        ref, ref_info = cp1.build(rows)
        got = [ld.builder.build(rows) for ld in ranks]
        assert torch.equal(torch.cat([b.pixel_values for b, _ in got]), ref.pixel_values)  # bit-exact
        n = ref.pixel_values.shape[0]
        tiles = tile_media(cp1, ref)
        owners: dict[tuple[int, int], set[int]] = {}
        for r, ((b, info), (lo, hi)) in enumerate(zip(got, tile_shares(n, cp))):
            check_batch(b, ranks[r].pack_cfg)
            assert (b.tile_offset, b.tile_offset + b.pixel_values.shape[0], b.pack_tiles) == (lo, hi, n)
            for f in TOKEN_SIDE:  # identical on every CP rank
                x, y = getattr(b, f), getattr(got[0][0], f)
                assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, f
            # decoded only its share: its tiles, its video frames, only the media overlapping it
            mine = tiles[lo:hi]
            assert info.share_tiles == hi - lo and info.tiles == n
            assert info.frames == sum(v for _, _, v in mine)
            assert info.media == len({(k, i) for k, i, _ in mine})
            for k, i, _ in mine:
                owners.setdefault((k, i), set()).add(r)
        assert sum(i.frames for _, i in got) == ref_info.frames  # every frame decoded exactly once
        split = [key for key, rs in owners.items() if len(rs) > 1]
        split_media += len(split)
        video_split += sum(any(v for k, i, v in tiles if (k, i) == key) for key in split)
    assert split_media > 0 and video_split > 0  # media (videos too) cut between two ranks' shares were tested


def test_dp_change_is_refused_mid_stage_but_fine_at_a_new_stage(data, tmp_path):
    ld = loader(data, 0)
    stream(ld, steps=2)
    state = ld.state_dict()
    with pytest.raises(ConfigError, match="dp=2"):
        loader(data, 0, world_size=4, state=state)
    other = dict(state, stage="s0")
    with pytest.raises(ConfigError, match="stage"):
        loader(data, 0, state=other)
    assert loader(data, 0, world_size=4, state=dict(state, step=0)).step == 0


def test_table_cache_is_computed_once_and_shared(data, tmp_path):
    from megatron_eagle.data.loading.table_cache import cached_table
    from megatron_eagle.data.packing.plan_index import table_from_prepared

    model = preset_model_config("tiny")
    ref, drops = table_from_prepared([data["prepared"]], L, model)
    a, da = cached_table(data["prepared"], L, model, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].endswith(".npz")
    b, db = cached_table(data["prepared"], L, model, tmp_path)
    for t in (a, b):
        assert np.array_equal(t.length, ref.length) and np.array_equal(t.tiles, ref.tiles)
        assert t.datasets == ref.datasets
    assert da == db == drops
    c, _ = cached_table(data["prepared"], 2 * L, model, tmp_path)  # another length: another entry
    assert len(list(tmp_path.iterdir())) == 2 and not np.array_equal(c.length, a.length)
    ld = loader(data, 0, cache_dir=str(tmp_path))
    assert ld.fingerprint() == loader(data, 0).fingerprint()


def test_uint8_tiles_and_in_place_normalisation_match_the_inference_path(data):
    import io

    from megatron_eagle.data.loading.pack_builder import PackInfo, assemble_pixels, image_tiles_uint8
    from megatron_eagle.data.media.ads import VideoPlan
    from megatron_eagle.data.media.image import decode_image, image_to_tiles, normalize
    from megatron_eagle.data.media.video import video_to_tiles

    root = data["root"] / "media"
    img = decode_image((root / "img/7.jpg").read_bytes())
    chunks = []
    for grid in [(1, 1), (3, 2), (2, 5)]:
        u8 = image_tiles_uint8(img, grid, 112)
        assert u8.dtype == torch.uint8 and torch.equal(normalize(u8), image_to_tiles(img, grid, 112))
        chunks.append(u8)
    ld = loader(data)
    rec = next(r for r in load_index(data["prepared"]) if r["media"] and r["media"][0]["path"] == "vid/v0.mp4")
    raw = ld.sources[0].reader().read_media(rec, 0)
    frames = ld.builder._decode(raw, VideoPlan((0, 7, 20), (0.0, 0.7, 2.0)), PackInfo())
    assert torch.equal(normalize(frames), video_to_tiles(io.BytesIO(raw), [0, 7, 20], 112)[0])
    chunks.append(frames)
    assert torch.equal(assemble_pixels(chunks, (3, 112, 112), "float32"), normalize(torch.cat(chunks)))
    assert torch.equal(assemble_pixels(chunks, (3, 112, 112), "uint8"), torch.cat(chunks))
