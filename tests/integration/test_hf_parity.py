"""Our model loaded from an HF Eagle 2.5 checkpoint matches an independent transformers
reference (SiglipVisionModel + InternVL pixel shuffle + mlp1 + Qwen2ForCausalLM), fp32."""

from __future__ import annotations

import pytest

from tests.hf_fixtures import layout_run

CASES = ["one_tile", "multi_tile", "video_frames", "text_only", "mixed_pack"]
LAYOUTS = [(1, 1, False), (2, 1, False), (1, 2, True)]
REL_TOL = 1e-5


@pytest.mark.parametrize("tp,pp,tied", LAYOUTS)
def test_logits_match_transformers_reference(tp, pp, tied):
    diffs = layout_run(tp, pp, tied)["diffs"]
    assert sorted(diffs) == sorted(CASES)
    for case, (abs_diff, rel_diff) in diffs.items():
        print(f"tp={tp} pp={pp} tied={tied} {case}: max abs {abs_diff:.3e} rel {rel_diff:.3e}")
        assert rel_diff < REL_TOL, f"{case}: relative logit difference {rel_diff:.3e}"


@pytest.mark.parametrize("tp,pp,tied", LAYOUTS)
def test_pack_equals_subsamples_alone(tp, pp, tied):
    max_diff, scale = layout_run(tp, pp, tied)["pack_vs_alone"]
    assert scale > 0
    assert max_diff / scale < REL_TOL
