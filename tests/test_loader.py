"""The resumable loader on a really prepared dataset: coverage, pack limits, exact resume with any
worker count, epochs, bad data, fsspec URLs, CP/SP padding, CP tile shares (each CP rank decodes only
its share; the replica agrees on bad sub-samples), TP broadcast and a tiny model forward."""

from __future__ import annotations

import logging
import shutil
from dataclasses import fields, replace

import numpy as np
import pytest
import torch

from megatron_eagle.config import ConfigError, preset_model_config
from megatron_eagle.data.loading.loader import StageLoader, build_stage_loader, needs_data, needs_media
from megatron_eagle.data.loading.pack_builder import check_batch
from megatron_eagle.data.shards import load_index
from tests.dist import run_distributed
from tests.loader_fixtures import build_loader_dataset, write_curriculum
from tests.media_factory import tiny_tokenizer, tiny_tokenizer_dir

L = 512


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    d = build_loader_dataset(root)
    d["cur"] = write_curriculum(root / "cur.yaml", d["prepared"], seq_len=L)
    d["tok"] = tiny_tokenizer()
    return d


def loader(data, dp_rank=0, cur=None, **kw):
    kw.setdefault("num_workers", 0)
    world = kw.pop("world_size", 2)
    return build_stage_loader(cur or data["cur"], "s1", data["tok"], preset_model_config("tiny"), world_size=world,
                              dp_rank=dp_rank, **kw)


def stream(ld, steps=None):
    out = []
    for i, batches in enumerate(ld):
        out.append(batches)
        if steps is not None and i + 1 == steps:
            break
    ld.close()
    return out


def same_batch(a, b) -> bool:
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def same_stream(s1, s2) -> bool:
    return len(s1) == len(s2) and all(len(a) == len(b) and all(same_batch(x, y) for x, y in zip(a, b))
                                      for a, b in zip(s1, s2))


@pytest.fixture(scope="module")
def reference(data):
    """The uninterrupted stream of both DP ranks (inline, no workers)."""
    return [stream(loader(data, r)) for r in range(2)]


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


@pytest.fixture(scope="module")
def cp_share(data, tmp_path_factory):
    """Loader arguments of CP rank 1 at cp=2 (it decodes only its tile share) and its uninterrupted stream."""
    cur = write_curriculum(tmp_path_factory.mktemp("cp2") / "cur.yaml", data["prepared"], seq_len=L,
                           parallel={"tp": 1, "pp": 1, "cp": 2})
    kw = dict(cur=cur, world_size=4, cp_rank=1)
    return kw, stream(loader(data, 1, **kw))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("workers", [0, 1, 3])
@pytest.mark.parametrize("layout", ["cp1", "cp2_share"])
def test_resume_mid_epoch_gives_the_same_stream(data, reference, cp_share, workers, layout):
    k = 3
    kw, ref = ({}, reference[1]) if layout == "cp1" else cp_share
    first = loader(data, 1, num_workers=workers, **kw)
    head = stream(first, steps=k)
    state = first.state_dict()
    assert state["stage"] == "s1" and state["step"] == k and state["dp"] == 2
    resumed = loader(data, 1, num_workers=workers, prefetch=1, state=state, **kw)
    assert len(resumed) == resumed.total_steps - k
    tail = stream(resumed)
    assert same_stream(head + tail, ref)
    assert resumed.state_dict()["step"] == resumed.total_steps
    if layout == "cp2_share":  # CP rank 1 carries the second half of each pack's tiles, not the whole pack
        from megatron_eagle.parallel.vision_cp import tile_shares

        for b in (b for step in ref for b in step):
            lo, hi = tile_shares(b.total_tiles, 2)[1]
            assert (b.tile_offset, b.tile_offset + b.pixel_values.shape[0]) == (lo, hi)
        assert sum(b.total_tiles > 1 for step in ref for b in step) > 3
    else:
        assert same_stream(stream(loader(data, 0, num_workers=workers, start_step=k)), reference[0][k:])


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


def corrupt_member(root, rec, member) -> None:
    """Overwrite one shard member with zeros (same size, so the index still points at every member)."""
    off, size = rec["members"][member]
    with open(root / rec["shard"], "r+b") as f:
        f.seek(off)
        f.write(b"\0" * size)


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


def _tp_broadcast_and_forward(rank, world, cur, prepared, cp_cur):
    from megatron.core import parallel_state as ps

    from megatron_eagle.config import ParallelConfig, preset_model_config
    from megatron_eagle.models.eagle import build_model
    from megatron_eagle.runtime.distributed import init_model_parallel

    init_model_parallel(2, 1, 1)
    model_cfg = preset_model_config("tiny")
    tok = str(tiny_tokenizer_dir())
    kw = dict(world_size=4, dp_rank=1, num_workers=1 if rank == 0 else 0)
    bc = build_stage_loader(cur, "s1", tok, model_cfg, tp_mode="broadcast",
                            tp_group=ps.get_tensor_model_parallel_group(), **kw)
    got = stream(bc, steps=2)
    own = stream(build_stage_loader(cur, "s1", tok, model_cfg, **kw), steps=2)
    equal = same_stream(got, own)
    torch.manual_seed(0)
    model = build_model(model_cfg, ParallelConfig(tp=2))
    losses = []
    with torch.no_grad():
        for b in got[0]:
            n_ctx = int((b.tokens == model_cfg.image_token_id).sum())
            assert n_ctx == b.pixel_values.shape[0] * model_cfg.tokens_per_tile
            losses.append(float(model(b)))
    # with CP, the TP group of CP rank 1 broadcasts that rank's tile share from its TP source
    kw = dict(world_size=8, dp_rank=1, cp_rank=1, num_workers=0)
    cp_bc = stream(build_stage_loader(cp_cur, "s1", tok, model_cfg, tp_mode="broadcast",
                                      tp_group=ps.get_tensor_model_parallel_group(), **kw), steps=2)
    cp_own = stream(build_stage_loader(cp_cur, "s1", tok, model_cfg, **kw), steps=2)
    shares = [(b.tile_offset, b.pixel_values.shape[0], b.total_tiles) for step in cp_bc for b in step]
    return {"equal": equal, "losses": losses, "errors": bc.metrics()["loader_errors"], "packs": bc.metrics()["packs"],
            "cp_equal": same_stream(cp_bc, cp_own), "shares": shares}


def test_tp_broadcast_gives_identical_batches_and_the_model_runs_them(data, tmp_path):
    from megatron_eagle.parallel.vision_cp import tile_shares

    cur = write_curriculum(tmp_path / "cur.yaml", data["prepared"], seq_len=L, parallel={"tp": 2, "pp": 1, "cp": 1})
    cp_cur = write_curriculum(tmp_path / "cp.yaml", data["prepared"], seq_len=L, parallel={"tp": 2, "pp": 1, "cp": 2})
    res = run_distributed(_tp_broadcast_and_forward, 2, str(cur), str(data["prepared"]), str(cp_cur))
    assert all(r["equal"] for r in res) and all(r["packs"] == 4 and r["errors"] == 0 for r in res)
    assert all(r["cp_equal"] for r in res) and res[0]["shares"] == res[1]["shares"]
    assert all((off, off + n) == tile_shares(total, 2)[1] for off, n, total in res[0]["shares"])
    assert any(n < total for _, n, total in res[0]["shares"])
    assert res[0]["losses"] == res[1]["losses"] and all(np.isfinite(res[0]["losses"]))
    assert all(x > 0 for x in res[0]["losses"])


def _cp2_agreement(rank, world, curs, victim, diverged):
    """CP=2 loaders (each decodes its share) -> agree_on_batches -> model at CP=2, against CP=1 on the
    good data with the victim's loss weights removed; then a pack whose token side differs per rank."""
    import logging as _logging

    from megatron.core import parallel_state as ps

    from megatron_eagle.config import ParallelConfig, preset_model_config
    from megatron_eagle.batch import loss_weights_for
    from megatron_eagle.runtime.distributed import init_model_parallel, replica_group
    from megatron_eagle.training.agreement import agree_on_batches
    from tests.model_fixtures import full_reference_state
    from tests.test_cp import compare, run_model

    seen = []
    handler = _logging.Handler(_logging.WARNING)
    handler.emit = lambda r: seen.append(r.getMessage())
    _logging.getLogger("megatron_eagle.loader").addHandler(handler)
    cfg, tok = preset_model_config("tiny"), str(tiny_tokenizer_dir())
    kw = dict(world_size=2, dp_rank=0, num_workers=0)
    step, micro, seg = victim
    init_model_parallel(1, 1, 1)
    state = full_reference_state(cfg)
    ref = stream(build_stage_loader(curs["good"], "s1", tok, cfg, start_step=step, **kw), steps=1)[0][micro]
    s, e = ref.cu_seqlens[seg].item(), ref.cu_seqlens[seg + 1].item()
    ref.labels[s:e] = -100  # the same pack, the victim contributing nothing
    ref.loss_weights = loss_weights_for(ref.labels, ref.cu_seqlens)
    expected = run_model(cfg, ParallelConfig(), state, ref)

    init_model_parallel(1, 1, 2)
    group = replica_group(ps.get_data_parallel_rank())
    out = {"seen": seen}
    for name, at in (("victim", step), ("diverged", diverged[0])):
        ld = build_stage_loader(curs[rank], "s1", tok, cfg, cp_rank=rank, start_step=at, **kw)
        batches = next(iter(ld))
        agreed = agree_on_batches(batches, group, "sqrt", ld.pack_cfg.pad_id)
        ld.settle(agreed)
        m = micro if name == "victim" else diverged[1]
        got = run_model(cfg, ParallelConfig(cp=2), state, agreed[m])
        out[name] = {"local": [b.row_status.tolist() for b in batches], "agreed": [b.row_status.tolist() for b in agreed],
                     "metrics": ld.metrics(), "loss": got["loss"], "tokens": agreed[m].tokens,
                     "weights": agreed[m].loss_weights, "labels": agreed[m].labels}
        if name == "victim":
            out[name]["cmp"] = compare(expected, got)
            out[name]["same_weights"] = torch.equal(agreed[m].loss_weights, ref.loss_weights)
            out[name]["same_labels"] = torch.equal(agreed[m].labels, ref.labels)
    return out


def test_cp2_bad_medium_in_one_share_is_agreed_on_counted_once_and_drops_out_of_the_loss(data, tmp_path):
    """A corrupt medium inside CP rank 1's share only: no crash, no hang, both ranks blank the same
    sub-sample, the loss and gradients equal CP=1 on the good pack without that sub-sample's loss weights,
    and the rejection is counted and named once. A JSON member corrupt on rank 0's copy only (a token side
    that differs per rank, as a transient read error would) turns that pack into the same padding pack."""
    from megatron_eagle.parallel.vision_cp import tile_shares

    good = write_curriculum(tmp_path / "good.yaml", data["prepared"], seq_len=L, parallel={"tp": 1, "pp": 1, "cp": 2})
    full = stream(loader(data, 0, cur=good, world_size=2))
    records = load_index(data["prepared"])
    victim = None
    for step, batches in enumerate(full):
        for m, b in enumerate(batches):
            lo1 = tile_shares(b.total_tiles, 2)[1][0]
            for k, (_, idx) in enumerate(b.sample_ids.tolist()):
                s, e = b.cu_seqlens[k].item(), b.cu_seqlens[k + 1].item()
                t = torch.nonzero((b.tile_positions >= s) & (b.tile_positions < e)).squeeze(1)
                if victim is None and t.numel() and int(t.min()) >= lo1:
                    victim, vidx = (step, m, k), idx
    assert victim is not None
    other = next(step for step in range(len(full)) if step != victim[0])
    didx = full[other][1].sample_ids[0, 1].item()
    bad1, bad0 = tmp_path / "bad1", tmp_path / "bad0"
    shutil.copytree(data["prepared"], bad1)
    corrupt_member(bad1, records[vidx], records[vidx]["media"][0]["member"])
    shutil.copytree(bad1, bad0)
    corrupt_member(bad0, records[didx], "json")
    par = {"tp": 1, "pp": 1, "cp": 2}
    curs = {"good": str(good), 0: str(write_curriculum(tmp_path / "bad0.yaml", bad0, seq_len=L, parallel=par)),
            1: str(write_curriculum(tmp_path / "bad1.yaml", bad1, seq_len=L, parallel=par))}
    res = run_distributed(_cp2_agreement, 2, curs, victim, (other, 1))

    name = f"mix: {records[vidx]['shard']}:{records[vidx]['key']}"
    step, m, k = victim
    v = [r["victim"] for r in res]
    assert v[0]["local"][m][k] == 0 and v[1]["local"][m][k] == 1  # only rank 1 decoded (and failed) it
    assert v[0]["agreed"] == v[1]["agreed"] and v[0]["agreed"][m][k] == 1
    assert sum(x != 0 for b in v[0]["agreed"] for x in b) == 1
    for r in v + [r["diverged"] for r in res]:  # inputs = used + rejected, on every rank
        assert r["metrics"]["samples"] + r["metrics"]["loader_errors"] == sum(map(len, r["agreed"]))
    for r in v:
        assert r["metrics"]["loader_errors"] == 1 and r["metrics"]["rejected"] == [name]  # once, named
        assert r["same_weights"] and r["same_labels"]
        d = r["cmp"]
        assert d["same_params"] and d["loss"] <= 1e-5 * r["loss"], d
        assert d["grad"] < 1e-6 or d["grad_rel"] < 1e-4, d
    assert [any(records[vidx]["key"] in msg and "cannot decode" in msg for msg in r["seen"]) for r in res] \
        == [False, True]  # the rank that hit it says why
    dv = [r["diverged"] for r in res]
    row = full[other][1].sample_ids[:, 1].tolist().index(didx)
    assert dv[0]["local"][1][row] == 2 and dv[1]["local"][1][row] == 0
    assert dv[0]["agreed"] == dv[1]["agreed"] and set(dv[0]["agreed"][1]) == {2}  # the whole pack, on both
    assert torch.equal(dv[0]["tokens"], dv[1]["tokens"]) and not bool(dv[0]["weights"].any())
    assert dv[0]["loss"] == dv[1]["loss"] == 0.0
    n_rows = len(dv[0]["agreed"][1])
    assert all(r["metrics"]["loader_errors"] == n_rows for r in dv)


class _StallOnce:
    """Wraps a PackBuilder: the first build of one pack (in any process) hangs, as a stuck decode would."""

    def __init__(self, inner, marker, rows):
        self.inner, self.marker, self.rows = inner, str(marker), rows

    def build(self, rows):
        import os
        import time

        if list(rows) == self.rows and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            time.sleep(60)
        return self.inner.build(rows)


def test_a_stalled_worker_is_replaced_and_the_stream_continues(data, reference, tmp_path, caplog):
    ld = loader(data, 0, num_workers=1, prefetch=1, worker_timeout_s=2.0, start_step=1)
    from megatron_eagle.data.loading.loader import rank_schedule

    rows = rank_schedule(ld.epoch_plan(0), 0).rows(2 * 2 + 1)  # step 2, micro 1
    ld.builder = _StallOnce(ld.builder, tmp_path / "stalled", rows)
    with caplog.at_level(logging.ERROR, logger="megatron_eagle.loader"):
        got = stream(ld)
    assert (tmp_path / "stalled").exists() and any("restarting" in r.getMessage() for r in caplog.records)
    assert same_stream(got, reference[0][1:])


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
