import json
import shutil

from megatron_eagle.cli import main as cli_main
from megatron_eagle.data.prepare import pipeline as prepare_mod
from megatron_eagle.data.prepare.pipeline import prepare
from megatron_eagle.data.shards import load_manifest, plan_shards
from tests.media_factory import tiny_tokenizer_dir
from tests.prepare_fixtures import cfg, ds  # noqa: F401


def test_media_changed_between_scan_and_write_is_rejected_late(ds, tmp_path, monkeypatch):
    media = tmp_path / "media"
    shutil.copytree(ds["media"], media, symlinks=True)
    real_scan = prepare_mod.scan

    def scan_then_edit(c, plan_path):
        res = real_scan(c, plan_path)
        (media / "img/a.jpg").write_bytes((media / "img/d.png").read_bytes())
        return res

    monkeypatch.setattr(prepare_mod, "scan", scan_then_edit)
    c = cfg(ds, tmp_path / "out", max_reject_fraction=1.0)
    c.media_root = str(media)
    res = prepare(c)
    m = res.manifest
    assert m["rejected_by_reason"]["media changed during prepare"] == 1
    assert m["written_samples"] == 6 and m["input_samples"] == m["written_samples"] + m["rejected_samples"]
    late = [json.loads(l) for l in (tmp_path / "out/rejects.jsonl").read_text().splitlines()]
    assert [(r["id"], r["line"]) for r in late if r["reason"] == "media changed during prepare"] == [("a1", 1)]
    assert res.exit_code == 0


def test_cli_exit_codes_and_threshold(ds, tmp_path, capsys):
    base = ["prepare", "--input", *map(str, ds["inputs"]), "--media-root", str(ds["media"]),
            "--tokenizer", str(tiny_tokenizer_dir()), "--shard-size", "1MiB", "--workers", "1", "--no-progress"]
    assert cli_main(base + ["--output", str(tmp_path / "o1")]) == 1
    assert (tmp_path / "o1/manifest.json").exists()  # written before failing
    assert "exceeds --max-reject-fraction" in capsys.readouterr().err
    assert cli_main(base + ["--output", str(tmp_path / "o2"), "--max-reject-fraction", "0.7"]) == 0
    assert len(load_manifest(tmp_path / "o2")["shards"]) == 1
    bad = ["prepare", "--input", str(tmp_path / "none.jsonl"), "--media-root", str(ds["media"]), "--output",
           str(tmp_path / "o3"), "--tokenizer", str(tiny_tokenizer_dir())]
    assert cli_main(bad) == 2


def test_shard_planner_is_balanced_and_ordered():
    sizes = [1000] * 50 + [30_000] + [500] * 100
    ranges = plan_shards(sizes, 20_000)
    assert ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    totals = [sum(sizes[a:b]) for a, b in ranges]
    assert len(ranges) == 7 and totals[3] == 30_000 and max(t for t in totals if t < 30_000) <= 20_000
    # balanced, not greedy: 100 x 1000 bytes at 30 KB -> four shards of 25, not 30+30+30+10
    assert [b - a for a, b in plan_shards([1000] * 100, 30_000)] == [25, 25, 25, 25]
    assert plan_shards([10] * 7, 10**9) == [(0, 7)] and plan_shards([], 10) == []
    assert len(plan_shards([100] * 10, 100)) == 10
