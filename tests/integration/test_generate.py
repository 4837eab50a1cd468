"""`generate`: our greedy decoding equals transformers' greedy generate on the reference
model (image with several tiles, video frames, text), and the CLI's --json output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist import run_distributed
from tests.hf_fixtures import media, tiny_checkpoint  # noqa: F401

MAX_NEW = 8


PROMPTS = {
    "image": dict(prompt="What is the color of <image>?", images=True, videos=False),
    "video": dict(prompt="Describe the video.", images=False, videos=True),
    "text": dict(prompt="What is the shape?", images=False, videos=False),
}


def _worker(rank, world, hf_dir, img_path, vid_path):
    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.convert.load import build_model_from_hf
    from megatron_eagle.convert.reference import EagleHFReference
    from megatron_eagle.inference.generate import greedy_generate
    from megatron_eagle.inference.media import build_inputs, load_image, load_video
    from megatron_eagle.runtime.distributed import init_model_parallel
    from megatron_eagle.tokenizer import load_tokenizer, special_token_ids

    init_model_parallel(1, 1, 1)
    model, _ = build_model_from_hf(hf_dir, ParallelConfig())
    ref = EagleHFReference.from_pretrained(hf_dir)
    tok = load_tokenizer(hf_dir)
    eos = special_token_ids(tok)["eos"]
    cfg = model.model_cfg
    out = {}
    for name, p in PROMPTS.items():
        images = [load_image(img_path, cfg.vision.image_size, max_tiles=4)] if p["images"] else []
        videos = [load_video(vid_path, cfg.vision.image_size, num_frames=3)] if p["videos"] else []
        ids, pixels = build_inputs(tok, p["prompt"], images, videos, cfg.tokens_per_tile, cfg.vision.image_size)
        ours = greedy_generate(model, ids, pixels, MAX_NEW, eos)
        theirs = ref.greedy(ids, pixels if pixels.shape[0] else None, MAX_NEW, eos)
        out[name] = {"ours": ours, "ref": theirs, "input_ids": ids.tolist(), "tiles": int(pixels.shape[0])}
    return out


@pytest.fixture(scope="module")
def generated(media):
    return run_distributed(_worker, 1, str(tiny_checkpoint(False)), str(media[0]), str(media[1]))[0]


@pytest.mark.parametrize("case", list(PROMPTS))
def test_greedy_equals_transformers_reference(generated, case):
    r = generated[case]
    assert len(r["ours"]) >= 1
    assert r["ours"] == r["ref"], f"{case}: ours {r['ours']} vs transformers {r['ref']}"
    assert len(set(r["ours"])) > 1 or len(r["ours"]) < MAX_NEW  # not a degenerate constant stream


def test_prompt_media_expansion(generated):
    from megatron_eagle.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint(False))
    ctx = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    tpt = 16
    # 200x150 image at 112 px tiles, max 4: IAP grid (2, 2) + thumbnail = 5 tiles
    img = generated["image"]
    assert img["tiles"] == 5 and img["input_ids"].count(ctx) == 5 * tpt
    vid = generated["video"]
    assert vid["tiles"] == 3 and vid["input_ids"].count(ctx) == 3 * tpt
    text = tok.decode(vid["input_ids"])
    assert "The first video of" in text and " fps: Frame 1: <img>" in text and "</img>Frame 3: <img>" in text
    assert text.count("<img>") == 3 and "You are an AI assistant whose name is Eagle-Next." in text
    assert text.rstrip().endswith("<|im_start|>assistant")
    assert generated["text"]["tiles"] == 0 and ctx not in generated["text"]["input_ids"]


def test_cli_json(generated, media):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    cmd = [sys.executable, "-m", "megatron_eagle.cli", "generate", "--hf", str(tiny_checkpoint(False)),
           "--prompt", PROMPTS["image"]["prompt"], "--image", str(media[0]), "--max-tiles", "4",
           "--max-new-tokens", str(MAX_NEW), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out) == {"input_ids", "generated_ids", "text"}
    assert out["input_ids"] == generated["image"]["input_ids"]
    assert out["generated_ids"] == generated["image"]["ours"]
    from megatron_eagle.tokenizer import load_tokenizer

    assert out["text"] == load_tokenizer(tiny_checkpoint(False)).decode(out["generated_ids"], skip_special_tokens=True)
