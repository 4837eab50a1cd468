"""HF -> our model (TP/PP layouts) -> HF is bit-exact, sharded with an index, and carries
config and tokenizer; separate SigLIP + Qwen2 dirs load with a fresh connector."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_eagle.convert import hf_io, hf_mapping
from megatron_eagle.convert.hf_export.config import hf_config


def test_hf_config_roundtrip_and_presets():
    from megatron_eagle.config import preset_model_config

    for name in ("tiny", "eagle2.5-2b", "eagle2.5-8b"):
        cfg = preset_model_config(name)
        back = hf_mapping.model_config_from_hf(json.loads(json.dumps(hf_config(cfg))))
        assert back.vision == cfg.vision and back.llm == cfg.llm and back.preset == name
        assert back.tokens_per_tile == cfg.tokens_per_tile
    d = hf_config(preset_model_config("tiny"))
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
