"""Slurm batch scripts for `megatron-eagle train`: render, validate, submit as a chain.

One job per curriculum stage (``train.only_stage``), chained with ``afterok``; each job has its
stage's own node count. Inside a job: one task per GPU through ``srun``; ``MASTER_ADDR`` is the
first host of ``scontrol show hostnames``, ``MASTER_PORT`` is derived from the job id.

Preemption and time limits: the job asks for ``--signal=TERM@LEAD`` (no ``B:``), so the training
tasks receive SIGTERM directly (at LEAD seconds before the time limit, or at once when Slurm picks
the job for preemption), save a checkpoint and exit 0. The batch shell then looks at the run's
``latest`` checkpoint: if its stage is not finished it runs ``scontrol requeue`` itself (Slurm
does not requeue a job that exits during its grace time) and the requeued job resumes from
``latest``. A SIGTERM to the batch shell itself is passed on to the tasks as ``scancel --signal``
(never ``kill`` to srun, which would SIGKILL the tasks).

Every value from the command line or the config is validated and shell-quoted. A value with a
newline or control character is refused everywhere; names (partition, account, QoS, stage, job
name, modules, env keys), the time limit, the container image and mounts must match a strict
pattern, so no option can inject commands into the batch script.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_eagle.config import ConfigError, Run, load_run

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
PATTERNS: dict[str, tuple[re.Pattern, str]] = {
    "name": (re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*"), "letters, digits and _ . + -"),
    "names": (re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+,-]*"), "letters, digits and _ . + - ,"),
    "time": (re.compile(r"(\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE"), "minutes, HH:MM:SS or D-HH:MM:SS"),
    "image": (re.compile(r"[A-Za-z0-9_./:@#+-]+"), "an image reference or a .sqsh path"),
    "mounts": (re.compile(r"[A-Za-z0-9_./:,+@=-]+"), "SRC:DST[:FLAGS][,...] without spaces"),
    "envkey": (re.compile(r"[A-Za-z_][A-Za-z0-9_]*"), "a shell variable name"),
    "module": (re.compile(r"[A-Za-z0-9_./+-]+"), "a module name like cuda/12.4"),
    "signal": (re.compile(r"(SIG)?[A-Z0-9]+"), "a signal name like TERM or USR1"),
    "jobid": (re.compile(r"\d+(_\d+)?"), "a numeric job id"),
    "sbatch": (re.compile(r"-{1,2}[A-Za-z].*"), "an sbatch option like --exclusive or --mem=0"),
    # paths that land in #SBATCH lines, which sbatch splits on whitespace and expands % in
    "sbatch_path": (re.compile(r"[^\s%'\"\\]+"), "a path without spaces, quotes, backslashes or %"),
}


def check(field_name: str, value: str, kind: Optional[str] = None) -> str:
    """Return ``value`` if it is safe for the script, else raise ConfigError naming the field.

    Every value is refused with a newline or control character; ``kind`` (see ``PATTERNS``)
    restricts it further. Values without a kind may hold any other character: they are quoted.
    """
    value = str(value)
    if _CONTROL.search(value):
        raise ConfigError(field_name, f"{value!r} contains a newline or control character",
                          "pass a single-line value")
    if kind is not None:
        pattern, what = PATTERNS[kind]
        if not pattern.fullmatch(value):
            raise ConfigError(field_name, f"{value!r} is not {what}", f"pass {what} (no shell metacharacters)")
    return value


def q(value: str) -> str:
    """Shell-quote one word."""
    return shlex.quote(str(value))


@dataclass
class ClusterOptions:
    """Everything `megatron-eagle submit` can say about the cluster and the job."""

    nodes: int = 1
    gpus_per_node: int = 8
    tasks_per_node: Optional[int] = None          # default: gpus_per_node (one task per GPU)
    cpus_per_task: Optional[int] = None
    stage_nodes: dict[str, int] = field(default_factory=dict)
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    time: Optional[str] = None
    stage_time: dict[str, str] = field(default_factory=dict)
    stage_overrides: dict[str, list[str]] = field(default_factory=dict)  # --set for one stage's job only
    job_name: str = "eagle"
    container_image: Optional[str] = None
    container_mounts: list[str] = field(default_factory=list)
    container_workdir: Optional[str] = None
    venv: Optional[str] = None                     # `source VENV/bin/activate`
    source: list[str] = field(default_factory=list)  # files to `source` (module init, conda, ...)
    modules: list[str] = field(default_factory=list)  # `module load NAME`
    env: list[str] = field(default_factory=list)   # KEY=VALUE exported in the script
    sbatch_lines: list[str] = field(default_factory=list)  # extra `#SBATCH ...` lines, verbatim
    python: str = "python"
    workdir: Optional[str] = None
    signal: str = "TERM"
    signal_lead_s: int = 300
    max_requeues: int = 20

    @property
    def tasks(self) -> int:
        return self.tasks_per_node if self.tasks_per_node is not None else self.gpus_per_node

    def nodes_for(self, stage: str) -> int:
        return self.stage_nodes.get(stage, self.nodes)

    def time_for(self, stage: str) -> Optional[str]:
        return self.stage_time.get(stage, self.time)

    def validate(self, stage_names: list[str]) -> None:
        """Check every option (types, ranges, patterns); raise ConfigError naming the option."""
        if self.tasks < 1:
            raise ConfigError("--tasks-per-node", f"{self.tasks} tasks per node (gpus_per_node="
                              f"{self.gpus_per_node})", "pass --gpus-per-node G, or --tasks-per-node T for CPU jobs")
        counts = [("--nodes", self.nodes, 1), ("--gpus-per-node", self.gpus_per_node, 0),
                  ("--cpus-per-task", self.cpus_per_task or 1, 1), ("--signal-lead", self.signal_lead_s, 1),
                  ("--max-requeues", self.max_requeues, 0),
                  *[(f"--stage-nodes {k}", v, 1) for k, v in self.stage_nodes.items()]]
        for name, value, least in counts:
            if not isinstance(value, int) or value < least:
                raise ConfigError(name, f"{value!r} is not an integer >= {least}", f"pass an integer >= {least}")
        for opt, mapping in (("--stage-nodes", self.stage_nodes), ("--stage-time", self.stage_time),
                             ("--stage-set", self.stage_overrides)):
            for k in mapping:
                if k not in stage_names:
                    raise ConfigError(opt, f"no stage named {k!r}", f"use one of {stage_names}")
        for name, value, kind in [("--partition", self.partition, "names"), ("--account", self.account, "name"),
                                  ("--qos", self.qos, "name"), ("--time", self.time, "time"),
                                  ("--job-name", self.job_name, "name"), ("--signal", self.signal, "signal"),
                                  ("--container-image", self.container_image, "image"),
                                  ("--container-workdir", self.container_workdir, "sbatch_path"),
                                  ("--venv", self.venv, None), ("--python", self.python, None),
                                  ("--workdir", self.workdir, "sbatch_path"),
                                  *[("--stage-time", v, "time") for v in self.stage_time.values()],
                                  *[("--stage-set", v, None) for vs in self.stage_overrides.values() for v in vs],
                                  *[("--container-mounts", v, "mounts") for v in self.container_mounts],
                                  *[("--source", v, None) for v in self.source],
                                  *[("--module", v, "module") for v in self.modules],
                                  *[("--sbatch", v, "sbatch") for v in self.sbatch_lines]]:
            if value is not None:
                check(name, value, kind)
        if not hasattr(signal.Signals, "SIG" + self.signal.removeprefix("SIG")):
            raise ConfigError("--signal", f"unknown signal {self.signal!r}", "use e.g. TERM or USR1")
        for item in self.env:
            key, sep, value = item.partition("=")
            if not sep:
                raise ConfigError("--env", f"{item!r} has no '='", "write --env KEY=VALUE")
            check("--env", key, "envkey")
            check(f"--env {key}", value)


@dataclass
class Job:
    """One batch job: a stage of the chain (or the whole curriculum) and its rendered script."""

    name: str
    stage: Optional[str]          # train.only_stage; None trains every remaining stage
    target: str                   # the stage whose completion finishes this job
    target_index: int
    nodes: int
    tasks_per_node: int
    layout: dict
    script: str = ""


@dataclass
class RunInfo:
    config: str                   # absolute path of the run YAML
    overrides: list[str]
    run_dir: str
    stages: list                  # curriculum stages (name, parallel, ...)


def _load(config: str, overrides: list[str]) -> tuple[RunInfo, Run]:
    """Load the run YAML and its curriculum (no world size yet); refuse values unsafe for a script."""
    check("--config", config)
    for o in overrides:
        check("--set", o)
    run = load_run(config, overrides)
    for s in run.curriculum.stages:
        check(f"stages[{s.name}].name", s.name, "name")
    check("run_dir", run.config.run_dir, "sbatch_path")  # it holds the #SBATCH --output logs
    return RunInfo(str(Path(config).resolve()), list(overrides), run.config.run_dir, run.curriculum.stages), run


def plan_jobs(config: str, overrides: list[str], opts: ClusterOptions, stages: Optional[list[str]] = None,
              single: bool = False) -> tuple[RunInfo, list[Job]]:
    """The jobs to submit: one per stage (a chain), or one for all stages with ``single``."""
    run, loaded = _load(config, overrides)
    names = [s.name for s in run.stages]
    opts.validate(names)
    if single and (opts.stage_overrides or opts.stage_nodes or opts.stage_time):
        raise ConfigError("--single-job", "per-stage options given for one job that trains every stage",
                          "drop --stage-nodes/--stage-time/--stage-set, or submit a chain")
    stage_runs = {name: _load(config, overrides + extra)[1] for name, extra in opts.stage_overrides.items()}
    picked = list(stages) if stages else names
    for n in picked:
        if n not in names:
            raise ConfigError("--stages", f"no stage named {n!r}", f"use names from {names}")
    idx = sorted(names.index(n) for n in picked)
    if idx != list(range(idx[0], idx[-1] + 1)) or len(set(idx)) != len(idx):
        raise ConfigError("--stages", f"{picked} is not a contiguous run of stages {names}",
                          "name consecutive stages (the chain trains them in curriculum order)")
    chosen = [run.stages[i] for i in idx]
    jobs: list[Job] = []
    if single:
        nodes = opts.nodes
        for s in run.stages[idx[0]:]:
            loaded.check_world(s, nodes=nodes, tasks=opts.tasks)
        last = run.stages[-1]
        jobs.append(Job(opts.job_name, None, last.name, len(names) - 1, nodes, opts.tasks,
                        {s.name: dataclasses.asdict(s.parallel) for s in run.stages}))
    else:
        for s in chosen:
            nodes = opts.nodes_for(s.name)
            stage_runs.get(s.name, loaded).check_world(s, nodes=nodes, tasks=opts.tasks)
            jobs.append(Job(f"{opts.job_name}-{s.name}", s.name, s.name, names.index(s.name), nodes, opts.tasks,
                            {s.name: dataclasses.asdict(s.parallel)}))
    for job in jobs:
        check("--job-name", job.name, "name")
        job.script = render_script(run, opts, job)
    return run, jobs


def slurm_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "slurm"


def render_script(run: RunInfo, opts: ClusterOptions, job: Job) -> str:
    """The sbatch script of one job (values validated by the caller, quoted here)."""
    sdir = slurm_dir(run.run_dir)
    gpus = opts.gpus_per_node
    layouts = ", ".join(f"{k}: tp={v['tp']} pp={v['pp']} cp={v['cp']}" for k, v in job.layout.items())
    what = f"stage {job.stage}" if job.stage else f"all stages through {job.target}"
    sb = [f"--job-name={job.name}", f"--nodes={job.nodes}", f"--ntasks-per-node={job.tasks_per_node}"]
    if gpus > 0:
        sb.append(f"--gpus-per-node={gpus}")
    if opts.cpus_per_task:
        sb.append(f"--cpus-per-task={opts.cpus_per_task}")
    for flag, value in (("partition", opts.partition), ("account", opts.account), ("qos", opts.qos),
                        ("time", opts.time_for(job.target) if job.stage else opts.time)):
        if value:
            sb.append(f"--{flag}={value}")
    sb += [f"--output={sdir}/logs/%x-%j.out", "--open-mode=append", "--requeue",
           f"--signal={opts.signal.removeprefix('SIG')}@{opts.signal_lead_s}"]
    if opts.workdir:
        sb.append(f"--chdir={opts.workdir}")
    sb += opts.sbatch_lines

    setup: list[str] = []
    if opts.venv:
        setup.append(f"source {q(str(Path(opts.venv) / 'bin' / 'activate'))}")
    setup += [f"source {q(s)}" for s in opts.source]
    setup += [f"module load {q(m)}" for m in opts.modules]
    for item in opts.env:
        key, _, value = item.partition("=")
        setup.append(f"export {key}={q(value)}")

    srun = ["srun", "--kill-on-bad-exit=1", f"--nodes={job.nodes}", f"--ntasks-per-node={job.tasks_per_node}"]
    if opts.container_image:
        srun.append(f"--container-image={q(opts.container_image)}")
        if opts.container_mounts:
            srun.append(f"--container-mounts={q(','.join(opts.container_mounts))}")
        if opts.container_workdir:
            srun.append(f"--container-workdir={q(opts.container_workdir)}")
    train = [q(opts.python), "-m", "megatron_eagle.cli", "train", "--config", q(run.config)]
    extra = opts.stage_overrides.get(job.stage, []) + [f"train.only_stage={job.stage}"] if job.stage else []
    for o in run.overrides + extra:
        train += ["--set", q(o)]
    cmd = " \\\n    ".join([" ".join(srun), " ".join(train)])

    lines = [
        "#!/bin/bash",
        f"# megatron-eagle: {what} of {run.config}",
        f"# {job.nodes} node(s) x {job.tasks_per_node} task(s); layout {layouts}",
        "# Rendered by `megatron-eagle submit`; every value is validated and quoted.",
        *[f"#SBATCH {line}" for line in sb],
        "set -uo pipefail",
        "",
        f"RUN_DIR={q(run.run_dir)}",
        f"EVENTS={q(str(sdir / 'events.jsonl'))}",
        f"TARGET_STAGE={q(job.target)}",
        f"TARGET_INDEX={job.target_index}",
        f"MAX_REQUEUES={opts.max_requeues}",
        f"SIGNAL_RC={128 + signal.Signals['SIG' + opts.signal.removeprefix('SIG')].value}",
        "",
        _HELPERS,
        *setup,
        "",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        'export MASTER_PORT="$((20000 + SLURM_JOB_ID % 20000))"',
        'echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST:'
        f' {what}, master $MASTER_ADDR:$MASTER_PORT"',
        "event start",
        f"{cmd} &",
        _TAIL,
    ]
    return "\n".join(lines) + "\n"


_HELPERS = r'''event() {  # one JSON line per job event, read by `megatron-eagle status`
  printf '{"job": "%s", "event": "%s", "restart": %d, "time": %d, "rc": %d}\n' "$SLURM_JOB_ID" "$1" \
    "${SLURM_RESTART_COUNT:-0}" "$(date +%s)" "${2:-0}" >> "$EVENTS" || true
}

target_done() {  # the run's latest checkpoint finished TARGET_STAGE (meta.json has sorted keys)
  local name meta state
  name=$(cat "$RUN_DIR/checkpoints/latest" 2>/dev/null) || return 1
  meta="$RUN_DIR/checkpoints/$name/meta.json"
  [ -f "$meta" ] || return 1
  state=$(tr -d ' \n\t' < "$meta" | sed -n 's/.*"stage_done":\(true\|false\),"stage_index":\([0-9]*\).*/\1 \2/p')
  [ -n "$state" ] || return 1
  set -- $state
  [ "$2" -gt "$TARGET_INDEX" ] || { [ "$2" -eq "$TARGET_INDEX" ] && [ "$1" = true ]; }
}

SRUN_DONE=0
on_signal() {  # a signal for the batch shell: pass it to the training tasks, not to srun
  if [ "$SRUN_DONE" = 0 ]; then  # in the background: scancel retries while Slurm ends the job
    echo "batch shell got $1: signalling the job's steps"
    scancel --signal="$1" "$SLURM_JOB_ID" 2>/dev/null &
  fi
}
trap 'on_signal TERM' TERM
trap 'on_signal USR1' USR1
'''

_TAIL = r'''SRUN_PID=$!
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; done  # a trapped signal ends `wait` early
wait "$SRUN_PID"
rc=$?
SRUN_DONE=1
event end "$rc"
if [ "$rc" -ne 0 ] && [ "$rc" -ne "$SIGNAL_RC" ]; then
  echo "training failed: srun exited with $rc"
  exit "$rc"
fi  # SIGNAL_RC: the tasks died of the signal before they could save (e.g. still starting up)
if target_done; then
  echo "stage $TARGET_STAGE is done"
  exit 0
fi
if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
  echo "stage $TARGET_STAGE is not done after $MAX_REQUEUES requeues: giving up"
  exit 1
fi
echo "stage $TARGET_STAGE is not done (preempted or near the time limit): requeueing job $SLURM_JOB_ID"
event requeue
if ! scontrol requeue "$SLURM_JOB_ID"; then
  echo "scontrol requeue failed"
  exit 1
fi
exit 0  # the requeued job resumes from the latest checkpoint'''


def chain_commands(jobs: list[Job], scripts: list[str], after: Optional[str] = None) -> list[list[str]]:
    """The sbatch command of each job: afterok on the previous one (and on ``after`` for the first)."""
    cmds = []
    for i, (job, path) in enumerate(zip(jobs, scripts)):
        cmd = ["sbatch", "--parsable"]
        dep = f"$JOB{i}" if i else after
        if dep:
            cmd += [f"--dependency=afterok:{dep}", "--kill-on-invalid-dep=yes"]
        cmds.append(cmd + [path])
    return cmds


def dry_run_text(run: RunInfo, jobs: list[Job], after: Optional[str] = None) -> str:
    """What `submit --dry-run` prints: every script, then the sbatch commands of the chain."""
    sdir = slurm_dir(run.run_dir)
    paths = [str(sdir / "scripts" / f"<time>-{i}-{j.name}.sbatch") for i, j in enumerate(jobs)]
    out = []
    for job, path in zip(jobs, paths):
        out += [f"# ===== {job.name}: {path}", job.script]
    out.append("# ===== submission (each job id feeds the next job's dependency)")
    for i, cmd in enumerate(chain_commands(jobs, paths, after)):
        out.append(f"JOB{i + 1}=$(" + " ".join(c if c.startswith("--dependency=afterok:$") else q(c)
                                             for c in cmd) + ")")
    return "\n".join(out) + "\n"


def _next_stage(run: RunInfo) -> Optional[int]:
    """Index of the stage the run dir's latest checkpoint continues with (None: nothing saved)."""
    root = Path(run.run_dir) / "checkpoints"
    try:  # the layout of training/checkpoint.py, read without importing torch
        meta = json.loads((root / (root / "latest").read_text().strip() / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta["stage_index"] + (1 if meta["stage_done"] else 0)


def submit_jobs(run: RunInfo, jobs: list[Job], after: Optional[str] = None, sbatch: str = "sbatch") -> list[str]:
    """Write the scripts under RUN_DIR/slurm/scripts, submit them as an afterok chain, record them
    in RUN_DIR/slurm/jobs.jsonl; returns the job ids."""
    if after is not None:
        check("--after", after, "jobid")
    elif jobs[0].stage is not None:
        nxt = _next_stage(run)
        first = [s.name for s in run.stages].index(jobs[0].stage)
        if (nxt or 0) < first:
            have = run.stages[nxt].name if nxt is not None and nxt < len(run.stages) else run.stages[0].name
            raise ConfigError("--stages", f"the chain starts at stage {jobs[0].stage} but {run.run_dir} "
                              f"continues with stage {have}", f"submit from stage {have}, or pass --after "
                              "JOBID of the job that trains the stages before it")
    sdir = slurm_dir(run.run_dir)
    for d in ("scripts", "logs"):
        (sdir / d).mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    ids: list[str] = []
    prev = after
    for i, job in enumerate(jobs):
        path = sdir / "scripts" / f"{stamp}-{i}-{job.name}.sbatch"
        path.write_text(job.script)
        cmd = chain_commands([job], [str(path)], prev)[0]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}"
                               + (f"; already submitted: {ids}" if ids else ""))
        job_id = r.stdout.strip().split(";")[0]
        check("sbatch output", job_id, "jobid")
        ids.append(job_id)
        with open(sdir / "jobs.jsonl", "a") as f:
            f.write(json.dumps(dict(job=job_id, name=job.name, stage=job.stage, target=job.target,
                                    nodes=job.nodes, tasks_per_node=job.tasks_per_node, after=prev,
                                    script=str(path), submitted=time.time())) + "\n")
        prev = job_id
    return ids
