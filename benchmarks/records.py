"""Result records: which code produced them (``commit``) and how they are written (JSON lists)."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def git_commit(repo: Path = REPO) -> str:
    """``git rev-parse HEAD`` of the checkout, with ``-dirty`` when tracked files differ from it;
    ``unknown`` outside a git checkout (a copied tree)."""

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def append_json(path: Path, records: list[dict]) -> None:
    """Append ``records`` to the JSON list in ``path`` (created if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text()) if path.exists() else []
    path.write_text(json.dumps(old + records, indent=1) + "\n")


def write_json(path: Path, record: dict | list) -> None:
    """Write one JSON document (``default=str`` for paths and dtypes), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, default=str) + "\n")


def options(args, drop: tuple[str, ...] = ("out", "md_out", "json", "date")) -> dict:
    """A parsed command line as a record's ``config``: every option except where results go."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in drop}
