"""A small learnable multimodal dataset (colours, shapes, counts) with real encoded media.

Images are PNG/JPEG drawings of coloured shapes; videos are short H.264 clips of a moving
coloured disc, encoded with PyAV. Questions have short exact answers, so a tiny model can
learn them in a few hundred steps on a CPU. Used by `make demo` and the tests.
"""

from __future__ import annotations

import json
import random
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def shape_image(rng: random.Random, colour: str, shape: str, count: int = 1) -> Image.Image:
    w, h = rng.choice([(112, 112), (224, 112), (160, 200), (300, 180)])
    img = Image.new("RGB", (w, h), (245, 245, 245))
    d = ImageDraw.Draw(img)
    size = max(24, min(w, h) // 3)
    for k in range(count):
        x = (k * (w // max(count, 1))) + rng.randint(0, max(0, w // max(count, 1) - size))
        y = rng.randint(0, h - size)
        _draw(d, shape, (x, y, x + size - 1, y + size - 1), COLOURS[colour])
    return img


def moving_disc_video(path: Path, colour: str, frames: int = 12, fps: int = 4, size: int = 96) -> None:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, fps)
        for i in range(frames):
            img = Image.new("RGB", (size, size), (20, 20, 20))
            x = int((size - 30) * i / max(frames - 1, 1))
            ImageDraw.Draw(img).ellipse((x, 30, x + 29, 59), fill=COLOURS[colour])
            frame = av.VideoFrame.from_ndarray(np.asarray(img), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _sample(rng: random.Random, i: int, media_dir: Path, kind: str) -> dict:
    colour = rng.choice(list(COLOURS))
    if kind == "video":
        name = f"video_{i:05d}.mp4"
        moving_disc_video(media_dir / name, colour, frames=rng.choice([8, 12, 16]))
        q, a = "What is the colour of the moving object?", colour
        return {"id": f"v{i}", "video": name,
                "conversations": [{"from": "human", "value": f"<video>\n{q}"}, {"from": "gpt", "value": a}]}
    shape, count = rng.choice(SHAPES), rng.randint(1, 3)
    ext = rng.choice(["png", "jpg"])
    name = f"image_{i:05d}.{ext}"
    shape_image(rng, colour, shape, count).save(media_dir / name, quality=95)
    q, a = rng.choice([("What is the colour of the shape?", colour), ("What shape is it?", shape),
                       ("How many shapes are there?", NUMBERS[count])])
    return {"id": f"i{i}", "image": name,
            "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]}


def make_synthetic_dataset(out_dir: str | Path, num_samples: int = 200, video_fraction: float = 0.2,
                           seed: int = 0, name: str = "train.jsonl") -> Path:
    """Write ``media/`` and ``name`` (Eagle JSONL) under ``out_dir``; returns the JSONL path."""
    out = Path(out_dir)
    media = out / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(num_samples):
        kind = "video" if rng.random() < video_fraction else "image"
        lines.append(json.dumps(_sample(rng, i + seed * 100_000, media, kind)))
    path = out / name
    path.write_text("\n".join(lines) + "\n")
    return path
