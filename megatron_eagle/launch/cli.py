"""`megatron-eagle submit --config RUN.yaml --nodes N --gpus-per-node G [cluster options] [--dry-run]`.

Renders one sbatch script per curriculum stage and submits them as an ``afterok`` chain (or one
job for every stage with ``--single-job``). Examples::

    megatron-eagle submit --config run.yaml --nodes 16 --gpus-per-node 8 --stage-nodes stage1=4 \\
        --partition batch --account proj --time 04:00:00 \\
        --container-image nvcr.io#nvidia/pytorch:25.09-py3 --container-mounts /lustre:/lustre --dry-run
    megatron-eagle submit --config run.yaml --nodes 1 --gpus-per-node 0 --tasks-per-node 2 \\
        --venv .venv --env OMP_NUM_THREADS=1          # CPU processes, e.g. on a test cluster

Extra sbatch options go verbatim into ``#SBATCH`` lines: ``--sbatch=--exclusive --sbatch=--mem=0``.
"""

from __future__ import annotations

import argparse
import sys


def _pairs(items: list[str], option: str, cast=str) -> dict:
    from megatron_eagle.config import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(option, f"{item!r} has no '='", f"write {option} STAGE=VALUE")
        try:
            out[key] = cast(value)
        except ValueError:
            raise ConfigError(option, f"{value!r} is not a {cast.__name__}", f"write {option} STAGE=VALUE") from None
    return out


def _stage_sets(items: list[str]) -> dict[str, list[str]]:
    from megatron_eagle.config import ConfigError

    out: dict[str, list[str]] = {}
    for item in items:
        stage, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise ConfigError("--stage-set", f"{item!r} is not STAGE:KEY=VALUE", "write e.g. stage2:train.keep_last=5")
        out.setdefault(stage, []).append(override)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `megatron-eagle submit`."""
    p.add_argument("--config", required=True, help="run YAML (see examples/eagle2.5-8b/run.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, passed to every job's `train` as well")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, required=True, help="nodes per job (default for every stage)")
    g.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node (0: CPU processes)")
    g.add_argument("--tasks-per-node", type=int, help="processes per node (default: one per GPU)")
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--stage-nodes", action="append", default=[], metavar="STAGE=N",
                   help="another node count for one stage (its layout must divide nodes x tasks)")
    g = p.add_argument_group("chain")
    g.add_argument("--stage-set", action="append", default=[], metavar="STAGE:KEY=VALUE",
                   help="a config override for one stage's job only, e.g. stage2:model.recompute_llm=full")
    g.add_argument("--stages", help="comma-separated consecutive stages to submit (default: all)")
    g.add_argument("--single-job", action="store_true", help="one job trains every stage (same nodes)")
    g.add_argument("--after", metavar="JOBID", help="the first job waits for this job (afterok)")
    g = p.add_argument_group("cluster")
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--time", help="time limit per job, e.g. 04:00:00 (jobs requeue themselves)")
    g.add_argument("--stage-time", action="append", default=[], metavar="STAGE=TIME")
    g.add_argument("--job-name", default="eagle", help="job name prefix (jobs are NAME-STAGE)")
    g.add_argument("--sbatch", dest="sbatch_lines", action="append", default=[], metavar="OPTION",
                   help="extra #SBATCH line, e.g. --sbatch=--exclusive")
    g.add_argument("--signal", default="TERM", help="signal the tasks get before the time limit / on preemption")
    g.add_argument("--signal-lead", dest="signal_lead_s", type=int, default=300,
                   help="seconds before the time limit to send it (leave time for one step + a save)")
    g.add_argument("--max-requeues", type=int, default=20, help="a job stops requeueing itself after this")
    g = p.add_argument_group("environment")
    g.add_argument("--container-image", help="pyxis/enroot image for srun (e.g. the repo's Dockerfile build)")
    g.add_argument("--container-mounts", action="append", default=[], metavar="SRC:DST[,...]")
    g.add_argument("--container-workdir")
    g.add_argument("--venv", help="virtualenv to activate in the job")
    g.add_argument("--source", action="append", default=[], metavar="FILE",
                   help="a file to source before training (module init, conda, ...)")
    g.add_argument("--module", dest="modules", action="append", default=[], metavar="NAME", help="module load NAME")
    g.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="export in the job")
    g.add_argument("--python", default="python", help="interpreter inside the job")
    g.add_argument("--workdir", help="job working directory (#SBATCH --chdir)")
    p.add_argument("--dry-run", action="store_true", help="print the scripts and sbatch commands, submit nothing")


def run(args: argparse.Namespace) -> int:
    from megatron_eagle.config import ConfigError
    from megatron_eagle.launch.slurm import ClusterOptions, check, dry_run_text, plan_jobs, submit_jobs

    try:
        if args.after is not None:
            check("--after", args.after, "jobid")
        opts = ClusterOptions(
            nodes=args.nodes, gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
            cpus_per_task=args.cpus_per_task, stage_nodes=_pairs(args.stage_nodes, "--stage-nodes", int),
            partition=args.partition, account=args.account, qos=args.qos, time=args.time,
            stage_time=_pairs(args.stage_time, "--stage-time"), stage_overrides=_stage_sets(args.stage_set),
            job_name=args.job_name,
            container_image=args.container_image, container_mounts=args.container_mounts,
            container_workdir=args.container_workdir, venv=args.venv, source=args.source, modules=args.modules,
            env=args.env, sbatch_lines=args.sbatch_lines, python=args.python, workdir=args.workdir,
            signal=args.signal, signal_lead_s=args.signal_lead_s, max_requeues=args.max_requeues)
        stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
        run_info, jobs = plan_jobs(args.config, args.overrides, opts, stages, single=args.single_job)
        if args.dry_run:
            sys.stdout.write(dry_run_text(run_info, jobs, args.after))
            return 0
        ids = submit_jobs(run_info, jobs, args.after)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        print(f"submit failed: {e}", file=sys.stderr)
        return 1
    for job, job_id in zip(jobs, ids):
        print(f"{job_id}\t{job.name}\t{job.nodes} node(s) x {job.tasks_per_node} task(s)")
    print(f"logs: {run_info.run_dir}/slurm/logs; state: megatron-eagle status {run_info.run_dir}")
    return 0
