"""Real tokenizers end to end: prepare -> train (2 steps, tiny model with the real vocabulary) ->
`convert to-hf`; the export opens with the auto classes (trust_remote_code) on transformers 5.x and,
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


@pytest.fixture(scope="module", params=["qwen2_5_tokenizer", "qwen3_tokenizer"])
def exported(request, tmp_path_factory):
    from megatron_eagle.config import preset_model_config
    from megatron_eagle.convert.reference import make_random_hf_checkpoint
    from megatron_eagle.data.prepare.synthetic import make_synthetic_dataset
    from megatron_eagle.inference.media import load_image
    from megatron_eagle.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp(request.param)
    tok_dir = unpack_tokenizer(request.param, root / "tokenizer")
    vocab = len(load_tokenizer(tok_dir))
    cfg = preset_model_config("tiny")
    cfg.llm.vocab_size = vocab
    hf = make_random_hf_checkpoint(root / "hf-init", cfg, tok_dir)
    jsonl = make_synthetic_dataset(root / "raw", num_samples=8, seed=0)
    shards = root / "shards"
    run_cli(["prepare", "--input", str(jsonl), "--media-root", str(root / "raw" / "media"), "--output", str(shards),
             "--tokenizer", str(hf), "--workers", "1", "--no-progress"])
    stage = {"name": "sft", "seq_len": 512, "trainable": ["vision", "connector", "llm"], "steps": 2}
    run = write_run(root / "run", {"hf": hf, "shards": shards}, [stage])
    data = yaml.safe_load(run.read_text())
    data["model"]["llm"] = {"vocab_size": vocab}
    run.write_text(yaml.safe_dump(data))
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
    for f in ("configuration_eagle2_5_vl.py", "modeling_eagle2_5_vl.py", "processing_eagle2_5_vl.py",
              "image_processing_eagle2_5_vl_fast.py", "vocab.json", "merges.txt", "preprocessor_config.json"):
        assert (out / f).exists(), f
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "Qwen2Tokenizer" and "extra_special_tokens" not in tc
    assert not any(p.name.startswith(".") for p in out.parent.iterdir() if p.name.startswith(".export"))


def test_qwen3_text_and_select_layer_export_on_both_transformers(tmp_path):
    """A random Eagle dir with a Qwen3 LLM (q/k norm, no qkv bias, head_dim 32), ViT features from
    layer -2, and the real Qwen3 tokenizer: transformers 5.x and 4.51 give the reference's logits."""
    from safetensors.torch import save_file

    from megatron_eagle.config import preset_model_config
    from megatron_eagle.convert import hf_io
    from megatron_eagle.convert.hf_export.config import hf_config
    from megatron_eagle.convert.hf_export.writer import write_processor_files
    from megatron_eagle.convert.reference import EagleHFReference
    from megatron_eagle.tokenizer import special_token_ids
    from tests.tf451_env import ensure_tf451_venv

    out = tmp_path / "qwen3-eagle"
    tok = hf_io.save_tokenizer(unpack_tokenizer("qwen3_tokenizer", tmp_path / "tok"), out)
    cfg = preset_model_config("tiny")
    cfg.llm.vocab_size, cfg.image_token_id = len(tok), special_token_ids(tok)["img_context"]
    cfg.llm.family, cfg.llm.qk_layernorm, cfg.llm.qkv_bias, cfg.llm.head_dim = "qwen3", True, False, 32
    cfg.vision.select_layer = -2
    torch.manual_seed(0)
    ref = EagleHFReference(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf_config(cfg, "float32", special_token_ids(tok)["eos"])))
    write_processor_files(out, cfg, special_token_ids(tok)["eos"], tok.pad_token_id)
    ids = torch.tensor([151644, 872, 198, 151670] + [cfg.image_token_id] * 16 + [151671, 100, 151645])
    pixels = torch.randn(1, 3, 112, 112)
    want = ref.sample_logits(ids, pixels)
    inputs = tmp_path / "inputs.pt"
    torch.save({"input_ids": ids, "pixel_values": pixels, "max_new_tokens": 3}, inputs)
    pythons = {"tf5": sys.executable}
    try:
        pythons["tf451"] = str(ensure_tf451_venv())
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
        pass
    for tag, python in pythons.items():
        res = _check(python, {"root": tmp_path, "out": out, "inputs": inputs}, tag)
        assert (res["logits"] - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), tag
        assert res["slow_ids"] == res["fast_ids"] and res["fast_len"] == len(tok) == 151680, tag
    if "tf451" not in pythons:
        pytest.skip("cannot build the transformers 4.51 virtualenv")


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
