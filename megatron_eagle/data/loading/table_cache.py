"""On-disk cache of planner tables (ADS over a whole index), shared by all ranks of a job.

Every rank plans a stage itself, and ADS over the index is the slow part (about 0.3-0.7 ms per
record in Python: an hour for 10 M samples). The table depends only on the data, the stage length
and the ADS knobs, so it is computed once and stored as ``table-<key>.npz`` in a cache directory
(put it on a filesystem all ranks see, e.g. the run directory). The first process to take the
``.lock`` file computes; the others wait for the file (or, after ``stale_s``, compute themselves).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Union

import numpy as np

from megatron_eagle.config import ModelConfig
from megatron_eagle.data.packing.common import SampleTable
from megatron_eagle.data.packing.plan_index import ads_config_for, table_from_prepared
from megatron_eagle.data.shards import INDEX_NAME, load_manifest

log = logging.getLogger("megatron_eagle.loader")
VERSION = 1


def table_key(root: Union[str, Path], seq_len: int, model: Optional[ModelConfig]) -> str:
    """Hash of what the table depends on: the manifest (shard checksums) or, without one, the index's
    size and mtime; the stage length; the ADS knobs."""
    try:
        data_id = json.dumps(load_manifest(root), sort_keys=True)
    except FileNotFoundError:
        st = os.stat(Path(root) / INDEX_NAME)
        data_id = f"{st.st_size}:{st.st_mtime_ns}"
    manifest = json.loads(data_id) if data_id.startswith("{") else {}
    ads = asdict(ads_config_for(manifest, model))
    blob = json.dumps({"v": VERSION, "data": data_id, "L": seq_len, "ads": ads}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def cached_table(root: Union[str, Path], seq_len: int, model: Optional[ModelConfig], cache_dir: Union[str, Path],
                 stale_s: float = 4 * 3600.0, poll_s: float = 2.0) -> tuple[SampleTable, Counter]:
    """``table_from_prepared([root], seq_len, model)``, through the cache in ``cache_dir``."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"table-{table_key(root, seq_len, model)}.npz"
    lock = path.with_suffix(".lock")
    t0 = time.monotonic()
    while not path.exists():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if time.monotonic() - t0 > stale_s:
                log.warning("loader: %s held for %.0f s; computing the table here", lock, stale_s)
                break
            time.sleep(poll_s)
            continue
        os.close(fd)
        try:
            table, drops = table_from_prepared([root], seq_len, model)  # the other ranks wait: use the CPUs
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
            np.savez(tmp, length=table.length, tiles=table.tiles, dataset=table.dataset,
                     datasets=np.array(json.dumps(table.datasets)), drops=np.array(json.dumps(dict(drops))))
            os.replace(tmp, path)
            return table, drops
        finally:
            lock.unlink(missing_ok=True)
    if not path.exists():
        return table_from_prepared([root], seq_len, model, workers=1)
    with np.load(path) as z:
        table = SampleTable(z["length"], z["tiles"], z["dataset"], json.loads(str(z["datasets"])))
        drops = Counter(json.loads(str(z["drops"])))
    return table, drops
