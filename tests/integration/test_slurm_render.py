"""`megatron-eagle submit` without Slurm: rendering, quoting, injection refusal, chains, dry-run,
status, the Dockerfile, and the trainer's `train.only_stage` guard."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_eagle.config import ConfigError
from megatron_eagle.launch import status as status_mod
from megatron_eagle.launch.slurm import ClusterOptions, plan_jobs, submit_jobs
from tests.slurm_fixtures import opts, sbatch_lines, write_config

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "megatron_eagle.cli", *args], capture_output=True, text=True,
                          env=e, timeout=120)


# --------------------------------------------------------------------------- rendering

def test_chain_renders_one_job_per_stage_with_its_own_nodes(tmp_path):
    cfg = write_config(tmp_path)
    o = ClusterOptions(nodes=2, gpus_per_node=8, stage_nodes={"full.long": 4}, partition="batch", account="proj",
                       qos="normal", time="04:00:00", stage_time={"full.long": "1-00:00:00"},
                       container_image="nvcr.io#nvidia/pytorch:25.09-py3",
                       container_mounts=["/lustre:/lustre", "/data:/data:ro"], sbatch_lines=["--exclusive"])
    o.stage_overrides = {"full.long": ["model.recompute_llm=full"]}
    run, jobs = plan_jobs(str(cfg), ["train.save_every_steps=50"], o)
    assert [j.name for j in jobs] == ["eagle-connector", "eagle-full.long"]
    assert [j.nodes for j in jobs] == [2, 4]
    first, second = (sbatch_lines(j.script) for j in jobs)
    for line in ("--job-name=eagle-connector", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8",
                 "--partition=batch", "--account=proj", "--qos=normal", "--time=04:00:00", "--requeue",
                 "--open-mode=append", "--signal=TERM@300", "--exclusive",
                 f"--output={run.run_dir}/slurm/logs/%x-%j.out"):
        assert line in first, line
    assert "--nodes=4" in second and "--time=1-00:00:00" in second
    s = jobs[1].script
    assert 'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' in s
    assert 'MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"' in s
    assert "srun --kill-on-bad-exit=1 --nodes=4 --ntasks-per-node=8 " in s
    assert "--container-image='nvcr.io#nvidia/pytorch:25.09-py3'" in s
    assert "--container-mounts=/lustre:/lustre,/data:/data:ro" in s
    assert (f"--config {cfg.resolve()} --set train.save_every_steps=50 --set model.recompute_llm=full "
            "--set train.only_stage=full.long") in s
    assert "recompute" not in jobs[0].script
    assert "TARGET_INDEX=1" in s and "scontrol requeue" in s
    for j in jobs:
        subprocess.run(["bash", "-n"], input=j.script, text=True, check=True)


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def run_script(script: str, tmp: Path, srun_rc: int = 0, meta: dict | None = None) -> tuple[int, list, str]:
    """Execute a rendered script with stub srun/scontrol/scancel; returns (rc, srun argv, calls log)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp / "calls.log"
    _stub(bin_dir, "srun", f'printf "%s\\n" "$@" > {tmp}/srun.argv\necho srun >> {calls}\nexit {srun_rc}\n')
    _stub(bin_dir, "scontrol", f'echo "scontrol $*" >> {calls}\n[ "$1" = show ] && echo localhost\nexit 0\n')
    _stub(bin_dir, "scancel", f'echo "scancel $*" >> {calls}\n')
    if meta is not None:
        ck = Path(yaml.safe_load(script.split("RUN_DIR=", 1)[1].split("\n", 1)[0]))
        (ck / "checkpoints" / "iter_0000005").mkdir(parents=True, exist_ok=True)
        (ck / "checkpoints" / "iter_0000005" / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        (ck / "checkpoints" / "latest").write_text("iter_0000005")
        (ck / "slurm").mkdir(exist_ok=True)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
               SLURM_JOB_NODELIST="localhost", SLURM_RESTART_COUNT="0")
    r = subprocess.run(["bash", "-c", script], env=env, cwd=tmp, capture_output=True, text=True, timeout=60)
    argv = (tmp / "srun.argv").read_text().splitlines() if (tmp / "srun.argv").exists() else []
    return r.returncode, argv, calls.read_text() if calls.exists() else ""


def test_metacharacters_in_allowed_values_stay_data(tmp_path):
    """Paths and overrides may hold any printable character: executing the script runs none of it."""
    evil = tmp_path / "cfg $(touch PWNED1) `touch PWNED2`; touch PWNED3 'q'"
    cfg = write_config(evil, run_dir=str(tmp_path / "run"))
    override = "train.wandb_project=$(touch PWNED4); touch PWNED5 \"x\" 'y'"
    o = opts(env=["X=$(touch PWNED6); `touch PWNED7` 'z'"], python="python3 $(touch PWNED8)")
    run, jobs = plan_jobs(str(cfg), [override], o)
    meta = {"stage": "connector", "stage_done": True, "stage_index": 0, "loader": {"stage": "connector"}}
    rc, argv, _ = run_script(jobs[0].script, tmp_path, meta=meta)
    assert rc == 0, argv
    assert not list(tmp_path.rglob("PWNED*"))
    assert argv[-10:] == ["python3 $(touch PWNED8)", "-m", "megatron_eagle.cli", "train", "--config",
                          str(cfg.resolve()), "--set", override, "--set", "train.only_stage=connector"]


@pytest.mark.parametrize("meta,srun_rc,requeued,rc", [
    ({"stage": "full.long", "stage_done": False, "stage_index": 1}, 0, True, 0),   # preempted: requeue
    ({"stage": "full.long", "stage_done": True, "stage_index": 1}, 0, False, 0),   # stage finished
    ({"stage": "connector", "stage_done": True, "stage_index": 0}, 0, True, 0),    # nothing of it saved yet
    ({"stage": "full.long", "stage_done": False, "stage_index": 1}, 3, False, 3),  # training failed
    ({"stage": "full.long", "stage_done": False, "stage_index": 1}, 143, True, 0),  # killed by TERM at startup
    ({"stage": "full.long", "stage_done": True, "stage_index": 1}, 143, False, 0),
])
def test_job_requeues_itself_until_its_stage_is_done(tmp_path, meta, srun_rc, requeued, rc):
    cfg = write_config(tmp_path)
    _, jobs = plan_jobs(str(cfg), [], opts(), stages=["full.long"])
    meta = {**meta, "global_step": 5, "loader": {"stage": "x", "stage_done": True}, "step_in_stage": 2}
    got_rc, _, calls = run_script(jobs[0].script, tmp_path, srun_rc=srun_rc, meta=meta)
    assert got_rc == rc
    assert ("scontrol requeue 4242" in calls) == requeued
    events = [json.loads(l) for l in (tmp_path / "run" / "slurm" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "end"] + (["requeue"] if requeued else [])
    assert events[1]["rc"] == srun_rc


# --------------------------------------------------------------------------- CLI, chain submission, status

def test_dry_run_prints_scripts_and_chain_without_writing(tmp_path):
    cfg = write_config(tmp_path)
    r = cli("submit", "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "2", "--dry-run",
            "--sbatch=--exclusive", "--after", "77")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("#!/bin/bash") == 2 and "#SBATCH --exclusive" in r.stdout
    assert "JOB1=$(sbatch --parsable --dependency=afterok:77 --kill-on-invalid-dep=yes" in r.stdout
    assert "JOB2=$(sbatch --parsable --dependency=afterok:$JOB1 --kill-on-invalid-dep=yes" in r.stdout
    assert not (tmp_path / "run").exists()
    bad = cli("submit", "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "2", "--dry-run",
              "--partition", "a;reboot")
    assert bad.returncode == 2 and "--partition" in bad.stderr
    assert cli("submit", "--config", str(cfg), "--nodes", "1", "--gpus-per-node", "1", "--dry-run").returncode == 2


def test_submit_chains_jobs_with_afterok(tmp_path, monkeypatch):
    cfg = write_config(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "sbatch.log"
    _stub(bin_dir, "sbatch", f'echo "$*" >> {log}\nn=$(wc -l < {log}); echo $((100 + n))\n')
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    run, jobs = plan_jobs(str(cfg), [], opts())
    ids = submit_jobs(run, jobs)
    with pytest.raises(ConfigError, match="continues with stage connector"):
        submit_jobs(*plan_jobs(str(cfg), [], opts(), stages=["full.long"]))
    assert ids == ["101", "102"]
    calls = log.read_text().splitlines()
    assert calls[0].startswith("--parsable ") and "dependency" not in calls[0]
    assert calls[1].startswith("--parsable --dependency=afterok:101 --kill-on-invalid-dep=yes ")
    recs = [json.loads(l) for l in (tmp_path / "run" / "slurm" / "jobs.jsonl").read_text().splitlines()]
    assert [(r["job"], r["stage"], r["after"]) for r in recs] == [("101", "connector", None),
                                                                 ("102", "full.long", "101")]
    assert Path(recs[1]["script"]).read_text() == jobs[1].script
    assert (tmp_path / "run" / "slurm" / "logs").is_dir()


def test_status_lists_jobs_last_step_and_checkpoints(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    sdir = run_dir / "slurm"
    sdir.mkdir(parents=True)
    (sdir / "jobs.jsonl").write_text("\n".join(json.dumps(dict(job=j, name=f"eagle-{s}", stage=s, nodes=1))
                                               for j, s in (("11", "a"), ("12", "b"))) + "\n")
    ev = [("11", "start", 0, 0), ("11", "end", 0, 0), ("11", "requeue", 0, 0), ("11", "start", 1, 0),
          ("11", "end", 1, 0), ("12", "start", 0, 0), ("12", "end", 0, 1)]
    (sdir / "events.jsonl").write_text("".join(json.dumps(dict(job=j, event=e, restart=r, time=0, rc=c)) + "\n"
                                               for j, e, r, c in ev))
    (run_dir / "metrics.jsonl").write_text(json.dumps(dict(stage="b", step=3, global_step=7, loss=1.25)) + "\n")
    for it, stage, done in ((4, "a", True), (7, "b", False)):
        d = run_dir / "checkpoints" / f"iter_{it:07d}"
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps(dict(stage=stage, stage_done=done, global_step=it, step_in_stage=3)))
    (run_dir / "checkpoints" / "latest").write_text("iter_0000007")
    monkeypatch.setattr(status_mod, "_run", lambda cmd: None)  # Slurm forgot the jobs
    info = status_mod.collect(run_dir)
    assert [(j["job"], j["state"], j["restarts"], j["starts"]) for j in info["jobs"]] == [
        ("11", "COMPLETED", "1", 2), ("12", "FAILED", "0", 1)]
    text = status_mod.format_status(info)
    assert "loss 1.2500" in text and "iter_0000007  stage b step 3 (global 7)  <- latest" in text
    assert "iter_0000004  stage a step 3 (global 4)  stage done" in text
    cfg = write_config(tmp_path)
    assert status_mod.resolve_run_dir(str(cfg)) == run_dir
    r = cli("status", str(run_dir), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["latest"] == "iter_0000007"


def test_submit_tool_wrapper_shows_help():
    r = subprocess.run([sys.executable, str(REPO / "tools" / "submit_slurm.py"), "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "--gpus-per-node" in r.stdout and "--dry-run" in r.stdout


# --------------------------------------------------------------------------- Dockerfile, recipes

def _dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """Logical instructions (continuations joined, comments dropped)."""
    out, buf = [], ""
    for line in text.splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue  # comment inside a continuation
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        word, _, rest = buf.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    return out


def test_dockerfile_parses():
    path = REPO / "Dockerfile"
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint:  # a parse error is a DL1000 error; style warnings do not fail
        r = subprocess.run([hadolint, "--no-color", "--failure-threshold", "error", str(path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
    known = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
             "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}
    ins = _dockerfile_instructions(path.read_text())
    assert ins and ins[0][0] in ("FROM", "ARG") and any(w == "FROM" for w, _ in ins)
    for word, rest in ins:
        assert word in known, word
        assert rest or word in ("ENTRYPOINT", "CMD"), word
        if word in ("CMD", "ENTRYPOINT", "SHELL") and rest.startswith("["):
            assert isinstance(json.loads(rest), list), rest


def test_eagle_recipe_submits_per_stage():
    """examples/eagle2.5-8b/submit.sh renders a valid five-job chain (dry-run) from its run.yaml."""
    recipe = REPO / "examples" / "eagle2.5-8b"
    env = dict(os.environ, PYTHONPATH=str(REPO), MEGATRON_EAGLE=f"{sys.executable} -m megatron_eagle.cli")
    r = subprocess.run(["bash", str(recipe / "submit.sh"), "--dry-run"], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    scripts = r.stdout.split("# ===== ")[1:-1]
    assert len(scripts) == 5
    for name, nodes, layout in (("stage1", 16, "tp=1 pp=1 cp=1"), ("stage1.5", 32, "tp=2 pp=1 cp=1"),
                                ("stage2", 32, "tp=2 pp=1 cp=1"), ("stage3", 32, "tp=2 pp=1 cp=2"),
                                ("stage4", 32, "tp=2 pp=1 cp=4")):
        script = next(s for s in scripts if s.startswith(f"eagle-{name}:"))
        assert f"#SBATCH --nodes={nodes}\n" in script and f"{name}: {layout}" in script
        assert f"--set train.only_stage={name} &" in script
        subprocess.run(["bash", "-n"], input=script.split("\n", 1)[1], text=True, check=True)
    assert "recompute_llm=full" in next(s for s in scripts if s.startswith("eagle-stage4:"))
    assert "recompute" not in next(s for s in scripts if s.startswith("eagle-stage1:"))


_SHIELD = """
import os, signal, sys, time
import psutil
from megatron_eagle.training.checkpoint import _shield_writer_queue
from megatron.core.dist_checkpointing.strategies import filesystem_async
if __name__ == "__main__":
    _shield_writer_queue()
    for child in psutil.Process().children(recursive=True):  # as Slurm signals every process of a step
        os.kill(child.pid, signal.SIGTERM)
    time.sleep(1)
    queue = filesystem_async._results_queue
    queue.put("alive")
    print(queue.get(timeout=10), signal.pthread_sigmask(signal.SIG_BLOCK, set()) == set())
"""


def test_checkpoint_writer_queue_survives_a_step_wide_sigterm(tmp_path):
    """Slurm's --signal / preemption SIGTERM reaches every process of the step, including megatron's
    checkpoint-writer Manager; it must survive it, or the save that the signal asks for fails."""
    script = tmp_path / "shield.py"
    script.write_text(_SHIELD)
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0 and r.stdout.split() == ["alive", "True"], r.stdout + r.stderr[-2000:]
