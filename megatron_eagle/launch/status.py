"""`megatron-eagle status RUN_DIR|RUN.yaml [--json]`: a run's Slurm jobs, last step, loss, checkpoints.

Jobs come from RUN_DIR/slurm/jobs.jsonl (written by `submit`); their state from ``scontrol show
job`` while Slurm remembers them, else ``sacct`` where accounting exists, else the job's own
events (RUN_DIR/slurm/events.jsonl: start / end with exit code / requeue).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a crash mid-write
    return out


def _run(cmd: list[str]) -> Optional[str]:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def slurm_job_state(job_id: str) -> Optional[dict[str, str]]:
    """State, restarts, elapsed time and reason of a job from scontrol (or sacct); None if unknown."""
    out = _run(["scontrol", "show", "job", "-o", job_id])
    if out and out.strip():
        fields = dict(tok.split("=", 1) for tok in out.split("\n")[0].split() if "=" in tok)
        return {"state": fields.get("JobState", "?"), "restarts": fields.get("Restarts", "0"),
                "elapsed": fields.get("RunTime", ""), "reason": fields.get("Reason", "None"),
                "exit": fields.get("ExitCode", ""), "source": "scontrol"}
    out = _run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State,Elapsed,ExitCode"])
    if out and out.strip():
        state, elapsed, exit_code = (out.strip().splitlines()[-1].split("|") + ["", ""])[:3]
        return {"state": state.split()[0], "restarts": "", "elapsed": elapsed, "reason": "None",
                "exit": exit_code, "source": "sacct"}
    return None


def _state_from_events(events: list[dict]) -> dict[str, str]:
    if not events:
        return {"state": "UNKNOWN", "restarts": "0", "elapsed": "", "reason": "no record", "exit": "",
                "source": "events"}
    last = events[-1]
    restarts = str(max(int(e.get("restart", 0)) for e in events))
    state = {"start": "RUNNING?", "requeue": "REQUEUED", "end": "COMPLETED" if last.get("rc") == 0 else "FAILED"}
    return {"state": state.get(last["event"], last["event"]), "restarts": restarts, "elapsed": "",
            "reason": "None", "exit": str(last.get("rc", "")), "source": "events"}


def resolve_run_dir(target: str) -> Path:
    """A run directory, or a run YAML (its ``run_dir``)."""
    path = Path(target)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from megatron_eagle.config import load_run

        return Path(load_run(path).config.run_dir)
    return path


def collect(run_dir: str | Path) -> dict[str, Any]:
    """Everything `status` shows, as plain data."""
    run_dir = Path(run_dir)
    sdir = run_dir / "slurm"
    events = _read_jsonl(sdir / "events.jsonl")
    jobs = []
    for rec in _read_jsonl(sdir / "jobs.jsonl"):
        mine = [e for e in events if str(e.get("job")) == str(rec["job"])]
        state = slurm_job_state(str(rec["job"])) or _state_from_events(mine)
        log = sdir / "logs" / f"{rec['name']}-{rec['job']}.out"
        jobs.append({**rec, **state, "log": str(log) if log.exists() else None,
                     "starts": sum(e["event"] == "start" for e in mine)})
    ckpt_root = run_dir / "checkpoints"
    latest = (ckpt_root / "latest").read_text().strip() if (ckpt_root / "latest").exists() else None
    checkpoints = []
    for d in sorted(ckpt_root.glob("iter_*")) if ckpt_root.exists() else []:
        meta_path = d / "meta.json"
        if not meta_path.exists():
            continue  # a save in progress or cut short
        meta = json.loads(meta_path.read_text())
        checkpoints.append({"name": d.name, "stage": meta.get("stage"), "step_in_stage": meta.get("step_in_stage"),
                            "global_step": meta.get("global_step"), "stage_done": meta.get("stage_done"),
                            "latest": d.name == latest, "mtime": meta_path.stat().st_mtime})
    last = None
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        recs = _read_jsonl(metrics)
        if recs:
            r = recs[-1]
            last = {k: r.get(k) for k in ("stage", "step", "global_step", "loss", "lr", "tokens_per_s", "mfu")}
            last["time"] = metrics.stat().st_mtime
    return {"run_dir": str(run_dir), "jobs": jobs, "checkpoints": checkpoints, "latest": latest, "last": last}


def format_status(info: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [f"run {info['run_dir']}"]
    if info["jobs"]:
        lines.append("jobs:")
        lines.append(f"  {'JOBID':<10} {'NAME':<24} {'NODES':>5} {'STATE':<12} {'RESTARTS':>8} {'ELAPSED':>10}  REASON")
        for j in info["jobs"]:
            reason = "" if j.get("reason") in (None, "None") else j["reason"]
            lines.append(f"  {j['job']:<10} {j['name']:<24} {j['nodes']:>5} {j['state']:<12} {j['restarts']:>8} "
                         f"{j.get('elapsed', ''):>10}  {reason}")
    else:
        lines.append("jobs: none submitted from this run dir (RUN_DIR/slurm/jobs.jsonl)")
    last = info["last"]
    if last:
        age = time.time() - last.pop("time")
        loss = f"{last['loss']:.4f}" if isinstance(last.get("loss"), (int, float)) else last.get("loss")
        lines.append(f"last step: stage {last['stage']} step {last['step']} (global {last['global_step']}), "
                     f"loss {loss}, {age:.0f} s ago")
    else:
        lines.append("last step: none yet (no metrics.jsonl)")
    if info["checkpoints"]:
        lines.append("checkpoints:")
        for c in info["checkpoints"]:
            lines.append(f"  {c['name']}  stage {c['stage']} step {c['step_in_stage']} (global {c['global_step']})"
                         f"{'  stage done' if c['stage_done'] else ''}{'  <- latest' if c['latest'] else ''}")
    else:
        lines.append("checkpoints: none")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `megatron-eagle status`."""
    p.add_argument("run", metavar="RUN_DIR", help="the run directory (or its run YAML)")
    p.add_argument("--json", action="store_true", help="print JSON")


def run(args: argparse.Namespace) -> int:
    run_dir = resolve_run_dir(args.run)
    if not run_dir.exists():
        print(f"no run directory {run_dir}", file=sys.stderr)
        return 1
    info = collect(run_dir)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        sys.stdout.write(format_status(info))
    return 0
