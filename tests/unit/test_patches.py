"""The library's patches of megatron-core and torch: importing patches nothing, ``install_all`` installs
every one, each target exists, and an unsupported megatron-core version is refused by name."""

from __future__ import annotations

import pytest


def test_every_patch_target_exists():
    from megatron_eagle import patches

    patches.check_all()
    for patch in patches.PATCHES:
        patch.check()
        assert patch.TARGETS


def test_missing_target_is_named(monkeypatch):
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_eagle.patches import PatchTargetMissing, rope_thd

    monkeypatch.delattr(rope_utils, "_apply_rotary_pos_emb_thd")
    with pytest.raises(PatchTargetMissing, match="_apply_rotary_pos_emb_thd"):
        rope_thd.check()


def test_megatron_version_outside_the_range_is_refused():
    from megatron_eagle.patches import UnsupportedMegatron, check_megatron_version, megatron_version

    check_megatron_version()  # the installed one
    check_megatron_version("0.16.0rc2")
    for bad in ("0.15.3", "0.17.0", "0.17.0rc1", "1.0.0"):
        with pytest.raises(UnsupportedMegatron, match=rf"megatron-core {bad} is installed.*>=0\.16,<0\.17"):
            check_megatron_version(bad)
    assert megatron_version().startswith("0.16")
