"""The self-contained HF export on the installed transformers (5.x): config fields, auto classes,
remote code parity with the transformers reference, the processor's Eagle 2.5 prompt layout and
tiles, Qwen3 text configs, select_layer, tokenizer files, atomic writing."""

from __future__ import annotations

import ast
import json
import shutil

import pytest
import torch

from megatron_eagle.config import preset_model_config
from megatron_eagle.convert.hf_export.config import hf_config, hf_preprocessor_config
from megatron_eagle.convert.hf_export.writer import REMOTE_DIR, REMOTE_FILES, atomic_dir, write_remote_code
from tests.hf_fixtures import tiny_checkpoint

# what the official config class (Eagle2_5 configuration_eagle2_5_vl.py) and vLLM's eagle2_5_vl read
OFFICIAL_FIELDS = {"vision_config", "text_config", "use_backbone_lora", "use_llm_lora", "pad2square", "select_layer",
                   "force_image_size", "downsample_ratio", "template", "dynamic_image_size", "use_thumbnail",
                   "loss_version", "min_dynamic_tiles", "max_dynamic_tiles", "mlp_checkpoint", "image_token_index",
                   "use_pixel_shuffle", "mlp_connector_layers"}
VLLM_FIELDS = {"force_image_size", "min_dynamic_patch", "max_dynamic_patch", "dynamic_image_size", "use_thumbnail",
               "downsample_ratio", "select_layer", "architectures"}
IMAGE_PROCESSOR_KEYS = {"crop_size", "data_format", "default_to_square", "device", "do_center_crop", "do_convert_rgb",
                        "do_normalize", "do_pad", "do_rescale", "do_resize", "image_mean", "image_std",
                        "input_data_format", "max_dynamic_tiles", "min_dynamic_tiles", "pad_during_tiling", "resample",
                        "rescale_factor", "return_tensors", "size", "use_thumbnail", "tokens_per_tile",
                        "image_processor_type", "processor_class", "auto_map"}


def test_config_writes_every_field_the_official_code_and_vllm_read():
    d = hf_config(preset_model_config("eagle2.5-8b"))
    assert OFFICIAL_FIELDS | VLLM_FIELDS <= set(d)
    assert d["model_type"] == "eagle_2_5_vl" and d["architectures"] == ["Eagle2_5_VLForConditionalGeneration"]
    assert set(d["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText",
                                  "AutoProcessor"}
    # the official class defaults differ (select_layer -4, 6 tiles, no thumbnail): all explicit here
    assert (d["select_layer"], d["max_dynamic_tiles"], d["max_dynamic_patch"], d["use_thumbnail"]) == (-1, 12, 12, True)
    assert d["text_config"]["architectures"] == ["Qwen2ForCausalLM"] and d["vision_config"]["vision_use_head"] is False
    pre = hf_preprocessor_config(preset_model_config("tiny"))
    assert IMAGE_PROCESSOR_KEYS <= set(pre) and pre["image_processor_type"] == "Eagle2_5_VLImageProcessorFast"
    assert pre["size"] == {"height": 112, "width": 112} and pre["tokens_per_tile"] == 16


def test_remote_code_imports_nothing_from_megatron():
    for name in REMOTE_FILES:
        tree = ast.parse((REMOTE_DIR / name).read_text())
        mods = {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        mods |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        assert not any(m.startswith("megatron") for m in mods), (name, mods)
        assert {m.split(".")[0] for m in mods if m} <= {"torch", "transformers", "numpy", "PIL", "re",
                                                          "configuration_eagle2_5_vl"}, (name, mods)


@pytest.fixture(scope="module")
def auto():
    from transformers import AutoConfig, AutoModel, AutoProcessor

    d = tiny_checkpoint(False)
    return (d, AutoConfig.from_pretrained(d, trust_remote_code=True),
            AutoModel.from_pretrained(d, trust_remote_code=True, attn_implementation="eager").float().eval(),
            AutoProcessor.from_pretrained(d, trust_remote_code=True))


def test_auto_classes_match_the_transformers_reference(auto):
    """AutoModel (the remote code, loaded from disk) against convert verify's independent reference."""
    from megatron_eagle.convert.verify import TransformersReference, random_cases

    d, config, model, _ = auto
    assert type(config).__name__ == "Eagle2_5_VLConfig" and config.image_token_index == 5
    assert type(model).__name__ == "Eagle2_5_VLForConditionalGeneration"
    ref = TransformersReference.from_pretrained(d)
    for name, samples in random_cases(ref.cfg, seed=3).items():
        for ids, pv in samples:
            with torch.no_grad():
                ours = model(input_ids=ids[None], pixel_values=pv).logits[0]
            theirs = ref.sample_logits(ids, pv)
            assert (ours - theirs).abs().max().item() <= 1e-5 * max(1.0, theirs.abs().max().item()), name
    ids, pv = random_cases(ref.cfg, seed=4)["multi_tile"][0]
    new = model.generate(input_ids=ids[None], pixel_values=pv, max_new_tokens=5, do_sample=False)[0].tolist()
    seq, want = ids, []
    for _ in range(5):  # greedy by hand on the reference: argmax of the last position, no cache
        nxt = int(ref.sample_logits(seq, pv)[-1].argmax())
        want.append(nxt)
        seq = torch.cat([seq, torch.tensor([nxt])])
    assert new == want[:len(new)] and len(new) >= 1


def _image(w: int, h: int, seed: int = 0):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype("uint8"))


def test_processor_writes_the_eagle25_layout_and_our_tiles(auto, tmp_path):
    from megatron_eagle.data.media.image import frames_to_tiles
    from megatron_eagle.inference.media import load_image

    _, _, _, proc = auto
    tpt = 16
    ctx = lambda n: "<img>" + "<IMG_CONTEXT>" * (n * tpt) + "</img>"  # noqa: E731
    wide, tall = _image(300, 120), _image(90, 200, 1)
    one = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    text = proc.apply_chat_template(one, add_generation_prompt=True)
    expanded, tiles = proc.expand(text, [wide])
    path = tmp_path / "wide.png"
    wide.save(path)
    ours = load_image(path, 112, max_tiles=12)
    n = ours.tiles.shape[0]
    assert tiles[0].shape[0] == n > 1 and torch.equal(tiles[0], ours.tiles)  # IAP grid + thumbnail, same pixels
    assert f"user\n{ctx(n)}\nWhat?<|im_end|>" in expanded
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    expanded, tiles = proc.expand(proc.apply_chat_template(two), [wide, tall])
    n2 = tiles[1].shape[0]
    assert f"<image 1>{ctx(n)}\n<image 2>{ctx(n2)}\nSame?" in expanded
    frames = [_image(64, 48, i) for i in range(3)]
    vid = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Moves?"}]}]
    expanded, tiles = proc.expand(proc.apply_chat_template(vid), videos=[frames], video_fps=2.0)
    body = "".join(f"Frame {i}: {ctx(1)}" for i in (1, 2, 3))
    assert f"The first video of 1.50 seconds at 2.00 fps: {body}\nMoves?" in expanded
    assert torch.equal(tiles[0], frames_to_tiles(frames, 112))
    enc = proc(text=proc.apply_chat_template(two, add_generation_prompt=True), images=[wide, tall])
    assert enc["pixel_values"].shape[0] == n + n2
    assert int((enc["input_ids"] == 5).sum()) == (n + n2) * tpt


def test_processor_and_generate_run_on_images_and_video(auto):
    _, _, model, proc = auto
    frames = [_image(64, 48, i) for i in range(2)]
    cases = [([{"type": "image"}, {"type": "text", "text": "What?"}], dict(images=[_image(200, 100)])),
             ([{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}],
              dict(images=[_image(200, 100), _image(50, 60)])),
             ([{"type": "video"}, {"type": "text", "text": "Moves?"}], dict(videos=[frames]))]
    for content, media in cases:
        text = proc.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        enc = proc(text=text, **media)
        out = model.generate(**enc, max_new_tokens=3, do_sample=False)
        assert out.shape[0] == 1 and 1 <= out.shape[1] <= 3
    batch = proc(text=["<image-1>Hi", "<image-1><image-2>Longer question"],
                 images=[[_image(40, 40)], [_image(40, 40), _image(80, 20)]])
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0, 0] == 0  # left padding
    assert model.generate(**batch, max_new_tokens=2, do_sample=False).shape[0] == 2


def _qwen3_cfg():
    cfg = preset_model_config("tiny")
    cfg.llm.family, cfg.llm.qk_layernorm, cfg.llm.qkv_bias, cfg.llm.head_dim = "qwen3", True, False, 32
    return cfg


def test_qwen3_text_eagle_dir_loads_with_automodel_and_matches_qwen3(tmp_path):
    from transformers import AutoModel, Qwen3Config, Qwen3ForCausalLM

    from megatron_eagle.convert.hf_export.remote.configuration_eagle2_5_vl import Eagle2_5_VLConfig
    from megatron_eagle.convert.hf_export.remote.modeling_eagle2_5_vl import Eagle2_5_VLForConditionalGeneration

    d = hf_config(_qwen3_cfg())
    assert d["text_config"]["model_type"] == "qwen3" and d["text_config"]["head_dim"] == 32
    assert d["text_config"]["attention_bias"] is False and d["template"] == "qwen3-chat"
    torch.manual_seed(0)
    model = Eagle2_5_VLForConditionalGeneration(Eagle2_5_VLConfig(**d))
    model.save_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(d))
    write_remote_code(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, attn_implementation="eager").eval()
    names = set(loaded.state_dict())
    assert "language_model.model.layers.0.self_attn.q_norm.weight" in names
    assert "language_model.model.layers.3.self_attn.k_norm.weight" in names
    assert "language_model.model.layers.0.self_attn.q_proj.bias" not in names
    assert loaded.language_model.model.layers[0].self_attn.q_proj.weight.shape == (4 * 32, 64)
    plain = Qwen3ForCausalLM(Qwen3Config(**{k: v for k, v in d["text_config"].items() if k != "model_type"}))
    plain.load_state_dict({k[len("language_model."):]: v for k, v in loaded.state_dict().items()
                           if k.startswith("language_model.")})
    ids = torch.randint(0, 400, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=ids).logits, plain.eval()(input_ids=ids).logits, atol=1e-6)


def test_select_layer_takes_an_intermediate_vit_layer():
    from megatron_eagle.convert.hf_export.remote.configuration_eagle2_5_vl import Eagle2_5_VLConfig
    from megatron_eagle.convert.hf_export.remote.modeling_eagle2_5_vl import (Eagle2_5_VLForConditionalGeneration,
                                                                              pixel_shuffle)

    d = hf_config(preset_model_config("tiny"))
    d["select_layer"] = -2
    torch.manual_seed(0)
    model = Eagle2_5_VLForConditionalGeneration(Eagle2_5_VLConfig(**d)).eval()
    pv = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=pv, output_hidden_states=True).hidden_states
        assert len(hidden) == 3  # embeddings + 2 layers: -2 is the first layer's output, no post-layernorm
        want = model.mlp1(pixel_shuffle(hidden[-2].reshape(2, 8, 8, -1).contiguous()).reshape(2, 16, -1))
        assert torch.equal(model.extract_feature(pv), want)
        model.select_layer = -1
        assert not torch.allclose(model.extract_feature(pv), want)


def test_exported_tokenizer_files_read_by_transformers_451(tmp_path):
    from transformers import AutoTokenizer

    from megatron_eagle.convert.hf_io import save_tokenizer
    from tests.tokenizer_fixtures import unpack_tokenizer

    src = unpack_tokenizer("qwen2_5_tokenizer", tmp_path / "src")
    tok = save_tokenizer(src, tmp_path / "out")
    tc = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "Qwen2Tokenizer" and "extra_special_tokens" not in tc
    assert tc["additional_special_tokens"][-11:] == ["<IMG_CONTEXT>", "<img>", "</img>", "<box>", "</box>", "<quad>",
                                                     "</quad>", "<ref>", "</ref>", "<interval>", "</interval>"]
    assert tc["added_tokens_decoder"]["151665"]["content"] == "<IMG_CONTEXT>"
    vocab = json.loads((tmp_path / "out" / "vocab.json").read_text())
    merges = (tmp_path / "out" / "merges.txt").read_text().splitlines()
    assert len(vocab) == 151643 and merges[0] == "#version: 0.2" and len(merges) == 151388
    again = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "<img><IMG_CONTEXT></img> 3 cats <ref>x</ref>"
    assert again(text)["input_ids"] == tok(text)["input_ids"] and len(again) == len(tok) == 151676
    tiny = save_tokenizer(tiny_checkpoint(False), tmp_path / "tiny")
    tc = json.loads((tmp_path / "tiny" / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "PreTrainedTokenizerFast" and len(tiny) == 488


def test_atomic_dir_leaves_nothing_on_failure_and_replaces_on_success(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and (out / "old.txt").exists()
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not (out / "config.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    shutil.rmtree(out)
