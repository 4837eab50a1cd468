"""Every benchmark in ``benchmarks/`` on a CPU: the training-throughput benchmark on the tiny
preset (in process, and as a script through torchrun), context parallelism on 2 gloo processes,
the CPU-capable scripts on tiny inputs, the GPU-only ones up to their device check, and the sweep
scripts' syntax and variant names. Every JSON record carries ``commit`` and ``config``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.bench_fixtures import BENCH, SCRIPTS
from tests.dist import run_distributed

COMMIT = re.compile(r"^([0-9a-f]{40}(-dirty)?|unknown)$")
# every option of the ours side that runs on a CPU, in one variant
ALL_OPTIONS = "ours+rc-vit+rc-llm+no-swiglu+offload-vit+grad-bf16+no-flat-adam+no-overlap-grad+overlap+sp"


def _bench(rank, world, out):
    from benchmarks.train.runner import main

    main(["--preset", "tiny", "--seq-len", "192", "--steps", "1", "--warmup", "1", "--packs", "2",
          "--variants", "hf", "hf+nomask", "hf-strong", "hf-strong+fp32-master+gc+flce", "ours", ALL_OPTIONS,
          "--out", str(out), "--raw-out", str(out) + ".raw", "--date", "2026-11-26"])
    return json.loads(open(out).read()), json.loads(open(str(out) + ".raw").read())


def test_benchmark_smoke_tiny(tmp_path):
    out = tmp_path / "tt.json"
    runs, raw = run_distributed(_bench, 1, out, timeout=240)[0]
    assert [r["ours_variant"] for r in runs] == ["ours", ALL_OPTIONS]
    for r in runs:
        for key in ("device", "date", "preset", "seq_len", "ours_tokens_per_s", "hf_tokens_per_s", "ours_mfu",
                    "hf_mfu", "ours_peak_gib", "hf_peak_gib", "commit", "config", "hf_config"):
            assert key in r, key
        assert r["date"] == "2026-11-26" and r["preset"] == "tiny" and r["seq_len"] == 192
        assert r["ours_status"] == r["hf_status"] == "ok", r
        assert r["ours_tokens_per_s"] > 0 and r["hf_tokens_per_s"] > 0 and r["hf_nomask_tokens_per_s"] > 0
        assert r["ours_mfu"] > 0 and r["speedup_vs_hf"] > 0
        ph = r["ours_phases_ms"]
        assert all(ph[k] is not None and ph[k] >= 0 for k in ("vit_fwd", "llm_fwd", "llm_bwd", "optimizer"))
        assert abs(sum(v for k, v in ph.items() if k != "total") - ph["total"]) < 1e-6 * max(ph["total"], 1)
        assert COMMIT.match(r["commit"])
        assert r["config"]["side"] == "ours" and r["baseline"] == "hf-strong"
        assert r["ours_precision"] == r["baseline_precision"] == "fp32-master"  # equal optimizer precision
        assert set(r["baselines"]) == {"hf", "hf+nomask", "hf-strong", "hf-strong+fp32-master+gc+flce"}
        assert r["baselines"]["hf-strong"]["precision"] == "bf16-adam"
    # ours without recompute against hf-strong at fp32 master (only the checkpointed one ran),
    # ours with recompute against hf-strong with gradient checkpointing
    assert [r["hf_variant"] for r in runs] == ["hf-strong+fp32-master+gc+flce"] * 2
    assert runs[0]["ours_recompute"]["llm"] == "none" and runs[1]["ours_recompute"]["vision"] == "full"
    assert runs[1]["baseline_recompute"].startswith("gradient-checkpointing")
    strong = {r["variant"]: r["config"] for r in raw if r["side"] == "hf-strong"}
    for c in strong.values():  # on a CPU the flash/Liger paths are absent and the fallbacks are labelled
        assert c["attention"] == "segment-sdpa (cpu fallback)" and c["liger"] is False
    assert strong["hf-strong"]["loss"] == "torch-ce on supervised positions"
    assert "torch fallback" in strong["hf-strong+fp32-master+gc+flce"]["loss"]
    assert runs[0]["config"]["recompute_llm"] == "none" and runs[0]["config"]["flat_adam"] is True
    mine = runs[1]["config"]
    assert (mine["recompute_vision"], mine["recompute_llm"], mine["swiglu"], mine["offload_vit"], mine["grad_bf16"],
            mine["flat_adam"], mine["overlap_grad"], mine["overlap"]) == ("full", "full", False, True, True, False,
                                                                          False, True)
    assert mine["sp"] is False  # resolved: no sequence parallelism at TP 1
    assert {r["variant"] for r in raw} == {"hf", "hf+nomask", "hf-strong", "hf-strong+fp32-master+gc+flce", "ours",
                                           ALL_OPTIONS}
    assert [r["config"]["doc_mask"] for r in raw[:2]] == [True, False]
    for r in raw:  # same packs, random init: every side starts near ln(vocab)
        assert all(abs(x - torch.log(torch.tensor(512.0)).item()) < 1.5 for x in r["losses"]), r["losses"]
        assert COMMIT.match(r["commit"]) and r["config"]["side"] == r["side"]


def _bench_repeat(rank, world, tmp):
    from benchmarks.train.runner import main

    main(["--preset", "tiny", "--seq-len", "128", "--steps", "1", "--warmup", "0", "--packs", "1", "--repeat", "2",
          "--variants", "ours", "ours+mb2", "--raw-out", f"{tmp}/raw.json", "--md-out", f"{tmp}/t.md"])
    return [r["variant"] for r in json.loads(open(f"{tmp}/raw.json").read())], open(f"{tmp}/t.md").read()


def test_benchmark_repeat_runs_round_robin_and_reports_medians(tmp_path):
    variants, md = run_distributed(_bench_repeat, 1, str(tmp_path), timeout=240)[0]
    assert variants == ["ours", "ours+mb2", "ours", "ours+mb2"]
    rows = [line for line in md.splitlines() if line.startswith("| ours")]
    medians = [line for line in rows if line.count("|") == 9]  # the median table's 8 columns
    assert len(rows) == 6 and len(medians) == 2 and all("| 2 |" in line for line in medians), md


def _run(script: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """A benchmark script as a user runs it: its own path, from another folder."""
    return subprocess.run([sys.executable, str(BENCH / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_train_throughput_script_launches_a_layout(tmp_path):
    """The entry script through torchrun (``--layouts``): one record per variant, from the worker."""
    r = _run("train_throughput.py", "--preset", "tiny", "--seq-len", "128", "--steps", "1", "--warmup", "0",
             "--packs", "1", "--layouts", "1x1", "--variants", "ours", "ours+mb2", "--out", "runs.json",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert [(x["ours_variant"], x["ours_status"], x["world"]) for x in runs] == [("ours", "ok", 1),
                                                                                 ("ours+mb2", "ok", 1)]
    assert [x["config"]["micro_batches"] for x in runs] == [1, 2] and all(COMMIT.match(x["commit"]) for x in runs)


def test_context_parallel_benchmark_smoke(tmp_path):
    """benchmarks/context_parallel.py end to end on 2 gloo processes: CP=1 and two CP variants, the
    attention check and the attention-alone benchmark, with the FLOP-normalised columns."""
    out = tmp_path / "cp.json"
    r = _run("context_parallel.py", "--nproc", "2", "--preset", "tiny", "--seq-len", "512", "--steps", "1",
             "--warmup", "0", "--variants", "cp1", "ring", "allgather", "--check", "--attn-bench",
             "--attn-seq-len", "256", "--out", str(out), "--md-out", str(tmp_path / "cp.md"), "--date", "2026-11-26",
             cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads(out.read_text())
    assert [x["variant"] for x in recs] == ["cp1", "ring", "allgather"] and all(x["status"] == "ok" for x in recs)
    assert all(x["tflops_per_gpu"] > 0 and x["model_flops_per_token"] > 0 for x in recs)
    assert len({round(x["first_loss"], 4) for x in recs}) == 1  # same pack, same weights: same loss
    assert all(COMMIT.match(x["commit"]) for x in recs)
    assert [(x["config"]["cp"], x["config"]["cp_variant"]) for x in recs] == [(1, "allgather"), (2, "ring"),
                                                                              (2, "allgather")]
    check, attn = recs[1]["check"], recs[1]["attention"][0]
    assert max(v for k in ("ring", "allgather", "ulysses") for v in check[k].values()) < 1e-4  # fp32 CPU path
    assert attn["seq_len"] == 256 and {"ring", "allgather", "ulysses"} <= set(attn)
    assert all(attn[v]["efficiency"] > 0 for v in ("ring", "allgather", "ulysses"))
    table = (tmp_path / "cp.md").read_text()
    assert "FLOP/s vs CP=1 @ shortest" in table and "efficiency vs 1-GPU flash" in table


# script -> (arguments, exit status, text in its output, JSON it writes or None); GPU-only scripts
# run up to their device check


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_script_smoke(script, tmp_path):
    args, rc, text, written = SCRIPTS[script]
    if torch.cuda.is_available() and rc:
        pytest.skip("a GPU is present: the script would measure")
    r = _run(script, *args, cwd=tmp_path, timeout=600)
    assert r.returncode == rc, r.stderr[-3000:]
    assert text in r.stdout, r.stdout[-3000:]
    if written:
        data = json.loads((tmp_path / written).read_text())
        for rec in data if isinstance(data, list) else [data]:
            assert COMMIT.match(rec["commit"]) and isinstance(rec["config"], dict), rec


def test_ab_checkouts_runs_both_sides_and_summarises(tmp_path):
    """Both sides of the A/B script on the tiny preset (this checkout against itself)."""
    env = dict(os.environ, PRESET="tiny", STEPS="1", WARMUP="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # its python3
    r = subprocess.run(["bash", str(BENCH / "ab_checkouts.sh"), str(BENCH.parent), str(BENCH.parent),
                        str(tmp_path / "ab"), "1", "ours", "192"], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for side in ("A", "B"):
        recs = json.loads((tmp_path / "ab" / f"{side}.json").read_text())
        assert len(recs) == 1 and recs[0]["ours_status"] == "ok", recs
        assert f"{side}: tokens/s median" in r.stdout, r.stdout[-3000:]


def test_sweep_scripts_parse_and_name_existing_variants():
    from benchmarks.train.variants import parse_variant

    for sh in sorted(BENCH.glob("*.sh")):
        r = subprocess.run(["bash", "-n", str(sh)], capture_output=True, text=True)
        assert r.returncode == 0, (sh.name, r.stderr)
    text = (BENCH / "train_throughput_sweep.sh").read_text().replace(":-", ": ")  # ${VAR:-default}
    for var, value in re.findall(r"^\s*(\w+)=(\S+)$", text, re.M):
        text = text.replace(f"${var}+", f"{value}+")
    names = set(re.findall(r"(?<![\w$/.-])((?:ours|hf)(?:\+[\w-]+)+|ours|hf)(?![\w-])", text))
    assert {"hf", "ours", "ours+prof", "ours+mb4", "hf+gc+mb4", "ours+rc-vit+no-swiglu+overlap"} <= names
    for name in names:
        parse_variant(name)  # raises on a removed option
