"""Eagle-style JSONL samples: parse, validate, resolve and probe media, count tokens.

One input line becomes either an accepted sample (the JSON written into the shard, with its
index metadata) or a reject with a reason from REJECT_REASONS. Every check runs on untrusted
input and never raises for bad data.

Accepted forms (those of Eagle 2.5's recipes): ``image`` as a path or a list of paths; ``video``
as a path, ``{video, start_time, end_time}`` or ``{path, start, end}``; an ``image`` entry
``{video: path}`` (a video); the ``data`` list form ``[{type: image, image_list}, {type: video,
video_list}]``. Paths join the media root; with an empty root they must be absolute, and a
``data`` list may name absolute paths under any root. Samples without placeholders get them
where Eagle 2.5 puts them: prepended to the first non-system turn, one media type at a time in
the order the media come (so with images then videos, the video tags end up first).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from megatron_eagle.data.media.image import MediaError, MediaLimits, image_ext, probe_image
from megatron_eagle.data.media.prompt import (DEFAULT_PROMPT_FORMAT, contains_special_token, count_text_tokens,
                                              placeholder_targets, special_token_strings)
from megatron_eagle.data.media.video import probe_video, video_ext
from megatron_eagle.data.shards import file_sha256

REJECT_REASONS = (
    "malformed JSON", "missing field", "wrong type", "invalid value", "placeholder count mismatch",
    "special token in text", "no supervised tokens", "path escapes media root", "missing media file",
    "media file too large", "undecodable image", "image too large", "zero-length video",
    "truncated video", "undecodable video", "video too long", "video resolution too large",
    "unknown media extension", "unsupported media", "clip outside video",
    "media changed during prepare", "unexpected error",
)
IMAGE_EXTS = ("jpg", "jpeg", "png", "gif", "bmp", "tiff", "tif", "webp")
VIDEO_EXTS = ("mp4", "mkv", "webm", "avi", "mov", "m4v", "ts", "flv", "mpg", "mpeg", "ogv", "3gp", "wmv")
TURN_ROLES = ("human", "gpt", "system")
_KEY_SAFE = re.compile(r"[^A-Za-z0-9_-]+")


class SampleError(Exception):
    """Why one input line is rejected; ``reason`` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class SampleContext:
    """What parsing needs besides the line: media root (resolved; "" = absolute paths only),
    tokenizer, limits and the prompt format the token counts follow."""

    media_root: str
    tokenizer: Any
    limits: MediaLimits = field(default_factory=MediaLimits)
    specials: list[str] = field(default_factory=list)
    prompt_format: str = DEFAULT_PROMPT_FORMAT

    def __post_init__(self) -> None:
        self.media_root = os.path.realpath(self.media_root) if self.media_root else ""
        if not self.specials and self.tokenizer is not None:
            self.specials = special_token_strings(self.tokenizer)


@dataclass
class Accepted:
    key: str
    sample: dict[str, Any]  # the JSON member; media entries carry metadata and member names

    @property
    def member_sizes(self) -> list[int]:
        return [len(sample_json_bytes(self.sample))] + [m["bytes"] for m in self.sample["media"]]


@dataclass
class Rejected:
    reason: str
    detail: str
    id: Optional[str] = None


def sample_json_bytes(sample: dict[str, Any]) -> bytes:
    """Canonical JSON encoding (sorted keys, no spaces) so shards are byte-identical across runs."""
    return json.dumps(sample, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def make_key(source: str, source_index: int, line: int) -> str:
    """Tar-safe sample key: sanitised file stem (no dots or slashes), input number and line."""
    stem = os.path.splitext(os.path.basename(source))[0]
    stem = _KEY_SAFE.sub("_", stem).strip("_")[:40] or "input"
    return f"{stem}-{source_index:03d}-{line:09d}"


# ----------------------------------------------------------------------------- media paths

def resolve_media_path(media_root: str, rel: str, allow_absolute: bool = False) -> str:
    """Real path of ``rel`` under ``media_root`` (already realpath'd); refuses anything that escapes it.

    With an empty ``media_root`` (a recipe's ``root: ""``), or ``allow_absolute``, an absolute path
    is used as it is; an empty root takes nothing else.
    """
    if not isinstance(rel, str) or not rel.strip():
        raise SampleError("invalid value", "empty media path")
    if "\x00" not in rel and os.path.isabs(rel) and (allow_absolute or not media_root):
        real = os.path.realpath(rel)
        if not os.path.isfile(real):
            raise SampleError("missing media file", rel[:200])
        return real
    if not media_root:
        raise SampleError("path escapes media root",
                          f"{rel[:200]} is relative but the root is empty; give the dataset a root or absolute paths")
    if "\x00" in rel or os.path.isabs(rel) or rel.startswith(("\\", "~")) or re.match(r"^[A-Za-z]:", rel) \
            or "://" in rel:
        raise SampleError("path escapes media root", rel[:200])
    real = os.path.realpath(os.path.join(media_root, rel))
    if os.path.commonpath([media_root, real]) != media_root or real == media_root:
        raise SampleError("path escapes media root", rel[:200])
    if not os.path.isfile(real):
        raise SampleError("missing media file", rel[:200])
    return real


# ----------------------------------------------------------------------------- field parsing

def _as_list(v: Any, name: str) -> list[Any]:
    if isinstance(v, list):
        return v
    if isinstance(v, (str, dict)):
        return [v]
    raise SampleError("wrong type", f"`{name}` must be a string or a list")


def _number(v: Any, name: str) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise SampleError("invalid value", f"`{name}` must be a non-negative number")
    return float(v)


def _check_ext(path: str, kind: str, name: str) -> None:
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    allowed = IMAGE_EXTS if kind == "image" else VIDEO_EXTS
    if ext not in allowed:
        raise SampleError("unknown media extension", f"`{name}` {path[-80:]!r}: {kind} extensions are {list(allowed)}")


def _video_item(v: Any, name: str, start: Any = None, end: Any = None, absolute: bool = False) -> dict[str, Any]:
    if isinstance(v, dict):
        key = "video" if "video" in v else "path"
        path = v.get(key)
        start = v.get("start_time", v.get("start", start))
        end = v.get("end_time", v.get("end", end))
        if path is None:
            raise SampleError("missing field", f"`{name}.video` (or `{name}.path`)")
        if ("start_time" in v) != ("end_time" in v):
            raise SampleError("missing field", f"`{name}` needs both start_time and end_time")
    else:
        path = v
    if not isinstance(path, str):
        raise SampleError("wrong type", f"`{name}` path must be a string")
    _check_ext(path, "video", name)
    s, e = _number(start, f"{name}.start"), _number(end, f"{name}.end")
    if s is not None and e is not None and e <= s:
        raise SampleError("invalid value", f"`{name}` end {e} <= start {s}")
    return {"type": "video", "path": path, "start": s, "end": e, "absolute": absolute}


def _image_item(v: Any, name: str, absolute: bool = False) -> dict[str, Any]:
    if isinstance(v, dict) and "lmdb_file" in v:
        raise SampleError("unsupported media", f"`{name}` is an LMDB image; export it to an image file")
    if isinstance(v, dict) and "video" in v:  # Eagle 2.5 reads image: {video: path} as a video
        return _video_item(v, name, absolute=absolute)
    path = v.get("path") if isinstance(v, dict) else v
    if not isinstance(path, str):
        raise SampleError("wrong type", f"`{name}` must be a path string")
    _check_ext(path, "image", name)
    return {"type": "image", "path": path, "absolute": absolute}


def parse_media_fields(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Media in sample order from ``image``/``video`` keys or the ``data`` list form."""
    has_data = "data" in obj and obj["data"] is not None
    if has_data and (obj.get("image") is not None or obj.get("video") is not None):
        raise SampleError("invalid value", "both `data` and `image`/`video` given")
    media: list[dict[str, Any]] = []
    if has_data:
        if not isinstance(obj["data"], list):
            raise SampleError("wrong type", "`data` must be a list")
        for i, item in enumerate(obj["data"]):
            if not isinstance(item, dict) or item.get("type") not in ("image", "video"):
                raise SampleError("wrong type", f"`data[{i}]` must be {{type: image|video, ...}}")
            lst = f"{item['type']}_list"
            if lst not in item:
                raise SampleError("missing field", f"`data[{i}].{lst}`")
            for j, v in enumerate(_as_list(item[lst], f"data[{i}].{lst}")):
                name = f"data[{i}].{lst}[{j}]"
                media.append(_image_item(v, name, True) if item["type"] == "image"
                             else _video_item(v, name, absolute=True))
        return media
    if obj.get("image") is not None:
        media += [_image_item(v, f"image[{j}]") for j, v in enumerate(_as_list(obj["image"], "image"))]
    if obj.get("video") is not None:
        videos = _as_list(obj["video"], "video")
        top = (obj.get("start"), obj.get("end")) if len(videos) == 1 else (None, None)
        media += [_video_item(v, f"video[{j}]", *top) for j, v in enumerate(videos)]
    # image: {video: path} entries are videos; keep images before videos like Eagle 2.5 does
    return [m for m in media if m["type"] == "image"] + [m for m in media if m["type"] == "video"]


def parse_conversations(obj: dict[str, Any]) -> list[dict[str, str]]:
    if "conversations" not in obj:
        raise SampleError("missing field", "`conversations`")
    conv = obj["conversations"]
    if not isinstance(conv, list) or not conv:
        raise SampleError("wrong type", "`conversations` must be a non-empty list")
    out = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise SampleError("wrong type", f"`conversations[{i}]` must be an object")
        for k in ("from", "value"):
            if k not in turn:
                raise SampleError("missing field", f"`conversations[{i}].{k}`")
        if not isinstance(turn["from"], str) or not isinstance(turn["value"], str):
            raise SampleError("wrong type", f"`conversations[{i}]` from/value must be strings")
        if turn["from"] not in TURN_ROLES:
            raise SampleError("invalid value", f"`conversations[{i}].from` is {turn['from'][:40]!r}")
        out.append({"from": turn["from"], "value": turn["value"]})
    return out


def canonical_placeholders(conv: list[dict[str, str]], media: list[dict[str, Any]],
                           absorb_newline: bool = True) -> list[dict[str, str]]:
    """Reconcile placeholders with media and rewrite them to the numbered form ``<image-k>`` / ``<video-k>``.

    A media type without any placeholder gets all of its tags prepended to the first non-system
    turn; with numbered tags, missing numbers are prepended likewise. A tag used twice, a number
    with no medium, or a placeholder outside a human turn cannot be reconciled. With
    ``absorb_newline`` an unnumbered tag swallows one newline right after it (eagle2.5 writes
    its own newline after each medium).
    """
    try:
        found = placeholder_targets([t["value"] for t in conv])
    except ValueError as e:
        raise SampleError("placeholder count mismatch", str(e)) from None
    kinds = list(dict.fromkeys(m["type"] for m in media))
    want = {k: sum(m["type"] == k for m in media) for k in ("image", "video")}
    got: dict[str, list[int]] = {"image": [], "video": []}
    for turn, items in zip(conv, found):
        if items and turn["from"] != "human":
            raise SampleError("placeholder count mismatch", f"media placeholder in a {turn['from']} turn")
        for kind, k, _, _ in items:
            got[kind].append(k)
    missing: dict[str, list[int]] = {}
    for kind in ("image", "video"):
        ks = got[kind]
        if len(set(ks)) != len(ks) or any(k >= want[kind] for k in ks):
            raise SampleError("placeholder count mismatch",
                              f"{len(ks)} <{kind}> placeholders for {want[kind]} {kind}(s)")
        missing[kind] = [k for k in range(want[kind]) if k not in set(ks)]
    out = []
    for turn, items in zip(conv, found):
        text, pos, parts = turn["value"], 0, []
        for kind, k, a, b in items:
            parts += [text[pos:a], f"<{kind}-{k + 1}>"]
            pos = b
            numbered = text[a:b] != f"<{kind}>"
            if absorb_newline and not numbered and text.startswith("\n", pos):
                pos += 1
        parts.append(text[pos:])
        out.append({"from": turn["from"], "value": "".join(parts)})
    if any(missing.values()):
        first = next((i for i, t in enumerate(out) if t["from"] != "system"), None)
        if first is None or out[first]["from"] != "human":
            raise SampleError("placeholder count mismatch", "the first non-system turn is not a human turn")
        for kind in kinds:  # each type prepends in turn, so the last type's tags come first
            tags = "".join(f"<{kind}-{k + 1}>" for k in missing[kind])
            out[first]["value"] = tags + out[first]["value"]
    return out


# ----------------------------------------------------------------------------- probing

def probe_media(item: dict[str, Any], index: int, ctx: SampleContext) -> dict[str, Any]:
    """Resolve, size-check, hash and probe one medium; returns its index entry."""
    real = resolve_media_path(ctx.media_root, item["path"], item.get("absolute", False))
    size = os.path.getsize(real)
    if size > ctx.limits.max_media_bytes:
        raise SampleError("media file too large", f"{size} bytes")
    entry: dict[str, Any] = {"type": item["type"], "path": item["path"], "bytes": size}
    if item.get("absolute") and os.path.isabs(item["path"]):
        entry["absolute"] = True
    try:
        if item["type"] == "image":
            with open(real, "rb") as f:
                data = f.read()
            entry.update(probe_image(data, ctx.limits))
            entry["sha256"] = hashlib.sha256(data).hexdigest()
            entry["member"] = f"m{index}.{image_ext(entry['format'])}"
            return entry
        info = probe_video(real, ctx.limits)
    except MediaError as e:
        raise SampleError(e.reason, e.detail[:300]) from None
    clip = item["start"] is not None or item["end"] is not None
    start = item["start"] or 0.0
    end = item["end"] if item["end"] is not None else info["duration"]
    slack = 1.0 / info["fps"]  # containers round their duration to about a frame
    if start >= info["duration"] or end > info["duration"] + slack:
        raise SampleError("clip outside video", f"clip {start}-{end} s of a {info['duration']:.2f} s video")
    end = min(end, info["duration"])
    if end - start < 0.5 / info["fps"] or (clip and int((end - start) * info["fps"]) < 1):
        raise SampleError("zero-length video", f"clip {start}-{end} s holds no frame")
    entry.update(info)
    entry.update(start=round(start, 6), end=round(end, 6), clip=clip, sha256=file_sha256(real),
                 member=f"m{index}.{video_ext(info['format'])}")
    return entry


# ----------------------------------------------------------------------------- one line

def parse_sample(raw: Union[str, bytes], source: str, source_index: int, line: int,
                 ctx: SampleContext) -> Union[Accepted, Rejected]:
    """Validate one JSONL line; cheap checks first, media probing last."""
    sid: Optional[str] = None
    try:
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            obj = json.loads(text)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: nesting bombs
            raise SampleError("malformed JSON", f"{type(e).__name__}: {str(e)[:200]}") from None
        if not isinstance(obj, dict):
            raise SampleError("wrong type", "a sample must be a JSON object")
        if obj.get("id") is not None:
            sid = str(obj["id"])[:200]
        conv = parse_conversations(obj)
        media = parse_media_fields(obj)
        conv = canonical_placeholders(conv, media, absorb_newline=ctx.prompt_format == "eagle2.5")
        for t in conv:
            tok = contains_special_token(t["value"], ctx.specials)
            if tok:
                raise SampleError("special token in text", tok)
        if not any(t["from"] == "gpt" and t["value"].strip() for t in conv):
            raise SampleError("no supervised tokens", "no non-empty gpt turn")
        text_tokens, supervised = count_text_tokens(ctx.tokenizer, conv, ctx.prompt_format)
        if supervised == 0:
            raise SampleError("no supervised tokens", "assistant turns tokenize to nothing")
        entries = [probe_media(m, i, ctx) for i, m in enumerate(media)]
    except SampleError as e:
        return Rejected(e.reason, e.detail, sid)
    key = make_key(source, source_index, line)
    sample = {"key": key, "id": sid, "source": os.path.basename(source), "line": line,
              "conversations": conv, "media": entries,
              "text_tokens": text_tokens, "supervised_tokens": supervised}
    return Accepted(key, sample)
