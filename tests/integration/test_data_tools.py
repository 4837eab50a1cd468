import json
import shutil

from megatron_eagle.cli import main as cli_main
from megatron_eagle.data.prepare.verify import verify
from megatron_eagle.data.shards import load_index
from tests.prepare_fixtures import ds, prepared  # noqa: F401


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
