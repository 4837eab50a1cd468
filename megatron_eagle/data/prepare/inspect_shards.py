"""`megatron-eagle inspect`: counts and distributions of a prepared directory, as text and a PNG.

Reads only manifest.json and index.jsonl (never the shards). With ``--sample N`` it also prints
sample N's text as training sees it at ``--seq-len`` (ADS frames and tiles, the dataset's prompt
format), each ``<img>`` block collapsed to ``<img>×256·k</img>`` (k tiles of 256 tokens).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

from megatron_eagle.data.shards import iter_index, load_manifest

DURATION_EDGES = (0.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, math.inf)


def pow2_edges(values: Sequence[float]) -> list[float]:
    """Power-of-two bin edges covering the values (token counts are long-tailed)."""
    hi = max(values, default=1)
    n = max(1, math.ceil(math.log2(max(hi, 1) + 1)))
    return [0.0] + [float(2 ** k) for k in range(4, max(n, 4) + 1)] + [math.inf]


def histogram(values: Sequence[float], edges: Sequence[float]) -> list[tuple[float, float, int]]:
    """Counts per [lo, hi) bin."""
    counts = [0] * (len(edges) - 1)
    for v in values:
        for i in range(len(edges) - 1):
            if edges[i] <= v < edges[i + 1]:
                counts[i] += 1
                break
    return [(edges[i], edges[i + 1], c) for i, c in enumerate(counts)]


def summarize(root: str | Path) -> dict[str, Any]:
    """Counts and histograms from manifest + index."""
    m = load_manifest(root)
    text, sup, durations, img_px, n_media = [], [], [], [], []
    for r in iter_index(root):
        text.append(r["text_tokens"])
        sup.append(r["supervised_tokens"])
        n_media.append(len(r["media"]))
        for x in r["media"]:
            if x["type"] == "video":
                durations.append(x["end"] - x["start"])
            else:
                img_px.append(x["width"] * x["height"])
    return {
        "samples": len(text), "input_samples": m["input_samples"], "rejected_samples": m["rejected_samples"],
        "rejected_by_reason": m["rejected_by_reason"], "shards": len(m["shards"]), "bytes": m["total_bytes"],
        "prompt_format": (m.get("prompt") or {}).get("format", "frame-times"), "video_sampling": m.get("video_sampling"),
        "images": len(img_px), "videos": len(durations),
        "text_only": sum(1 for n in n_media if n == 0),
        "video_seconds": round(sum(durations), 3),
        "text_tokens": {"total": sum(text), "hist": histogram(text, pow2_edges(text))},
        "supervised_tokens": {"total": sum(sup), "hist": histogram(sup, pow2_edges(sup))},
        "video_duration_s": {"hist": histogram(durations, DURATION_EDGES)},
        "_values": {"text": text, "supervised": sup, "durations": durations, "image_px": img_px},
    }


def _edge(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def render_text(s: dict[str, Any], width: int = 40) -> str:
    lines = [f"samples {s['samples']} written of {s['input_samples']} input, {s['rejected_samples']} rejected; "
             f"{s['shards']} shards, {s['bytes']} bytes",
             f"media: {s['images']} images, {s['videos']} videos ({s['video_seconds']} s); {s['text_only']} text-only",
             f"prompt format: {s.get('prompt_format', 'frame-times')}" + (
                 " (frames: {fps:g} fps, {min_frames}..{max_frames})".format(**s["video_sampling"])
                 if s.get("video_sampling") else "")]
    for reason, n in s["rejected_by_reason"].items():
        lines.append(f"  rejected  {reason}: {n}")
    for title, key in (("text tokens (no visual tokens)", "text_tokens"), ("supervised tokens", "supervised_tokens"),
                       ("video clip duration (s)", "video_duration_s")):
        hist = s[key]["hist"]
        peak = max((c for _, _, c in hist), default=0) or 1
        lines.append(f"{title}:" + (f" total {s[key]['total']}" if "total" in s[key] else ""))
        for lo, hi, c in hist:
            lines.append(f"  [{_edge(lo):>6}, {_edge(hi):>6})  {c:>7}  {'#' * round(width * c / peak)}")
    return "\n".join(lines)


def plot(s: dict[str, Any], path: str | Path) -> Path:
    """PNG with text-token, supervised-token and video-duration histograms and reject reasons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    v = s["_values"]
    fig, ax = plt.subplots(2, 2, figsize=(10, 7))
    for a, data, title in ((ax[0, 0], v["text"], "text tokens"), (ax[0, 1], v["supervised"], "supervised tokens"),
                           (ax[1, 0], v["durations"], "video clip duration (s)")):
        if data:
            a.hist(data, bins=min(50, max(5, len(set(data)))), color="tab:blue")
        a.set_title(title)
        a.set_ylabel("samples")
    reasons = s["rejected_by_reason"]
    ax[1, 1].barh(list(reasons) or ["none"], list(reasons.values()) or [0], color="tab:red")
    ax[1, 1].set_title("rejected inputs by reason")
    fig.suptitle(f"{s['samples']} samples, {s['shards']} shards")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `megatron-eagle inspect`."""
    p.add_argument("path", help="prepared directory")
    p.add_argument("--plot", default=None, help="PNG path (default PATH/inspect.png)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--sample", type=int, action="append", default=[],
                   help="also print sample N's text with <img> blocks collapsed (repeatable)")
    p.add_argument("--seq-len", type=int, default=32768, help="stage length ADS plans the sample for (default 32768)")
    p.add_argument("--tokens-per-tile", type=int, default=256, help="LLM tokens per tile of the model (default 256)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer dir (only for frame-times data; default: the one in the manifest)")


def sample_text(root: str | Path, i: int, seq_len: int = 32768, tokenizer: Any = None,
                tokens_per_tile: int = 256) -> str:
    """Sample ``i`` of a prepared directory as :func:`render_collapsed` writes it at ``seq_len``."""
    from megatron_eagle.data.media.ads import ads_config_from_manifest, plan_sample
    from megatron_eagle.data.media.prompt import format_from_manifest, render_collapsed
    from megatron_eagle.data.shards import ShardReader, load_index

    m = load_manifest(root)
    records = load_index(root)
    if not 0 <= i < len(records):
        raise ValueError(f"--sample {i}: the dataset has {len(records)} samples")
    rec = records[i]
    fmt = format_from_manifest(m)
    cfg = ads_config_from_manifest(m, tokens_per_tile=tokens_per_tile)
    res = plan_sample(rec, seq_len, cfg)
    if res.plan is None:
        return f"[sample {i} ({rec['key']}) is dropped at {seq_len}: {res.drop_reason}]"
    tok = None
    if fmt.chat != "chatml":
        from megatron_eagle.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer or m["tokenizer"]["path"])
    with ShardReader(root) as reader:
        sample = reader.read_json(rec)
    text = render_collapsed(tok, sample["conversations"], res.plan.media, cfg.tokens_per_tile, fmt)
    return f"--- sample {i} ({rec['key']}, {fmt.name}, {res.plan.num_tokens} tokens at most) ---\n{text}"


def run(args: argparse.Namespace) -> int:
    try:
        s = summarize(args.path)
        texts = [sample_text(args.path, i, args.seq_len, args.tokenizer, args.tokens_per_tile) for i in args.sample]
    except (OSError, ValueError) as e:
        print(f"inspect: {e}", file=sys.stderr)
        return 2
    for t in texts:
        print(t)
    png = plot(s, args.plot or Path(args.path) / "inspect.png")
    if args.json:
        print(json.dumps({k: v for k, v in s.items() if not k.startswith("_")}, indent=1, default=str))
    else:
        print(render_text(s))
    print(f"plot: {png}")
    return 0
