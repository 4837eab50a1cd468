"""A small prepared dataset for the loader tests (real images and videos), its stage loader, the
uninterrupted reference stream and stream comparison."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.media_factory import conv, encode_video, tiny_tokenizer, tiny_tokenizer_dir, write_image, write_jsonl

IMAGE_SIZES = [(64, 48), (300, 200), (120, 160), (640, 480), (900, 300), (96, 96), (200, 500), (1000, 700)]
VIDEOS = [("v0.mp4", "libx264", 3.0, 10), ("v1.mp4", "mpeg4", 2.0, 12), ("v2.mkv", "mpeg4", 4.0, 8)]
WORDS = "red green blue circle square star moving object left right top bottom big small".split()


def build_loader_dataset(root: str | Path, n: int = 60, long_text: bool = True) -> dict[str, Any]:
    """``n`` samples cycling over image / two-image / video / text-only kinds, plus (``long_text``) one
    text sample far longer than the test stage length. Returns paths and the prepared directory."""
    from megatron_eagle.data.prepare.pipeline import PrepareConfig, prepare

    root = Path(root)
    media = root / "media"
    for i, (w, h) in enumerate(IMAGE_SIZES):
        write_image(media / f"img/{i}.jpg", w, h, "JPEG", seed=i)
    for name, codec, secs, fps in VIDEOS:
        encode_video(media / f"vid/{name}", codec, seconds=secs, fps=fps)
    rows = []
    for i in range(n):
        w = " ".join(WORDS[(i * k) % len(WORDS)] for k in range(1, 3 + i % 5))
        kind = i % 4
        if kind == 0:
            rows.append({"id": f"s{i}", "image": f"img/{i % len(IMAGE_SIZES)}.jpg",
                         "conversations": conv(f"<image>\nWhat is {w}?", f"It is {w}.")})
        elif kind == 1:
            pair = [f"img/{i % len(IMAGE_SIZES)}.jpg", f"img/{(i + 3) % len(IMAGE_SIZES)}.jpg"]
            rows.append({"id": f"s{i}", "image": pair,
                         "conversations": conv(f"<image-1> and <image-2>: {w}?", f"The first, {w}.")})
        elif kind == 2:
            rows.append({"id": f"s{i}", "video": f"vid/{VIDEOS[i % len(VIDEOS)][0]}",
                         "conversations": conv(f"<video>\nWhat moves {w}?", f"A line {w}.")})
        else:
            rows.append({"id": f"s{i}", "conversations": [
                {"from": "human", "value": f"Say {w}."}, {"from": "gpt", "value": f"{w} {w}."},
                {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "yes"}]})
    if long_text:
        rows.append({"id": "long", "conversations": conv(" ".join(WORDS * 60), "no")})
    src = write_jsonl(root / "data.jsonl", rows)
    out = root / "prepared"
    # frame-times: the pack layouts these tests pick their cases from (eagle2.5 data is loaded in test_data_recipe)
    prepare(PrepareConfig(inputs=[str(src)], media_root=str(media), output=str(out),
                          tokenizer=str(tiny_tokenizer_dir()), shard_size=60_000, workers=1, progress=False,
                          prompt_format="frame-times"))
    return {"root": root, "prepared": out, "n": len(rows)}


def write_curriculum(path: str | Path, data: str | Path, seq_len: int = 512, packs_per_step: int = 4,
                     parallel: dict[str, Any] | None = None, repeat: float = 1.0, seed: int = 7) -> Path:
    """A one-stage curriculum for the tiny model over one prepared directory."""
    cur = {"model": "tiny", "seed": seed, "stages": [{
        "name": "s1", "seq_len": seq_len, "global_batch_tokens": seq_len * packs_per_step,
        "datasets": [{"name": "mix", "path": str(data), "repeat": repeat}],
        "parallel": parallel or {"tp": 1, "pp": 1, "cp": 1}}]}
    path = Path(path)
    path.write_text(yaml.safe_dump(cur))
    return path


L = 512


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    d = build_loader_dataset(root)
    d["cur"] = write_curriculum(root / "cur.yaml", d["prepared"], seq_len=L)
    d["tok"] = tiny_tokenizer()
    return d


def loader(data, dp_rank=0, cur=None, **kw):
    from megatron_eagle.config import preset_model_config
    from megatron_eagle.data.loading.loader import build_stage_loader

    kw.setdefault("num_workers", 0)
    world = kw.pop("world_size", 2)
    return build_stage_loader(cur or data["cur"], "s1", data["tok"], preset_model_config("tiny"), world_size=world,
                              dp_rank=dp_rank, **kw)


def stream(ld, steps=None):
    out = []
    for i, batches in enumerate(ld):
        out.append(batches)
        if steps is not None and i + 1 == steps:
            break
    ld.close()
    return out


def same_batch(a, b) -> bool:
    for f in fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
                return False
        elif x != y:
            return False
    return True


def same_stream(s1, s2) -> bool:
    return len(s1) == len(s2) and all(len(a) == len(b) and all(same_batch(x, y) for x, y in zip(a, b))
                                      for a, b in zip(s1, s2))


@pytest.fixture(scope="module")
def reference(data):
    """The uninterrupted stream of both DP ranks (inline, no workers)."""
    return [stream(loader(data, r)) for r in range(2)]


def corrupt_member(root, rec, member) -> None:
    """Overwrite one shard member with zeros (same size, so the index still points at every member)."""
    off, size = rec["members"][member]
    with open(root / rec["shard"], "r+b") as f:
        f.seek(off)
        f.write(b"\0" * size)
