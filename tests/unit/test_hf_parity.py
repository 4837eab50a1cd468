"""Our model loaded from an HF Eagle 2.5 checkpoint matches an independent transformers
reference (SiglipVisionModel + InternVL pixel shuffle + mlp1 + Qwen2ForCausalLM), fp32."""

from __future__ import annotations

from megatron_eagle.convert.verify import random_cases

REL_TOL = 1e-5


def test_cases_cover_media_kinds():
    from tests.model_fixtures import tiny_model_config

    cfg = tiny_model_config()
    cases = random_cases(cfg)
    tiles = {k: sum(0 if pv is None else pv.shape[0] for _, pv in v) for k, v in cases.items()}
    assert tiles == {"one_tile": 1, "multi_tile": 3, "video_frames": 4, "text_only": 0, "mixed_pack": 8}
    for samples in cases.values():
        for ids, pv in samples:
            n = 0 if pv is None else pv.shape[0]
            assert int((ids == cfg.image_token_id).sum()) == n * cfg.tokens_per_tile


def test_parity_detects_a_wrong_pixel_shuffle():
    """The reference is sensitive to the visual token order: transposing the 2x2 block
    channel order (the classic pixel-shuffle bug) must change the logits well above tolerance."""
    import torch

    from megatron_eagle.convert.reference import EagleHFReference, pixel_shuffle_internvl
    from megatron_eagle.convert.verify import diff
    from megatron_eagle.models.connector import pixel_shuffle
    from tests.hf_fixtures import tiny_checkpoint

    x = torch.randn(2, 8, 8, 5)
    assert torch.equal(pixel_shuffle_internvl(x), pixel_shuffle(x))
    assert not torch.equal(pixel_shuffle_internvl(x.transpose(1, 2).contiguous()), pixel_shuffle(x))
    ref = EagleHFReference.from_pretrained(tiny_checkpoint(False))
    ids, pv = random_cases(ref.cfg)["one_tile"][0]
    good = ref.sample_logits(ids, pv)
    orig = pixel_shuffle_internvl
    import megatron_eagle.convert.reference as refmod
    try:
        refmod.pixel_shuffle_internvl = lambda t, s=0.5: orig(t.transpose(1, 2).contiguous(), s)
        bad = ref.sample_logits(ids, pv)
    finally:
        refmod.pixel_shuffle_internvl = orig
    assert diff(bad, good)[1] > 100 * REL_TOL
