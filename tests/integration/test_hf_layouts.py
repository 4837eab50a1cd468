"""Import of the released layout (SigLIP2 patch16 + Qwen2.5) and the official current layout (SigLIP2
patch14 + Qwen3, features at select_layer -4, an odd vocabulary) from checkpoints written with
transformers' classes: logits equal transformers' (fp32), export gives the tensors back bit-exact
(the vocabulary padding stripped), at TP=1 and TP=2."""

from __future__ import annotations

import functools
import json
import re
import shutil

import pytest
import torch

from tests.dist import run_distributed
from tests.hf_fixtures import read_all, root
from tests.hf_layouts import layout_checkpoint, split_checkpoint

REL_TOL = 1e-5
CASES = ["one_tile", "multi_tile", "video_frames", "text_only", "mixed_pack"]


def _worker(rank, world, jobs, tp, bad_dtype_dir, split):
    import torch.distributed as dist

    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.convert.load import build_model_from_hf, export_model_to_hf, load_hf_into_model
    from megatron_eagle.convert.verify import TransformersReference, model_logits, random_cases, verify
    from megatron_eagle.runtime.distributed import init_model_parallel

    init_model_parallel(tp, 1, 1)
    out = {}
    for layout, src, dst in jobs:
        model, report = build_model_from_hf(src, ParallelConfig(tp=tp))
        export_model_to_hf(model, dst, tokenizer_dir=src, max_shard_size="100KB")
        reporter = rank == world - 1
        ref = TransformersReference.from_pretrained(src) if reporter else None
        cfg = model.model_cfg
        emb = model.language_model.embedding.word_embeddings.weight
        logits = model_logits(model, random_cases(cfg, seed=3)["text_only"], cfg.vision.image_size)
        out[layout] = {"diffs": verify(model, ref, cfg, seed=1, reporter=reporter), "unused": report.unused_hf,
                       "cfg": cfg, "rows": emb.shape[0] * tp, "logits_cols": logits.shape[-1],
                       "vit_layers": len(model.vision_model.encoder.layers),
                       "post_ln": model.vision_model.encoder.final_layernorm is not None}
        if bad_dtype_dir is not None:
            try:
                load_hf_into_model(model, bad_dtype_dir, cfg)
            except TypeError as e:
                out["bad_dtype"] = str(e)
        if split is not None and layout == split[0]:  # separate SigLIP2 + Qwen dirs: connector left at init
            from megatron_eagle.convert.sharding import iter_full_parameters

            full = dict(iter_full_parameters(model))
            sep, sep_report = build_model_from_hf(tuple(split[1:]), ParallelConfig(tp=tp))
            sep_full = dict(iter_full_parameters(sep))
            out["split"] = {"initialised": sep_report.initialised, "unused": sep_report.unused_hf,
                            "different": sorted(k for k in full if not torch.equal(full[k], sep_full[k])),
                            "cfg": sep.model_cfg}
    dist.barrier()
    return out


@functools.lru_cache(maxsize=None)
def run(tp: int) -> dict:
    layouts = ["released", "siglip"] if tp == 1 else ["qwen3", "qwen3-preset"]
    jobs = [(name, str(layout_checkpoint(name)), str(root() / f"layout_export_{name}_tp{tp}")) for name in layouts]
    bad = None
    if tp == 1:  # float32 tensors under a config that declares bfloat16
        bad = root() / "bad_dtype"
        shutil.copytree(layout_checkpoint("released"), bad, dirs_exist_ok=True)
        d = json.loads((bad / "config.json").read_text())
        d["torch_dtype"] = "bfloat16"
        (bad / "config.json").write_text(json.dumps(d))
        bad = str(bad)
    split = ("qwen3-preset", *map(str, split_checkpoint("qwen3-preset"))) if tp == 2 else None
    results = run_distributed(_worker, tp, jobs, tp, bad, split)
    merged = dict(results[-1])
    return {"results": merged, "jobs": {name: (src, dst) for name, src, dst in jobs}}


LAYOUTS = [("released", 1), ("siglip", 1), ("qwen3", 2), ("qwen3-preset", 2)]


@pytest.mark.parametrize("layout,tp", LAYOUTS)
def test_logits_match_transformers(layout, tp):
    diffs = run(tp)["results"][layout]["diffs"]
    assert sorted(diffs) == sorted(CASES)
    for case, (abs_diff, rel_diff) in diffs.items():
        print(f"{layout} tp={tp} {case}: max abs {abs_diff:.3e} rel {rel_diff:.3e}")
        assert rel_diff < REL_TOL, f"{layout} {case}: relative logit difference {rel_diff:.3e}"


@pytest.mark.parametrize("layout,tp", LAYOUTS)
def test_export_gives_the_tensors_back(layout, tp):
    from megatron_eagle.convert import hf_mapping

    r = run(tp)
    res = r["results"][layout]
    src, dst = (read_all(p) for p in r["jobs"][layout])
    cfg = res["cfg"]
    skipped = sorted(n for n in src if hf_mapping.is_skipped_hf(n, cfg))
    kept = {n: t for n, t in src.items() if n not in skipped and not hf_mapping.is_ignored_hf(n)}
    assert sorted(dst) == sorted(kept)
    for name, t in kept.items():
        assert dst[name].dtype == t.dtype and torch.equal(dst[name], t), name
    assert res["unused"] == []
    # the vocabulary: padded inside the model, true size outside
    assert dst[hf_mapping.HF_LLM + "embed_tokens.weight"].shape[0] == cfg.llm.vocab_size
    assert res["rows"] == cfg.llm.padded_vocab_size(tp) and res["logits_cols"] == cfg.llm.vocab_size
    if layout == "qwen3":
        # select_layer missing from config.json: the official default -4, so 2 of 5 ViT layers and no
        # post-layernorm are built; the other layers and the post-layernorm are skipped on import
        assert cfg.vision.select_layer == -4 and cfg.llm.vocab_size % 2 == 1
        assert (res["vit_layers"], res["post_ln"]) == (2, False)
        assert hf_mapping.HF_VISION + "post_layernorm.weight" in skipped
        assert any(".encoder.layers.4." in n for n in skipped) and not any(".layers.1." in n for n in skipped)
        assert any(n.endswith("self_attn.q_norm.weight") for n in kept)
    else:
        assert skipped == [] and res["post_ln"]


def test_presets_and_families_detected():
    res = {**run(1)["results"], **run(2)["results"]}
    assert (res["released"]["cfg"].preset, res["released"]["cfg"].vision.family) == ("tiny-eagle2.5-8b", "siglip2")
    assert res["siglip"]["cfg"].vision.family == "siglip"
    q3 = res["qwen3-preset"]["cfg"]
    assert (q3.preset, q3.llm.family, q3.llm.qk_layernorm, q3.llm.qkv_bias, q3.llm.head_dim) == (
        "tiny-eagle2.5-qwen3-8b", "qwen3", True, False, 24)


def test_separate_siglip2_and_qwen3_dirs():
    split = run(2)["results"]["split"]
    connector = [f"connector.{m}.{p}" for m in ("norm", "fc1", "fc2") for p in ("weight", "bias")]
    assert sorted(split["initialised"]) == sorted(connector) and split["unused"] == []
    assert set(split["different"]) <= set(connector) and "connector.fc1.weight" in split["different"]
    assert (split["cfg"].llm.family, split["cfg"].vision.select_layer) == ("qwen3", -1)


def test_dtype_mismatch_names_file_and_field():
    msg = run(1)["results"]["bad_dtype"]
    assert re.search(r"bad_dtype/model-\d{5}-of-\d{5}\.safetensors: tensor \S+ is float32", msg), msg
    assert "config.json field torch_dtype says bfloat16" in msg


def test_convert_verify_cli_on_the_qwen3_layout():
    """`megatron-eagle convert verify` builds its transformers reference from the checkpoint's own
    config.json: Qwen3ForCausalLM, SigLIP2 features at select_layer -4."""
    from tests.train_fixtures import run_cli

    r = run_cli(["convert", "verify", "--hf", str(layout_checkpoint("qwen3")), "--json"])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ok"] and res["max_rel"] < REL_TOL and sorted(res["cases"]) == sorted(CASES)
    assert res["unused_hf_tensors"] == []
