"""`megatron-eagle plan`: --lengths, --data (prepared index through ADS), --curriculum, plan.json format."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


from megatron_eagle.cli import main
from tests.plan_fixtures import lengths_file  # noqa: F401

ROOT = Path(__file__).resolve().parents[2]


def test_tools_script_runs(lengths_file, tmp_path):
    out = tmp_path / "plan.json"
    res = subprocess.run([sys.executable, str(ROOT / "tools/plan.py"), "--lengths", str(lengths_file),
                          "--seq-len", "16384", "--dp", "2", "--packer", "eagle2", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(out.read_text())["config"]["packer"] == "eagle2"


def test_plan_from_a_really_prepared_directory(tmp_path):
    """End to end with `prepare`'s real index: every written sample is planned, dropped or left over."""
    from megatron_eagle.data.media.ads import ads_config_from_manifest, plan_sample
    from megatron_eagle.data.packing.plan_index import table_from_prepared
    from megatron_eagle.data.prepare.pipeline import PrepareConfig, prepare
    from megatron_eagle.data.shards import load_index, load_manifest
    from tests.media_factory import build_dataset, tiny_tokenizer_dir

    ds = build_dataset(tmp_path / "ds")
    out = tmp_path / "out"
    prepare(PrepareConfig(inputs=[str(p) for p in ds["inputs"]], media_root=str(ds["media"]), output=str(out),
                          tokenizer=str(tiny_tokenizer_dir()), progress=False))
    records = load_index(out)
    table, _ = table_from_prepared([out], 4096)
    cfg = ads_config_from_manifest(load_manifest(out))
    assert table.length.tolist() == [plan_sample(r, 4096, cfg).plan.num_tokens for r in records]
    assert table.tiles.sum() > len(records)  # tiles and frames are counted for the ViT cost
    # ADS in spawned worker processes over chunks of 3 index lines: the same table, in order
    par, par_drops = table_from_prepared([out, out], 4096, workers=2, chunk_lines=3)
    ser, ser_drops = table_from_prepared([out, out], 4096, workers=1)
    assert par.length.tolist() == ser.length.tolist() == table.length.tolist() * 2
    assert par.tiles.tolist() == ser.tiles.tolist() and par.dataset.tolist() == ser.dataset.tolist()
    assert par_drops == ser_drops and len(records) > 6
    plan_json = tmp_path / "plan.json"
    assert main(["plan", "--data", str(out), "--seq-len", "4096", "--dp", "2", "--out", str(plan_json)]) == 0
    plan = json.loads(plan_json.read_text())
    rows = [i for p in plan["packs"] for i in p["samples"]] + plan["dropped_samples"] + plan["left_over_samples"]
    assert sorted(rows) == list(range(len(records)))
