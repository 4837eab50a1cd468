import random

import pytest

from megatron_eagle.data.media.ads import (DROP_FRAMES_BELOW_MIN, DROP_MEDIA_TOO_LONG, DROP_TEXT_TOO_LONG, ADSConfig,
                                           ImagePlan, SamplePlan, VideoPlan, ads_config_from_manifest, plan_records,
                                           plan_sample, sample_length)


def video(duration, fps=30.0, start=None, end=None):
    return {"type": "video", "duration": duration, "fps": fps, "frames": int(round(duration * fps)),
            "width": 640, "height": 360, "start": start, "end": end}


def image(w, h):
    return {"type": "image", "width": w, "height": h}


CFG = ADSConfig(tokens_per_tile=256, frame_text_tokens=10)


def test_same_record_gives_different_plans_per_stage_length():
    rec = {"text_tokens": 500, "media": [video(600.0)]}
    frames = {}
    for L in (32768, 65536, 131072):
        p = plan_sample(rec, L, CFG).plan
        assert p is not None and p.num_tokens <= L
        assert p.text_tokens == 500  # text is never cut
        frames[L] = p.media[0].num_frames
        # the budget is used up to less than one frame's worth
        assert L - p.num_tokens < CFG.frame_tokens
    assert frames[32768] < frames[65536] < frames[131072]
    assert frames[131072] == (131072 - 500) // CFG.frame_tokens  # 488 frames of 268 tokens
    assert frames[32768] == (32768 - 500) // CFG.frame_tokens


def test_frames_never_exceed_two_fps_and_use_segment_centres():
    rec = {"text_tokens": 100, "media": [video(60.0, fps=25.0)]}
    p = plan_sample(rec, 131072, CFG).plan
    v = p.media[0]
    assert v.num_frames == 120  # 2 fps x 60 s, although far more would fit
    assert list(v.frame_indices) == sorted(v.frame_indices) and len(set(v.frame_indices)) == 120
    assert v.frame_indices[0] == int(0.5 * 1500 / 120)
    assert v.timestamps[1] - v.timestamps[0] == pytest.approx(0.5, abs=0.05)


def test_short_clip_keeps_fps_cap_below_min_frames():
    p = plan_sample({"text_tokens": 10, "media": [video(2.0, fps=10.0)]}, 100000, CFG).plan
    assert p.media[0].num_frames == 4  # 2 fps x 2 s, below min_frames=8 but the cap wins


def test_clip_bounds_and_relative_timestamps():
    p = plan_sample({"text_tokens": 10, "media": [video(100.0, fps=10.0, start=10.0, end=20.0)]}, 100000, CFG).plan
    v = p.media[0]
    assert v.num_frames == 20
    assert all(100 <= i < 200 for i in v.frame_indices)
    assert all(0.0 <= t < 10.0 for t in v.timestamps)
    assert v.timestamps[0] == pytest.approx(v.frame_indices[0] / 10.0 - 10.0)


def test_drop_when_min_frames_do_not_fit_and_when_text_is_too_long():
    rec = {"text_tokens": 1000, "media": [video(600.0)]}
    L_ok = 1000 + 8 * CFG.frame_tokens
    assert plan_sample(rec, L_ok, CFG).plan.media[0].num_frames == 8
    r = plan_sample(rec, L_ok - 1, CFG)
    assert r.plan is None and r.drop_reason == DROP_FRAMES_BELOW_MIN
    r = plan_sample({"text_tokens": 5000, "media": []}, 4096, CFG)
    assert r.plan is None and r.drop_reason == DROP_TEXT_TOO_LONG
    r = plan_sample({"text_tokens": 100, "media": [image(100, 100)] * 3}, 100 + 2 * 258, CFG)
    assert r.drop_reason == DROP_MEDIA_TOO_LONG
    plans, drops = plan_records([rec, {"text_tokens": 5000, "media": []}, {"text_tokens": 5, "media": []}],
                                L_ok - 1, CFG)
    assert plans[0] is None and plans[1] is None and plans[2].num_tokens == 5
    assert drops == {DROP_FRAMES_BELOW_MIN: 1, DROP_TEXT_TOO_LONG: 1}


def test_tile_cap_degrades_through_the_allowed_set():
    rec = {"text_tokens": 100, "media": [image(2000, 1300)]}
    full = 100 + 13 * 256 + 2
    p = plan_sample(rec, full, CFG).plan
    assert p.tile_cap == 12 and p.media[0] == ImagePlan((4, 3)) and p.num_tokens == full
    p = plan_sample(rec, full - 1, CFG).plan
    assert p.tile_cap == 8 and p.media[0] == ImagePlan((4, 2))
    caps = [plan_sample(rec, L, CFG).plan.tile_cap for L in range(400, full + 1, 97)]
    assert caps == sorted(caps) and set(caps) <= {1, 2, 4, 6, 8, 12} and caps[0] == 1


def test_videos_are_degraded_before_images():
    rec = {"text_tokens": 100, "media": [image(2000, 1300), video(600.0)]}
    p = plan_sample(rec, 32768, CFG).plan
    assert p.tile_cap == 1 and p.media[1].num_frames > 100
    assert p.num_tokens <= 32768


def test_several_videos_share_the_budget_by_duration():
    rec = {"text_tokens": 50, "media": [video(300.0), video(30.0), video(3.0)]}
    p = plan_sample(rec, 20000, CFG).plan
    n = [m.num_frames for m in p.media]
    assert n[0] > n[1] >= 8 and n[2] == 6  # the 3 s clip gets its 2 fps maximum
    assert sum(n) == (20000 - 50) // CFG.frame_tokens


def test_plans_always_fit_randomised():
    rng = random.Random(0)
    for _ in range(300):
        media = [image(rng.randint(20, 5000), rng.randint(20, 5000)) for _ in range(rng.randint(0, 3))]
        media += [video(rng.uniform(0.5, 3000), fps=rng.choice([10.0, 24.0, 29.97, 60.0]))
                  for _ in range(rng.randint(0, 2))]
        rng.shuffle(media)
        rec = {"text_tokens": rng.randint(1, 20000), "media": media}
        L = rng.choice([4096, 32768, 65536, 131072])
        r = plan_sample(rec, L, CFG)
        if r.plan is None:
            continue
        assert r.plan.num_tokens <= L
        assert r.plan.text_tokens == rec["text_tokens"]
        assert [type(m) for m in r.plan.media] == [ImagePlan if x["type"] == "image" else VideoPlan for x in media]
        for m, x in zip(r.plan.media, media):
            if x["type"] == "video":
                assert m.num_frames <= max(1, int(2 * x["duration"] + 1e-9))
                assert max(m.frame_indices) < x["frames"]


def test_sample_length_is_plan_sample_without_the_plan():
    """The planner's counts-only path gives plan_sample's tokens, tiles + frames and drop reason,
    also for clipped videos, several videos, and every drop kind."""
    rng = random.Random(1)
    kinds = set()
    for _ in range(600):
        media = [image(rng.randint(20, 5000), rng.randint(20, 5000)) for _ in range(rng.randint(0, 4))]
        for _ in range(rng.randint(0, 2)):
            d = rng.uniform(0.5, 3000)
            start = rng.uniform(0, d / 2) if rng.random() < 0.3 else None
            media.append(video(d, fps=rng.choice([10.0, 24.0, 29.97, 60.0]), start=start,
                               end=rng.uniform(start, d) if start is not None else None))
        rng.shuffle(media)
        rec = {"text_tokens": rng.randint(1, 40000), "media": media}
        L = rng.choice([4096, 32768, 65536, 131072])
        r = plan_sample(rec, L, CFG)
        n, tiles, why = sample_length(rec, L, CFG)
        if r.plan is None:
            assert (n, tiles, why) == (None, 0, r.drop_reason)
        else:
            want = sum(m.num_tiles if isinstance(m, ImagePlan) else m.num_frames for m in r.plan.media)
            assert (n, tiles, why) == (r.plan.num_tokens, want, None)
        kinds.add(why)
    assert kinds == {None, DROP_TEXT_TOO_LONG, DROP_MEDIA_TOO_LONG, DROP_FRAMES_BELOW_MIN}


def test_tiny_preset_parameters_and_roundtrip():
    cfg = ADSConfig(tokens_per_tile=16, tile_size=112, frame_text_tokens=12)
    p = plan_sample({"text_tokens": 40, "media": [image(500, 325), video(5.0, fps=10.0)]}, 2048, cfg).plan
    assert p.media[0].grid == (4, 3) and p.num_tokens == 40 + (13 * 16 + 2) + 10 * (16 + 2 + 12)
    assert SamplePlan.from_dict(p.to_dict()) == p
    assert ads_config_from_manifest({"prompt": {"frame_prefix_tokens": 9}}, tokens_per_tile=16).frame_text_tokens == 9
