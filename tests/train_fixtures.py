"""Build a small real dataset + tiny HF init once, and launch `megatron-eagle train` under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def build_assets(root: Path, num_samples: int = 120) -> dict[str, Path]:
    """Synthetic JSONL + media -> shards (megatron-eagle prepare), and a tiny random HF init."""
    from megatron_eagle.data.prepare.synthetic import make_synthetic_dataset

    jsonl = make_synthetic_dataset(root / "raw", num_samples=num_samples, seed=0)
    hf = root / "hf-init"
    run_cli(["convert", "make-tiny", "--out", str(hf)])
    shards = root / "shards"
    run_cli(["prepare", "--input", str(jsonl), "--media-root", str(root / "raw" / "media"), "--output",
             str(shards), "--tokenizer", str(hf), "--shard-size", "256KiB", "--workers", "1", "--no-progress"])
    return {"hf": hf, "shards": shards}


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, "-m", "megatron_eagle.cli", *args], env=env, capture_output=True,
                       text=True, **kw)
    assert r.returncode == 0, f"megatron-eagle {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def write_run(dir_: Path, assets: dict[str, Path], stages: list[dict], train: dict | None = None) -> Path:
    """Write curriculum.yaml + run.yaml into ``dir_``; returns the run.yaml path."""
    dir_.mkdir(parents=True, exist_ok=True)
    for st in stages:
        st.setdefault("datasets", [{"name": "shapes", "path": str(assets["shards"]), "weight": 1.0}])
        st.setdefault("lr", {"peak": 1e-3, "min": 1e-4, "warmup": 0.0, "decay": "cosine"})
        st.setdefault("global_batch_tokens", 2 * st["seq_len"])
    (dir_ / "curriculum.yaml").write_text(yaml.safe_dump({"model": "tiny", "seed": 7, "stages": stages}))
    run = {"run_dir": str(dir_ / "run"), "curriculum": "curriculum.yaml", "tokenizer": str(assets["hf"]),
           "init": {"hf": str(assets["hf"])}, "model": {"preset": "tiny"},
           "train": {"save_every_steps": 4, "keep_last": 3, "log_every": 1, "num_workers": 0,
                     "tensorboard": False, **(train or {})}}
    path = dir_ / "run.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def torchrun_cmd(nproc: int, run_yaml: Path, overrides: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_eagle.cli", "train", "--config", str(run_yaml)]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def train(nproc: int, run_yaml: Path, overrides: list[str] = (), expect_rc: int = 0,
          timeout: float = 400) -> subprocess.CompletedProcess:
    r = subprocess.run(torchrun_cmd(nproc, run_yaml, overrides), env=_env(), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == expect_rc, f"rc={r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def run_single(run_yaml: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`megatron-eagle train` as one plain process (world size 1, no launcher)."""
    cmd = [sys.executable, "-m", "megatron_eagle.cli", "train", "--config", str(run_yaml)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


def train_until(nproc: int, run_yaml: Path, global_step: int, sig: int, timeout: float = 400) -> int:
    """Start training; once ``global_step`` is logged, SIGKILL the whole process group, or send
    another signal twice to each training process (as srun/scancel deliver it), not to torchrun."""
    proc = subprocess.Popen(torchrun_cmd(nproc, run_yaml), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = run_dir(run_yaml) / "metrics.jsonl"
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None:
            if metrics.exists() and any(json.loads(l)["global_step"] >= global_step
                                        for l in metrics.read_text().splitlines() if l.strip()):
                if sig == signal.SIGKILL:
                    os.killpg(proc.pid, sig)
                else:
                    import psutil

                    workers = psutil.Process(proc.pid).children()
                    for _ in range(2):
                        for w in workers:
                            w.send_signal(sig)
                break
            time.sleep(0.05)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_dir(run_yaml: Path) -> Path:
    return Path(yaml.safe_load(run_yaml.read_text())["run_dir"])


def losses(run_yaml: Path) -> dict[tuple[str, int], float]:
    """(stage, step) -> loss; a step logged twice (re-run after a kill) keeps its last value."""
    return {(r["stage"], r["step"]): r["loss"] for r in records(run_yaml)}


def records(run_yaml: Path) -> list[dict]:
    return [json.loads(l) for l in (run_dir(run_yaml) / "metrics.jsonl").read_text().splitlines() if l.strip()]
