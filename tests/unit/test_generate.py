"""`generate`'s inputs: a real encoded video gives the official eagle2.5 frames, header and ids."""

from __future__ import annotations

import torch

from tests.hf_fixtures import media, tiny_checkpoint  # noqa: F401


def test_video_prompt_uses_the_official_frames_and_header(media):
    """20 frames at 10 fps, 3 asked for: round(linspace(0, 19, 3)) = (0, 10, 19) (half to even), a
    2.00 s video stated at 3 / 2 s = 1.50 fps; the decoded tiles are those frames (red = 12·i)."""
    import megatron_eagle.inference.media as m
    from megatron_eagle.tokenizer import IMG_CONTEXT, load_tokenizer

    tok = load_tokenizer(tiny_checkpoint(False))
    v = m.load_video(media[1], 112, num_frames=3)
    assert v.frame_indices == (0, 10, 19)
    assert (round(v.duration, 2), round(v.rate, 2)) == (2.0, 1.5)
    red = (v.tiles[:, 0].mean(dim=(1, 2)) + 1) / 2 * 255  # SigLIP normalisation: x / 127.5 - 1
    assert torch.allclose(red, torch.tensor([0.0, 120.0, 228.0]), atol=12)

    ids, pixels = m.build_inputs(tok, "Describe it.", [], [v], 16, 112)
    text = tok.decode(ids).replace(IMG_CONTEXT, "")
    assert "The first video of 2.00 seconds at 1.50 fps: Frame 1: <img></img>Frame 2: <img></img>" \
           "Frame 3: <img></img>\nDescribe it." in text
    assert "You are an AI assistant whose name is Eagle-Next." in text
    assert torch.equal(pixels, v.tiles)
