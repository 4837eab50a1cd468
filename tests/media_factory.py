"""Real media for tests: JPEG/PNG via pillow, H.264 (libx264) and MPEG-4 videos via PyAV.

Frame ``i`` of a generated video is filled with a colour that encodes ``i`` (red channel = 8*i mod
256) plus a moving bar, so decoders can be checked frame by frame.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np


def frame_array(i: int, width: int, height: int) -> np.ndarray:
    a = np.zeros((height, width, 3), np.uint8)
    a[..., 0] = (8 * i) % 256
    a[..., 2] = 255 - (8 * i) % 256
    a[:, (3 * i) % width, 1] = 255
    return a


def write_image(path: str | Path, width: int, height: int, fmt: str = "JPEG", seed: int = 0,
                exif_orientation: Optional[int] = None) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = np.zeros((height, width, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    a[..., 2] = rng.integers(0, 255)
    img = Image.fromarray(a)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kw: dict[str, Any] = {"quality": 90} if fmt == "JPEG" else {}
    if exif_orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif
    img.save(path, format=fmt, **kw)
    return path


def encode_video(path: str | Path, codec: str = "libx264", seconds: float = 2.0, fps: int = 10,
                 width: int = 64, height: int = 48, gop: Optional[int] = None,
                 container_options: Optional[dict[str, str]] = None,
                 keyframes: Optional[set[int]] = None) -> Path:
    """Encode a real video with PyAV; ``codec`` is 'libx264' (H.264) or 'mpeg4' (MPEG-4 Part 2).

    ``keyframes`` forces keyframes at those frame numbers (irregular GOPs, H.264 only)."""
    import av
    from av.video.frame import PictureType

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", options=container_options or {}) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        if gop:
            s.codec_context.gop_size = gop
        if codec == "libx264":
            s.options = {"preset": "ultrafast", "tune": "zerolatency", "forced-idr": "1", "sc_threshold": "0"}
        for i in range(int(round(seconds * fps))):
            frame = av.VideoFrame.from_ndarray(frame_array(i, width, height), format="rgb24")
            if keyframes is not None and i in keyframes:
                frame.pict_type = PictureType.I
            for p in s.encode(frame):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


def truncate(path: str | Path, fraction: float = 0.5, out: Optional[str | Path] = None) -> Path:
    data = Path(path).read_bytes()
    out = Path(out or path)
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


def write_jsonl(path: str | Path, rows: list[Any]) -> Path:
    """Rows may be dicts (dumped) or raw strings (written as-is, for malformed lines)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def conv(question: str = "<image>\nWhat is the color?", answer: str = "It is red.") -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def build_dataset(root: str | Path) -> dict[str, Any]:
    """A small mixed dataset under ``root``: media/ plus a.jsonl and b.jsonl with good and bad lines.

    Returns the paths and the expected reject reasons keyed by (file name, line).
    """
    root = Path(root)
    media = root / "media"
    write_image(media / "img/a.jpg", 640, 480, "JPEG", 1)
    write_image(media / "img/b.png", 300, 500, "PNG", 2)
    write_image(media / "img/c.jpg", 2000, 1300, "JPEG", 3)
    write_image(media / "img/d.png", 96, 64, "PNG", 4)
    write_image(media / "img/rot.jpg", 120, 80, "JPEG", 5, exif_orientation=6)
    (media / "img/corrupt.jpg").write_bytes(write_image(media / "img/tmp.jpg", 200, 200).read_bytes()[:400])
    os.unlink(media / "img/tmp.jpg")
    encode_video(media / "vid/h264.mp4", "libx264", seconds=3.0, fps=10)
    encode_video(media / "vid/mpeg4.mp4", "mpeg4", seconds=2.0, fps=12)
    encode_video(media / "vid/clip.mkv", "mpeg4", seconds=3.0, fps=10)
    encode_video(media / "vid/fast.mp4", "libx264", seconds=2.0, fps=10, container_options={"movflags": "faststart"})
    truncate(media / "vid/fast.mp4", 0.5, media / "vid/truncated.mp4")
    (media / "vid/empty.mp4").write_bytes(b"")
    outside = root / "outside.jpg"
    write_image(outside, 32, 32)
    os.symlink(outside, media / "img/link_out.jpg")

    a = [
        {"id": "a1", "image": "img/a.jpg", "conversations": conv()},
        {"id": "a2", "image": ["img/b.png", "img/c.jpg"],
         "conversations": conv("<image-1> and <image-2>: which is wider?", "The second one.")},
        {"id": "a3", "video": "vid/h264.mp4", "conversations": conv("<video>\nWhat moves?", "A green line.")},
        {"id": "a4", "data": [{"type": "image", "image_list": ["img/d.png"]},
                              {"type": "video", "video_list": [{"path": "vid/clip.mkv", "start": 0.5, "end": 2.5}]}],
         "conversations": conv("<image-1> <video-1> Describe.", "A clip and a picture.")},
        "{not json",
        {"id": "a6", "image": "img/a.jpg", "conversations": conv("<image> <image>", "Two?")},
        {"id": "a7", "image": "img/missing.jpg", "conversations": conv()},
        {"id": "a8", "image": "img/corrupt.jpg", "conversations": conv()},
        {"id": "a9", "video": "vid/truncated.mp4", "conversations": conv("<video>", "Hm.")},
        {"id": "a10", "image": "../outside.jpg", "conversations": conv()},
        {"id": "a11", "conversations": [{"from": "human", "value": "hello"}]},
    ]
    b = [
        {"id": "b1", "video": ["vid/mpeg4.mp4"], "conversations": conv("<video-1>\nCount frames.", "Twenty four.")},
        {"id": "b2", "conversations": "nope"},
        {"id": "b3", "image": "img/link_out.jpg", "conversations": conv()},
        {"id": "b4", "video": "vid/empty.mp4", "conversations": conv("<video>", "Nothing.")},
        {"id": "b5", "image": "/etc/hostname.jpg", "conversations": conv()},
        {"id": "b6", "conversations": [{"from": "human", "value": "Say <img> please"}, {"from": "gpt", "value": "no"}]},
        {"id": "b7", "image": "img/rot.jpg", "conversations": conv("<image>\nDescribe the picture.", "A gradient.")},
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2+2?"},
                           {"from": "gpt", "value": "four"}]},
    ]
    fa, fb = write_jsonl(root / "a.jsonl", a), write_jsonl(root / "b.jsonl", b)
    expected = {
        ("a.jsonl", 5): "malformed JSON", ("a.jsonl", 6): "placeholder count mismatch",
        ("a.jsonl", 7): "missing media file", ("a.jsonl", 8): "undecodable image",
        ("a.jsonl", 9): "truncated video", ("a.jsonl", 10): "path escapes media root",
        ("a.jsonl", 11): "no supervised tokens", ("b.jsonl", 2): "wrong type",
        ("b.jsonl", 3): "path escapes media root", ("b.jsonl", 4): "zero-length video",
        ("b.jsonl", 5): "path escapes media root", ("b.jsonl", 6): "special token in text",
    }
    return {"root": root, "media": media, "inputs": [fa, fb], "expected_rejects": expected,
            "input_samples": len(a) + len(b), "written": len(a) + len(b) - len(expected)}


_TOKENIZER_DIR: Optional[Path] = None


def tiny_tokenizer_dir() -> Path:
    """A local byte-level BPE tokenizer, built once per test session (no hub access)."""
    global _TOKENIZER_DIR
    if _TOKENIZER_DIR is None:
        import tempfile

        from megatron_eagle.tokenizer import build_tiny_tokenizer

        _TOKENIZER_DIR = build_tiny_tokenizer(Path(tempfile.mkdtemp(prefix="tiny_tok_")) / "tok")
    return _TOKENIZER_DIR


def tiny_tokenizer():
    from megatron_eagle.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir())
