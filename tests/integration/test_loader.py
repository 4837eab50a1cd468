"""The resumable loader on a really prepared dataset: coverage, pack limits, exact resume with any
worker count, epochs, bad data, fsspec URLs, CP/SP padding, CP tile shares (each CP rank decodes only
its share; the replica agrees on bad sub-samples), TP broadcast and a tiny model forward."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch

from megatron_eagle.data.loading.loader import build_stage_loader
from megatron_eagle.data.shards import load_index
from tests.dist import run_distributed
from tests.loader_fixtures import (L, corrupt_member, data, loader, reference, same_stream, stream,  # noqa: F401
                                   write_curriculum)
from tests.media_factory import tiny_tokenizer_dir


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
    from tests.integration.test_cp import compare, run_model

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
