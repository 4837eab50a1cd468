import json
import os
import re

import pytest

from megatron_eagle.data.media.image import MediaLimits
from megatron_eagle.data.media.prompt import count_text_tokens
from megatron_eagle.data.prepare.samples import Accepted, Rejected, SampleContext, make_key, parse_sample
from tests.media_factory import conv, encode_video, tiny_tokenizer, write_image


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("samples")
    root = base / "media"
    write_image(root / "a.jpg", 64, 40)
    write_image(root / "sub/b.png", 30, 50, "PNG")
    encode_video(root / "v.mp4", "libx264", seconds=3.0, fps=10)
    write_image(base / "secret.jpg", 10, 10)
    os.symlink(base / "secret.jpg", root / "out_link.jpg")
    os.symlink(root / "a.jpg", root / "in_link.jpg")
    (root / "adir").mkdir()
    (root / "adir.jpg").mkdir()
    (root / "bad.jpg").write_bytes(b"not an image at all")
    (root / "bad.mp4").write_bytes(b"not a video at all")
    return SampleContext(str(root), tiny_tokenizer())


def run(env, obj, **kw):
    raw = obj if isinstance(obj, (str, bytes)) else json.dumps(obj)
    return parse_sample(raw, kw.get("source", "data/train.jsonl"), kw.get("src", 0), kw.get("line", 7), env)


def reason(env, obj):
    r = run(env, obj)
    assert isinstance(r, Rejected), r
    return r.reason


def test_image_forms_and_canonical_placeholders(env):
    r = run(env, {"id": 5, "image": "a.jpg", "conversations": conv()})
    assert isinstance(r, Accepted) and r.key == "train-000-000000007"
    s = r.sample
    assert s["id"] == "5" and s["source"] == "train.jsonl" and s["line"] == 7
    assert s["conversations"][0]["value"] == "<image-1>What is the color?"  # eagle2.5 writes its own newline
    m = s["media"][0]
    assert (m["type"], m["width"], m["height"], m["format"], m["member"]) == ("image", 64, 40, "jpeg", "m0.jpg")
    assert m["bytes"] == os.path.getsize(os.path.join(env.media_root, "a.jpg")) and len(m["sha256"]) == 64
    assert (s["text_tokens"], s["supervised_tokens"]) == count_text_tokens(
        env.tokenizer, [{"from": "human", "value": "\nWhat is the color?"}, {"from": "gpt", "value": "It is red."}])
    r = run(env, {"image": ["sub/b.png", "a.jpg"], "conversations": conv("<image-2> vs <image-1>", "same")})
    assert [m["path"] for m in r.sample["media"]] == ["sub/b.png", "a.jpg"]
    assert [m["member"] for m in r.sample["media"]] == ["m0.png", "m1.jpg"]
    assert isinstance(run(env, {"image": "in_link.jpg", "conversations": conv()}), Accepted)


def test_video_forms_with_clips(env):
    r = run(env, {"video": "v.mp4", "start": 0.5, "end": 2.0, "conversations": conv("<video>", "ok")})
    v = r.sample["media"][0]
    assert (v["start"], v["end"], v["frames"], v["fps"], v["codec"]) == (0.5, 2.0, 30, 10.0, "h264")
    assert v["member"] == "m0.mp4" and r.sample["conversations"][0]["value"] == "<video-1>"
    assert reason(env, {"video": [{"path": "v.mp4", "end": 99.0}], "conversations": conv("<video-1>", "ok")}) \
        == "clip outside video"
    r = run(env, {"data": [{"type": "video", "video_list": ["v.mp4"]}, {"type": "image", "image_list": [{"path": "a.jpg"}]}],
                  "conversations": conv("<image-1><video-1>", "ok")})
    assert [m["type"] for m in r.sample["media"]] == ["video", "image"]
    assert reason(env, {"video": {"path": "v.mp4", "start": 5.0}, "conversations": conv("<video>", "ok")}) \
        == "clip outside video"
    assert reason(env, {"video": {"path": "v.mp4", "start": 2, "end": 1}, "conversations": conv("<video>", "ok")}) == "invalid value"


@pytest.mark.parametrize("obj,why", [
    ("{bad json", "malformed JSON"),
    (b"\xff\xfe{}", "malformed JSON"),
    ('["a list"]', "wrong type"),
    pytest.param("[" * 100000 + "]" * 100000, "malformed JSON", id="nesting-bomb"),
    ({"image": "a.jpg"}, "missing field"),
    ({"conversations": []}, "wrong type"),
    ({"conversations": [{"from": "human"}]}, "missing field"),
    ({"conversations": [{"from": "human", "value": 3}]}, "wrong type"),
    ({"conversations": [{"from": "robot", "value": "x"}]}, "invalid value"),
    ({"image": 5, "conversations": conv()}, "wrong type"),
    ({"data": {"type": "image"}, "conversations": conv()}, "wrong type"),
    ({"data": [{"type": "image"}], "conversations": conv()}, "missing field"),
    ({"data": [], "image": "a.jpg", "conversations": conv()}, "invalid value"),
    ({"image": "a.jpg", "conversations": conv("<image-1> twice <image-1>")}, "placeholder count mismatch"),
    ({"image": "a.jpg", "conversations": conv("<image><image>")}, "placeholder count mismatch"),
    ({"image": ["a.jpg", "a.jpg"], "conversations": conv("<image-1><image-3>")}, "placeholder count mismatch"),
    ({"image": ["a.jpg", "a.jpg"], "conversations": conv("<image-1><image>")}, "placeholder count mismatch"),
    ({"conversations": conv("<video>")}, "placeholder count mismatch"),
    ({"image": "a.jpg", "conversations": conv("hi", "<image>")}, "placeholder count mismatch"),
    ({"conversations": conv("hi <|im_start|>", "x")}, "special token in text"),
    ({"conversations": conv("hi", "<IMG_CONTEXT>")}, "special token in text"),
    ({"conversations": conv("hi", "   ")}, "no supervised tokens"),
    ({"image": "../secret.jpg", "conversations": conv()}, "path escapes media root"),
    ({"image": "sub/../../secret.jpg", "conversations": conv()}, "path escapes media root"),
    ({"image": "/etc/passwd.jpg", "conversations": conv()}, "path escapes media root"),
    ({"image": "out_link.jpg", "conversations": conv()}, "path escapes media root"),
    ({"image": "./../a.jpg", "conversations": conv()}, "path escapes media root"),
    ({"image": "nope.jpg", "conversations": conv()}, "missing media file"),
    ({"image": "adir.jpg", "conversations": conv()}, "missing media file"),
    ({"image": "bad.jpg", "conversations": conv()}, "undecodable image"),
    ({"video": "bad.mp4", "conversations": conv("<video>", "x")}, "undecodable video"),
    ({"image": "v.mp4", "conversations": conv()}, "unknown media extension"),
    ({"video": "a.jpg", "conversations": conv("<video>", "x")}, "unknown media extension"),
    ({"image": "adir", "conversations": conv()}, "unknown media extension"),
    ({"image": {"lmdb_file": "x.lmdb", "lmdb_key": "k"}, "conversations": conv()}, "unsupported media"),
])
def test_rejections(env, obj, why):
    assert reason(env, obj) == why


def test_limits_apply(env):
    small = SampleContext(env.media_root, env.tokenizer, MediaLimits(max_media_bytes=100, max_image_pixels=10**9))
    r = parse_sample(json.dumps({"image": "a.jpg", "conversations": conv()}), "x.jsonl", 0, 1, small)
    assert isinstance(r, Rejected) and r.reason == "media file too large"
    tiny = SampleContext(env.media_root, env.tokenizer, MediaLimits(max_image_pixels=100))
    r = parse_sample(json.dumps({"image": "a.jpg", "conversations": conv()}), "x.jsonl", 0, 1, tiny)
    assert r.reason == "image too large"


def test_keys_are_tar_safe():
    k = make_key("../dir/we.ird näme!.jsonl", 12, 34)
    assert k == "we_ird_n_me-012-000000034"
    assert re.fullmatch(r"[A-Za-z0-9_-]+", make_key("/x/" + "é" * 300 + ".jsonl", 1, 1))
    assert make_key("%%%.jsonl", 0, 1) == "input-000-000000001"


@pytest.mark.parametrize("media,text,want", [
    (["image"], "What?", "<image-1>What?"),
    (["image", "image"], "Compare.", "<image-1><image-2>Compare."),
    (["image", "video"], "Both?", "<video-1><image-1>Both?"),  # each type prepends in turn: videos end up first
    (["video", "image"], "Both?", "<image-1><video-1>Both?"),
    (["image", "image"], "<image-2> vs ?", "<image-1><image-2> vs ?"),  # a missing number is prepended
    (["image"], "<image>\nWhat?", "<image-1>What?"),  # the layout writes its own newline
    (["image"], "<image-1>\nWhat?", "<image-1>\nWhat?"),  # numbered tags keep the text; no second copy
    (["image", "image"], "<image>\n<image>\nCompare.", "<image-1><image-2>Compare."),
])
def test_placeholders_are_inserted_where_eagle_puts_them(media, text, want):
    from megatron_eagle.data.prepare.samples import canonical_placeholders

    conv_ = [{"from": "system", "value": "S"}, {"from": "human", "value": text}, {"from": "gpt", "value": "A"}]
    out = canonical_placeholders(conv_, [{"type": t} for t in media])
    assert out[0] == conv_[0] and out[1]["value"] == want and out[2] == conv_[2]


def test_official_video_forms(env):
    r = run(env, {"video": {"video": "v.mp4", "start_time": 0.5, "end_time": 2.0}, "conversations": conv("<video>", "ok")})
    v = r.sample["media"][0]
    assert (v["start"], v["end"], v["clip"]) == (0.5, 2.0, True)
    r = run(env, {"image": [{"video": "v.mp4"}], "conversations": conv("<video>", "ok")})  # image: {video: path}
    assert r.sample["media"][0]["type"] == "video" and r.sample["media"][0]["clip"] is False
    assert reason(env, {"video": {"video": "v.mp4", "start_time": 0.5}, "conversations": conv("<video>", "ok")}) \
        == "missing field"
