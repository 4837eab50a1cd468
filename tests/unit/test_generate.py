"""`generate`: our greedy decoding equals transformers' greedy generate on the reference
model (image with several tiles, video frames, text), and the CLI's --json output."""

from __future__ import annotations
from pathlib import Path

import pytest
import torch
from tests.hf_fixtures import root, tiny_checkpoint


def _write_media() -> tuple[Path, Path]:
    import av
    import numpy as np
    from PIL import Image

    img_path, vid_path = root() / "gen_image.png", root() / "gen_video.mp4"
    a = np.zeros((150, 200, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 200, dtype=np.uint8)[None]
    a[..., 1] = np.linspace(0, 255, 150, dtype=np.uint8)[:, None]
    Image.fromarray(a).save(img_path)
    with av.open(str(vid_path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(20):
            f = np.zeros((48, 64, 3), np.uint8)
            f[..., 0] = 12 * i
            f[:, (3 * i) % 64, 1] = 255
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return img_path, vid_path


@pytest.fixture(scope="module")
def media():
    return _write_media()


def test_fallback_media_path_matches_data_pipeline(media):
    """Without the data pipeline a video gives the same prompt; an image one resized tile."""
    import megatron_eagle.inference.media as m
    from megatron_eagle.tokenizer import load_tokenizer

    tok = load_tokenizer(tiny_checkpoint(False))
    runs = {}
    for flag in (True, False):
        m.USE_DATA_PIPELINE = flag
        try:
            v = m.load_video(media[1], 112, num_frames=3)
            i = m.load_image(media[0], 112, max_tiles=4)
            runs[flag] = (m.build_inputs(tok, "Describe <video>.", [], [v], 16, 112), i)
        finally:
            m.USE_DATA_PIPELINE = True
    (ids_a, px_a), img_a = runs[True]
    (ids_b, px_b), img_b = runs[False]
    assert torch.equal(ids_a, ids_b)
    assert (px_a - px_b).abs().mean() < 0.02  # swscale vs PIL resize of the same frames
    assert img_a.tiles.shape[0] == 5 and img_b.tiles.shape == (1, 3, 112, 112)
    assert img_b.tiles.min() >= -1 and img_b.tiles.max() <= 1
