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


def test_hf_config_roundtrip_and_presets():
    from megatron_eagle.config import preset_model_config

    for name in ("tiny", "eagle2.5-2b", "eagle2.5-8b"):
        cfg = preset_model_config(name)
        back = hf_mapping.model_config_from_hf(json.loads(json.dumps(hf_mapping.hf_config(cfg))))
        assert back.vision == cfg.vision and back.llm == cfg.llm and back.preset == name
        assert back.tokens_per_tile == cfg.tokens_per_tile
    d = hf_mapping.hf_config(preset_model_config("tiny"))
    d["text_config"]["model_type"] = "llama"
    with pytest.raises(hf_mapping.HFConfigError):
        hf_mapping.model_config_from_hf(d)


def test_qkv_and_gate_up_layouts():
    # 4 query heads in 2 groups, head_dim 1: group-major [q0 q1 k0 v0 | q2 q3 k1 v1]
    q, k, v = torch.tensor([0., 1, 2, 3]), torch.tensor([10., 11]), torch.tensor([20., 21])
    fused = hf_mapping.fuse_qkv(q, k, v, num_heads=4, num_groups=2)
    assert fused.tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    for a, b in zip(hf_mapping.split_qkv(fused, 4, 2), (q, k, v)):
        assert torch.equal(a, b)
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    g2, u2 = hf_mapping.split_gate_up(hf_mapping.fuse_gate_up(gate, up))
    assert torch.equal(g2, gate) and torch.equal(u2, up)


def test_writer_streams_in_bounded_shards(tmp_path):
    w = hf_io.ShardedWriter(tmp_path, max_shard_size="1KB", tag="t")
    for i in range(10):
        w.add(f"t{i}", torch.zeros(100))  # 400 bytes each
        assert w._buf_bytes <= 1000
    w.add("big", torch.zeros(1000))  # 4000 bytes: a shard of its own
    index = hf_io.finalize_shards(tmp_path, [w.close()])
    assert w.peak_buffer_bytes == 4000 and len(set(index["weight_map"].values())) == 6
    assert not list(tmp_path.glob("*.part"))
    r = hf_io.SafetensorsReader(tmp_path)
    assert torch.equal(r.get("big"), torch.zeros(1000)) and r.get("missing") is None
    with pytest.raises(ValueError):
        hf_io.parse_size("5 parsecs")
    assert hf_io.parse_size("5GB") == 5 * 10 ** 9 and hf_io.parse_size("2MiB") == 2 * 2 ** 20


def test_pipeline_stages_read_only_their_tensors():
    """With PP each stage reads (lazily) just its own HF tensors: the model is never held twice."""
    per_rank = layout_run(1, 2, True)["per_rank_read"]
    first, last = (set(r) for r in per_rank)
    assert any(n.startswith("vision_model.") for n in first) and any(n.startswith("mlp1.") for n in first)
    assert not any(n.startswith(("vision_model.", "mlp1.")) for n in last)
    assert not any(".layers.2." in n or ".layers.3." in n for n in first if n.startswith("language_model."))
    assert not any(".layers.0." in n or ".layers.1." in n for n in last if n.startswith("language_model."))
    assert "language_model.model.norm.weight" in last and "language_model.model.norm.weight" not in first
