"""Training with CP=2 (torchrun, 2 gloo processes) logs the same per-step losses and gradient
norms as CP=1 on the same packs.

The planner packs CP-padded lengths (multiples of 2*CP), so a CP=1 plan can group samples
differently. To compare the same packs, the CP=1 run plans with CP=2's padding: a
``sitecustomize`` on its PYTHONPATH wraps ``packing.common.cp_padded_lengths`` (test-only). Its packs
then hold the same samples without the per-sample padding, which changes no loss term
(padding follows each sample and carries zero weight).
"""

from __future__ import annotations

import subprocess

import pytest

from tests.train_fixtures import REPO, _env, build_assets, records, torchrun_cmd, write_run

SITE = """import os
if os.environ.get("EAGLE_TEST_PLAN_CP"):
    from megatron_eagle.data.packing import common
    _orig, _cp = common.cp_padded_lengths, int(os.environ["EAGLE_TEST_PLAN_CP"])
    common.cp_padded_lengths = lambda length, cp: _orig(length, max(cp, _cp))
"""


def _train(nproc: int, run, env: dict) -> None:
    r = subprocess.run(torchrun_cmd(nproc, run), env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, f"rc={r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"


@pytest.mark.parametrize("variant", ["allgather"])
def test_cp2_training_losses_equal_cp1(tmp_path, variant):
    assets = build_assets(tmp_path / "assets")
    stage = {"name": "full", "seq_len": 512, "trainable": ["vision", "connector", "llm"], "steps": 6}
    cp2 = write_run(tmp_path / "cp2", assets, [dict(stage, parallel={"cp": 2, "cp_variant": variant})])
    _train(2, cp2, _env())
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    cp1 = write_run(tmp_path / "cp1", assets, [dict(stage, parallel={"cp": 1})])
    _train(1, cp1, {**_env(), "PYTHONPATH": f"{site}:{REPO}", "EAGLE_TEST_PLAN_CP": "2"})
    ref, got = records(cp1), records(cp2)
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, 7))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (a, b)
        assert b["updated"] and a["updated"] and a["loader_errors"] == b["loader_errors"] == 0
    assert got[-1]["loss"] < got[0]["loss"]
