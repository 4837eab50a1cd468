"""`megatron-eagle submit` against a real Slurm (scripts/slurm_localhost.sh start; .ci/run does it).

- a 2-stage chain of 2-task CPU jobs (afterok) that runs in order, each job completing with a
  checkpoint; the second stage starts from the first stage's final checkpoint;
- a job whose training tasks get the preemption / time-limit signal mid-run: they save, the job
  requeues itself, resumes from `latest` and ends with the same losses as the uninterrupted chain.
Without Slurm they skip (set MEGATRON_EAGLE_REQUIRE_SLURM=1 to make that a failure); the trainer's
`train.only_stage` guard, which the chain relies on, is tested either way.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.train_fixtures import build_assets, losses, records, run_cli, run_dir, write_run

STAGES = [  # stage 1: connector only, DP=2; stage 2: everything, TP=2 (its own layout)
    {"name": "connector", "seq_len": 512, "trainable": ["connector"], "steps": 4,
     "lr": {"peak": 3e-3, "min": 1e-3, "warmup": 0.0, "decay": "cosine"}, "parallel": {"tp": 1}},
    {"name": "full", "seq_len": 512, "trainable": ["vision", "connector", "llm"], "steps": 10,
     "lr": {"peak": 3e-3, "min": 1e-3, "warmup": 0.0, "decay": "cosine"}, "parallel": {"tp": 2}},
]
REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("VIRTUAL_ENV") or REPO / ".venv")


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0 and bool(r.stdout.strip())


SLURM_UP = _slurm_up()
if not SLURM_UP and os.environ.get("MEGATRON_EAGLE_REQUIRE_SLURM") == "1":
    raise RuntimeError("no responding Slurm (sinfo) but MEGATRON_EAGLE_REQUIRE_SLURM=1")
needs_slurm = pytest.mark.skipif(not SLURM_UP, reason="no responding Slurm (sinfo): start one with "
                                 "`scripts/slurm_localhost.sh start` (root)")


def submit(run_yaml: Path, *extra: str) -> list[str]:
    """`megatron-eagle submit` of 2-task CPU jobs; returns the job ids."""
    r = run_cli(["submit", "--config", str(run_yaml), "--nodes", "1", "--gpus-per-node", "0",
                 "--tasks-per-node", "2", "--venv", str(VENV), "--env", f"PYTHONPATH={REPO}",
                 "--env", "OMP_NUM_THREADS=1", "--env", "PYTHONUNBUFFERED=1", "--job-name", "ci",
                 "--signal-lead", "60", *extra])
    return [line.split("\t")[0] for line in r.stdout.splitlines() if "\t" in line]


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True).stdout
    fields = dict(t.split("=", 1) for t in out.split() if "=" in t)
    return fields.get("JobState", "UNKNOWN")


def events(run_yaml: Path) -> list[dict]:
    path = run_dir(run_yaml) / "slurm" / "events.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


def wait_done(jobs: list[str], timeout: float = 400) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = {j: job_state(j) for j in jobs}
        if all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
               for s in states.values()):
            return states
        time.sleep(1)
    raise AssertionError(f"jobs {jobs} not done after {timeout}s: {states}")


def log_of(run_yaml: Path, name: str, job: str) -> str:
    return (run_dir(run_yaml) / "slurm" / "logs" / f"{name}-{job}.out").read_text()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("slurm_assets"), num_samples=60)


@pytest.fixture(scope="module")
def chain(assets, tmp_path_factory):
    """The whole curriculum submitted as a chain; keep_last high so stage 1's end survives."""
    run = write_run(tmp_path_factory.mktemp("chain"), assets, [dict(s) for s in STAGES], {"keep_last": 20})
    jobs = submit(run)
    assert len(jobs) == 2
    states = wait_done(jobs)
    return run, jobs, states


@needs_slurm
def test_two_task_job_completes_with_checkpoint(chain):
    run, jobs, states = chain
    assert states[jobs[0]] == "COMPLETED", log_of(run, "ci-connector", jobs[0])
    log = log_of(run, "ci-connector", jobs[0])
    assert "layout tp=1 pp=1 cp=1 dp=2" in log  # two tasks, one process group
    meta = json.loads((run_dir(run) / "checkpoints" / "iter_0000004" / "meta.json").read_text())
    assert meta["stage"] == "connector" and meta["stage_done"] and meta["global_step"] == 4


@needs_slurm
def test_chain_runs_stages_in_order(chain):
    run, jobs, states = chain
    assert states[jobs[1]] == "COMPLETED", log_of(run, "ci-full", jobs[1])
    ev = events(run)
    end1 = next(e["time"] for e in ev if e["job"] == jobs[0] and e["event"] == "end")
    start2 = next(e["time"] for e in ev if e["job"] == jobs[1] and e["event"] == "start")
    assert start2 >= end1  # afterok: stage 2 waits for stage 1
    assert "layout tp=2 pp=1 cp=1 dp=1" in log_of(run, "ci-full", jobs[1])
    recs = records(run)
    assert [(r["stage"], r["step"]) for r in recs] == [("connector", i) for i in range(1, 5)] + \
        [("full", i) for i in range(1, 11)]
    ckpts = run_dir(run) / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    meta = json.loads((ckpts / latest / "meta.json").read_text())
    assert latest == "iter_0000014" and meta["stage"] == "full" and meta["stage_done"]
    status = run_cli(["status", str(run_dir(run))]).stdout
    assert f"{jobs[0]:<10} ci-connector" in status and "COMPLETED" in status
    assert "iter_0000014  stage full step 10 (global 14)  stage done  <- latest" in status


def _has_preempting_partition() -> bool:
    """scripts/slurm_localhost.sh's `high` partition preempts (requeues) jobs of the default one."""
    r = subprocess.run(["scontrol", "show", "partition", "high", "-o"], capture_output=True, text=True)
    return r.returncode == 0 and "PriorityTier=10" in r.stdout


@needs_slurm
def test_preempted_job_saves_requeues_and_matches_uninterrupted(chain, tmp_path):
    """Stage 2 again from stage 1's final checkpoint, preempted mid-run by a job in a higher-priority
    partition: Slurm sends the job's --signal (TERM) to the tasks and the grace-time SIGTERM to every
    process of the step. (Without that partition: `scancel --signal=TERM`, as at the time limit.)"""
    ref_run, _, _ = chain
    shutil.copytree(ref_run.parent, tmp_path / "p", ignore=shutil.ignore_patterns("run"))
    run = tmp_path / "p" / "run.yaml"
    cfg = yaml.safe_load(run.read_text())
    cfg["run_dir"] = str(tmp_path / "p" / "run")
    run.write_text(yaml.safe_dump(cfg))
    ckpts = run_dir(run) / "checkpoints"
    ckpts.mkdir(parents=True)
    shutil.copytree(run_dir(ref_run) / "checkpoints" / "iter_0000004", ckpts / "iter_0000004")
    (ckpts / "latest").write_text("iter_0000004")

    (job,) = submit(run, "--stages", "full")
    metrics = run_dir(run) / "metrics.jsonl"
    deadline = time.time() + 300
    # Signal after the stage's first periodic save (step 4): the checkpoint writer's helper
    # processes exist by then and get the signal too (Slurm signals every process of the step).
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 6:
            break
        assert job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), log_of(run, "ci-full", job)
        time.sleep(0.2)
    else:
        raise AssertionError("no progress: " + log_of(run, "ci-full", job))
    high = None
    if _has_preempting_partition():
        high = subprocess.run(["sbatch", "--parsable", "-p", "high", "--exclusive", "-N1", "-o", "/dev/null",
                               "--wrap", "sleep 1"], capture_output=True, text=True, check=True).stdout.strip()
    else:
        subprocess.run(["scancel", "--signal=TERM", job], check=True)
    states = wait_done([job] + ([high] if high else []))
    log = log_of(run, "ci-full", job)
    assert states[job] == "COMPLETED", log
    ev = events(run)
    assert [e["event"] for e in ev] == ["start", "end", "requeue", "start", "end"], (ev, log)
    assert ev[1]["rc"] == 0, log  # the tasks saved and exited cleanly
    assert "preemption signal (SIGTERM)" in log and "requeueing job" in log
    assert "(restart 1)" in log  # the log of the first run survived the requeue (append)
    saved = int(log.split("preemption signal (SIGTERM): saved step ", 1)[1].split()[0])
    assert 6 <= saved < 10  # really interrupted mid-stage, then resumed from that checkpoint
    ref = {k: v for k, v in losses(ref_run).items() if k[0] == "full"}
    got = losses(run)
    assert got.keys() == ref.keys()
    for key in ref:
        assert got[key] == pytest.approx(ref[key], rel=1e-6, abs=1e-7), key
    status = run_cli(["status", str(run_dir(run)), "--json"]).stdout
    info = json.loads(status)
    assert info["jobs"][0]["restarts"] == "1" and info["jobs"][0]["state"] == "COMPLETED"
    assert info["last"]["global_step"] == 14


def test_only_stage_refuses_a_stage_that_is_not_next(assets, tmp_path):
    """A chain job for stage 2 must not start before stage 1 is done (no Slurm needed)."""
    run = write_run(tmp_path, assets, [dict(STAGES[0]), dict(STAGES[1], parallel={"tp": 1})])  # one process
    r = subprocess.run([sys.executable, "-m", "megatron_eagle.cli", "train", "--config", str(run), "--set",
                        "train.only_stage=full"], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1"))
    assert r.returncode == 2, r.stdout + r.stderr[-3000:]
    assert "stage full is not the run's next stage" in r.stdout and "train.only_stage=connector" in r.stdout
    assert not (run_dir(run) / "checkpoints" / "latest").exists()
