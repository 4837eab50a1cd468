"""`megatron-eagle prepare`: Eagle-style JSONL + media folder -> webdataset shards + index + manifest.

Two passes. Scan: every input line is parsed, validated, its media probed and tokens counted,
in parallel but collected in input order into a plan. Write: the plan is cut into balanced
shards that worker processes write independently and atomically. Both passes depend only on
the inputs, so output bytes do not depend on the worker count, and a rerun skips finished shards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional

from megatron_eagle.data.media.image import MediaLimits
from megatron_eagle.data.media.prompt import DEFAULT_PROMPT_FORMAT, PROMPT_FORMATS
from megatron_eagle.data.prepare.samples import (Accepted, Rejected, SampleContext, SampleError, parse_sample,
                                                 resolve_media_path, sample_json_bytes)
from megatron_eagle.data.prepare.shard_jobs import clear_sidecars, pool_context, run_shard_jobs
from megatron_eagle.data.shards import (FORMAT_VERSION, INDEX_NAME, MANIFEST_NAME, REJECTS_NAME, WORK_DIR, ShardSample,
                                        file_sha256, index_meta, parse_size, plan_shards, remove_stale,
                                        sample_tar_bytes, shard_name, write_json_atomic, write_jsonl_atomic)

MAX_LINE_BYTES = 64 << 20  # a longer line is rejected as malformed without being held in memory


def tool_version() -> str:
    try:
        from importlib.metadata import version

        return version("megatron-eagle")
    except Exception:
        return "0.1.0"


class PrepareError(RuntimeError):
    """Bad arguments (missing input, media root, tokenizer); nothing was written."""


@dataclass
class PrepareConfig:
    inputs: list[str]
    media_root: str
    output: str
    tokenizer: str
    shard_size: int = 1 << 30
    workers: int = 1
    max_reject_fraction: float = 0.05
    limits: MediaLimits = field(default_factory=MediaLimits)
    progress: bool = True
    prompt_format: str = DEFAULT_PROMPT_FORMAT
    video_fps: float = 2.0  # official frame sampling: target rate, min and max frames per video
    min_frames: int = 8
    max_frames: int = 128
    max_dynamic_tiles: Optional[int] = None  # a recipe's per-dataset tile cap (None: the model's)


# ----------------------------------------------------------------------------- scan pass

_CTX: Optional[SampleContext] = None


def _init_scan(tokenizer: str, media_root: str, limits: MediaLimits, fmt: str) -> None:
    global _CTX
    from megatron_eagle.tokenizer import load_tokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _CTX = SampleContext(media_root, load_tokenizer(tokenizer), limits, prompt_format=fmt)


def _scan_one(task: tuple[str, int, int, bytes]) -> tuple[int, int, Any]:
    source, src_idx, line, raw = task
    assert _CTX is not None
    if raw is None:  # over-long line, never read into memory
        return src_idx, line, Rejected("malformed JSON", f"line longer than {MAX_LINE_BYTES} bytes")
    try:
        return src_idx, line, parse_sample(raw, source, src_idx, line, _CTX)
    except Exception as e:  # a decoder or library failure on one sample must not stop the job
        return src_idx, line, Rejected("unexpected error", f"{type(e).__name__}: {str(e)[:200]}")


def _read_lines(f: BinaryIO, h: Any) -> Iterator[tuple[int, Optional[bytes]]]:
    """(line number, bytes) for non-blank lines; None for lines over MAX_LINE_BYTES."""
    n = 0
    while True:
        raw = f.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        h.update(raw)
        n += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = f.readline(MAX_LINE_BYTES)
                h.update(raw)
            yield n, None
            continue
        if raw.strip():
            yield n, raw


def _count_lines(paths: list[str]) -> int:
    n = 0
    for p in paths:
        with open(p, "rb") as f:
            for b in iter(lambda: f.read(1 << 20), b""):
                n += b.count(b"\n")
    return n


@dataclass
class ScanResult:
    offsets: list[int]  # byte offset of each accepted sample in the plan file
    sizes: list[int]  # tar bytes of each accepted sample
    rejects: list[dict[str, Any]]
    inputs: list[dict[str, Any]]
    input_samples: int


def scan(cfg: PrepareConfig, plan_path: Path) -> ScanResult:
    """Parse and probe every input line; accepted samples go to ``plan_path`` in input order."""
    from tqdm import tqdm

    hashes = [hashlib.sha256() for _ in cfg.inputs]
    counts = [0] * len(cfg.inputs)

    def tasks() -> Iterator[tuple[str, int, int, Optional[bytes]]]:
        for i, path in enumerate(cfg.inputs):
            with open(path, "rb") as f:
                for line, raw in _read_lines(f, hashes[i]):
                    counts[i] += 1
                    yield path, i, line, raw

    res = ScanResult([], [], [], [], 0)
    bar = tqdm(total=_count_lines(cfg.inputs), desc="scan", unit="line", disable=not cfg.progress, file=sys.stderr)
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    with open(tmp, "wb") as plan:
        if cfg.workers <= 1:
            _init_scan(cfg.tokenizer, cfg.media_root, cfg.limits, cfg.prompt_format)
            results = map(_scan_one, tasks())
            pool = None
        else:
            pool = pool_context().Pool(cfg.workers, initializer=_init_scan,
                                       initargs=(cfg.tokenizer, cfg.media_root, cfg.limits, cfg.prompt_format))
            results = pool.imap(_scan_one, tasks(), chunksize=8)  # ordered: output is independent of workers
        try:
            for src_idx, line, r in results:
                res.input_samples += 1
                bar.update(1)
                if isinstance(r, Accepted):
                    res.offsets.append(plan.tell())
                    res.sizes.append(sample_tar_bytes(r.member_sizes))
                    plan.write(json.dumps(r.sample, sort_keys=True, ensure_ascii=False).encode("utf-8") + b"\n")
                else:
                    res.rejects.append({"source": cfg.inputs[src_idx], "line": line, "id": r.id,
                                        "reason": r.reason, "detail": r.detail, "_order": (src_idx, line)})
        except BaseException:
            if pool is not None:
                pool.terminate()
            raise
        finally:
            if pool is not None:
                pool.close()
                pool.join()
            bar.close()
    os.replace(tmp, plan_path)
    res.inputs = [{"path": p, "sha256": h.hexdigest(), "samples": c} for p, h, c in zip(cfg.inputs, hashes, counts)]
    return res


# ----------------------------------------------------------------------------- write pass

@dataclass
class PlanSource:
    """Samples of the plan file, with media bytes re-read (and re-checked) from the media root."""

    plan_path: str
    offsets: list[int]
    media_root: str
    inputs: list[str]

    def samples(self, start: int, end: int, late_rejects: list[dict[str, Any]]) -> Iterator[ShardSample]:
        root = os.path.realpath(self.media_root) if self.media_root else ""
        with open(self.plan_path, "rb") as plan:
            for i in range(start, end):
                plan.seek(self.offsets[i])
                sample = json.loads(plan.readline())
                try:
                    members = {"json": sample_json_bytes(sample)}
                    for m in sample["media"]:
                        with open(resolve_media_path(root, m["path"], m.get("absolute", False)), "rb") as f:
                            data = f.read()
                        if len(data) != m["bytes"] or hashlib.sha256(data).hexdigest() != m["sha256"]:
                            raise SampleError("media changed during prepare", m["path"][:200])
                        members[m["member"]] = data
                except (SampleError, OSError) as e:
                    reason, detail = ((e.reason, e.detail) if isinstance(e, SampleError)
                                      else ("unexpected error", f"{type(e).__name__}: {e}"[:200]))
                    src_idx = int(sample["key"].rsplit("-", 2)[1])  # keys are STEM-SRC-LINE
                    late_rejects.append({"source": self.inputs[src_idx], "line": sample["line"], "id": sample["id"],
                                         "reason": reason, "detail": detail})
                    continue
                yield ShardSample(sample["key"], members, index_meta(sample))


def _plan_fingerprint(plan_path: Path, ranges: list[tuple[int, int]]) -> str:
    h = hashlib.sha256(f"format={FORMAT_VERSION}\n".encode())
    h.update(file_sha256(str(plan_path)).encode())
    h.update(json.dumps(ranges).encode())
    return h.hexdigest()[:32]


def _order_key(source: str, line: int, inputs: list[str]) -> tuple[int, int]:
    return (inputs.index(source) if source in inputs else len(inputs), line)


# ----------------------------------------------------------------------------- driver

def _check_args(cfg: PrepareConfig):
    for p in cfg.inputs:
        if not os.path.isfile(p):
            raise PrepareError(f"--input {p}: no such file")
    if len(set(cfg.inputs)) != len(cfg.inputs):
        raise PrepareError("--input lists a file twice")
    if cfg.media_root and not os.path.isdir(cfg.media_root):
        raise PrepareError(f"--media-root {cfg.media_root}: not a directory")
    if cfg.prompt_format not in PROMPT_FORMATS:
        raise PrepareError(f"--prompt-format {cfg.prompt_format!r}: use one of {list(PROMPT_FORMATS)}")
    if not (cfg.video_fps > 0 and 1 <= cfg.min_frames <= cfg.max_frames):
        raise PrepareError("video sampling needs fps > 0 and 1 <= min_frames <= max_frames")
    if cfg.shard_size <= 0:
        raise PrepareError("--shard-size must be positive")
    if not 0.0 <= cfg.max_reject_fraction <= 1.0:
        raise PrepareError("--max-reject-fraction must be within [0, 1]")
    from megatron_eagle.tokenizer import load_tokenizer

    try:
        return load_tokenizer(cfg.tokenizer)
    except Exception as e:
        raise PrepareError(f"--tokenizer {cfg.tokenizer}: cannot load ({type(e).__name__}: {e})") from None


@dataclass
class PrepareResult:
    manifest: dict[str, Any]
    exit_code: int  # 1 when the rejected fraction exceeds the threshold (or there was no input)
    skipped_shards: int  # shards found complete from an earlier run


def prepare(cfg: PrepareConfig) -> PrepareResult:
    """Run both passes and write index, rejects and manifest (always, even when the rejected
    fraction exceeds ``max_reject_fraction``; the exit code reports that)."""
    from megatron_eagle.data.media.prompt import prompt_format, prompt_token_bounds
    from megatron_eagle.tokenizer import tokenizer_fingerprint

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = _check_args(cfg)
    out = Path(cfg.output)
    work = out / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    plan_path = work / "plan.jsonl"

    res = scan(cfg, plan_path)
    ranges = plan_shards(res.sizes, cfg.shard_size)
    fp = _plan_fingerprint(plan_path, ranges)
    source = PlanSource(str(plan_path), res.offsets, cfg.media_root, list(cfg.inputs))
    sidecars, skipped = run_shard_jobs(out, work, ranges, fp, source, cfg.workers, cfg.progress)

    records = [r for d in sidecars for r in d["records"]]
    rejects = res.rejects + [dict(r, _order=_order_key(r["source"], r["line"], cfg.inputs))
                             for d in sidecars for r in d["late_rejects"]]
    rejects.sort(key=lambda r: r["_order"])
    for r in rejects:
        r.pop("_order")
    remove_stale(out, {shard_name(i) for i in range(len(ranges))})
    clear_sidecars(work, len(ranges))
    write_jsonl_atomic(out / INDEX_NAME, records)
    write_jsonl_atomic(out / REJECTS_NAME, rejects)

    by_reason = Counter(r["reason"] for r in rejects)
    frac = len(rejects) / res.input_samples if res.input_samples else 0.0
    media = [m for r in records for m in r["media"]]
    manifest = {
        "tool": "megatron-eagle prepare", "tool_version": tool_version(), "format_version": FORMAT_VERSION,
        "inputs": res.inputs, "media_root": cfg.media_root,
        "input_samples": res.input_samples, "written_samples": len(records),
        "rejected_samples": len(rejects), "rejected_by_reason": dict(sorted(by_reason.items())),
        "reject_fraction": round(frac, 6), "max_reject_fraction": cfg.max_reject_fraction,
        "shard_size": cfg.shard_size,
        "shards": [{k: d[k] for k in ("name", "samples", "bytes", "sha256")} for d in sidecars],
        "total_bytes": sum(d["bytes"] for d in sidecars),
        "tokenizer": {"path": cfg.tokenizer, "fingerprint": tokenizer_fingerprint(tok), "vocab_size": len(tok)},
        "limits": cfg.limits.to_dict(),
        "prompt": {"text_tokens": "chat rendered, media placeholders removed",
                   **prompt_format(cfg.prompt_format).to_dict(),
                   **prompt_token_bounds(tok, cfg.prompt_format, max_frames=max(1024, cfg.max_frames))},
        "video_sampling": ({"rule": "official", "fps": cfg.video_fps, "min_frames": cfg.min_frames,
                            "max_frames": cfg.max_frames} if cfg.prompt_format == "eagle2.5" else None),
        "max_dynamic_tiles": cfg.max_dynamic_tiles,
        "stats": {"images": sum(m["type"] == "image" for m in media),
                  "videos": sum(m["type"] == "video" for m in media),
                  "video_seconds": round(sum(m["end"] - m["start"] for m in media if m["type"] == "video"), 3),
                  "text_tokens": sum(r["text_tokens"] for r in records),
                  "supervised_tokens": sum(r["supervised_tokens"] for r in records)},
        "index": INDEX_NAME, "rejects": REJECTS_NAME,
    }
    assert manifest["input_samples"] == manifest["written_samples"] + manifest["rejected_samples"]
    write_json_atomic(out / MANIFEST_NAME, manifest)
    plan_path.unlink()
    rc = 1 if (frac > cfg.max_reject_fraction or res.input_samples == 0) else 0
    return PrepareResult(manifest, rc, skipped)


# ----------------------------------------------------------------------------- CLI

def add_limit_args(p: argparse.ArgumentParser) -> None:
    d = MediaLimits()
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="reject larger images")
    p.add_argument("--max-video-seconds", type=float, default=d.max_video_seconds, help="reject longer videos")
    p.add_argument("--max-video-pixels", type=int, default=d.max_video_pixels,
                   help="reject videos whose width*height is larger")
    p.add_argument("--max-media-bytes", type=parse_size, default=d.max_media_bytes, help="reject larger files")


def limits_from_args(a: argparse.Namespace) -> MediaLimits:
    return MediaLimits(a.max_image_pixels, a.max_video_seconds, a.max_video_pixels, a.max_media_bytes)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `megatron-eagle prepare`."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", help="Eagle-style JSONL annotation files")
    src.add_argument("--recipe", help="an Eagle 2.5 recipe JSON (dataset name -> root, annotation, repeat_time, "
                                      "...): one output folder per dataset plus recipe.json")
    p.add_argument("--media-root", help="directory that media paths are relative to (with --input)")
    p.add_argument("--output", required=True, help="output directory for shards, index and manifest")
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=DEFAULT_PROMPT_FORMAT,
                   help="prompt layout the token counts follow (default eagle2.5, the released models' layout)")
    p.add_argument("--video-fps", type=float, default=2.0, help="eagle2.5 frame sampling: target fps (default 2)")
    p.add_argument("--min-frames", type=int, default=8, help="eagle2.5 frame sampling: min frames (default 8)")
    p.add_argument("--max-frames", type=int, default=128, help="eagle2.5 frame sampling: max frames (default 128)")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory (for token counts)")
    p.add_argument("--shard-size", type=parse_size, default=1 << 30, help="target shard size (default 1GiB)")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="processes")
    p.add_argument("--max-reject-fraction", type=float, default=0.05,
                   help="exit non-zero when more than this fraction of inputs is rejected (default 0.05)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_limit_args(p)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> PrepareConfig:
    """A PrepareConfig from the command line (``overrides`` for one dataset of a recipe)."""
    kw: dict[str, Any] = dict(
        inputs=list(args.input or []), media_root=args.media_root, output=args.output, tokenizer=args.tokenizer,
        shard_size=args.shard_size, workers=args.workers, max_reject_fraction=args.max_reject_fraction,
        limits=limits_from_args(args), progress=not args.no_progress and sys.stderr.isatty(),
        prompt_format=args.prompt_format, video_fps=args.video_fps, min_frames=args.min_frames,
        max_frames=args.max_frames)
    kw.update(overrides)
    return PrepareConfig(**kw)


def run(args: argparse.Namespace) -> int:
    """`megatron-eagle prepare --input ...` (the ``--recipe`` form is in :mod:`.recipe`)."""
    if not args.media_root:
        print("prepare: --media-root is required with --input", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    try:
        result = prepare(cfg)
    except PrepareError as e:
        print(f"prepare: {e}", file=sys.stderr)
        return 2
    m, rc = result.manifest, result.exit_code
    print(f"prepared {m['written_samples']} of {m['input_samples']} samples into {len(m['shards'])} shards "
          f"({m['total_bytes']} bytes) in {cfg.output}; {result.skipped_shards} shards were already done")
    if m["rejected_samples"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in m["rejected_by_reason"].items())
        print(f"rejected {m['rejected_samples']} ({m['reject_fraction']:.1%}): {reasons}; see "
              f"{os.path.join(cfg.output, REJECTS_NAME)}")
    if rc:
        print(f"prepare: rejected fraction {m['reject_fraction']:.1%} exceeds --max-reject-fraction "
              f"{cfg.max_reject_fraction:.1%}" if m["input_samples"] else "prepare: no input samples",
              file=sys.stderr)
    return rc
