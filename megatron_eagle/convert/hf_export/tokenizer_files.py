"""Tokenizer files that transformers 4.51 (fast and slow) and 5.x load to the same ids.

transformers 5 saves a ``tokenizer_config.json`` that 4.51 cannot read (``TokenizersBackend``,
``extra_special_tokens`` as a list) and no ``vocab.json`` / ``merges.txt``, which the slow
``Qwen2Tokenizer`` (the official code loads with ``use_fast=False``) needs. This writes the
classic layout from the tokenizer's ``tokenizer.json``: ``vocab.json`` + ``merges.txt`` for a
byte-level BPE, ``added_tokens_decoder`` and ``additional_special_tokens`` in the config, the
chat template inside ``tokenizer_config.json``, ``special_tokens_map.json`` and ``added_tokens.json``.

:func:`eagle25_chat_template` is the chat template an ``eagle2.5``-trained model is exported with: it
renders what training renders (``data/media/prompt.py: render_chatml``), so a prompt built at inference
matches the one the model was trained on token for token.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def eagle25_chat_template(system_prompt: str) -> str:
    """ChatML as ``eagle2.5`` training renders it: ``system_prompt`` when the conversation does not
    open with a system turn, every other turn's content stripped (a system turn is kept as written),
    ``<|im_start|>assistant\\n`` as the generation prompt (``system_prompt`` "": none)."""
    default = ""
    if system_prompt:
        text = json.dumps(f"<|im_start|>system\n{system_prompt}<|im_end|>\n")  # a valid Jinja string literal
        default = ("{%- if messages | length == 0 or messages[0]['role'] != 'system' -%}{{- " + text
                   + " -}}{%- endif -%}")
    return default + (
        "{%- for message in messages -%}"
        "{%- set content = message['content'] if message['role'] == 'system' else message['content'] | trim -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


# tokenizer classes whose slow implementation reads vocab.json + merges.txt with Qwen's pre-tokenizer
QWEN_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")


def _dump(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _token_text(t) -> str | None:
    return None if t is None else str(t)


def write_tokenizer(tok, out_dir: str | Path) -> None:
    """Write ``tok`` (a loaded HF tokenizer with a ``tokenizer.json`` backend) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        saved = Path(tmp) / "tokenizer.json"
        if not saved.exists():  # no fast backend: keep what transformers wrote
            for f in Path(tmp).iterdir():
                (out / f.name).write_bytes(f.read_bytes())
            return
        backend = json.loads(saved.read_text())
    (out / "tokenizer.json").write_text(json.dumps(backend, ensure_ascii=False) + "\n")
    model = backend.get("model", {})
    if model.get("type") == "BPE":
        _dump(out / "vocab.json", model["vocab"])
        merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    added = sorted(backend.get("added_tokens", []), key=lambda t: t["id"])
    decoder = {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                 "special")} for t in added}
    named = {_token_text(getattr(tok, n, None)) for n in ("eos_token", "pad_token", "bos_token", "unk_token")}
    extra = [t["content"] for t in added if t["special"] and t["content"] not in named]
    cls = type(tok).__name__
    source_cls = cls if cls in QWEN_CLASSES else "PreTrainedTokenizerFast"
    config = {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": extra, "bos_token": _token_text(tok.bos_token),
        "chat_template": tok.chat_template, "clean_up_tokenization_spaces": False,
        "eos_token": _token_text(tok.eos_token), "errors": "replace",
        "model_max_length": min(int(tok.model_max_length), 10 ** 9) if tok.model_max_length else 131072,
        "pad_token": _token_text(tok.pad_token), "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer" if source_cls in QWEN_CLASSES else source_cls,
        "unk_token": _token_text(tok.unk_token),
    }
    _dump(out / "tokenizer_config.json", config)
    by_content = {t["content"]: t for t in added}

    def entry(text):
        t = by_content.get(text)
        if t is None:
            return text
        return {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word")}
    special_map = {"additional_special_tokens": extra}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        text = _token_text(getattr(tok, name, None))
        if text is not None:
            special_map[name] = entry(text)
    _dump(out / "special_tokens_map.json", special_map)
    _dump(out / "added_tokens.json", {t["content"]: t["id"] for t in added})
