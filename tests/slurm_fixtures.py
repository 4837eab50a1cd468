"""A two-stage run config with unreachable data, and helpers to read rendered sbatch scripts."""

from __future__ import annotations

from pathlib import Path

import yaml

from megatron_eagle.launch.slurm import ClusterOptions

STAGES = [
    {"name": "connector", "seq_len": 512, "steps": 3, "trainable": ["connector"], "global_batch_tokens": 32768,
     "datasets": [{"name": "d", "path": "/nonexistent/shards", "weight": 1.0}], "parallel": {"tp": 1}},
    {"name": "full.long", "seq_len": 1024, "steps": 5, "global_batch_tokens": 32768,
     "datasets": [{"name": "d", "path": "/nonexistent/shards", "weight": 1.0}], "parallel": {"tp": 2}},
]


def write_config(dir_: Path, stages=None, run_dir: str | None = None, name: str = "run.yaml") -> Path:
    dir_.mkdir(parents=True, exist_ok=True)
    (dir_ / "curriculum.yaml").write_text(yaml.safe_dump({"model": "tiny", "seed": 1, "stages": stages or STAGES}))
    path = dir_ / name
    path.write_text(yaml.safe_dump({"run_dir": run_dir or str(dir_ / "run"), "curriculum": "curriculum.yaml",
                                    "tokenizer": "/nonexistent/tok", "model": {"preset": "tiny"}}))
    return path


def opts(**kw) -> ClusterOptions:
    base = dict(nodes=1, gpus_per_node=0, tasks_per_node=2)
    base.update(kw)
    return ClusterOptions(**base)


def sbatch_lines(script: str) -> list[str]:
    return [line[len("#SBATCH "):] for line in script.splitlines() if line.startswith("#SBATCH ")]
