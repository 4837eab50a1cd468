"""Real tokenizers end to end: prepare -> train (2 steps, tiny Qwen2 / Qwen3 models with the real
vocabulary) -> `convert to-hf`; the export opens with the auto classes (trust_remote_code) on transformers 5.x and,
in a second virtualenv, 4.51, gives our logits within 1e-5 (fp32) and `megatron-eagle generate`'s
greedy tokens, and its tokenizer gives the same ids fast and slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.dist import run_distributed
from tests.tokenizer_fixtures import unpack_tokenizer
from tests.train_fixtures import REPO, run_cli, run_dir, run_single, write_run

MAX_NEW = 6
CHECK = Path(__file__).resolve().parents[1] / "hf_export_check.py"


def _ours_worker(rank, world, hf_dir, ids, pixels):
    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.convert.load import build_model_from_hf
    from megatron_eagle.inference.forward import forward_logits, inference_batch
    from megatron_eagle.runtime.distributed import init_model_parallel

    init_model_parallel(1, 1, 1)
    model, _ = build_model_from_hf(hf_dir, ParallelConfig())
    return forward_logits(model, inference_batch([(ids, pixels)], model.model_cfg.vision.image_size))


def _on_a_free_port(fn, *args):
    """Call ``fn`` with MASTER_PORT set to a free port (other runs on this host may hold 29500)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    old = os.environ.get("MASTER_PORT")
    os.environ["MASTER_PORT"] = port
    try:
        return fn(*args)
    finally:
        if old is None:
            os.environ.pop("MASTER_PORT")
        else:
            os.environ["MASTER_PORT"] = old


def _media(root: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    import numpy as np
    from PIL import Image

    rng = np.random.RandomState(0)
    arr = (rng.rand(150, 260, 3) * 255).astype(np.uint8)
    path = root / "picture.png"
    Image.fromarray(arr).save(path)
    video = torch.from_numpy((rng.rand(3, 90, 120, 3) * 255).astype(np.uint8))
    return path, torch.from_numpy(arr), video


# (tokenizer fixture, model preset, ViT select_layer): Qwen2.5 on the Qwen2 LLM; Qwen3 on the Qwen3 LLM
# (q/k norm, no qkv bias, head_dim 24, SigLIP2) with features from an intermediate ViT layer
CASES = {"qwen2_5_tokenizer": ("tiny", -1), "qwen3_tokenizer": ("tiny-eagle2.5-qwen3-8b", -2)}


@pytest.fixture(scope="module", params=sorted(CASES))
def exported(request, tmp_path_factory):
    from megatron_eagle.config import preset_model_config
    from megatron_eagle.convert.reference import make_random_hf_checkpoint
    from megatron_eagle.data.prepare.synthetic import make_synthetic_dataset
    from megatron_eagle.inference.media import load_image
    from megatron_eagle.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp(request.param)
    tok_dir = unpack_tokenizer(request.param, root / "tokenizer")
    vocab = len(load_tokenizer(tok_dir))
    preset, select_layer = CASES[request.param]
    cfg = preset_model_config(preset)
    cfg.llm.vocab_size, cfg.vision.select_layer = vocab, select_layer
    hf = make_random_hf_checkpoint(root / "hf-init", cfg, tok_dir)
    jsonl = make_synthetic_dataset(root / "raw", num_samples=8, seed=0)
    shards = root / "shards"
    run_cli(["prepare", "--input", str(jsonl), "--media-root", str(root / "raw" / "media"), "--output", str(shards),
             "--tokenizer", str(hf), "--workers", "1", "--no-progress"])
    stage = {"name": "sft", "seq_len": 512, "trainable": ["vision", "connector", "llm"], "steps": 2}
    run = write_run(root / "run", {"hf": hf, "shards": shards}, [stage])
    data = yaml.safe_load(run.read_text())
    data["model"] = {"preset": preset, "llm": {"vocab_size": vocab}, "vision": {"select_layer": select_layer}}
    run.write_text(yaml.safe_dump(data))
    curriculum = root / "run" / "curriculum.yaml"
    curriculum.write_text(curriculum.read_text().replace("model: tiny", f"model: {preset}"))
    r = _on_a_free_port(run_single, run)
    assert r.returncode == 0, r.stderr[-3000:]
    out = root / "export"
    run_cli(["convert", "to-hf", "--ckpt", str(run_dir(run)), "--out", str(out)])

    image_path, image, video = _media(root)
    gen = json.loads(run_cli(["generate", "--hf", str(out), "--prompt", "What is shown?", "--image", str(image_path),
                              "--max-tiles", "4", "--max-new-tokens", str(MAX_NEW), "--json"]).stdout)
    ids = torch.tensor(gen["input_ids"])
    pixels = load_image(image_path, cfg.vision.image_size, max_tiles=4).tiles
    ours = run_distributed(_ours_worker, 1, str(out), ids, pixels)[0]
    inputs = root / "inputs.pt"
    torch.save({"input_ids": ids, "pixel_values": pixels, "max_new_tokens": MAX_NEW, "image": image,
                "video": video}, inputs)
    return {"name": request.param, "out": out, "root": root, "inputs": inputs, "ours": ours,
            "generated": gen["generated_ids"], "vocab": vocab, "tokenizer": load_tokenizer(out),
            "run": run_dir(run)}


def _failing_export_worker(rank, world, run, out):
    import megatron_eagle.convert.load as load
    from megatron_eagle.convert.checkpoint_io import checkpoint_to_hf

    def fail(*a, **k):  # the last file of the export cannot be written
        raise OSError("disk full")
    load.write_processor_files = fail
    try:
        checkpoint_to_hf(run, out)
    except OSError as e:
        return str(e)
    return "no error"


def _check(python: str, exported: dict, tag: str) -> dict:
    res = exported["root"] / f"check_{tag}.pt"
    r = subprocess.run([python, str(CHECK), str(exported["out"]), str(exported["inputs"]), str(res)],
                       capture_output=True, text=True, timeout=600, cwd=str(exported["root"]))
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(res, weights_only=False)


def _assert_matches_ours(res: dict, exported: dict) -> None:
    ours, theirs = exported["ours"], res["logits"]
    assert theirs.shape == ours.shape == (len(torch.load(exported["inputs"])["input_ids"]), exported["vocab"])
    assert (theirs - ours).abs().max().item() <= 1e-5 * max(1.0, ours.abs().max().item())
    assert res["greedy"] == exported["generated"]
    assert res["config_class"] == "Eagle2_5_VLConfig"
    assert res["model_class"] == "Eagle2_5_VLForConditionalGeneration"
    tok = exported["tokenizer"]
    probe = tok("<img><IMG_CONTEXT></img> Describe <box>[1, 2]</box> the 3 cats, 中文 ok?<|im_end|>",
                add_special_tokens=False)["input_ids"]
    assert res["fast_ids"] == probe and res["fast_len"] == len(tok)
    assert res["slow_ids"] == probe and res["slow_len"] == len(tok)
    assert res["processor_class"] == "Eagle2_5_VLProcessor"
    assert res["image_processor_class"] == "Eagle2_5_VLImageProcessorFast"
    assert "<image-1>" in res["processor_text"] and "<img>" in tok.decode(res["processor_ids"])
    for k in ("processor_generated", "multi_image_generated", "video_generated"):  # may stop early at eos
        assert 1 <= len(res[k]) <= 3, k
    assert res["video_tiles"] == 3 and res["multi_image_tiles"] >= 2


def test_export_loads_on_transformers_5_and_matches_ours(exported):
    res = _check(sys.executable, exported, "tf5")
    assert res["transformers"].startswith("5.")
    _assert_matches_ours(res, exported)


def test_export_loads_on_transformers_451_and_matches_ours(exported):
    from tests.tf451_env import ensure_tf451_venv

    try:
        python = ensure_tf451_venv()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:  # no PyPI: nothing to test against
        pytest.skip(f"cannot build the transformers 4.51 virtualenv: {e}")
    res = _check(str(python), exported, "tf451")
    assert res["transformers"] == "4.51.3"
    _assert_matches_ours(res, exported)
    tf5 = exported["root"] / "check_tf5.pt"
    if tf5.exists():  # the two transformers versions agree with each other too
        other = torch.load(tf5, weights_only=False)
        assert other["processor_ids"] == res["processor_ids"]
        assert torch.equal(other["processor_pixels"], res["processor_pixels"])


def test_export_is_self_contained_and_names_the_tokenizer_ids(exported):
    out = exported["out"]
    config = json.loads((out / "config.json").read_text())
    tok = exported["tokenizer"]
    assert config["image_token_index"] == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert config["image_token_index"] == (151665 if exported["name"] == "qwen2_5_tokenizer" else 151669)
    assert config["text_config"]["vocab_size"] == exported["vocab"]
    preset, select_layer = CASES[exported["name"]]
    assert config["select_layer"] == select_layer
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    if preset.endswith("qwen3-8b"):
        assert config["text_config"]["model_type"] == "qwen3" and config["text_config"]["head_dim"] == 24
        assert "language_model.model.layers.0.self_attn.q_norm.weight" in index
        assert "language_model.model.layers.0.self_attn.q_proj.bias" not in index
    else:
        assert config["text_config"]["model_type"] == "qwen2"
        assert "language_model.model.layers.0.self_attn.q_proj.bias" in index
    for f in ("configuration_eagle2_5_vl.py", "modeling_eagle2_5_vl.py", "processing_eagle2_5_vl.py",
              "image_processing_eagle2_5_vl_fast.py", "vocab.json", "merges.txt", "preprocessor_config.json"):
        assert (out / f).exists(), f
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "Qwen2Tokenizer" and "extra_special_tokens" not in tc
    assert not any(p.name.startswith(".") for p in out.parent.iterdir() if p.name.startswith(".export"))


def test_failed_or_mismatched_export_leaves_the_old_directory(exported, tmp_path):
    if exported["name"] != "qwen2_5_tokenizer":
        pytest.skip("one tokenizer is enough")
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    assert run_distributed(_failing_export_worker, 1, str(exported["run"]), str(out))[0] == "disk full"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"] and (out / "keep.txt").exists()
    from megatron_eagle.tokenizer import build_tiny_tokenizer

    tiny = build_tiny_tokenizer(tmp_path / "tiny")  # 488 ids, <IMG_CONTEXT> = 5: not the run's tokenizer
    r = subprocess.run([sys.executable, "-m", "megatron_eagle.cli", "convert", "to-hf", "--ckpt", str(exported["run"]),
                        "--out", str(out), "--tokenizer", str(tiny)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode != 0 and "model.image_token_id" in r.stderr and str(tiny) in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
