"""Prompt construction: media placeholder expansion and chat-template tokenization with labels.

One place defines how media become tokens, so prepare (token counting), the loader and
generation agree:
- image: ``<img>`` + (tiles x tokens_per_tile) x ``<IMG_CONTEXT>`` + ``</img>``, tiles counting the
  thumbnail when the grid has more than one tile;
- video: per frame ``Frame {i} at {t:.1f} s: <img>`` + tokens_per_tile x ``<IMG_CONTEXT>`` + ``</img>``
  (i 1-based, t in seconds from the clip start), frames concatenated.

Placeholders in text: ``<image>`` / ``<video>`` (taken in order) or ``<image-k>`` / ``<video-k>``
(1-based within the media type).
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence, Union

from megatron_eagle.data.media.ads import ImagePlan, MediaPlan, VideoPlan
from megatron_eagle.tokenizer import IM_END, IMG_CONTEXT, IMG_END, IMG_START

IGNORE_INDEX = -100
PLACEHOLDER_RE = re.compile(r"<(image|video)(?:-(\d+))?>")
ROLES = {"human": "user", "gpt": "assistant", "system": "system",
         "user": "user", "assistant": "assistant"}

Conversation = list[dict[str, str]]


def frame_prefix(index: int, seconds: float) -> str:
    """Text before a video frame's image tokens; ``index`` is 1-based."""
    return f"Frame {index} at {seconds:.1f} s: "


def _image_text(n_context: int) -> str:
    return f"{IMG_START}{IMG_CONTEXT * n_context}{IMG_END}"


def placeholder_targets(texts: Sequence[str]) -> list[list[tuple[str, int, int, int]]]:
    """For each text, its placeholders as ``(kind, k, start, end)`` with ``k`` 0-based within the kind.

    Unnumbered placeholders count up in reading order across all texts. Raises ValueError when one
    kind mixes numbered and unnumbered forms or a number is < 1.
    """
    out: list[list[tuple[str, int, int, int]]] = []
    seen_forms: dict[str, set[bool]] = {"image": set(), "video": set()}
    counters = {"image": 0, "video": 0}
    for text in texts:
        items = []
        for m in PLACEHOLDER_RE.finditer(text):
            kind, num = m.group(1), m.group(2)
            seen_forms[kind].add(num is not None)
            if len(seen_forms[kind]) > 1:
                raise ValueError(f"mixed numbered and unnumbered <{kind}> placeholders")
            if num is None:
                k = counters[kind]
                counters[kind] += 1
            else:
                k = int(num) - 1
                if k < 0:
                    raise ValueError(f"placeholder <{kind}-{num}> must count from 1")
            items.append((kind, k, m.start(), m.end()))
        out.append(items)
    return out


def _media_by_kind(media_plan: Sequence[MediaPlan]) -> dict[str, list[MediaPlan]]:
    return {"image": [m for m in media_plan if isinstance(m, ImagePlan)],
            "video": [m for m in media_plan if isinstance(m, VideoPlan)]}


def _expand_texts(texts: Sequence[str], media_plan: Sequence[MediaPlan], tokens_per_tile: int,
                  collapse: bool) -> tuple[list[str], list[int]]:
    """Expand placeholders; with ``collapse`` each run of context tokens is written once and
    its true length recorded, so tokenization does not have to scan thousands of copies."""
    by_kind = _media_by_kind(media_plan)
    runs: list[int] = []
    out: list[str] = []
    for text, items in zip(texts, placeholder_targets(texts)):
        parts, pos = [], 0
        for kind, k, start, end in items:
            if k >= len(by_kind[kind]):
                raise ValueError(f"placeholder <{kind}-{k + 1}> has no media in the plan")
            parts.append(text[pos:start])
            plan = by_kind[kind][k]
            if isinstance(plan, ImagePlan):
                n = plan.num_tiles * tokens_per_tile
                runs.append(n)
                parts.append(_image_text(1 if collapse else n))
            else:
                for i, t in enumerate(plan.timestamps, start=1):
                    runs.append(tokens_per_tile)
                    parts.append(frame_prefix(i, t) + _image_text(1 if collapse else tokens_per_tile))
            pos = end
        parts.append(text[pos:])
        out.append("".join(parts))
    return out, runs


def expand_media_placeholders(conversation: Union[str, Conversation], media_plan: Sequence[MediaPlan],
                              tokens_per_tile: int) -> Union[str, Conversation]:
    """Replace media placeholders by image/frame token text for a string or a conversation.

    ``media_plan`` is aligned with the sample's media list; the k-th image placeholder uses the
    k-th ImagePlan in it, likewise for videos. Returns the same shape it was given.
    """
    if isinstance(conversation, str):
        return _expand_texts([conversation], media_plan, tokens_per_tile, collapse=False)[0][0]
    texts, _ = _expand_texts([t["value"] if "value" in t else t["content"] for t in conversation],
                             media_plan, tokens_per_tile, collapse=False)
    return [_with_text(turn, text) for turn, text in zip(conversation, texts)]


def strip_media_placeholders(text: str) -> str:
    """Text with every media placeholder removed (what the index counts as text tokens)."""
    return PLACEHOLDER_RE.sub("", text)


def _with_text(turn: dict[str, str], text: str) -> dict[str, str]:
    turn = dict(turn)
    turn["value" if "value" in turn else "content"] = text
    return turn


def to_chat_messages(conversation: Conversation) -> list[dict[str, str]]:
    """Eagle ``{from, value}`` turns (or ``{role, content}``) as chat-template messages."""
    msgs = []
    for turn in conversation:
        role = turn.get("from", turn.get("role"))
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; use human, gpt or system")
        msgs.append({"role": ROLES[role], "content": turn["value"] if "value" in turn else turn["content"]})
    return msgs


def _end_of_turn(tok) -> str:
    return IM_END if IM_END in tok.get_vocab() else (tok.eos_token or "")


def _supervised_spans(tok, msgs: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Character spans of assistant content plus its end-of-turn token in the rendered text."""
    eot = _end_of_turn(tok)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        lo = len(tok.apply_chat_template(msgs[:i], tokenize=False)) if i else 0
        upto = tok.apply_chat_template(msgs[: i + 1], tokenize=False)
        hi = len(upto)
        if not text.startswith(upto):
            raise ValueError("chat template does not render conversations prefix-wise; cannot find labels")
        content = m["content"]
        if content:
            start = text.rfind(content, lo, hi)
            end = start + len(content)
        else:
            start = end = text.rfind(eot, lo, hi) if eot else hi
        if start < 0:
            raise ValueError("assistant content not found in the rendered chat template")
        if eot and text.startswith(eot, end):
            end += len(eot)
        spans.append((start, end))
    return spans


def tokenize_conversation(tok, conversation: Conversation, media_plan: Optional[Sequence[MediaPlan]] = None,
                          tokens_per_tile: int = 256,
                          add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Tokenize with the chat template; returns ``(input_ids, labels)``.

    Labels are IGNORE_INDEX (-100) except on assistant content and its ``<|im_end|>``. Media
    placeholders are expanded with ``media_plan``; without a plan they must be absent.
    """
    texts = [t["value"] if "value" in t else t["content"] for t in conversation]
    if media_plan is None:
        if any(PLACEHOLDER_RE.search(t) for t in texts):
            raise ValueError("conversation has media placeholders but no media_plan was given")
        runs: list[int] = []
    else:
        texts, runs = _expand_texts(texts, media_plan, tokens_per_tile, collapse=True)
    msgs = to_chat_messages([_with_text(t, x) for t, x in zip(conversation, texts)])
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    spans = _supervised_spans(tok, msgs, text)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    si = 0
    for j, (a, _) in enumerate(offsets):
        while si < len(spans) and a >= spans[si][1]:
            si += 1
        if si < len(spans) and spans[si][0] <= a < spans[si][1]:
            labels[j] = ids[j]
    if not runs:
        return ids, labels
    ctx = tok.convert_tokens_to_ids(IMG_CONTEXT)
    if sum(1 for i in ids if i == ctx) != len(runs):
        raise ValueError(f"text contains a literal {IMG_CONTEXT}; refusing to misalign media tokens")
    out_ids, out_labels, r = [], [], 0
    for i, lab in zip(ids, labels):
        if i == ctx:
            out_ids.extend([ctx] * runs[r])
            out_labels.extend([IGNORE_INDEX] * runs[r])
            r += 1
        else:
            out_ids.append(i)
            out_labels.append(lab)
    return out_ids, out_labels


def count_text_tokens(tok, conversation: Conversation) -> tuple[int, int]:
    """``(text_tokens, supervised_tokens)`` of a conversation with media placeholders removed."""
    stripped = [_with_text(t, strip_media_placeholders(t["value"] if "value" in t else t["content"]))
                for t in conversation]
    ids, labels = tokenize_conversation(tok, stripped)
    return len(ids), sum(1 for x in labels if x != IGNORE_INDEX)


def frame_prefix_token_bound(tok, max_frames: int = 1024, max_seconds: float = 36000.0) -> int:
    """Upper bound on the tokens of one frame prefix; +1 for a merge with the text before it."""
    idx = sorted({1, 9, 10, 99, 100, 999, 1000, 1234, 9999, max_frames} - {0})
    secs = [0.0, 9.9, 99.5, 999.5, 1234.5, 9999.9, max_seconds]
    worst = max(len(tok(frame_prefix(i, t), add_special_tokens=False)["input_ids"])
                for i in idx if i <= max(max_frames, 1) for t in secs if t <= max_seconds)
    return worst + 1


def visual_tokens(media_plan: Iterable[MediaPlan], tokens_per_tile: int) -> int:
    """Image-context plus <img>/</img> tokens of a plan (frame prefix text not included)."""
    n = 0
    for m in media_plan:
        if isinstance(m, ImagePlan):
            n += m.num_tiles * tokens_per_tile + 2
        else:
            n += m.num_frames * (tokens_per_tile + 2)
    return n


def special_token_strings(tok) -> list[str]:
    """Every special/added token string; user text containing one is rejected at prepare time."""
    names = set(getattr(tok, "all_special_tokens", []) or [])
    names |= set((getattr(tok, "get_added_vocab", lambda: {})() or {}).keys())
    names |= {IMG_START, IMG_END, IMG_CONTEXT}
    return sorted(n for n in names if n)


def contains_special_token(text: str, specials: Iterable[str]) -> Optional[str]:
    """The first special token string found in ``text``, else None."""
    for s in specials:
        if s in text:
            return s
    return None

