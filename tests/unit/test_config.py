"""Typed config: YAML + dotted overrides, presets, and errors that name the field and the fix."""

from __future__ import annotations

import pytest

from megatron_eagle.config import ConfigError, EagleConfig, load_config, preset_model_config, validate


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: eagle2.5-2b\nparallel:\n  tp: 2\n")
    cfg = load_config(path, ["model.llm.num_layers=4", "parallel.sp=true", "loss.weighting=token"])
    assert cfg.model.llm.num_layers == 4 and cfg.model.llm.hidden_size == 1536  # preset + override
    assert cfg.model.llm.tie_embeddings is True and cfg.model.llm.vocab_size == 151936
    assert cfg.parallel.tp == 2 and cfg.parallel.sp is True and cfg.loss.weighting == "token"
    assert cfg.model.tokens_per_tile == 256


def test_presets_match_the_published_shapes():
    big = preset_model_config("eagle2.5-8b")
    assert (big.llm.num_layers, big.llm.hidden_size, big.llm.num_heads, big.llm.num_kv_heads,
            big.llm.ffn_hidden_size, big.llm.vocab_size, big.llm.tie_embeddings) == (28, 3584, 28, 4, 18944, 152064,
                                                                                      False)
    # The released Eagle2.5-8B: SigLIP2-so400m-patch16-512, 32x32 patches -> 256 tokens per tile.
    assert (big.vision.num_layers, big.vision.hidden_size, big.vision.num_heads, big.vision.ffn_hidden_size,
            big.vision.patch_size, big.vision.image_size, big.vision.family) == (27, 1152, 16, 4304, 16, 512,
                                                                                 "siglip2")
    assert big.vision.patches_per_side ** 2 == 1024 and big.tokens_per_tile == 256
    q3 = preset_model_config("eagle2.5-qwen3-8b")  # SigLIP2-so400m-patch14-448 + Qwen3-8B
    assert (q3.vision.patch_size, q3.vision.image_size, q3.vision.family, q3.tokens_per_tile) == (14, 448, "siglip2",
                                                                                                   256)
    assert (q3.llm.num_layers, q3.llm.hidden_size, q3.llm.num_heads, q3.llm.num_kv_heads, q3.llm.ffn_hidden_size,
            q3.llm.vocab_size, q3.llm.head_dim, q3.llm.qkv_bias, q3.llm.qk_layernorm, q3.llm.family) == (
        36, 4096, 32, 8, 12288, 151936, 128, False, True, "qwen3")
    for name in ("tiny-eagle2.5-8b", "tiny-eagle2.5-qwen3-8b"):  # tiny versions keep the layer types
        tiny = preset_model_config(name)
        full = preset_model_config(name[len("tiny-"):])
        assert (tiny.vision.family, tiny.llm.family, tiny.llm.qkv_bias, tiny.llm.qk_layernorm) == (
            full.vision.family, full.llm.family, full.llm.qkv_bias, full.llm.qk_layernorm)
        assert tiny.vision.patch_size == full.vision.patch_size


def test_vocab_padding_and_select_layer():
    llm = preset_model_config("tiny-eagle2.5-qwen3-8b").llm
    assert llm.vocab_size == 509 and llm.padded_vocab_size(1) == 512 and llm.padded_vocab_size(2) == 512
    assert llm.padded_vocab_size(3) == 768  # lcm(128, 3) = 384
    assert preset_model_config("eagle2.5-8b").llm.padded_vocab_size(8) == 152064  # already divisible
    v = preset_model_config("eagle2.5-8b").vision
    assert (v.layers_used, v.post_layernorm) == (27, True)
    v.select_layer = -4  # HF hidden_states[-4]: the output of layer 24, before the post-layernorm
    assert (v.layers_used, v.post_layernorm) == (24, False)
    v.select_layer = 27
    assert (v.layers_used, v.post_layernorm) == (27, False)
    v.select_layer = -28
    with pytest.raises(ConfigError, match="select_layer"):
        v.layers_used


@pytest.mark.parametrize("overrides,field,fix", [
    (["parallel.tp=3"], "model.llm.num_heads", "choose parallel.tp"),
    (["parallel.pp=3"], "model.llm.num_layers", "choose parallel.pp"),
    (["parallel.sp=true"], "parallel.sp", "parallel.tp>1"),
    (["model.preset=nope"], "model.preset", "use one of"),
    (["model.llm.num_layers=four"], "model.llm.num_layers", "whole number"),
    (["parallel.cp_variant=zigzag"], "parallel.cp_variant", "use one of"),
    (["model.bogus=1"], "model.bogus", "remove it"),
    (["model.vision.select_layer=-3"], "model.vision.select_layer", "use -1 (last) to -2"),
    (["model.llm.family=qwen3"], "model.llm.qk_layernorm", "qk_layernorm=true"),
])
def test_errors_name_field_and_fix(overrides, field, fix):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert e.value.field == field
    assert f"`{field}`" in str(e.value) and "Fix:" in str(e.value) and fix in str(e.value)


def test_world_size_must_divide_by_model_parallel_size():
    cfg = load_config(None, ["parallel.tp=2", "parallel.pp=2"])
    validate(cfg, world_size=8)
    with pytest.raises(ConfigError, match="world size 6 is not divisible by tp\\*pp\\*cp=4"):
        validate(cfg, world_size=6)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception) as e:
        load_config(path)
    assert "python/object" in str(e.value) or "constructor" in str(e.value)
    assert isinstance(load_config(None), EagleConfig)
