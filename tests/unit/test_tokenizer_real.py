"""tokenizer.py on the real tokenizer files (tests/fixtures/qwen*_tokenizer): loading on the installed
transformers, Eagle's 11 special tokens appended after the tokenizer's ids in the official order, ids
kept by a tokenizer that already holds them, list content in chat templates, save/load round trip."""

from __future__ import annotations

import json

import pytest

from megatron_eagle.tokenizer import (EAGLE_SPECIAL_TOKENS, IMG_CONTEXT, IMG_END, IMG_START, load_tokenizer,
                                      special_token_ids, with_list_content)
from tests.tokenizer_fixtures import REAL_TOKENIZERS, unpack_tokenizer

OFFICIAL_ORDER = ["<IMG_CONTEXT>", "<img>", "</img>", "<box>", "</box>", "<quad>", "</quad>",
                  "<ref>", "</ref>", "<interval>", "</interval>"]


@pytest.fixture(scope="module", params=sorted(REAL_TOKENIZERS))
def real_dir(request, tmp_path_factory):
    return request.param, unpack_tokenizer(request.param, tmp_path_factory.mktemp(request.param))


def test_real_tokenizer_loads_and_gets_the_eagle_tokens_in_official_order(real_dir):
    name, path = real_dir
    base = REAL_TOKENIZERS[name]
    tok = load_tokenizer(path)
    assert EAGLE_SPECIAL_TOKENS == OFFICIAL_ORDER
    assert len(tok) == base + 11
    assert [tok.convert_tokens_to_ids(t) for t in OFFICIAL_ORDER] == list(range(base, base + 11))
    ids = special_token_ids(tok)
    assert ids["img_context"] == (151665 if name == "qwen2_5_tokenizer" else 151669)
    assert ids["eos"] == 151645 and tok.convert_ids_to_tokens(151643) == "<|endoftext|>"
    text = f"{IMG_START}{IMG_CONTEXT}{IMG_CONTEXT}{IMG_END} What is shown? <box>[1, 2]</box>"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert enc[:4] == [ids["img_start"], ids["img_context"], ids["img_context"], ids["img_end"]]
    assert tok.convert_tokens_to_ids("<box>") in enc and tok.decode(enc) == text


def test_real_tokenizer_keeps_its_ids_after_save_and_reload(real_dir, tmp_path):
    _, path = real_dir
    tok = load_tokenizer(path)
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)  # the tokens are present now: nothing is added twice
    assert len(again) == len(tok) and special_token_ids(again) == special_token_ids(tok)
    msgs = [{"role": "user", "content": f"{IMG_START}{IMG_CONTEXT}{IMG_END} hi"}]
    assert again.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)
    assert again.chat_template == tok.chat_template  # the list-content wrapper is not applied twice


def test_tokenizer_holding_the_tokens_keeps_their_ids(tmp_path):
    """A released Eagle tokenizer (tokens present, in another order) keeps its ids; only missing ones are added."""
    path = unpack_tokenizer("qwen2_5_tokenizer", tmp_path / "src")
    data = json.loads((path / "tokenizer.json").read_text())
    config = json.loads((path / "tokenizer_config.json").read_text())
    present = [IMG_START, IMG_END, IMG_CONTEXT]  # an older layout: image tokens only, another order
    for i, t in enumerate(present):
        entry = {"content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                 "special": True}
        data["added_tokens"].append({"id": 151665 + i, **entry})
        config["added_tokens_decoder"][str(151665 + i)] = entry
    (path / "tokenizer.json").write_text(json.dumps(data))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(path)
    assert [tok.convert_tokens_to_ids(t) for t in present] == [151665, 151666, 151667]
    rest = [t for t in OFFICIAL_ORDER if t not in present]
    assert [tok.convert_tokens_to_ids(t) for t in rest] == list(range(151668, 151668 + len(rest)))
    assert special_token_ids(tok)["img_context"] == 151667


def test_chat_template_takes_string_and_list_content(real_dir):
    _, path = real_dir
    tok = load_tokenizer(path)
    as_list = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]},
               {"role": "assistant", "content": [{"type": "text", "text": "Two cats."}]},
               {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And this?"}]}]
    as_str = [{"role": "user", "content": "<image-1><image-2>Compare."},
              {"role": "assistant", "content": "Two cats."},
              {"role": "user", "content": "<video-1>And this?"}]
    a = tok.apply_chat_template(as_list, tokenize=False, add_generation_prompt=True)
    b = tok.apply_chat_template(as_str, tokenize=False, add_generation_prompt=True)
    assert a == b and "<image-2>Compare." in a and a.endswith("<|im_start|>assistant\n")
    assert with_list_content(tok.chat_template) == tok.chat_template
