from pathlib import Path

import pytest

from megatron_eagle.cli import main as cli_main
from megatron_eagle.data.prepare.inspect_shards import render_text, summarize
from megatron_eagle.data.prepare.reshard import reshard
from megatron_eagle.data.prepare.verify import verify
from megatron_eagle.data.shards import load_manifest
from tests.prepare_fixtures import ds, prepared, run_prepare  # noqa: F401


def tree(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.endswith(".tar") or p.name == "index.jsonl"}


def test_inspect_counts_histograms_and_plot(prepared, tmp_path, capsys):
    s = summarize(prepared)
    m = load_manifest(prepared)
    assert (s["samples"], s["shards"], s["images"], s["videos"], s["text_only"]) == (7, len(m["shards"]), 5, 3, 1)
    assert s["video_seconds"] == pytest.approx(3.0 + 2.0 + 2.0)
    assert sum(c for _, _, c in s["text_tokens"]["hist"]) == 7
    assert sum(c for _, _, c in s["video_duration_s"]["hist"]) == 3
    assert s["video_duration_s"]["hist"][0][2] == 3  # all clips < 5 s
    text = render_text(s)
    assert "text tokens" in text and "video clip duration" in text and "path escapes media root: 3" in text
    png = tmp_path / "p.png"
    assert cli_main(["inspect", str(prepared), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "samples 7 written of 19 input" in capsys.readouterr().out


def test_reshard_equals_preparing_at_that_size(ds, prepared, tmp_path):
    m = reshard(prepared, tmp_path / "big", shard_size=10**6, workers=2)
    assert len(m["shards"]) == 1 and m["written_samples"] == 7
    assert m["resharded_from"]["shards"] == len(load_manifest(prepared)["shards"])
    assert verify(tmp_path / "big").ok
    run_prepare(ds, tmp_path / "direct", 10**6)
    assert tree(tmp_path / "big") == tree(tmp_path / "direct")
    # and back down again
    assert cli_main(["reshard", str(tmp_path / "big"), "--shard-size", "40000", "--output", str(tmp_path / "small"),
                     "--workers", "1", "--no-progress"]) == 0
    assert tree(tmp_path / "small") == tree(prepared)
    assert (tmp_path / "small/rejects.jsonl").read_bytes() == (prepared / "rejects.jsonl").read_bytes()
    with pytest.raises(ValueError):
        reshard(prepared, prepared, 10**6)
