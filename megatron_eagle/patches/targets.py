"""What every patch module shares: the error for a missing target, and the check that finds it."""

from __future__ import annotations

import importlib
from typing import Any


class PatchTargetMissing(RuntimeError):
    """A patch's target (a megatron-core or torch attribute) is not where the patch expects it."""


def resolve(target: str) -> tuple[Any, str]:
    """``"package.module:Owner.attr"`` -> (the object holding ``attr``, ``"attr"``)."""
    module, _, path = target.partition(":")
    owner: Any = importlib.import_module(module)
    *parents, attr = path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    return owner, attr


def require(*targets: str) -> None:
    """Raise :class:`PatchTargetMissing` naming the first target that does not exist."""
    for target in targets:
        try:
            owner, attr = resolve(target)
        except (ImportError, AttributeError) as e:
            raise PatchTargetMissing(f"patch target {target} not found ({type(e).__name__}: {e})") from e
        if not hasattr(owner, attr):
            raise PatchTargetMissing(f"patch target {target} not found")
