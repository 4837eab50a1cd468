"""Recipe reading (paths, field errors), per-dataset and overall reject thresholds, and curriculum
stages that name a recipe index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from megatron_eagle.config import ConfigError, load_curriculum
from megatron_eagle.data.prepare.pipeline import PrepareConfig, PrepareError
from megatron_eagle.data.prepare.recipe import prepare_recipe, read_recipe
from tests.media_factory import conv, tiny_tokenizer_dir
from tests.media_factory import write_jsonl as _write_jsonl


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return _write_jsonl(path, rows)


def _recipe(tmp: Path, entries: dict) -> Path:
    p = tmp / "r" / "recipe.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(entries))
    return p


def test_paths_resolve_against_the_recipe_folder_then_the_working_directory(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "r" / "a.jsonl", [])
    write_jsonl(tmp_path / "a.jsonl", [])  # same name in the working directory: the recipe's folder wins
    (tmp_path / "b").mkdir()
    write_jsonl(tmp_path / "b" / "only_cwd.jsonl", [])
    monkeypatch.chdir(tmp_path)
    p = _recipe(tmp_path, {"x": {"root": "", "annotation": "a.jsonl", "repeat_time": 2, "modality": "image"},
                           "y": {"root": "", "annotation": "b/only_cwd.jsonl"}})
    x, y = read_recipe(p)
    assert x.annotation == str(tmp_path / "r" / "a.jsonl") and y.annotation == str(tmp_path / "b" / "only_cwd.jsonl")
    assert (x.repeat_time, y.repeat_time, x.root, x.extra) == (2.0, 1.0, "", {"modality": "image"})


@pytest.mark.parametrize("entry,needle", [
    ({"root": ""}, "`annotation` missing"),
    ({"root": "", "annotation": "nope.jsonl"}, "annotation nope.jsonl not found"),
    ({"root": "", "annotation": "a.jsonl", "repeat_time": 0}, "`repeat_time` must be a number > 0"),
    ({"root": "", "annotation": "a.jsonl", "max_dynamic_tiles": 0}, "`max_dynamic_tiles`"),
    ({"root": "no_dir", "annotation": "a.jsonl"}, "root no_dir is not a directory"),
    ({"root": 3, "annotation": "a.jsonl"}, "`root` must be a string"),
])
def test_bad_recipes_name_the_dataset_and_the_field(tmp_path, entry, needle):
    write_jsonl(tmp_path / "r" / "a.jsonl", [])
    with pytest.raises(PrepareError, match="dataset 'ds'") as e:
        read_recipe(_recipe(tmp_path, {"ds": entry}))
    assert needle in str(e.value)


def test_reject_threshold_applies_per_dataset_and_overall(tmp_path):
    good = [{"conversations": conv(f"Q{i}?", f"A{i}.")} for i in range(8)]
    write_jsonl(tmp_path / "r" / "clean.jsonl", good)
    write_jsonl(tmp_path / "r" / "dirty.jsonl", good[:2] + ["{bad", "{bad"])
    p = _recipe(tmp_path, {"clean": {"root": "", "annotation": "clean.jsonl"},
                           "dirty": {"root": "", "annotation": "dirty.jsonl", "max_reject_fraction": 0.2}})
    base = PrepareConfig(inputs=[], media_root="", output=str(tmp_path / "out"), tokenizer=str(tiny_tokenizer_dir()),
                         workers=1, progress=False, max_reject_fraction=0.25)
    index, rc = prepare_recipe(p, base)
    t = index["totals"]
    assert (t["input_samples"], t["written_samples"], t["rejected_samples"]) == (12, 10, 2)
    assert index["over_threshold"] == ["dirty"] and rc == 1  # 50% > 20%, though 2/12 overall is under 25%
    index, rc = prepare_recipe(p, PrepareConfig(**{**base.__dict__, "max_reject_fraction": 0.1}))
    assert index["over_threshold"] == ["dirty"] and rc == 1
    p2 = _recipe(tmp_path, {"dirty": {"root": "", "annotation": "dirty.jsonl", "max_reject_fraction": 0.6}})
    index, rc = prepare_recipe(p2, base)
    assert index["over_threshold"] == [] and rc == 1  # 2/4 overall is over 25%
    index, rc = prepare_recipe(p2, PrepareConfig(**{**base.__dict__, "max_reject_fraction": 0.5}))
    assert rc == 0 and index["datasets"][0]["rejected_by_reason"] == {"malformed JSON": 2}


def _curriculum(tmp: Path, datasets: list) -> Path:
    cur = {"model": "tiny", "seed": 1, "stages": [{"name": "s", "seq_len": 512, "global_batch_tokens": 1024,
                                                   "datasets": datasets}]}
    p = tmp / "cur.yaml"
    p.write_text(yaml.safe_dump(cur))
    return p


def test_curriculum_stage_names_a_recipe_index(tmp_path):
    idx = {"format": "megatron-eagle recipe 1", "datasets": [
        {"name": "b", "path": "b", "repeat_time": 3}, {"name": "a", "path": "/abs/a", "repeat_time": 0.5}]}
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "recipe.json").write_text(json.dumps(idx))
    cur = load_curriculum(_curriculum(tmp_path, [{"name": "sft", "recipe": "prep/recipe.json", "repeat": 2},
                                                 {"name": "extra", "path": "x", "repeat": 1}]))
    got = [(d.name, d.path, d.repeat) for d in cur.stages[0].datasets]
    assert got == [("sft/b", "prep/b", 6.0), ("sft/a", "/abs/a", 1.0), ("extra", "x", 1.0)]
    cur = load_curriculum(_curriculum(tmp_path, [{"name": "sft", "recipe": "prep"}]))  # the folder works too
    assert [d.repeat for d in cur.stages[0].datasets] == [3.0, 0.5]
    with pytest.raises(ConfigError, match="recipe"):
        load_curriculum(_curriculum(tmp_path, [{"name": "sft", "recipe": "prep/none.json"}]))
    (tmp_path / "in.json").write_text(json.dumps({"ds": {"root": "", "annotation": "a.jsonl"}}))
    with pytest.raises(ConfigError, match="not a recipe index"):
        load_curriculum(_curriculum(tmp_path, [{"name": "sft", "recipe": "in.json"}]))
    with pytest.raises(ConfigError, match="takes its datasets"):
        load_curriculum(_curriculum(tmp_path, [{"name": "sft", "recipe": "prep", "weight": 1.0}]))


def test_repeat_below_one_draws_int_n_r():
    from megatron_eagle.config.curriculum import DatasetRef, Stage
    from megatron_eagle.data.packing.blend import blend_counts

    st = Stage(name="s", seq_len=8, global_batch_tokens=8,
               datasets=[DatasetRef("a", "a", repeat=0.5), DatasetRef("b", "b", repeat=3), DatasetRef("c", "c", repeat=0.99)])
    assert blend_counts(st, [5, 4, 100]).tolist() == [2, 12, 99]
