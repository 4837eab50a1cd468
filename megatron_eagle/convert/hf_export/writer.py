"""A self-contained HF Eagle 2.5 directory: remote code, processor and generation settings, and
atomic publication (everything is written into a temporary sibling dir that is renamed at the end).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

from megatron_eagle.config import ModelConfig
from megatron_eagle.convert.hf_export.config import DEFAULT_MAX_TILES, MODULES, hf_preprocessor_config

REMOTE_DIR = Path(__file__).resolve().parent / "remote"
REMOTE_FILES = tuple(f"{m}.py" for m in MODULES.values())


def write_remote_code(out: str | Path) -> list[str]:
    """Copy the transformers modules (configuration, modeling, processing, image processing) into ``out``."""
    for name in REMOTE_FILES:
        shutil.copyfile(REMOTE_DIR / name, Path(out) / name)
    return list(REMOTE_FILES)


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_processor_files(out: str | Path, cfg: ModelConfig, eos_token_id: Optional[int] = None,
                          pad_token_id: Optional[int] = None, max_dynamic_tiles: int = DEFAULT_MAX_TILES) -> None:
    """``preprocessor_config.json``, ``processor_config.json``, ``generation_config.json`` and the remote code."""
    out = Path(out)
    _dump(out / "preprocessor_config.json", hf_preprocessor_config(cfg, max_dynamic_tiles))
    _dump(out / "processor_config.json", {"processor_class": "Eagle2_5_VLProcessor",
                                          "auto_map": {"AutoProcessor": hf_preprocessor_config(cfg)["auto_map"]
                                                       ["AutoProcessor"]}})
    gen = {"do_sample": False}
    if eos_token_id is not None:
        gen["eos_token_id"] = eos_token_id
    if pad_token_id is not None:
        gen["pad_token_id"] = pad_token_id
    _dump(out / "generation_config.json", gen)
    write_remote_code(out)


def partial_dir(out: str | Path) -> Path:
    """The temporary sibling an export of ``out`` is written into (same name on every rank)."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def publish(tmp: str | Path, out: str | Path) -> Path:
    """Move the finished ``tmp`` into place at ``out``, replacing an existing directory."""
    tmp, out = Path(tmp), Path(out)
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary dir; on success it becomes ``out``, on failure it is removed."""
    tmp = partial_dir(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out)
