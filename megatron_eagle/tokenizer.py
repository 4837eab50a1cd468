"""Tokenizer loading, Eagle special tokens, chat template, and a small local tokenizer.

Any HF tokenizer directory works, on transformers 4.51+ and 5.x. Eagle's 11 special tokens
(:data:`EAGLE_SPECIAL_TOKENS`, the official training order) are appended when missing, so a
plain Qwen2.5 tokenizer gets ``<IMG_CONTEXT>`` = 151665 and a released Eagle tokenizer keeps
its ids. A tokenizer without a chat template gets Qwen2's ChatML; every template is wrapped
so messages may carry list content (``[{"type": "image"}, {"type": "text", "text": ...}]``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
from pathlib import Path
from typing import Iterable

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
# The official training order (Eagle2_5 eaglevl/train/constants.py): <IMG_CONTEXT> first.
EAGLE_SPECIAL_TOKENS = [IMG_CONTEXT, IMG_START, IMG_END, "<box>", "</box>", "<quad>", "</quad>",
                        "<ref>", "</ref>", "<interval>", "</interval>"]

# Qwen2 ChatML, with a default system prompt only when the conversation has none.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def load_tokenizer(path: str | Path):
    """Load an HF tokenizer dir, adding Eagle special tokens and ChatML if missing."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    # An Eagle HF dir's config.json is not a model transformers knows; only the tokenizer matters.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    finally:
        hf_logging.set_verbosity(level)
    vocab = tok.get_vocab()
    missing = [t for t in EAGLE_SPECIAL_TOKENS if t not in vocab]
    if missing:
        add_special_tokens(tok, missing)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one is used for chat
        template = template.get("default")
    tok.chat_template = with_list_content(template or CHATML_TEMPLATE)
    if tok.pad_token is None:
        tok.pad_token = ENDOFTEXT if ENDOFTEXT in tok.get_vocab() else tok.eos_token
    return tok


# Prepended to a chat template: message content given as a list of items becomes a string
# (image/video items become <image-k>/<video-k> placeholders, numbered through the whole
# conversation); string content is passed through untouched, so the template renders it as before.
LIST_CONTENT_MARKER = "{#- eagle: list content -#}"
_LIST_CONTENT_PRELUDE = LIST_CONTENT_MARKER + (
    "{%- set eagle_ns = namespace(msgs=[], image=0, video=0, text='') -%}"
    "{%- for m in messages -%}"
    "{%- if m['content'] is string or m['content'] is none -%}"
    "{%- set eagle_ns.msgs = eagle_ns.msgs + [m] -%}"
    "{%- else -%}"
    "{%- set eagle_ns.text = '' -%}"
    "{%- for item in m['content'] -%}"
    "{%- if item['type'] == 'image' -%}"
    "{%- set eagle_ns.image = eagle_ns.image + 1 -%}"
    "{%- set eagle_ns.text = eagle_ns.text + '<image-' + eagle_ns.image|string + '>' -%}"
    "{%- elif item['type'] == 'video' -%}"
    "{%- set eagle_ns.video = eagle_ns.video + 1 -%}"
    "{%- set eagle_ns.text = eagle_ns.text + '<video-' + eagle_ns.video|string + '>' -%}"
    "{%- elif item['type'] == 'text' -%}"
    "{%- set eagle_ns.text = eagle_ns.text + item['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set eagle_ns.msgs = eagle_ns.msgs + [{'role': m['role'], 'content': eagle_ns.text}] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = eagle_ns.msgs -%}"
)


def with_list_content(template: str) -> str:
    """``template`` accepting list content as well as strings (idempotent)."""
    return template if template.startswith(LIST_CONTENT_MARKER) else _LIST_CONTENT_PRELUDE + template


def add_special_tokens(tok, tokens: list[str]) -> int:
    """Append ``tokens`` as special tokens, keeping the ones the tokenizer already lists.

    transformers 4.x calls the keep-flag ``replace_additional_special_tokens``, 5.x
    ``replace_extra_special_tokens``; the signature tells which one this install has.
    """
    params = inspect.signature(tok.add_special_tokens).parameters
    for flag in ("replace_extra_special_tokens", "replace_additional_special_tokens"):
        if flag in params:
            return tok.add_special_tokens({"additional_special_tokens": tokens}, **{flag: False})
    kept = [t for t in getattr(tok, "additional_special_tokens", []) if t not in tokens]
    return tok.add_special_tokens({"additional_special_tokens": kept + tokens})


def special_token_ids(tok) -> dict[str, int]:
    """ids of the image tokens and the end-of-turn token."""
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           (("img_start", IMG_START), ("img_end", IMG_END), ("img_context", IMG_CONTEXT))}
    ids["eos"] = tok.convert_tokens_to_ids(IM_END) if IM_END in tok.get_vocab() else tok.eos_token_id
    return ids


def tokenizer_fingerprint(tok) -> str:
    """Stable hash of the vocabulary, special tokens and chat template."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tok.get_vocab().items()), separators=(",", ":")).encode())
    h.update((tok.chat_template or "").encode())
    return h.hexdigest()[:16]


_TINY_WORDS = (
    "red green blue yellow purple orange black white gray pink brown cyan "
    "circle square triangle star cross ring dot line stripe "
    "zero one two three four five six seven eight nine ten "
    "what is the color shape of this image video picture frame how many are there in "
    "a an yes no answer question describe left right top bottom center big small "
    "I see it shows you assistant user system helpful The there's count colour "
    "first second last moving object background seconds fps at Frame "
)


def _tiny_corpus() -> Iterable[str]:
    words = _TINY_WORDS.split()
    for i, w in enumerate(words):
        yield f"{w} {words[(i * 7) % len(words)]} {words[(i * 13) % len(words)]}."
        yield f"What is the {w}? It is {words[(i * 3) % len(words)]}. {i} {i * 17 % 100}"
    yield "0 1 2 3 4 5 6 7 8 9 , . ? ! : ; ' \" ( ) - _ / \n"


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 480) -> Path:
    """Train a small byte-level BPE tokenizer locally (no hub) and save it as an HF dir
    (``vocab_size`` trained ids, then Eagle's 8 box/quad/ref/interval tags).

    Deterministic: the same call writes the same files. The tokenizer has ChatML
    special tokens and the Eagle image tokens, so it behaves like Qwen2's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    # The BPE is trained with the image tokens at ids 3, 4, 5 (<IMG_CONTEXT> = 5, the ModelConfig
    # default); Eagle's other tags are appended after the trained vocabulary.
    image = [IMG_START, IMG_END, IMG_CONTEXT]
    specials = [ENDOFTEXT, IM_START, IM_END, *image]
    tags = [t for t in EAGLE_SPECIAL_TOKENS if t not in image]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(_tiny_corpus()), trainer=trainer)
    tk.add_special_tokens(tags)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   additional_special_tokens=[IM_START, *image, *tags])
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(str(out))
    return out
