"""`megatron-eagle plan`: --lengths, --data (prepared index through ADS), --curriculum, plan.json format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from megatron_eagle.cli import main
from megatron_eagle.data.packing.length_mix import realistic_mix
from tests.plan_fixtures import lengths_file  # noqa: F401


def test_lengths_file_to_plan_json(lengths_file, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", "--lengths", str(lengths_file), "--seq-len", "16384", "--dp", "4", "--cp", "2",
               "--out", str(out), "--compare"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "balanced" in printed and "eagle2" in printed and "fill" in printed
    plan = json.loads(out.read_text())
    stats = plan["stats"]
    for key in ("fill_ratio", "imbalance", "dropped", "packs", "timing", "step_time_s"):
        assert key in stats
    assert stats["packs"] == len(plan["packs"]) and stats["packs"] % 4 == 0
    first = plan["packs"][0]
    assert set(first) == {"step", "micro", "rank", "samples"}
    lens = np.loadtxt(lengths_file, dtype=np.int64)[:, 0]
    over = np.flatnonzero((lens + 3) // 4 * 4 > 16384)
    assert stats["dropped"] == len(over) > 0 and plan["dropped_samples"] == over.tolist()
    seen = [i for p in plan["packs"] for i in p["samples"]]
    assert len(seen) == len(set(seen)) == stats["planned_samples"]
    assert all(((lens[p["samples"]] + 3) // 4 * 4).sum() <= 16384 for p in plan["packs"])
    assert stats["fill_ratio"] == pytest.approx(lens[seen].sum() / (stats["packs"] * 16384))


def test_lengths_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_text("# a comment\n100 2\n\n12x\n")
    assert main(["plan", "--lengths", str(bad), "--seq-len", "1024", "--dp", "1", "--out", str(tmp_path / "p")]) == 2
    assert "bad.txt:4" in capsys.readouterr().err
    ok = tmp_path / "ok.txt"
    ok.write_text("# a comment\n100 2\n\n200\n")
    assert main(["plan", "--lengths", str(ok), "--seq-len", "1024", "--dp", "1", "--out", str(tmp_path / "p")]) == 0
    assert main(["plan", "--lengths", str(ok), "--seq-len", "1000", "--dp", "1", "--cp", "8",
                 "--out", str(tmp_path / "p")]) == 2
    assert "2*cp" in capsys.readouterr().err


def _fake_prepared(root: Path, records: list[dict]) -> Path:
    root.mkdir(parents=True)
    (root / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "manifest.json").write_text(json.dumps({"prompt": {"frame_prefix_tokens": 6}}))
    return root


def test_data_dirs_go_through_ads(tmp_path):
    video = {"type": "video", "fps": 30.0, "frames": 9000, "duration": 300.0, "start": 0.0, "end": 300.0}
    image = {"type": "image", "width": 2000, "height": 1300}
    a = _fake_prepared(tmp_path / "imgs", [
        {"text_tokens": 300, "supervised_tokens": 50, "media": [image]},
        {"text_tokens": 20000, "supervised_tokens": 50, "media": []},  # text longer than L: dropped
        {"text_tokens": 800, "supervised_tokens": 100, "media": []}])
    b = _fake_prepared(tmp_path / "vids", [{"text_tokens": 200, "supervised_tokens": 40, "media": [video]}] * 3)
    out = tmp_path / "plan.json"
    rc = main(["plan", "--data", str(a), str(b), "--seq-len", "16384", "--dp", "1", "--out", str(out)])
    assert rc == 0
    plan = json.loads(out.read_text())
    assert plan["stats"]["dropped"] == 1 and plan["dropped_samples"] == [1]
    assert plan["stats"]["ads_drops"] == {"text exceeds max length": 1}
    assert plan["sources"]["datasets"] == ["imgs", "vids"]
    assert plan["sources"]["dataset"] == [0, 0, 0, 1, 1, 1] and plan["sources"]["index"] == [0, 1, 2, 0, 1, 2]
    # 600 frames at 2 FPS do not fit 16K: ADS cuts the videos' frames, so each fits a pack on its own.
    vids = [p for p in plan["packs"] if set(p["samples"]) & {3, 4, 5}]
    assert len(vids) == 3 and all(len(set(p["samples"]) & {3, 4, 5}) == 1 for p in vids)


def test_missing_index_is_a_clear_error(tmp_path, capsys):
    assert main(["plan", "--data", str(tmp_path), "--seq-len", "1024", "--dp", "1", "--out", str(tmp_path / "p")]) == 2
    assert "index.jsonl" in capsys.readouterr().err


def test_curriculum_stage_from_lengths_files(tmp_path):
    t = realistic_mix(6000, 32768, seed=1)
    for m, name in enumerate(("img", "vid")):
        sel = t.dataset == m
        np.savetxt(tmp_path / f"{name}.txt", np.stack([t.length[sel], t.tiles[sel]], 1), fmt="%d")
    cur = {"model": "eagle2.5-8b", "seed": 3, "stages": [{
        "name": "long", "seq_len": 32768, "global_batch_tokens": 32768 * 16, "steps": 6,
        "datasets": [{"name": "img", "path": "img.txt", "weight": 0.7},
                     {"name": "vid", "path": "vid.txt", "weight": 0.3}],
        "parallel": {"tp": 2, "cp": 2}}]}
    (tmp_path / "cur.yaml").write_text(yaml.safe_dump(cur))
    out = tmp_path / "plan.json"
    rc = main(["plan", "--curriculum", str(tmp_path / "cur.yaml"), "--stage", "long", "--world-size", "16",
               "--out", str(out)])
    assert rc == 0
    plan = json.loads(out.read_text())
    assert plan["stats"]["steps"] == 6 and plan["config"]["dp"] == 4 and plan["config"]["micro_batches"] == 4
    assert plan["sources"]["datasets"] == ["img", "vid"]
    assert main(["plan", "--curriculum", str(tmp_path / "cur.yaml"), "--stage", "nope", "--world-size", "16",
                 "--out", str(out)]) == 2
