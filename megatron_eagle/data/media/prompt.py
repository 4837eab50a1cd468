"""Prompt construction: media placeholder expansion and chat rendering with supervised-token labels.

One place defines how media become tokens, so prepare (token counting), the loader and
generation agree. Two layouts, chosen by ``prompt_format``:

- ``eagle2.5`` (default; the layout the released Eagle 2.5 models were trained on):
  one image ``<img>…</img>\\n``; with several images each is prefixed ``<image k>``; a video is
  ``The first video of {D:.2f} seconds at {F:.2f} fps: Frame 1: <img>…</img>Frame 2: …\\n``.
  Every turn is stripped and rendered as ChatML by :func:`render_chatml` with the system prompt
  "You are an AI assistant whose name is Eagle-Next." when the sample has none.
- ``frame-times``: images as bare ``<img>…</img>``, video frames as ``Frame {i} at {t:.1f} s: <img>…</img>``,
  rendered with the tokenizer's own chat template.

``<img>…</img>`` stands for ``<img>`` + tiles x tokens_per_tile ``<IMG_CONTEXT>`` + ``</img>``
(tiles counting the thumbnail when the grid has more than one tile).

Placeholders in text: ``<image>`` / ``<video>`` (taken in order) or ``<image-k>`` / ``<video-k>``
(1-based within the media type).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from megatron_eagle.data.media.ads import ImagePlan, MediaPlan, VideoPlan
from megatron_eagle.tokenizer import IM_END, IM_START, IMG_CONTEXT, IMG_END, IMG_START

IGNORE_INDEX = -100
PLACEHOLDER_RE = re.compile(r"<(image|video)(?:-(\d+))?>")
ROLES = {"human": "user", "gpt": "assistant", "system": "system",
         "user": "user", "assistant": "assistant"}
EAGLE_SYSTEM_PROMPT = "You are an AI assistant whose name is Eagle-Next."
PROMPT_FORMATS = ("eagle2.5", "frame-times")
DEFAULT_PROMPT_FORMAT = "eagle2.5"
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth")

Conversation = list[dict[str, str]]


@dataclass(frozen=True)
class PromptFormat:
    """How a conversation and its media become text.

    ``layout``: the media text (see the module doc). ``chat``: ``"chatml"`` renders with
    :func:`render_chatml` (every turn the same, so multi-turn labels are exact for any tokenizer),
    ``"tokenizer"`` with the tokenizer's chat template. ``system_prompt`` is used when the
    conversation has no system turn (ChatML only). ``strip``: strip every turn's text.
    """

    layout: str = DEFAULT_PROMPT_FORMAT
    chat: str = "chatml"
    system_prompt: str = EAGLE_SYSTEM_PROMPT
    strip: bool = True

    @property
    def name(self) -> str:
        return self.layout

    def to_dict(self) -> dict[str, Any]:
        return {"format": self.layout, "chat_template": self.chat, "system_prompt": self.system_prompt,
                "strip": self.strip}


def prompt_format(name: Union[str, PromptFormat, None] = None) -> PromptFormat:
    """The named format (``None``: the default, eagle2.5). Raises ValueError naming the choices."""
    if isinstance(name, PromptFormat):
        return name
    name = name or DEFAULT_PROMPT_FORMAT
    if name == "eagle2.5":
        return PromptFormat("eagle2.5", "chatml", EAGLE_SYSTEM_PROMPT, True)
    if name == "frame-times":
        return PromptFormat("frame-times", "tokenizer", "", False)
    raise ValueError(f"unknown prompt_format {name!r}; use one of {list(PROMPT_FORMATS)}")


def format_from_manifest(manifest: Mapping[str, Any]) -> PromptFormat:
    """The format a prepared dataset was counted with (datasets without a record: ``frame-times``)."""
    p = manifest.get("prompt") or {}
    fmt = prompt_format(p.get("format") or "frame-times")
    if "system_prompt" in p and fmt.chat == "chatml":
        fmt = PromptFormat(fmt.layout, fmt.chat, str(p["system_prompt"]), fmt.strip)
    return fmt


# ----------------------------------------------------------------------------- media text

def frame_prefix(index: int, seconds: float, fmt: Union[str, PromptFormat, None] = "frame-times") -> str:
    """Text before a video frame's image tokens; ``index`` is 1-based."""
    if prompt_format(fmt).layout == "eagle2.5":
        return f"Frame {index}: "
    return f"Frame {index} at {seconds:.1f} s: "


def ordinal(k: int) -> str:
    """'first' … 'tenth' for k = 0…9, then the 1-based number."""
    return ORDINALS[k] if k < len(ORDINALS) else str(k + 1)


def video_header(k: int, seconds: float, fps: float) -> str:
    """eagle2.5's line before the frames of the k-th (0-based) video."""
    return f"The {ordinal(k)} video of {seconds:.2f} seconds at {fps:.2f} fps: "


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


def _media_text(plan: MediaPlan, k: int, n_of_kind: int, fmt: PromptFormat, tpt: int, collapse: bool,
                runs: list[int]) -> str:
    """Text of the k-th medium of its kind; appends its context-token run lengths to ``runs``."""
    eagle = fmt.layout == "eagle2.5"
    if isinstance(plan, ImagePlan):
        n = plan.num_tiles * tpt
        runs.append(n)
        body = _image_text(1 if collapse else n)
        if not eagle:
            return body
        return (f"<image {k + 1}>" if n_of_kind > 1 else "") + body + "\n"
    frames = []
    for i, t in enumerate(plan.timestamps, start=1):
        runs.append(tpt)
        frames.append(frame_prefix(i, t, fmt) + _image_text(1 if collapse else tpt))
    if not eagle:
        return "".join(frames)
    seconds = plan.duration if plan.duration is not None else 0.0
    rate = plan.rate if plan.rate is not None else 0.0
    return video_header(k, seconds, rate) + "".join(frames) + "\n"


def _expand_texts(texts: Sequence[str], media_plan: Sequence[MediaPlan], tokens_per_tile: int,
                  collapse: bool, fmt: PromptFormat) -> tuple[list[str], list[int]]:
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
            parts.append(_media_text(by_kind[kind][k], k, len(by_kind[kind]), fmt, tokens_per_tile, collapse, runs))
            pos = end
        parts.append(text[pos:])
        out.append("".join(parts))
    return out, runs


def _text_of(turn: Mapping[str, str]) -> str:
    return turn["value"] if "value" in turn else turn["content"]


def expand_media_placeholders(conversation: Union[str, Conversation], media_plan: Sequence[MediaPlan],
                              tokens_per_tile: int, fmt: Union[str, PromptFormat, None] = "frame-times"
                              ) -> Union[str, Conversation]:
    """Replace media placeholders by image/frame token text for a string or a conversation.

    ``media_plan`` is aligned with the sample's media list; the k-th image placeholder uses the
    k-th ImagePlan in it, likewise for videos. Returns the same shape it was given (turns not stripped).
    """
    f = prompt_format(fmt)
    if isinstance(conversation, str):
        return _expand_texts([conversation], media_plan, tokens_per_tile, False, f)[0][0]
    texts, _ = _expand_texts([_text_of(t) for t in conversation], media_plan, tokens_per_tile, False, f)
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
        msgs.append({"role": ROLES[role], "content": _text_of(turn)})
    return msgs


# ----------------------------------------------------------------------------- chat rendering

def render_chatml(msgs: Sequence[Mapping[str, str]], system_prompt: str = EAGLE_SYSTEM_PROMPT,
                  add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """ChatML text of ``msgs`` and the character spans of what is supervised (each assistant
    turn's content plus its ``<|im_end|>``).

    Every turn renders the same way wherever it stands, so the spans are exact for multi-turn
    samples (a tokenizer's template may render history turns differently from the last one).
    ``system_prompt`` opens the text when ``msgs`` has no system turn first ("" for none).
    """
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def add(s: str) -> None:
        nonlocal pos
        parts.append(s)
        pos += len(s)

    if (not msgs or msgs[0]["role"] != "system") and system_prompt:
        add(f"{IM_START}system\n{system_prompt}{IM_END}\n")
    for m in msgs:
        add(f"{IM_START}{m['role']}\n")
        start = pos
        add(m["content"] + IM_END)
        if m["role"] == "assistant":
            spans.append((start, pos))
        add("\n")
    if add_generation_prompt:
        add(f"{IM_START}assistant\n")
    return "".join(parts), spans


def _end_of_turn(tok) -> str:
    return IM_END if IM_END in tok.get_vocab() else (tok.eos_token or "")


def _template_spans(tok, msgs: list[dict[str, str]], text: str) -> list[tuple[int, int]]:
    """Supervised spans in a tokenizer-template rendering: each turn's content is found in order
    after the previous one, so templates that render history turns differently still work."""
    eot = _end_of_turn(tok)
    spans, pos = [], 0
    for m in msgs:
        content = m["content"]
        start = text.find(content, pos) if content else (text.find(eot, pos) if eot else len(text))
        if start < 0:
            raise ValueError(f"{m['role']} content not found in the rendered chat template")
        end = start + len(content)
        if m["role"] == "assistant":
            if eot and text.startswith(eot, end):
                end += len(eot)
            spans.append((start, end))
        pos = end
    return spans


def render_conversation(tok, msgs: list[dict[str, str]], fmt: PromptFormat,
                        add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """(text, supervised character spans) of chat messages under ``fmt``."""
    if fmt.strip:  # turns are stripped, a system prompt is kept as written (as Eagle 2.5's preprocess does)
        msgs = [m if m["role"] == "system" else {"role": m["role"], "content": m["content"].strip()} for m in msgs]
    if fmt.chat == "chatml":
        return render_chatml(msgs, fmt.system_prompt, add_generation_prompt)
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
    return text, _template_spans(tok, msgs, text)


def tokenize_conversation(tok, conversation: Conversation, media_plan: Optional[Sequence[MediaPlan]] = None,
                          tokens_per_tile: int = 256, add_generation_prompt: bool = False,
                          fmt: Union[str, PromptFormat, None] = None) -> tuple[list[int], list[int]]:
    """Tokenize under ``fmt`` (default eagle2.5); returns ``(input_ids, labels)``.

    Labels are IGNORE_INDEX (-100) except on assistant content and its ``<|im_end|>``. Media
    placeholders are expanded with ``media_plan``; without a plan they must be absent.
    """
    f = prompt_format(fmt)
    texts = [_text_of(t) for t in conversation]
    if media_plan is None:
        if any(PLACEHOLDER_RE.search(t) for t in texts):
            raise ValueError("conversation has media placeholders but no media_plan was given")
        runs: list[int] = []
    else:
        texts, runs = _expand_texts(texts, media_plan, tokens_per_tile, True, f)
    msgs = to_chat_messages([_with_text(t, x) for t, x in zip(conversation, texts)])
    text, spans = render_conversation(tok, msgs, f, add_generation_prompt)
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


def render_collapsed(tok, conversation: Conversation, media_plan: Sequence[MediaPlan], tokens_per_tile: int,
                     fmt: Union[str, PromptFormat, None] = None) -> str:
    """The text a sample trains on, with each ``<img>…</img>`` block written ``<img>×{tpt}·{tiles}</img>``
    so the layout can be read at a glance (``tok`` is only used by the ``tokenizer`` chat mode)."""
    f = prompt_format(fmt)
    texts, runs = _expand_texts([_text_of(t) for t in conversation], media_plan, tokens_per_tile, True, f)
    msgs = to_chat_messages([_with_text(t, x) for t, x in zip(conversation, texts)])
    text, _ = render_conversation(tok, msgs, f)
    block = _image_text(1)
    parts = text.split(block)
    out = [parts[0]]
    for n, rest in zip(runs, parts[1:]):
        out.append(f"{IMG_START}×{tokens_per_tile}·{n // tokens_per_tile}{IMG_END}{rest}")
    return "".join(out)


def count_text_tokens(tok, conversation: Conversation,
                      fmt: Union[str, PromptFormat, None] = None) -> tuple[int, int]:
    """``(text_tokens, supervised_tokens)`` of a conversation with media placeholders removed."""
    stripped = [_with_text(t, strip_media_placeholders(_text_of(t))) for t in conversation]
    ids, labels = tokenize_conversation(tok, stripped, fmt=fmt)
    return len(ids), sum(1 for x in labels if x != IGNORE_INDEX)


# ----------------------------------------------------------------------------- token bounds

def _n_tokens(tok, s: str) -> int:
    return len(tok(s, add_special_tokens=False)["input_ids"])


def frame_prefix_token_bound(tok, max_frames: int = 1024, max_seconds: float = 36000.0,
                             fmt: Union[str, PromptFormat, None] = "frame-times") -> int:
    """Upper bound on the tokens of one frame prefix; +1 for a merge with the text before it."""
    idx = sorted({1, 9, 10, 99, 100, 999, 1000, 1234, 9999, max_frames} - {0})
    secs = [0.0, 9.9, 99.5, 999.5, 1234.5, 9999.9, max_seconds]
    worst = max(_n_tokens(tok, frame_prefix(i, t, fmt))
                for i in idx if i <= max(max_frames, 1) for t in secs if t <= max_seconds)
    return worst + 1


def prompt_token_bounds(tok, fmt: Union[str, PromptFormat, None] = None, max_frames: int = 1024,
                        max_seconds: float = 36000.0) -> dict[str, int]:
    """Upper bounds, for ADS, on the text a layout adds around media: per frame
    (``frame_prefix_tokens``), per video (``video_text_tokens``: header and newline) and per image
    (``image_text_tokens``: ``<image k>`` and newline). Each has +1 for a merge with its neighbours."""
    f = prompt_format(fmt)
    out = {"frame_prefix_tokens": frame_prefix_token_bound(tok, max_frames, max_seconds, f),
           "video_text_tokens": 0, "image_text_tokens": 0}
    if f.layout == "eagle2.5":
        secs = [0.0, 9.99, 99.99, 999.99, 1234.56, 9999.99, max_seconds]
        rates = [0.01, 2.0, 2.67, 29.97, 59.94, 120.0, 999.99]
        out["video_text_tokens"] = 1 + max(_n_tokens(tok, video_header(k, s, r) + "\n")
                                           for k in (0, 2, 6, 9, 10, 99, 999) for s in secs for r in rates)
        out["image_text_tokens"] = 1 + max(_n_tokens(tok, f"<image {k}>\n") for k in (1, 9, 10, 99, 100, 999, 1000))
    return out


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
