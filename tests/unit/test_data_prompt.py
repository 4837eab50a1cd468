import pytest
from tests.media_factory import tiny_tokenizer

from megatron_eagle.data.media.ads import ImagePlan, VideoPlan
from megatron_eagle.data.media.prompt import (IGNORE_INDEX, count_text_tokens, expand_media_placeholders, frame_prefix,
                                              frame_prefix_token_bound, tokenize_conversation, visual_tokens)
from megatron_eagle.tokenizer import IMG_CONTEXT, IMG_END, IMG_START


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_expand_image_and_video_strings():
    s = expand_media_placeholders("<image>\nQ", [ImagePlan((2, 1))], tokens_per_tile=4)
    assert s == IMG_START + IMG_CONTEXT * 12 + IMG_END + "\nQ"  # (2x1 + thumbnail) x 4
    s = expand_media_placeholders("<image>", [ImagePlan((1, 1))], tokens_per_tile=16)
    assert s.count(IMG_CONTEXT) == 16  # no thumbnail for a single tile
    v = VideoPlan((0, 15), (0.0, 1.5))
    s = expand_media_placeholders("See <video>!", [v], tokens_per_tile=3)
    assert s == ("See Frame 1 at 0.0 s: " + IMG_START + IMG_CONTEXT * 3 + IMG_END
                 + "Frame 2 at 1.5 s: " + IMG_START + IMG_CONTEXT * 3 + IMG_END + "!")


def test_numbered_placeholders_pick_media_by_kind_and_number():
    plan = [ImagePlan((1, 1)), VideoPlan((3,), (0.25,)), ImagePlan((3, 1))]
    conv = [{"from": "human", "value": "<image-2> then <video-1> then <image-1>"}, {"from": "gpt", "value": "ok"}]
    out = expand_media_placeholders(conv, plan, tokens_per_tile=1)
    parts = out[0]["value"].split(" then ")
    assert parts[0].count(IMG_CONTEXT) == 4 and parts[2].count(IMG_CONTEXT) == 1
    assert parts[1].startswith(frame_prefix(1, 0.25)) and frame_prefix(1, 0.25) == "Frame 1 at 0.2 s: "
    assert out[1] == conv[1] and conv[0]["value"].startswith("<image-2>")  # input untouched


def test_labels_cover_assistant_content_and_end_of_turn_only(tok):
    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A red circle."}, {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "yes"}]
    ids, labels = tokenize_conversation(tok, conv, [ImagePlan((2, 2))], tokens_per_tile=16)
    assert len(ids) == len(labels)
    sup = [i for i, l in zip(ids, labels) if l != IGNORE_INDEX]
    assert tok.decode(sup) == "A red circle.<|im_end|>yes<|im_end|>"
    assert all(l == i for i, l in zip(ids, labels) if l != IGNORE_INDEX)
    ctx = tok.convert_tokens_to_ids(IMG_CONTEXT)
    assert ids.count(ctx) == 5 * 16
    assert ids.count(tok.convert_tokens_to_ids(IMG_START)) == 1
    assert "You are a helpful assistant" not in tok.decode(ids)  # explicit system turn replaces the default


def test_collapsed_tokenization_matches_full_expansion(tok):
    conv = [{"from": "human", "value": "<image-1> and <video-1>: compare."}, {"from": "gpt", "value": "same"}]
    plan = [ImagePlan((3, 1)), VideoPlan((0, 5, 9), (0.0, 0.5, 0.9))]
    ids, _ = tokenize_conversation(tok, conv, plan, tokens_per_tile=8, fmt="frame-times")
    expanded = expand_media_placeholders(conv, plan, tokens_per_tile=8)
    text = tok.apply_chat_template([{"role": "user", "content": expanded[0]["value"]},
                                    {"role": "assistant", "content": "same"}], tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]


def test_index_token_counts_predict_lengths(tok):
    conv = [{"from": "human", "value": "<image>\nWhat is the color?"}, {"from": "gpt", "value": "It is red."}]
    text_tokens, supervised = count_text_tokens(tok, conv, "frame-times")
    plan = [ImagePlan((4, 3))]
    ids, labels = tokenize_conversation(tok, conv, plan, tokens_per_tile=16, fmt="frame-times")
    assert len(ids) == text_tokens + visual_tokens(plan, 16) == text_tokens + 13 * 16 + 2
    assert sum(l != IGNORE_INDEX for l in labels) == supervised == len(tok("It is red.")["input_ids"]) + 1
    vconv = [{"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "a line"}]
    vplan = [VideoPlan(tuple(range(0, 120, 10)), tuple(i / 10 for i in range(0, 120, 10)))]
    t, _ = count_text_tokens(tok, vconv, "frame-times")
    ids, _ = tokenize_conversation(tok, vconv, vplan, tokens_per_tile=16, fmt="frame-times")
    bound = frame_prefix_token_bound(tok)
    assert t + visual_tokens(vplan, 16) < len(ids) <= t + visual_tokens(vplan, 16) + 12 * bound


def test_generation_prompt_and_errors(tok):
    conv = [{"from": "human", "value": "<image> hi"}]
    ids, labels = tokenize_conversation(tok, conv, [ImagePlan((1, 1))], 4, add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert set(labels) == {IGNORE_INDEX}
    with pytest.raises(ValueError, match="media_plan"):
        tokenize_conversation(tok, conv)
    with pytest.raises(ValueError, match="no media"):
        tokenize_conversation(tok, [{"from": "human", "value": "<image-2>"}], [ImagePlan((1, 1))], 4)
    with pytest.raises(ValueError, match="literal"):
        tokenize_conversation(tok, [{"from": "human", "value": f"<image> {IMG_CONTEXT}"}], [ImagePlan((1, 1))], 4)
    with pytest.raises(ValueError, match="mixed"):
        expand_media_placeholders("<image> <image-1>", [ImagePlan((1, 1))], 4)
