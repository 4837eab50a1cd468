"""Reading HF configs of every supported family, the name rules of Qwen3 and select_layer, the
vocabulary padding, and bad input refused with the file and the field named."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from megatron_eagle.config import preset_model_config
from megatron_eagle.convert import hf_mapping


def _eagle(vision: dict, text: dict, **top) -> dict:
    return {"model_type": "eagle_2_5_vl", "vision_config": vision, "text_config": text, **top}


def test_qwen3_and_siglip2_configs_as_transformers_writes_them():
    from transformers import Qwen3Config, SiglipVisionConfig

    text = Qwen3Config(vocab_size=1001, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
                       tie_word_embeddings=True).to_dict()
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                                image_size=128, patch_size=16).to_dict()
    vision["_name_or_path"] = "google/siglip2-so400m-patch16-512"
    cfg = hf_mapping.model_config_from_hf(_eagle(vision, text, select_layer=-2))
    l, v = cfg.llm, cfg.vision
    assert (l.family, l.qk_layernorm, l.qkv_bias, l.head_dim, l.kv_channels, l.rope_theta, l.tie_embeddings) == (
        "qwen3", True, False, 32, 32, 1e6, True)
    assert (v.family, v.select_layer, v.layers_used, v.post_layernorm, v.patches_per_side) == (
        "siglip2", -2, 5, False, 8)
    # no select_layer in config.json: the official Eagle2_5_VLConfig default, -4
    assert hf_mapping.model_config_from_hf(_eagle(vision, text)).vision.select_layer == -4
    # Qwen2 keeps its q/k/v biases and plain head size
    from transformers import Qwen2Config
    q2 = hf_mapping.llm_config_from_hf(Qwen2Config(hidden_size=64, num_attention_heads=4).to_dict())
    assert (q2.family, q2.qkv_bias, q2.qk_layernorm, q2.head_dim, q2.kv_channels) == ("qwen2", True, False, None, 16)
    q2 = hf_mapping.llm_config_from_hf({**Qwen2Config(hidden_size=64, num_attention_heads=4).to_dict(), "head_dim": 16})
    assert q2.head_dim is None  # a writer that spells out the default head size reads back the same
    q3 = hf_mapping.llm_config_from_hf({**text, "head_dim": 16})
    assert q3.head_dim == 16  # Qwen3 keeps its head_dim as written


def test_released_preset_recognised_from_its_shapes():
    from tests.hf_layouts import eagle_config

    for name in ("eagle2.5-8b", "eagle2.5-qwen3-8b", "tiny-eagle2.5-8b", "tiny-eagle2.5-qwen3-8b", "tiny"):
        cfg = preset_model_config(name)
        back = hf_mapping.model_config_from_hf(eagle_config(cfg))
        assert back.preset == name and back.vision == cfg.vision, name
        assert {k: v for k, v in vars(back.llm).items() if k != "max_position_embeddings"} == \
            {k: v for k, v in vars(cfg.llm).items() if k != "max_position_embeddings"}, name


def test_naflex_siglip2_refused_naming_file_and_field():
    from transformers import Siglip2VisionConfig

    d = _eagle(Siglip2VisionConfig().to_dict(), {"model_type": "qwen2"})
    with pytest.raises(hf_mapping.HFConfigError) as e:
        hf_mapping.model_config_from_hf(d, source="/ckpt/config.json")
    assert e.value.field == "vision_config.model_type" and e.value.source == "/ckpt/config.json"
    assert str(e.value).startswith("/ckpt/config.json: vision_config.model_type: ") and "NaFlex" in str(e.value)
    d = _eagle({"model_type": "siglip_vision_model"}, {"model_type": "llama"})
    with pytest.raises(hf_mapping.HFConfigError, match="text_config.model_type: text model_type 'llama'"):
        hf_mapping.model_config_from_hf(d, source="x/config.json")
    d = _eagle({"model_type": "siglip_vision_model", "num_hidden_layers": 3}, {}, select_layer=-5)
    with pytest.raises(hf_mapping.HFConfigError, match="select_layer: -5 selects no encoder layer"):
        hf_mapping.model_config_from_hf(d)


def test_qwen3_and_select_layer_name_rules():
    cfg = preset_model_config("tiny-eagle2.5-qwen3-8b")
    cfg.vision.select_layer = -4  # 2 of 5 ViT layers, no post-layernorm
    names = list(hf_mapping.our_full_names(cfg))
    assert "language_model.decoder.layers.3.self_attention.q_layernorm.weight" in names
    assert not any(n.endswith("linear_qkv.bias") and n.startswith("language_model.") for n in names)
    assert not any(n.startswith("vision_model.encoder.layers.2.") for n in names)
    assert "vision_model.encoder.final_layernorm.weight" not in names
    hf = hf_mapping.expected_hf_names(cfg)
    assert "language_model.model.layers.0.self_attn.k_norm.weight" in hf
    assert hf_mapping.is_skipped_hf("vision_model.vision_model.encoder.layers.2.mlp.fc1.weight", cfg)
    assert hf_mapping.is_skipped_hf("vision_model.vision_model.post_layernorm.bias", cfg)
    assert not hf_mapping.is_skipped_hf("vision_model.vision_model.encoder.layers.1.mlp.fc1.weight", cfg)
    # export strips the vocabulary padding
    padded = torch.randn(cfg.llm.padded_vocab_size(2), cfg.llm.hidden_size)
    (name, t), = hf_mapping.to_hf("language_model.output_layer.weight", padded, cfg)
    assert name == hf_mapping.HF_LM_HEAD and torch.equal(t, padded[:509])


def test_padded_vocabulary_rows_take_no_probability():
    """The loss's mask of padded rows (a single rank here; TP=2 in test_model_parallel, where the
    padded rows also get no gradient)."""
    from megatron_eagle.models.loss import vocab_pad_mask

    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(7, 16, generator=g), torch.randn(13, 16, generator=g)
    labels = torch.randint(0, 13, (7,), generator=g)
    padded = torch.cat([weight, 100 * torch.ones(3, 16)])  # rows that would win every argmax
    mask = vocab_pad_mask(padded, 13)
    assert mask.tolist() == [False] * 13 + [True] * 3 and vocab_pad_mask(weight, 13) is None
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), labels, reduction="none")
    ce = torch.nn.functional.cross_entropy((hidden @ padded.t()).masked_fill(mask, float("-inf")), labels,
                                           reduction="none")
    assert torch.allclose(ce, ref)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    from tests.hf_layouts import layout_checkpoint

    return layout_checkpoint("released")


def test_tokenizer_that_does_not_fit_refused(released, tmp_path):
    from megatron_eagle.convert.load import model_config_from_source

    bad = tmp_path / "ckpt"
    shutil.copytree(released, bad)
    d = json.loads((bad / "config.json").read_text())
    d["text_config"]["vocab_size"] = 300  # the tokenizer holds more ids than the embedding has rows
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"tokenizer.json: the tokenizer holds \d+ tokens but .*config.json field "
                                         r"text_config.vocab_size is 300"):
        model_config_from_source(bad)
    d["text_config"]["vocab_size"] = 512
    d["image_token_index"] = 7
    (bad / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"<IMG_CONTEXT> is id \d+ but .*config.json field image_token_index is 7"):
        model_config_from_source(bad)
    # no image_token_index (the official class default is None): read from the tokenizer beside it
    del d["image_token_index"]
    (bad / "config.json").write_text(json.dumps(d))
    from megatron_eagle.convert.load import image_token_id_from_tokenizer
    assert model_config_from_source(bad).image_token_id == image_token_id_from_tokenizer(bad)
    for f in bad.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(hf_mapping.HFConfigError, match=r"config.json: image_token_index: missing, and no tokenizer"):
        model_config_from_source(bad)


def test_missing_shard_refused(released, tmp_path):
    from megatron_eagle.convert.load import load_hf_into_model, model_config_from_source

    bad = tmp_path / "ckpt"
    shutil.copytree(released, bad)
    victim = sorted(bad.glob("model-*.safetensors"))[1]
    victim.unlink()
    cfg = model_config_from_source(bad)
    with pytest.raises(FileNotFoundError, match=rf"model.safetensors.index.json: weight_map names 1 shard\(s\) "
                                                rf"missing .*{victim.name}"):
        load_hf_into_model(None, bad, cfg)


def test_checkpoint_that_does_not_match_the_model_refused():
    """The feature layer and the vocabulary rows must be the model's, else an error names the field
    (both would otherwise load silently: every ViT layer is there, and short rows would be padded)."""
    from megatron_eagle.convert.load import load_hf_into_model, model_config_from_source
    from tests.hf_layouts import layout_checkpoint

    src = layout_checkpoint("qwen3")  # no select_layer in config.json: -4
    cfg = model_config_from_source(src)
    cfg.vision.select_layer = -1
    with pytest.raises(ValueError, match=r"config.json: field select_layer is -4 \(absent: the official default\) "
                                         r"but model.vision.select_layer is -1"):
        load_hf_into_model(None, src, cfg)
    cfg.vision.select_layer = -4
    cfg.llm.vocab_size = 512
    model = torch.nn.Module()
    model.language_model = torch.nn.Module()
    model.language_model.embedding = torch.nn.Module()
    model.language_model.embedding.word_embeddings = torch.nn.Embedding(512, cfg.llm.hidden_size)
    with pytest.raises(ValueError, match=r"language_model.model.embed_tokens.weight has 509 rows but the model's "
                                         r"llm.vocab_size is 512"):
        load_hf_into_model(model, src, cfg)
