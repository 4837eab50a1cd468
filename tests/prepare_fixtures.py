"""A small raw dataset (media_factory) and its prepared shards, shared by the prepare and shard-tool tests."""

from __future__ import annotations

import pytest

from megatron_eagle.data.prepare.pipeline import PrepareConfig, prepare
from tests.media_factory import build_dataset, tiny_tokenizer_dir

SHARD_SIZE = 40_000


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return build_dataset(tmp_path_factory.mktemp("ds"))


def cfg(ds, out, **kw):
    kw.setdefault("workers", 1)
    return PrepareConfig(inputs=[str(p) for p in ds["inputs"]], media_root=str(ds["media"]), output=str(out),
                         tokenizer=str(tiny_tokenizer_dir()), shard_size=kw.pop("shard_size", SHARD_SIZE),
                         progress=False, **kw)


def run_prepare(ds, out, shard_size):
    return prepare(PrepareConfig(inputs=[str(p) for p in ds["inputs"]], media_root=str(ds["media"]), output=str(out),
                                 tokenizer=str(tiny_tokenizer_dir()), shard_size=shard_size, progress=False))


@pytest.fixture(scope="module")
def prepared(ds, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    run_prepare(ds, out, 40_000)
    return out
