"""`megatron-eagle submit` without Slurm: rendering, quoting, injection refusal, chains, dry-run,
status, the Dockerfile, and the trainer's `train.only_stage` guard."""

from __future__ import annotations

import pytest

from megatron_eagle.config import ConfigError
from megatron_eagle.launch.slurm import plan_jobs
from tests.slurm_fixtures import STAGES, opts, sbatch_lines, write_config


def test_cpu_tasks_single_job_and_setup_lines(tmp_path):
    cfg = write_config(tmp_path)
    o = opts(venv="/opt/venv", source=["/etc/profile.d/modules.sh"], modules=["cuda/12.4"], cpus_per_task=4,
             env=["OMP_NUM_THREADS=1", "NCCL_DEBUG=WARN"], signal="USR1", signal_lead_s=120, workdir="/scratch/w")
    _, jobs = plan_jobs(str(cfg), [], o, single=True)
    assert len(jobs) == 1 and jobs[0].stage is None and jobs[0].target == "full.long"
    lines = sbatch_lines(jobs[0].script)
    assert "--ntasks-per-node=2" in lines and not any(x.startswith("--gpus") for x in lines)
    assert "--cpus-per-task=4" in lines and "--signal=USR1@120" in lines and "--chdir=/scratch/w" in lines
    s = jobs[0].script
    assert "source /opt/venv/bin/activate\nsource /etc/profile.d/modules.sh\nmodule load cuda/12.4\n" in s
    assert "export OMP_NUM_THREADS=1\nexport NCCL_DEBUG=WARN\n" in s
    assert "only_stage" not in s


def test_world_must_divide_each_stage_layout(tmp_path):
    cfg = write_config(tmp_path)
    fix = r"stages\[full.long\].*1 nodes x 1 tasks.*tp\*pp\*cp.*--stage-nodes full.long=2"
    with pytest.raises(ConfigError, match=fix):
        plan_jobs(str(cfg), [], opts(tasks_per_node=1))
    plan_jobs(str(cfg), [], opts(tasks_per_node=1, stage_nodes={"full.long": 2}))  # the named fix works
    with pytest.raises(ConfigError, match="packs per step"):  # dp=3 does not split 64 packs
        plan_jobs(str(cfg), [], opts(tasks_per_node=3), stages=["connector"])
    with pytest.raises(ConfigError, match="contiguous"):
        plan_jobs(str(write_config(tmp_path / "b", STAGES + [dict(STAGES[0], name="x")])), [], opts(),
                  stages=["connector", "x"])
    with pytest.raises(ConfigError, match="--tasks-per-node"):
        plan_jobs(str(cfg), [], opts(tasks_per_node=None))


# --------------------------------------------------------------------------- quoting / injection

@pytest.mark.parametrize("field,value", [
    ("partition", "batch\nrm -rf /"), ("partition", "batch;touch x"), ("account", "a b"), ("qos", "$(id)"),
    ("time", "1:00;id"), ("time", "1 hour"), ("job_name", "x/y"), ("container_image", "img`id`"),
    ("container_mounts", ["/a:/b;id"]), ("modules", ["cuda && id"]), ("env", ["A-B=1"]),
    ("env", ["A=1\nid"]), ("sbatch_lines", ["--exclusive\nid"]), ("sbatch_lines", ["exclusive"]),
    ("venv", "/v\r"), ("signal", "TERM@1;id"), ("signal", "NOPE"), ("workdir", "/a b"), ("source", ["/x\nid"]),
    ("stage_time", {"connector": "1:00 && id"}), ("nodes", 0), ("stage_nodes", {"nope": 2}),
    ("stage_overrides", {"connector": ["train.seed=1\nid"]}), ("stage_overrides", {"connector": ["nokey=1"]}),
])
def test_unsafe_values_are_refused(tmp_path, field, value):
    cfg = write_config(tmp_path)
    with pytest.raises(ConfigError):
        plan_jobs(str(cfg), [], opts(**{field: value}))


def test_unsafe_config_values_are_refused(tmp_path):
    bad_stage = [dict(STAGES[0], name="s;id")]
    with pytest.raises(ConfigError, match="name"):
        plan_jobs(str(write_config(tmp_path / "a", bad_stage)), [], opts())
    with pytest.raises(ConfigError, match="run_dir"):
        plan_jobs(str(write_config(tmp_path / "b", run_dir="/tmp/run dir")), [], opts())
    with pytest.raises(ConfigError, match="--set"):
        plan_jobs(str(write_config(tmp_path / "c")), ["train.seed=1\nid"], opts())
