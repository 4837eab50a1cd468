import hashlib
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from megatron_eagle.data.prepare import pipeline as prepare_mod
from megatron_eagle.data.prepare.pipeline import prepare
from megatron_eagle.data.shards import ShardReader, load_index, load_manifest
from tests.prepare_fixtures import cfg, ds  # noqa: F401

OUTPUT_FILES = ("index.jsonl", "manifest.json", "rejects.jsonl")


@pytest.fixture(scope="module")
def prepared(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    res = prepare(cfg(ds, out, workers=2))
    return out, res


def snapshot(out: Path) -> dict[str, bytes]:
    names = [p.name for p in out.iterdir() if p.name.endswith(".tar")] + list(OUTPUT_FILES)
    return {n: (out / n).read_bytes() for n in sorted(names)}


def test_counts_rejects_and_manifest(ds, prepared):
    out, res = prepared
    m = res.manifest
    assert m["input_samples"] == ds["input_samples"] == 19
    assert m["written_samples"] == ds["written"] == 7
    assert m["input_samples"] == m["written_samples"] + m["rejected_samples"]
    rejects = [json.loads(l) for l in (out / "rejects.jsonl").read_text().splitlines()]
    got = {(Path(r["source"]).name, r["line"]): r["reason"] for r in rejects}
    assert got == ds["expected_rejects"]
    assert {r["id"] for r in rejects if r["line"] == 6 and r["source"].endswith("a.jsonl")} == {"a6"}
    assert m["rejected_by_reason"]["path escapes media root"] == 3
    assert sum(m["rejected_by_reason"].values()) == m["rejected_samples"]
    assert res.exit_code == 1  # 12/19 rejected > 5%, yet everything was written
    assert len(m["shards"]) >= 3 and sum(s["samples"] for s in m["shards"]) == 7
    for s in m["shards"]:
        p = out / s["name"]
        assert p.stat().st_size == s["bytes"] and hashlib.sha256(p.read_bytes()).hexdigest() == s["sha256"]
    assert len(m["tokenizer"]["fingerprint"]) == 16 and m["tool_version"]
    assert m["stats"]["images"] == 5 and m["stats"]["videos"] == 3
    assert m["prompt"]["frame_prefix_tokens"] > 5
    assert not any(p.name.startswith(".shard") for p in out.iterdir())


def test_index_records_and_random_access(ds, prepared):
    out, _ = prepared
    index = load_index(out)
    assert [r["id"] for r in index] == ["a1", "a2", "a3", "a4", "b1", "b7", None]
    by_id = {r["id"]: r for r in index}
    a1 = by_id["a1"]["media"][0]
    assert (a1["width"], a1["height"]) == (640, 480)
    assert (by_id["b7"]["media"][0]["width"], by_id["b7"]["media"][0]["height"]) == (80, 120)  # EXIF rotated
    v = by_id["a3"]["media"][0]
    assert (v["duration"], v["fps"], v["frames"], v["width"], v["height"], v["codec"]) == (3.0, 10.0, 30, 64, 48, "h264")
    clip = by_id["a4"]["media"][1]
    assert (clip["start"], clip["end"], clip["codec"]) == (0.5, 2.5, "mpeg4")
    assert all(r["text_tokens"] > r["supervised_tokens"] > 0 for r in index)
    with ShardReader(out) as reader:
        for r in reversed(index):  # any order, no scanning
            sample = reader.read_json(r)
            assert sample["key"] == r["key"] and sample["conversations"][-1]["from"] == "gpt"
            for i, m in enumerate(r["media"]):
                assert reader.read_media(r, i) == (ds["media"] / m["path"]).read_bytes()
            # the record's byte span covers exactly its members
            with open(out / r["shard"], "rb") as f:
                f.seek(r["offset"])
                span = f.read(r["length"])
            assert span[257:262] == b"ustar" and r["key"].encode() in span[:100]


def test_shards_read_by_webdataset_and_tar(ds, prepared):
    import webdataset as wds

    out, res = prepared
    urls = [str(out / s["name"]) for s in res.manifest["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    index = load_index(out)
    assert [s["__key__"] for s in samples] == [r["key"] for r in index]
    for s, r in zip(samples, index):
        assert json.loads(s["json"])["key"] == r["key"]
        assert {k for k in s if not k.startswith("__")} == set(r["members"])
    listing = subprocess.run(["tar", "-tvf", urls[0]], capture_output=True, text=True, check=True).stdout
    assert f"{index[0]['key']}.json" in listing and "1970-01-01" in listing and "megatron-eagle" in listing
    with tarfile.open(urls[0]) as tf:
        for ti in tf:
            assert ti.mtime == 0 and ti.mode == 0o444 and ti.uid == 0 and ti.isfile() and "/" not in ti.name


def test_two_runs_are_byte_identical_for_any_worker_count(ds, prepared, tmp_path):
    out, _ = prepared
    res = prepare(cfg(ds, tmp_path / "again", workers=1))
    assert snapshot(tmp_path / "again") == snapshot(out)
    assert res.manifest["shards"] == load_manifest(out)["shards"]


def test_rerun_skips_finished_shards_and_repairs_missing_ones(ds, prepared, tmp_path):
    ref, _ = prepared
    out = tmp_path / "resume"
    shutil.copytree(ref, out)
    names = sorted(p.name for p in out.glob("shard-*.tar"))
    (out / names[1]).unlink()
    (out / "index.jsonl").unlink()
    (out / f".{names[0]}.tmp.999").write_bytes(b"half a shard")  # left by a killed writer
    kept = {n: (out / n).stat().st_mtime_ns for n in names if n != names[1]}
    res = prepare(cfg(ds, out))
    assert res.skipped_shards == len(names) - 1
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept  # untouched
    assert snapshot(out) == snapshot(ref)
    assert not any(p.name.startswith(".shard") for p in out.iterdir())


def test_interrupted_run_leaves_no_corrupt_shard_and_resumes(ds, prepared, tmp_path, monkeypatch):
    ref, _ = prepared
    out = tmp_path / "crash"
    real = prepare_mod.PlanSource.samples

    def dying(self, start, end, late):
        for n, s in enumerate(real(self, start, end, late)):
            if start > 0 and n == 0:
                raise KeyboardInterrupt("killed while writing")
            yield s

    monkeypatch.setattr(prepare_mod.PlanSource, "samples", dying)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg(ds, out))
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]
    assert not (out / "manifest.json").exists() and not list(out.glob(".shard*"))
    monkeypatch.setattr(prepare_mod.PlanSource, "samples", real)
    res = prepare(cfg(ds, out))
    assert res.skipped_shards == 1
    assert snapshot(out) == snapshot(ref)


def test_tools_script_runs(ds, prepared):
    out, _ = prepared
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([os.sys.executable, str(root / "tools/verify_shards.py"), str(out), "--workers", "1"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "7 samples" in r.stdout and "OK" in r.stdout
