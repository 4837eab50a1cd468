"""`megatron-eagle prepare`: JSONL + media (``--input``) or an Eagle 2.5 recipe (``--recipe``) -> shards + index.

``--recipe RECIPE.json`` writes one prepared folder per dataset plus ``recipe.json``, the recipe
index (the role of the official ``.prepared.json``); ``--input`` is :mod:`.pipeline` alone.

A recipe maps dataset names to ``{root, annotation, repeat_time, max_dynamic_tiles, ...}``.
``annotation`` (and a relative ``root``) resolve against the recipe file's folder first, then the
working directory (where the official preparation opens them). ``root: ""`` means media paths are
absolute. Keys we do not use (``data_augment``, ``weight``, ``modality``, ...) are kept in the index.

The index lists, per dataset in recipe order, its name, folder, ``repeat_time``, tile cap, the other recipe keys, and
counts (inputs = written + rejected, reasons) and token lengths; a curriculum stage names it with
``{name: ..., recipe: OUT/recipe.json}``. The reject threshold applies per dataset (a recipe
entry's ``max_reject_fraction``, else ``--max-reject-fraction``) and over all datasets.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from megatron_eagle.config.curriculum import RECIPE_FORMAT, RECIPE_INDEX
from megatron_eagle.data.prepare.pipeline import PrepareConfig, PrepareError, add_arguments, config_from_args, prepare
from megatron_eagle.data.prepare.pipeline import run as run_inputs
from megatron_eagle.data.shards import INDEX_NAME, REJECTS_NAME, iter_index, write_json_atomic

USED_KEYS = ("root", "annotation", "repeat_time", "max_dynamic_tiles", "max_reject_fraction")
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class RecipeDataset:
    """One dataset of a recipe, with its paths resolved."""

    name: str
    annotation: str
    root: str  # "" = absolute media paths
    repeat_time: float = 1.0
    max_dynamic_tiles: Optional[int] = None
    max_reject_fraction: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def folder(self) -> str:
        """Output folder name: the dataset name made filesystem-safe."""
        return _SAFE.sub("_", self.name).strip("._") or "dataset"


def _resolve(path: str, recipe_dir: Path) -> str:
    """``path`` if absolute; else under the recipe's folder if it exists there, else under the working directory."""
    if os.path.isabs(path):
        return path
    for base in (recipe_dir, Path.cwd()):
        if (base / path).exists():
            return str(base / path)
    return str(recipe_dir / path)


def read_recipe(path: str | Path) -> list[RecipeDataset]:
    """Parse and check a recipe; raises PrepareError naming the dataset, the field and the fix."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PrepareError(f"--recipe {path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict) or not data:
        raise PrepareError(f"--recipe {path}: must be a JSON object mapping dataset names to "
                           "{root, annotation, repeat_time, ...}")
    out, folders = [], set()
    for name, entry in data.items():
        where = f"--recipe {path}: dataset {name!r}"
        if not isinstance(entry, dict):
            raise PrepareError(f"{where}: must be an object with root and annotation")
        ann, root = entry.get("annotation"), entry.get("root", "")
        if not isinstance(ann, str) or not ann:
            raise PrepareError(f"{where}: field `annotation` missing; give the .jsonl file of its samples")
        if not isinstance(root, str):
            raise PrepareError(f"{where}: field `root` must be a string (\"\" for absolute media paths)")
        r = entry.get("repeat_time", 1)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not (r > 0 and math.isfinite(r)):
            raise PrepareError(f"{where}: field `repeat_time` must be a number > 0, got {r!r}")
        tiles = entry.get("max_dynamic_tiles")
        if tiles is not None and (isinstance(tiles, bool) or not isinstance(tiles, int) or tiles < 1):
            raise PrepareError(f"{where}: field `max_dynamic_tiles` must be an integer >= 1, got {tiles!r}")
        frac = entry.get("max_reject_fraction")
        if frac is not None and not (isinstance(frac, (int, float)) and 0 <= frac <= 1):
            raise PrepareError(f"{where}: field `max_reject_fraction` must be within [0, 1]")
        ann_path = _resolve(ann, path.parent)
        if not os.path.isfile(ann_path):
            raise PrepareError(f"{where}: annotation {ann} not found under {path.parent} or {Path.cwd()}")
        root_path = _resolve(root, path.parent) if root else ""
        if root_path and not os.path.isdir(root_path):
            raise PrepareError(f"{where}: root {root} is not a directory under {path.parent} or {Path.cwd()}")
        ds = RecipeDataset(str(name), ann_path, root_path, float(r), tiles, frac,
                           {k: v for k, v in entry.items() if k not in USED_KEYS})
        if ds.folder in folders or ds.folder == RECIPE_INDEX:
            raise PrepareError(f"{where}: its folder name {ds.folder!r} clashes with another dataset's; rename one")
        folders.add(ds.folder)
        out.append(ds)
    return out


def _token_stats(out_dir: Path) -> dict[str, Any]:
    text = [r["text_tokens"] for r in iter_index(out_dir)] if (out_dir / INDEX_NAME).is_file() else []
    return {"total": sum(text), "mean": round(sum(text) / len(text), 3) if text else 0.0,
            "max": max(text, default=0)}


def prepare_recipe(recipe: str | Path, base: PrepareConfig) -> tuple[dict[str, Any], int]:
    """Prepare every dataset of ``recipe`` into ``base.output/<folder>`` and write the recipe index.

    Returns (index, exit code): 1 when a dataset or the whole exceeds its reject threshold."""
    datasets = read_recipe(recipe)
    out = Path(base.output)
    entries: dict[str, Any] = {}
    totals: Counter = Counter()
    reasons: Counter = Counter()
    over: list[str] = []
    for ds in datasets:
        limit = ds.max_reject_fraction if ds.max_reject_fraction is not None else base.max_reject_fraction
        cfg = replace(base, inputs=[ds.annotation], media_root=ds.root, output=str(out / ds.folder),
                      max_dynamic_tiles=ds.max_dynamic_tiles, max_reject_fraction=limit)
        res = prepare(cfg)
        m = res.manifest
        if res.exit_code:
            over.append(ds.name)
        totals.update(input_samples=m["input_samples"], written_samples=m["written_samples"],
                      rejected_samples=m["rejected_samples"])
        reasons.update(m["rejected_by_reason"])
        entries[ds.name] = {
            **ds.extra, "name": ds.name, "path": ds.folder, "annotation": ds.annotation, "root": ds.root,
            "repeat_time": ds.repeat_time, "max_dynamic_tiles": ds.max_dynamic_tiles,
            "length": m["written_samples"], "input_samples": m["input_samples"],
            "written_samples": m["written_samples"], "rejected_samples": m["rejected_samples"],
            "rejected_by_reason": m["rejected_by_reason"], "reject_fraction": m["reject_fraction"],
            "max_reject_fraction": limit, "text_tokens": _token_stats(out / ds.folder),
            "supervised_tokens": m["stats"]["supervised_tokens"],
            "images": m["stats"]["images"], "videos": m["stats"]["videos"],
        }
    n_in = totals["input_samples"]
    frac = totals["rejected_samples"] / n_in if n_in else 0.0
    index = {
        "format": RECIPE_FORMAT, "recipe": str(Path(recipe).resolve()), "prompt_format": base.prompt_format,
        "datasets": list(entries.values()),  # recipe order (the JSON writer sorts object keys)
        "totals": {"input_samples": n_in, "written_samples": totals["written_samples"],
                   "rejected_samples": totals["rejected_samples"], "reject_fraction": round(frac, 6),
                   "max_reject_fraction": base.max_reject_fraction,
                   "rejected_by_reason": dict(sorted(reasons.items())),
                   "samples_per_epoch": sum(_epoch_samples(e["length"], e["repeat_time"]) for e in entries.values())},
        "over_threshold": over,
    }
    assert n_in == index["totals"]["written_samples"] + index["totals"]["rejected_samples"]
    write_json_atomic(out / RECIPE_INDEX, index)
    rc = 1 if over or frac > base.max_reject_fraction or n_in == 0 else 0
    return index, rc


def _epoch_samples(n: int, repeat_time: float) -> int:
    """Samples one epoch draws from a dataset of ``n``: ``int(n * r)`` below 1, else ``round(n * r)``."""
    return int(n * repeat_time) if repeat_time < 1 else int(math.floor(n * repeat_time + 0.5))


def load_recipe_index(path: str | Path) -> dict[str, Any]:
    """A recipe index written by ``prepare --recipe`` (the file, or the folder holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / RECIPE_INDEX
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or data.get("format") != RECIPE_FORMAT:
        raise ValueError(f"{p} is not a recipe index written by `megatron-eagle prepare --recipe`")
    return data


def run_recipe(args: argparse.Namespace) -> int:
    """The ``--recipe`` form of `megatron-eagle prepare`; prints one line per dataset and the total."""
    if args.media_root:
        print("prepare: --media-root is not used with --recipe (each dataset has its `root`)", file=sys.stderr)
        return 2
    base = config_from_args(args, inputs=[], media_root="")
    try:
        index, rc = prepare_recipe(args.recipe, base)
    except PrepareError as e:
        print(f"prepare: {e}", file=sys.stderr)
        return 2
    for e in index["datasets"]:
        name = e["name"]
        flag = "  OVER THRESHOLD" if name in index["over_threshold"] else ""
        print(f"  {name}: wrote {e['written_samples']} of {e['input_samples']}, rejected {e['rejected_samples']} "
              f"({e['reject_fraction']:.1%}, max {e['max_reject_fraction']:.1%}), repeat_time {e['repeat_time']:g} "
              f"-> {os.path.join(args.output, e['path'])}{flag}")
        if e["rejected_samples"]:
            print(f"    reasons: {', '.join(f'{k}: {v}' for k, v in e['rejected_by_reason'].items())}; see "
                  f"{os.path.join(args.output, e['path'], REJECTS_NAME)}")
    t = index["totals"]
    print(f"prepared {t['written_samples']} of {t['input_samples']} samples in {len(index['datasets'])} datasets; "
          f"rejected {t['rejected_samples']} ({t['reject_fraction']:.1%}, max {t['max_reject_fraction']:.1%}); "
          f"{t['samples_per_epoch']} samples per epoch with repeat_time; index {os.path.join(args.output, RECIPE_INDEX)}")
    if rc:
        print(f"prepare: reject threshold exceeded ({', '.join(index['over_threshold']) or 'overall'})",
              file=sys.stderr)
    return rc


def run(args: argparse.Namespace) -> int:
    """`megatron-eagle prepare`: the recipe form, or the plain JSONL form."""
    return run_recipe(args) if args.recipe else run_inputs(args)


__all__ = ["add_arguments", "run", "run_recipe", "prepare_recipe", "read_recipe", "load_recipe_index"]
