import json
import shutil
from pathlib import Path

import pytest

from megatron_eagle.cli import main as cli_main
from megatron_eagle.data.prepare.inspect_shards import render_text, summarize
from megatron_eagle.data.prepare.pipeline import PrepareConfig, prepare
from megatron_eagle.data.prepare.reshard import reshard
from megatron_eagle.data.prepare.verify import verify
from megatron_eagle.data.shards import load_index, load_manifest
from tests.media_factory import build_dataset, tiny_tokenizer_dir


def run_prepare(ds, out, shard_size):
    return prepare(PrepareConfig(inputs=[str(p) for p in ds["inputs"]], media_root=str(ds["media"]), output=str(out),
                                 tokenizer=str(tiny_tokenizer_dir()), shard_size=shard_size, progress=False))


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("ds"))


@pytest.fixture(scope="module")
def prepared(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    run_prepare(ds, out, 40_000)
    return out


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


def test_verify_passes_on_good_output(prepared):
    rep = verify(prepared, workers=2)
    assert rep.ok, rep.errors
    assert (rep.samples, rep.images, rep.videos) == (7, 5, 3)


def test_verify_catches_corruption(prepared, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(prepared, bad)
    index = load_index(bad)
    rec = next(r for r in index if r["id"] == "a3")  # the H.264 video
    off, size = rec["members"]["m0.mp4"]
    with open(bad / rec["shard"], "r+b") as f:  # wreck the video payload in place
        f.seek(off + 32)
        f.write(b"\0" * (size - 64))
    errs = verify(bad).errors
    assert any("sha256" in e for e in errs) and any("a3" in e or rec["key"] in e for e in errs)

    bad2 = tmp_path / "bad2"
    shutil.copytree(prepared, bad2)
    index[0]["members"]["json"][0] += 512
    (bad2 / "index.jsonl").write_text("".join(json.dumps(r) + "\n" for r in index))
    assert any("offsets do not match" in e for e in verify(bad2, decode=False).errors)

    bad3 = tmp_path / "bad3"
    shutil.copytree(prepared, bad3)
    m = json.loads((bad3 / "manifest.json").read_text())
    m["rejected_samples"] -= 1
    (bad3 / "manifest.json").write_text(json.dumps(m))
    errs = verify(bad3, decode=False).errors
    assert any("input_samples" in e for e in errs) and any("rejects.jsonl" in e for e in errs)
    assert cli_main(["verify", str(bad3), "--no-decode"]) == 1


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
