"""HF -> our model (TP/PP layouts) -> HF is bit-exact, sharded with an index, and carries
config and tokenizer; separate SigLIP + Qwen2 dirs load with a fresh connector."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_eagle.convert import hf_io, hf_mapping
from tests.hf_fixtures import layout_run, read_all


@pytest.mark.parametrize("tp,pp,tied", [(1, 1, False), (2, 1, False), (1, 2, True)])
def test_roundtrip_bit_exact(tp, pp, tied):
    run = layout_run(tp, pp, tied)
    src, out = read_all(run["src"]), read_all(run["out"])
    assert sorted(src) == sorted(out)
    for name, t in src.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name], t), name
    assert run["unused"] == []
    if tied:
        assert hf_mapping.HF_LM_HEAD not in out
    # index, shards of bounded size (200 KB; a larger single tensor would get its own shard)
    index = json.loads((run["out"] / hf_io.INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(p.name for p in run["out"].glob("*.safetensors")) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in src.values())
    for s in shards:
        size = (run["out"] / s).stat().st_size
        assert size < 200_000 + 20_000 or len([k for k, v in index["weight_map"].items() if v == s]) == 1
    # config and tokenizer
    cfg_src = json.loads((run["src"] / "config.json").read_text())
    cfg_out = json.loads((run["out"] / "config.json").read_text())
    assert cfg_out == cfg_src
    assert cfg_out["model_type"] == "eagle_2_5_vl" and cfg_out["downsample_ratio"] == 0.5
    assert cfg_out["vision_config"]["model_type"] == "siglip_vision_model"
    assert cfg_out["text_config"]["model_type"] == "qwen2"
    assert (run["out"] / "tokenizer.json").exists() and (run["out"] / "tokenizer_config.json").exists()


def test_separate_siglip_and_qwen2_dirs():
    sep = layout_run(1, 1, False)["separate"]
    connector = [f"connector.{m}.{p}" for m in ("norm", "fc1", "fc2") for p in ("weight", "bias")]
    assert sorted(sep["initialised"]) == sorted(connector)
    # everything but the connector equals the Eagle checkpoint's tensors; the connector does not
    assert set(sep["different"]) <= set(connector) and "connector.fc1.weight" in sep["different"]
    assert any(k.startswith("vision_model.") for k in sep["equal"])
    assert "language_model.output_layer.weight" in sep["equal"]
    assert sep["unused"] == []


def test_pipeline_stages_read_only_their_tensors():
    """With PP each stage reads (lazily) just its own HF tensors: the model is never held twice."""
    per_rank = layout_run(1, 2, True)["per_rank_read"]
    first, last = (set(r) for r in per_rank)
    assert any(n.startswith("vision_model.") for n in first) and any(n.startswith("mlp1.") for n in first)
    assert not any(n.startswith(("vision_model.", "mlp1.")) for n in last)
    assert not any(".layers.2." in n or ".layers.3." in n for n in first if n.startswith("language_model."))
    assert not any(".layers.0." in n or ".layers.1." in n for n in last if n.startswith("language_model."))
    assert "language_model.model.norm.weight" in last and "language_model.model.norm.weight" not in first
