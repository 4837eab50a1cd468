"""`make demo` / `megatron-eagle demo`: the whole path on a laptop, in a few minutes.

1. make a small learnable multimodal dataset (PNG/JPEG shapes, H.264 videos) + a held-out set;
2. make a tiny random Eagle 2.5 HF checkpoint and tokenizer (the "HF init");
3. `prepare` the shards; 4. `train` the two-stage curriculum of examples/tiny with 2 processes;
5. plot the loss; 6. export the final checkpoint to HF; 7. answer held-out questions with `generate`.
Everything lands under runs/demo/. The same command runs on GPUs (2 or more) unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "tiny"


def _run(cmd: list[str], title: str, env: dict | None = None) -> None:
    print(f"\n==> {title}\n    $ {' '.join(cmd)}", flush=True)
    t = time.time()
    r = subprocess.run(cmd, env=env or _env(), cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"demo step failed ({title}): exit {r.returncode}")
    print(f"    done in {time.time() - t:.1f}s", flush=True)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "megatron_eagle.cli", *args]


def plot_losses(metrics: Path, out_png: Path) -> list[dict]:
    """Loss per global step, one colour per curriculum stage (the rows are returned even where
    matplotlib is missing, e.g. a bare GPU image: then no PNG is written)."""
    recs = {}
    for line in metrics.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            recs[r["global_step"]] = r  # the last write of a step wins (resumed runs)
    rows = [recs[k] for k in sorted(recs)]
    try:
        import matplotlib
    except ImportError:
        print(f"note: matplotlib is not installed; no {out_png.name} written", flush=True)
        return rows
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for stage in dict.fromkeys(r["stage"] for r in rows):
        xs = [r["global_step"] for r in rows if r["stage"] == stage]
        ax.plot(xs, [r["loss"] for r in rows if r["stage"] == stage], label=f"stage {stage}")
    ax.set_xlabel("global step")
    ax.set_ylabel("loss (weighted CE on answers)")
    ax.set_title("megatron-eagle tiny demo")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    return rows


def _nproc() -> int:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < 2:
        print("note: fewer than 2 GPUs; the demo runs its 2 processes on the CPU", flush=True)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return 2


def main(out: Path = REPO / "runs" / "demo") -> int:
    t0 = time.time()
    data, hf_init, shards = out / "data", out / "hf-init", out / "data" / "shards"
    run_dir, hf_final = out / "run", out / "hf-final"
    from megatron_eagle.data.prepare.synthetic import make_synthetic_dataset

    if not (data / "train.jsonl").exists():
        print("==> making the synthetic dataset (colours, shapes, counts; images and H.264 videos)", flush=True)
        make_synthetic_dataset(data, num_samples=320, video_fraction=0.2, seed=0)
        make_synthetic_dataset(data, num_samples=4, video_fraction=0.0, seed=1, name="heldout.jsonl")
    if not (hf_init / "config.json").exists():
        _run(_cli("convert", "make-tiny", "--out", str(hf_init)), "tiny random HF Eagle 2.5 init + tokenizer")
    _run(_cli("prepare", "--input", str(data / "train.jsonl"), "--media-root", str(data / "media"),
              "--output", str(shards), "--tokenizer", str(hf_init), "--shard-size", "512KiB", "--workers", "2"),
         "prepare webdataset shards + index")
    _run(_cli("inspect", str(shards)), "inspect the shards")
    nproc = _nproc()
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
          "-m", "megatron_eagle.cli", "train", "--config", str(EXAMPLE / "run.yaml")],
         f"train two curriculum stages with {nproc} processes (examples/tiny/run.yaml)")
    rows = plot_losses(run_dir / "metrics.jsonl", out / "loss.png")
    _run(_cli("convert", "to-hf", "--ckpt", str(run_dir), "--out", str(hf_final)), "export to HF Eagle 2.5 format")

    print("\n==> held-out questions (generate on the exported HF checkpoint)", flush=True)
    correct = 0
    held = [json.loads(l) for l in (data / "heldout.jsonl").read_text().splitlines() if l.strip()]
    for s in held:
        question = s["conversations"][0]["value"]
        r = subprocess.run(_cli("generate", "--hf", str(hf_final), "--prompt", question, "--image",
                                str(data / "media" / s["image"]), "--max-new-tokens", "4", "--json"),
                           env=_env(), cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"generate failed:\n{r.stderr[-2000:]}")
        answer = json.loads(r.stdout.strip().splitlines()[-1])["text"].strip()
        truth = s["conversations"][1]["value"]
        correct += answer.split()[0:1] == [truth] if answer else 0
        print(f"    Q: {question.splitlines()[-1]:<36} A: {answer!r:<12} (truth: {truth})", flush=True)

    first = [r["loss"] for r in rows[:5]]
    last = [r["loss"] for r in rows[-5:]]
    print(f"\nloss {sum(first) / len(first):.3f} (first 5 steps) -> {sum(last) / len(last):.3f} (last 5 steps); "
          f"held-out answers correct: {correct}/{len(held)}")
    print(f"""
everything is under {out}:
  dataset        {data}  (train.jsonl, heldout.jsonl, media/)
  shards         {shards}  (index.jsonl, manifest.json, inspect.png)
  HF init        {hf_init}
  run            {run_dir}  (metrics.jsonl, checkpoints/)
  loss curve     {out / 'loss.png'}
  HF export      {hf_final}
demo finished in {time.time() - t0:.0f}s""")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `megatron-eagle demo`."""
    p.add_argument("--out", default=str(REPO / "runs" / "demo"))


def run(args: argparse.Namespace) -> int:
    return main(Path(args.out))


if __name__ == "__main__":
    from megatron_eagle.cli import main as cli_main

    sys.exit(cli_main(["demo", *sys.argv[1:]]))
