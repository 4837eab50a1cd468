"""`train` on the Qwen3 layout at TP=2 from an imported checkpoint whose vocabulary TP does not divide
(509 rows, padded to 512 inside the model), then `convert to-hf`: the export holds the true vocabulary
and Qwen3's q/k norms."""

from __future__ import annotations

import math

import yaml

from megatron_eagle.convert import hf_mapping

from tests.hf_fixtures import read_all
from tests.hf_layouts import layout_checkpoint
from tests.train_fixtures import build_assets, records, run_cli, train, write_run


def test_qwen3_trains_at_tp2_and_exports_the_true_vocabulary(tmp_path):
    assets = build_assets(tmp_path / "assets", num_samples=24)
    init = layout_checkpoint("qwen3-preset")
    stage = [{"name": "full", "seq_len": 512, "steps": 4, "trainable": ["vision", "connector", "llm"],
              "lr": {"peak": 3e-3, "min": 1e-3, "warmup": 0.0, "decay": "cosine"}, "parallel": {"tp": 2}}]
    run = write_run(tmp_path / "run", {**assets, "hf": init}, stage)
    d = yaml.safe_load(run.read_text())
    d["model"] = {"preset": "tiny-eagle2.5-qwen3-8b"}
    run.write_text(yaml.safe_dump(d))
    cur = tmp_path / "run" / "curriculum.yaml"
    cur.write_text(cur.read_text().replace("model: tiny", "model: tiny-eagle2.5-qwen3-8b"))
    train(2, run)
    loss = [r["loss"] for r in records(run) if "loss" in r]
    assert len(loss) == 4 and all(math.isfinite(x) for x in loss)
    out = tmp_path / "hf"
    run_cli(["convert", "to-hf", "--ckpt", str(tmp_path / "run" / "run"), "--out", str(out)])
    exported, src = read_all(out), read_all(init)
    assert exported["language_model.model.embed_tokens.weight"].shape == (509, 64)
    assert exported["language_model.lm_head.weight"].shape == (509, 64)
    assert "language_model.model.layers.3.self_attn.q_norm.weight" in exported
    assert sorted(exported) == sorted(k for k in src if not hf_mapping.is_ignored_hf(k))  # (SigLIP's pooling head)
    changed = [k for k in exported if not (exported[k] == src[k]).all()]
    assert "language_model.model.layers.0.self_attn.k_norm.weight" in changed  # q/k norms train
