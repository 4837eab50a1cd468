"""eagle2.5 prompt format: the official frame rule on real videos, ADS lowering frames with the
header following, ChatML multi-turn labels with the real Qwen tokenizers, alpha onto white."""

from __future__ import annotations

import glob
import io
import lzma
import shutil
from pathlib import Path

import numpy as np
import pytest

from megatron_eagle.data.media.ads import ADSConfig, ImagePlan, VideoPlan, plan_sample
from megatron_eagle.data.media.prompt import (IGNORE_INDEX, count_text_tokens, prompt_token_bounds, render_collapsed,
                                              tokenize_conversation)
from megatron_eagle.data.media.video import decode_frames, probe_video
from megatron_eagle.tokenizer import IMG_CONTEXT
from tests.media_factory import encode_video, tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
QWEN_TOKENIZERS = sorted(glob.glob(str(REPO / "tests" / "fixtures" / "qwen*_tokenizer")))
SYS = "<|im_start|>system\nYou are an AI assistant whose name is Eagle-Next.<|im_end|>\n"
OFFICIAL = ADSConfig(frame_sampling="official", max_fps=2.0, min_frames=8, max_frames=128)


def official_indices(total: int, fps: float, sample_fps: float = 2.0, lo: int = 8, hi: int = 128) -> list[int]:
    """The rule as ecosystem.md states it (get_seq_frames_v2, corner_align=True)."""
    if total <= lo:
        return list(range(total))
    n = min(max(int(total * min(sample_fps, fps) / fps), lo), hi)
    return np.round(np.linspace(0, total - 1, n)).astype(int).tolist()


def _video_record(path: Path, start=None, end=None) -> dict:
    meta = probe_video(str(path))
    clip = start is not None or end is not None
    return {"type": "video", **meta, "start": start or 0.0, "end": end if end is not None else meta["duration"],
            "clip": clip}


@pytest.mark.parametrize("seconds,fps", [(3.0, 24), (2.0, 10), (0.5, 10), (12.0, 5), (70.0, 4)])
def test_frame_indices_follow_the_official_rule_on_real_videos(tmp_path, seconds, fps):
    path = encode_video(tmp_path / f"v_{seconds}_{fps}.mp4", "libx264", seconds=seconds, fps=fps)
    rec = _video_record(path)
    plan = plan_sample({"text_tokens": 20, "media": [rec]}, 1 << 20, OFFICIAL).plan
    v = plan.media[0]
    total = int(round(seconds * fps))
    assert rec["frames"] == total
    want = official_indices(total, fps)
    assert list(v.frame_indices) == want
    if (seconds, fps) == (3.0, 24):
        assert want == [0, 10, 20, 30, 41, 51, 61, 71]
    rate = fps if total <= 8 else len(want) / seconds
    assert f"{v.duration:.2f} seconds at {v.rate:.2f} fps" == f"{seconds:.2f} seconds at {rate:.2f} fps"
    # the indices pick those frames of the real file (frame i has red = 8*i mod 256)
    frames, _ = decode_frames(io.BytesIO(path.read_bytes()), want[:3] + want[-2:])
    for i, f in zip(want[:3] + want[-2:], frames):
        assert abs(int(f[..., 0].mean()) - (8 * i) % 256) <= 6


def test_clip_samples_its_own_span_and_the_header_states_the_whole_video(tmp_path):
    path = encode_video(tmp_path / "c.mp4", "libx264", seconds=3.0, fps=24)
    rec = _video_record(path, 1.0, 2.5)
    v = plan_sample({"text_tokens": 20, "media": [rec]}, 1 << 20, OFFICIAL).plan.media[0]
    total, first = int((2.5 - 1.0) * 24), int(1.0 * 24)
    assert list(v.frame_indices) == [first + i for i in official_indices(total, 24)]
    assert (round(v.duration, 2), round(v.rate, 2)) == (3.0, round(8 / 3.0, 2))


def test_ads_lowers_frames_only_when_the_budget_requires_and_the_header_follows():
    rec = {"type": "video", "fps": 5.0, "frames": 100, "duration": 20.0, "start": 0.0, "end": 20.0, "clip": False}
    cfg = ADSConfig(frame_sampling="official", max_frames=128, frame_text_tokens=6, video_text_tokens=30)
    full = plan_sample({"text_tokens": 50, "media": [rec]}, 1 << 20, cfg).plan.media[0]
    assert full.num_frames == 40 and full.rate == 2.0  # int(100 * 2 / 5)
    per = cfg.frame_tokens
    budget = 50 + 30 + 20 * per + per // 2  # room for 20 frames, not 21
    low = plan_sample({"text_tokens": 50, "media": [rec]}, budget, cfg).plan.media[0]
    assert low.num_frames == 20 and f"{low.rate:.2f}" == "1.00"
    assert list(low.frame_indices) == np.round(np.linspace(0, 99, 20)).astype(int).tolist()
    assert plan_sample({"text_tokens": 50, "media": [rec]}, 50 + 30 + 7 * per, cfg).plan is None  # below 8


def _real_tokenizer_dir(src: str, dst: Path) -> Path:
    """A copy of a fixture tokenizer dir with its ``*.xz`` files decompressed."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in Path(src).iterdir():
        if f.suffix == ".xz":
            (dst / f.stem).write_bytes(lzma.decompress(f.read_bytes()))
        elif f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


def _chatml(turns: list[tuple[str, str]]) -> str:
    out = SYS
    for role, text in turns:
        out += f"<|im_start|>{role}\n{text}<|im_end|>\n"
    return out


@pytest.mark.parametrize("tok_dir", QWEN_TOKENIZERS or [None])
def test_multi_turn_labels_with_real_qwen_tokenizers(tok_dir, tmp_path):
    from megatron_eagle.tokenizer import load_tokenizer

    tok = load_tokenizer(_real_tokenizer_dir(tok_dir, tmp_path / "tok")) if tok_dir else tiny_tokenizer()
    if tok_dir:
        assert len(tok) > 150000 and len(tok("What is it?", add_special_tokens=False)["input_ids"]) == 4
    conv = [{"from": "human", "value": "<image-1>\nWhat is it?  "}, {"from": "gpt", "value": " A red circle. "},
            {"from": "human", "value": "And the size?"}, {"from": "gpt", "value": "Small."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes, quite."}]
    tiles = 5
    ids, labels = tokenize_conversation(tok, conv, [ImagePlan((2, 2))], tokens_per_tile=16)
    img = "<img>" + IMG_CONTEXT * (tiles * 16) + "</img>"
    want = _chatml([("user", img + "\n\nWhat is it?"), ("assistant", "A red circle."), ("user", "And the size?"),
                    ("assistant", "Small."), ("user", "Sure?"), ("assistant", "Yes, quite.")])
    assert ids == tok(want, add_special_tokens=False)["input_ids"]
    sup = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert sup == tok("A red circle.<|im_end|>Small.<|im_end|>Yes, quite.<|im_end|>", add_special_tokens=False)[
        "input_ids"]
    # the tokenizer-template mode finds each turn in order, whatever the template does to history turns
    ids2, labels2 = tokenize_conversation(tok, [dict(t, value=t["value"].replace("<image-1>\n", "")) for t in conv],
                                          fmt="frame-times")
    sup2 = tok.decode([i for i, l in zip(ids2, labels2) if l != IGNORE_INDEX])
    assert sup2.replace(" ", "").endswith("Small.<|im_end|>Yes,quite.<|im_end|>") and "Sure?" not in sup2
    assert " A red circle. <|im_end|>" in sup2 and "Small.<|im_end|>" in sup2


def test_token_bounds_cover_the_text_around_media():
    tok = tiny_tokenizer()
    b = prompt_token_bounds(tok, "eagle2.5")
    conv = [{"from": "human", "value": "<video-1><image-1><image-2>Compare."}, {"from": "gpt", "value": "same"}]
    text, _ = count_text_tokens(tok, conv)
    v = VideoPlan(tuple(range(0, 240, 10)), tuple(i / 30 for i in range(0, 240, 10)), 123.45, 0.19)
    ids, _ = tokenize_conversation(tok, conv, [v, ImagePlan((1, 1)), ImagePlan((2, 1))], tokens_per_tile=4)
    visual = 24 * (4 + 2) + (4 + 2) + (12 + 2)
    assert text + visual < len(ids) <= text + visual + b["video_text_tokens"] + 24 * b["frame_prefix_tokens"] \
        + 2 * b["image_text_tokens"]


def test_collapsed_rendering_reads_at_a_glance():
    v = VideoPlan((0, 10), (0.0, 0.4), 3.0, 2 / 3)
    conv = [{"from": "human", "value": "<image-1><video-1>Q"}, {"from": "gpt", "value": "A"}]
    text = render_collapsed(None, conv, [ImagePlan((3, 1)), v], 256)
    assert text == _chatml([("user", "<img>×256·4</img>\nThe first video of 3.00 seconds at 0.67 fps: "
                                     "Frame 1: <img>×256·1</img>Frame 2: <img>×256·1</img>\nQ"), ("assistant", "A")])


def test_alpha_is_composited_onto_white():
    from PIL import Image

    from megatron_eagle.data.media.image import decode_image

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    for mode in ("RGBA", "LA", "P"):
        img = rgba if mode == "RGBA" else rgba.convert(mode)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out = decode_image(buf.getvalue())
        assert out.mode == "RGB" and out.getpixel((5, 5)) == (255, 255, 255), mode
    assert decode_image(_png(rgba)).getpixel((0, 0)) == (0, 0, 255)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
