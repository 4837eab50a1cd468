"""tokenizer.py on the real Qwen3 tokenizer files (tests/fixtures/qwen3_tokenizer): loading on the
installed transformers, the Eagle image tokens appended after Qwen's ids, and a save/load round trip."""

from __future__ import annotations

import hashlib
import lzma
import shutil
from pathlib import Path

import pytest

from megatron_eagle.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, load_tokenizer, special_token_ids

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "qwen3_tokenizer"
QWEN3_IDS = 151669  # ids in Qwen3's tokenizer.json, added tokens included


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen3")
    data = lzma.decompress((FIXTURE / "tokenizer.json.xz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == (FIXTURE / "tokenizer.json.sha256").read_text().strip()
    (out / "tokenizer.json").write_bytes(data)
    shutil.copy(FIXTURE / "tokenizer_config.json", out / "tokenizer_config.json")
    return out


def test_real_qwen3_tokenizer_loads_and_gets_the_image_tokens(qwen3_dir):
    tok = load_tokenizer(qwen3_dir)
    assert len(tok) == QWEN3_IDS + 3
    ids = special_token_ids(tok)
    assert (ids["img_start"], ids["img_end"], ids["img_context"]) == (QWEN3_IDS, QWEN3_IDS + 1, QWEN3_IDS + 2)
    assert ids["eos"] == 151645 and tok.convert_ids_to_tokens(151643) == "<|endoftext|>"
    text = f"{IMG_START}{IMG_CONTEXT}{IMG_CONTEXT}{IMG_END} What is shown?"
    enc = tok(text, add_special_tokens=False)["input_ids"]
    assert enc[:4] == [ids["img_start"], ids["img_context"], ids["img_context"], ids["img_end"]]
    assert tok.decode(enc) == text


def test_real_qwen3_tokenizer_keeps_its_ids_after_save_and_reload(qwen3_dir, tmp_path):
    tok = load_tokenizer(qwen3_dir)
    tok.save_pretrained(str(tmp_path))
    again = load_tokenizer(tmp_path)  # the tokens are present now: nothing is added twice
    assert len(again) == len(tok) and special_token_ids(again) == special_token_ids(tok)
    msgs = [{"role": "user", "content": f"{IMG_START}{IMG_CONTEXT}{IMG_END} hi"}]
    assert again.apply_chat_template(msgs, tokenize=False) == tok.apply_chat_template(msgs, tokenize=False)
