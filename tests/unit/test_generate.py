"""`generate`: our greedy decoding equals transformers' greedy generate on the reference
model (image with several tiles, video frames, text), and the CLI's --json output."""

from __future__ import annotations

import torch

from tests.hf_fixtures import media, tiny_checkpoint  # noqa: F401


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
