"""An Eagle 2.5 recipe in the official formats goes through `prepare --recipe` and `train`:
counts add up per dataset and in total, each kind's text equals the official layout written out
by hand, and a two-stage run on the prepared recipe samples by repeat_time."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megatron_eagle.data.media.ads import ads_config_from_manifest, plan_sample
from megatron_eagle.data.media.prompt import IGNORE_INDEX, format_from_manifest, tokenize_conversation
from megatron_eagle.data.shards import ShardReader, load_index, load_manifest
from tests.media_factory import conv, encode_video, write_image, write_jsonl
from tests.train_fixtures import REPO, records, run_cli, write_run

TPT = 256
SYS = "<|im_start|>system\nYou are an AI assistant whose name is Eagle-Next.<|im_end|>\n"


def _rgba_png(path: Path) -> Path:
    from PIL import Image

    img = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def build_recipe(tmp: Path) -> dict:
    """Three datasets: relative root (repeat 3), absolute root (1), empty root (0.5)."""
    rdir = tmp / "recipes"
    rel, absr, loose = rdir / "media_rel", tmp / "abs_media", tmp / "loose"
    write_image(rel / "a.jpg", 640, 480, seed=1)
    write_image(rel / "b.png", 300, 500, "PNG", seed=2)
    (rel / "a.txt").write_text("not media")
    encode_video(rel / "v24.mp4", "libx264", seconds=3.0, fps=24)
    write_image(absr / "c.jpg", 200, 100, seed=3)
    encode_video(absr / "clip.mp4", "libx264", seconds=3.0, fps=10)
    rgba = _rgba_png(absr / "rgba.png")
    d1, d2 = write_image(loose / "d1.jpg", 120, 90, seed=4), write_image(loose / "d2.jpg", 90, 120, seed=5)
    lv = encode_video(loose / "lv.mp4", "libx264", seconds=2.0, fps=10)
    multi_turn = [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi"},
                  {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "hi again"}]
    rel_rows = [
        {"id": "r1", "image": "a.jpg", "conversations": conv("<image>\nWhat is it?", "It is red.")},
        {"id": "r2", "image": ["a.jpg", "b.png"], "conversations": conv("Compare them.", "Same.")},
        {"id": "r3", "video": "v24.mp4", "conversations": conv("<video>\nWhat moves?", "A line.")},
        {"id": "r4", "conversations": multi_turn},
        "{oops",
        {"id": "r6", "image": "nope.jpg", "conversations": conv()},
        {"id": "r7", "image": "a.txt", "conversations": conv()},
        {"id": "r8", "image": "a.jpg", "conversations": conv("<image-1> <image-2>", "x")},
        {"id": "r9", "video": {"video": "v24.mp4", "start_time": 1.0, "end_time": 9.0}, "conversations": conv("<video>", "x")},
    ]
    abs_rows = [
        {"id": "a1", "video": {"video": "clip.mp4", "start_time": 0.5, "end_time": 2.5},
         "conversations": conv("<video>\nDescribe the clip.", "A bar.")},
        {"id": "a2", "image": "c.jpg", "video": "clip.mp4", "conversations": conv("Both?", "Yes.")},
        {"id": "a3", "data": [{"type": "image", "image_list": [str(rgba)]}], "conversations": conv("<image-1>\nWhat?", "White.")},
        {"id": "a4", "conversations": conv("Plain text?", "Yes.")},
    ]
    empty_rows = [
        {"id": "e1", "image": str(d1), "conversations": conv("<image>\nColour?", "Green.")},
        {"id": "e2", "video": str(lv), "conversations": conv("<video>\nSpeed?", "Slow.")},
        {"id": "e3", "image": [str(d1), str(d2)], "conversations": conv("<image>\n<image>\nCompare.", "Rotated.")},
        {"id": "e4", "image": "d1.jpg", "conversations": conv()},
        {"id": "e5", "conversations": conv("One?", "1")},
        {"id": "e6", "conversations": conv("Two?", "2")},
    ]
    (rdir / "ann").mkdir(parents=True)
    write_jsonl(rdir / "ann" / "rel.jsonl", rel_rows)
    (tmp / "cwd_ann").mkdir()
    write_jsonl(tmp / "cwd_ann" / "abs.jsonl", abs_rows)  # found through the working directory
    write_jsonl(rdir / "empty.jsonl", empty_rows)
    recipe = {
        "rel_set": {"root": "media_rel", "annotation": "ann/rel.jsonl", "repeat_time": 3, "data_augment": False,
                    "max_dynamic_tiles": 6, "max_reject_fraction": 0.6, "length": 9},
        "abs_set": {"root": str(absr), "annotation": "cwd_ann/abs.jsonl", "repeat_time": 1, "weight": 1.0},
        "empty_set": {"root": "", "annotation": "empty.jsonl", "repeat_time": 0.5, "max_reject_fraction": 0.2},
    }
    path = rdir / "sft_recipe.json"
    path.write_text(json.dumps(recipe))
    return {"recipe": path, "inputs": {"rel_set": 9, "abs_set": 4, "empty_set": 6},
            "rejects": {"rel_set": {"malformed JSON": 1, "missing media file": 1, "unknown media extension": 1,
                                    "placeholder count mismatch": 1, "clip outside video": 1},
                        "abs_set": {}, "empty_set": {"path escapes media root": 1}}}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    import os

    tmp = tmp_path_factory.mktemp("recipe")
    spec = build_recipe(tmp)
    hf = tmp / "hf-init"
    run_cli(["convert", "make-tiny", "--out", str(hf)])
    out = tmp / "prepared"
    old = os.getcwd()
    os.chdir(tmp)
    try:
        args = ["prepare", "--recipe", str(spec["recipe"]), "--output", str(out), "--tokenizer", str(hf),
                "--workers", "1", "--no-progress"]
        import subprocess
        import sys

        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        strict = subprocess.run([sys.executable, "-m", "megatron_eagle.cli", *args], cwd=tmp, env=env,
                                capture_output=True, text=True)
        ok = run_cli(args + ["--max-reject-fraction", "0.4"], cwd=tmp)
    finally:
        os.chdir(old)
    return {**spec, "out": out, "hf": hf, "tmp": tmp, "strict": strict, "ok": ok}


def test_prepare_recipe_writes_every_good_sample_and_counts_add_up(prepared):
    out = prepared["out"]
    index = json.loads((out / "recipe.json").read_text())
    assert [e["name"] for e in index["datasets"]] == ["rel_set", "abs_set", "empty_set"]
    index["datasets"] = {e["name"]: e for e in index["datasets"]}
    total_in = total_written = 0
    for name, n_in in prepared["inputs"].items():
        e = index["datasets"][name]
        m = load_manifest(out / e["path"])
        rejects = [json.loads(l) for l in (out / e["path"] / "rejects.jsonl").read_text().splitlines()]
        assert e["input_samples"] == m["input_samples"] == n_in
        assert e["written_samples"] + e["rejected_samples"] == n_in == m["written_samples"] + m["rejected_samples"]
        assert e["length"] == e["written_samples"] == len(load_index(out / e["path"]))
        assert dict(Counter(r["reason"] for r in rejects)) == prepared["rejects"][name] == e["rejected_by_reason"]
        assert all(r["source"].endswith(".jsonl") and r["line"] >= 1 for r in rejects)  # file and line
        assert e["text_tokens"]["total"] == sum(r["text_tokens"] for r in load_index(out / e["path"]))
        assert m["prompt"]["format"] == "eagle2.5" and m["video_sampling"]["max_frames"] == 128
        total_in += n_in
        total_written += e["written_samples"]
    t = index["totals"]
    assert (t["input_samples"], t["written_samples"], t["rejected_samples"]) == (total_in, total_written, 6) == (19, 13, 6)
    assert [index["datasets"][n]["repeat_time"] for n in ("rel_set", "abs_set", "empty_set")] == [3, 1, 0.5]
    assert t["samples_per_epoch"] == 4 * 3 + 4 + int(5 * 0.5)
    assert index["datasets"]["rel_set"]["data_augment"] is False and index["datasets"]["abs_set"]["weight"] == 1.0
    assert load_manifest(out / "rel_set")["max_dynamic_tiles"] == 6
    lines = prepared["ok"].stdout
    assert "rel_set: wrote 4 of 9, rejected 5 (55.6%, max 60.0%), repeat_time 3" in lines
    assert "prepared 13 of 19 samples in 3 datasets; rejected 6 (31.6%, max 40.0%)" in lines
    assert prepared["strict"].returncode == 1 and "overall" in prepared["strict"].stderr  # 31.6% > 5%


def _train_single(run_yaml: Path):
    """`megatron-eagle train` as one process on a free port (other runs may hold the default one)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return subprocess.run([sys.executable, "-m", "megatron_eagle.cli", "train", "--config", str(run_yaml)], env=env,
                          capture_output=True, text=True, timeout=400)


def _img(tiles: int) -> str:
    return "<img>" + "<IMG_CONTEXT>" * (TPT * tiles) + "</img>"


def _frames(indices: list[int]) -> str:
    return "".join(f"Frame {i}: " + _img(1) for i in range(1, len(indices) + 1))


def _official(total: int, fps: float, first: int = 0) -> list[int]:
    if total <= 8:
        return [first + i for i in range(total)]
    n = min(max(int(total * min(2.0, fps) / fps), 8), 128)
    return [first + int(i) for i in np.round(np.linspace(0, total - 1, n))]


def _chat(user: str, answer: str) -> str:
    return SYS + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


def test_each_kind_is_laid_out_as_official_training_writes_it(prepared):
    from megatron_eagle.tokenizer import load_tokenizer

    tok = load_tokenizer(prepared["hf"])
    out = prepared["out"]
    got = {}
    for name in ("rel_set", "abs_set", "empty_set"):
        m = load_manifest(out / name)
        cfg, fmt = ads_config_from_manifest(m), format_from_manifest(m)
        with ShardReader(out / name) as reader:
            for rec in load_index(out / name):
                plan = plan_sample(rec, 1 << 20, cfg).plan
                sample = reader.read_json(rec)
                ids, labels = tokenize_conversation(tok, sample["conversations"], plan.media, TPT, fmt=fmt)
                tiles = [mp.num_tiles for mp in plan.media if hasattr(mp, "grid")]
                got[rec["id"]] = (ids, labels, tiles, [list(mp.frame_indices) for mp in plan.media
                                                       if hasattr(mp, "frame_indices")])
    t = {k: v[2] for k, v in got.items()}
    v24, clip_whole, clip = _official(72, 24), _official(30, 10), _official(int(2.0 * 10), 10, first=5)
    assert got["r3"][3] == [v24] and got["a1"][3] == [clip] and got["a2"][3] == [clip_whole]
    assert v24 == [0, 10, 20, 30, 41, 51, 61, 71]
    want = {
        "r1": _chat(_img(t["r1"][0]) + "\nWhat is it?", "It is red."),
        "r2": _chat(f"<image 1>{_img(t['r2'][0])}\n<image 2>{_img(t['r2'][1])}\nCompare them.", "Same."),
        "r3": _chat("The first video of 3.00 seconds at 2.67 fps: " + _frames(v24) + "\nWhat moves?", "A line."),
        "r4": SYS + "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
                    "<|im_start|>user\nAgain?<|im_end|>\n<|im_start|>assistant\nhi again<|im_end|>\n",
        "a1": _chat("The first video of 3.00 seconds at 2.67 fps: " + _frames(clip) + "\nDescribe the clip.", "A bar."),
        "a2": _chat("The first video of 3.00 seconds at 2.67 fps: " + _frames(clip_whole) + "\n"
                    + _img(t["a2"][0]) + "\nBoth?", "Yes."),
        "a3": _chat(_img(t["a3"][0]) + "\n\nWhat?", "White."),
        "a4": _chat("Plain text?", "Yes."),
        "e1": _chat(_img(t["e1"][0]) + "\nColour?", "Green."),
        "e2": _chat("The first video of 2.00 seconds at 4.00 fps: " + _frames(_official(20, 10)) + "\nSpeed?", "Slow."),
        "e3": _chat(f"<image 1>{_img(t['e3'][0])}\n<image 2>{_img(t['e3'][1])}\nCompare.", "Rotated."),
        "e5": _chat("One?", "1"), "e6": _chat("Two?", "2"),
    }
    assert sorted(got) == sorted(want)
    answers = {"r4": "hi<|im_end|>hi again<|im_end|>"}
    for key, text in want.items():
        ids, labels, _, _ = got[key]
        assert ids == tok(text, add_special_tokens=False)["input_ids"], key
        sup = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
        answer = answers.get(key) or text.rsplit("assistant\n", 1)[1].rstrip("\n")
        assert sup == tok(answer, add_special_tokens=False)["input_ids"], key
    assert max(t["r2"]) <= 7  # the recipe's max_dynamic_tiles: 6 (+ thumbnail)


def test_inspect_collapses_image_blocks(prepared):
    r = run_cli(["inspect", str(prepared["out"] / "rel_set"), "--sample", "1", "--plot", str(prepared["tmp"] / "p.png")])
    assert "<|im_start|>user\n<image 1><img>×256·" in r.stdout and "</img>\nCompare them.<|im_end|>" in r.stdout
    assert "<IMG_CONTEXT>" not in r.stdout


def test_two_stage_run_trains_on_the_recipe_and_samples_by_repeat_time(prepared, tmp_path):
    from megatron_eagle.config import load_curriculum, preset_model_config
    from megatron_eagle.data.loading.loader import build_stage_loader, plan_sources
    from megatron_eagle.tokenizer import load_tokenizer

    recipe = str(prepared["out"] / "recipe.json")
    stages = [
        {"name": "warm", "seq_len": 1024, "trainable": ["connector"], "datasets": [{"name": "sft", "recipe": recipe}]},
        {"name": "full", "seq_len": 2048, "trainable": ["vision", "connector", "llm"],
         "datasets": [{"name": "sft", "recipe": recipe}]},
    ]
    assets = {"hf": prepared["hf"], "shards": None}
    run = write_run(tmp_path, assets, stages)
    cur = load_curriculum(tmp_path / "curriculum.yaml")
    assert [d.repeat for d in cur.stages[0].datasets] == [3.0, 1.0, 0.5]
    tok, model = load_tokenizer(prepared["hf"]), preset_model_config("tiny")
    ld = build_stage_loader(tmp_path / "curriculum.yaml", "warm", tok, model, world_size=1, dp_rank=0, num_workers=0)
    plan = ld.epoch_plan(0)
    ds, idx = plan_sources(plan)
    blend = Counter(zip(ds.tolist(), idx.tolist()))  # what the stage draws: repeat_time per dataset
    assert Counter(ds.tolist()) == {0: 4 * 3, 1: 4, 2: int(5 * 0.5)}
    assert {c for (d, _), c in blend.items() if d == 0} == {3} and len({i for d, i in blend if d == 0}) == 4
    assert {c for (d, _), c in blend.items() if d == 1} == {1} and len({i for d, i in blend if d == 2}) == 2
    drawn: Counter = Counter()
    for batches in ld:
        for b in batches:
            for d, i in b.sample_ids.tolist():
                drawn[(d, i)] += 1
    ld.close()
    # the packs hold exactly the blend, less what the planner leaves out (too long, or short of a whole step)
    left = len(plan.dropped_samples) + len(plan.left_over_samples)
    assert left <= 2 and sum(drawn.values()) + left == len(ds) == 18
    assert all(drawn[k] <= c for k, c in blend.items()) and set(drawn) <= set(blend)
    r = _train_single(run)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = records(run)
    assert {x["stage"] for x in recs} == {"warm", "full"} and all(np.isfinite(x["loss"]) for x in recs)
