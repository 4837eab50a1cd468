import io

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_eagle.data.media import video as video_mod
from megatron_eagle.data.media.image import (MediaError, MediaLimits, decode_image, frames_to_tiles, image_to_tiles,
                                             probe_image)
from megatron_eagle.data.media.video import decode_all_frames, decode_frames, probe_video, video_to_tiles
from tests.media_factory import encode_video, frame_array, truncate, write_image


@pytest.fixture(scope="module")
def vids(tmp_path_factory):
    d = tmp_path_factory.mktemp("vids")
    return {
        "h264": encode_video(d / "h264.mp4", "libx264", seconds=3.0, fps=10),
        "mpeg4": encode_video(d / "mpeg4.mp4", "mpeg4", seconds=2.0, fps=12),
        "mkv": encode_video(d / "clip.mkv", "mpeg4", seconds=3.0, fps=10),
        "fast": encode_video(d / "fast.mp4", "libx264", seconds=2.0, fps=10, container_options={"movflags": "faststart"}),
        "long": encode_video(d / "long.mp4", "libx264", seconds=30.0, fps=10, gop=10),
        "onekey": encode_video(d / "onekey.mp4", "libx264", seconds=30.0, fps=10, gop=1000),
        "irregular": encode_video(d / "irregular.mp4", "libx264", seconds=30.0, fps=10, gop=1000,
                                  keyframes={0, 7, 31, 90, 95, 200, 211, 280}),
        "dir": d,
    }


# ----------------------------------------------------------------------------- images

def test_probe_jpeg_png_sizes_and_exif_rotation(tmp_path):
    for w, h, fmt in ((640, 480, "JPEG"), (300, 500, "PNG"), (17, 9, "PNG"), (1200, 40, "JPEG")):
        info = probe_image(write_image(tmp_path / f"x.{fmt}", w, h, fmt).read_bytes())
        assert (info["width"], info["height"], info["format"]) == (w, h, fmt.lower())
    data = write_image(tmp_path / "rot.jpg", 120, 80, exif_orientation=6).read_bytes()
    assert (probe_image(data)["width"], probe_image(data)["height"]) == (80, 120)
    assert decode_image(data).size == (80, 120)


def test_corrupt_empty_and_bomb_images_are_rejected(tmp_path):
    good = write_image(tmp_path / "a.jpg", 200, 200).read_bytes()
    for bad in (good[: len(good) // 3], b"\xff\xd8garbage" * 10, b""):
        with pytest.raises(MediaError) as e:
            probe_image(bad)
        assert e.value.reason == "undecodable image"
    buf = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buf, "PNG")  # ~25 MP that compresses to a few KB
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(MediaError) as e:
        probe_image(buf.getvalue(), MediaLimits(max_image_pixels=1_000_000))
    assert e.value.reason == "image too large"
    assert probe_image(buf.getvalue(), MediaLimits(max_image_pixels=30_000_000))["width"] == 5000
    assert Image.MAX_IMAGE_PIXELS != 1_000_000  # the global PIL limit is restored


def test_image_to_tiles_layout_and_normalisation():
    arr = np.zeros((32, 64, 3), np.uint8)
    arr[:, 32:] = 255  # left half black, right half white; 2x1 tiles of 32 need no resampling
    img = Image.fromarray(arr)
    t = image_to_tiles(img, (2, 1), tile_size=32)
    assert t.shape == (3, 3, 32, 32) and t.dtype == torch.float32
    assert torch.allclose(t[0], torch.full_like(t[0], -1.0))  # black -> (0 - 0.5) / 0.5
    assert torch.allclose(t[1], torch.full_like(t[1], 1.0))  # white -> 1
    assert t[2, :, :, :10].mean() < -0.9 and t[2, :, :, -10:].mean() > 0.9  # thumbnail is the whole image
    assert image_to_tiles(img, (1, 1), 16).shape == (1, 3, 16, 16)
    t = image_to_tiles(img, (2, 3), 16)
    assert t.shape == (7, 3, 16, 16)
    # row-major: top-left, top-right, ...; right column is white
    assert t[1].mean() > 0.9 and t[0].mean() < -0.9 and t[3].mean() > 0.9
    f = frames_to_tiles([arr, arr], 24)
    assert f.shape == (2, 3, 24, 24) and f.min() >= -1 and f.max() <= 1


# ----------------------------------------------------------------------------- videos

@pytest.mark.parametrize("name,codec,fps,frames", [("h264", "h264", 10.0, 30), ("mpeg4", "mpeg4", 12.0, 24),
                                                   ("mkv", "mpeg4", 10.0, 30)])
def test_probe_real_videos(vids, name, codec, fps, frames):
    info = probe_video(vids[name])
    assert info["codec"] == codec and info["fps"] == pytest.approx(fps)
    assert info["frames"] == frames and info["duration"] == pytest.approx(frames / fps, abs=0.01)
    assert (info["width"], info["height"]) == (64, 48)
    assert probe_video(vids[name].read_bytes()) == info  # bytes (from a shard) probe the same


def test_bad_videos_are_classified(vids):
    d = vids["dir"]
    cases = {
        truncate(vids["fast"], 0.5, d / "cut_fast.mp4"): "truncated video",  # moov first, mdat cut
        truncate(vids["h264"], 0.6, d / "cut.mp4"): "truncated video",  # moov missing
        truncate(vids["mkv"], 0.5, d / "cut.mkv"): "truncated video",  # header intact, frames missing
        d / "empty.mp4": "zero-length video",
        d / "junk.mp4": "undecodable video",
    }
    (d / "empty.mp4").write_bytes(b"")
    (d / "junk.mp4").write_bytes(b"\x00\x01junk" * 300)
    for path, reason in cases.items():
        with pytest.raises(MediaError) as e:
            probe_video(path)
        assert e.value.reason == reason, (path, e.value)
    with pytest.raises(MediaError) as e:
        probe_video(vids["h264"], MediaLimits(max_video_seconds=2.0))
    assert e.value.reason == "video too long"
    with pytest.raises(MediaError) as e:
        probe_video(vids["h264"], MediaLimits(max_video_pixels=64 * 47))
    assert e.value.reason == "video resolution too large"


def test_playlists_cannot_pull_in_other_files(vids, tmp_path):
    m3u8 = tmp_path / "evil.m3u8"
    m3u8.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile://{vids['h264']}\n#EXT-X-ENDLIST\n")
    with pytest.raises(MediaError) as e:
        probe_video(m3u8)
    assert e.value.reason == "undecodable video"


@pytest.mark.parametrize("name", ["h264", "mpeg4", "mkv", "long"])
def test_sparse_decode_matches_full_decode(vids, name):
    full, times = decode_all_frames(vids[name])
    n = len(full)
    idx = [n - 1, 0, 5, 5, n // 2, n // 2 + 1, 7]
    frames, ts = decode_frames(vids[name], idx)
    assert len(frames) == len(idx)
    for f, i, t in zip(frames, idx, ts):
        assert np.array_equal(f, full[i]) and t == pytest.approx(times[i])
    fps = probe_video(vids[name])["fps"]
    assert ts == pytest.approx([i / fps for i in idx])
    # the decoded content is the frame encoded at that index: the green bar sits at column 3*i mod 64
    for f, i in zip(frames, idx):
        assert int(f[..., 1].astype(float).mean(0).argmax()) == int(frame_array(i, 64, 48)[..., 1].mean(0).argmax())


@pytest.mark.parametrize("name", ["long", "onekey", "irregular"])
def test_sparse_decode_random_plans_any_gop(vids, name):
    full, _ = decode_all_frames(vids[name])
    rng = np.random.default_rng(0)
    for n in (3, 12, 40):
        idx = sorted(rng.choice(len(full), n, replace=False).tolist())
        frames, _ = decode_frames(vids[name], idx)
        assert all(np.array_equal(f, full[i]) for f, i in zip(frames, idx)), (name, idx)


def test_sparse_decode_does_not_decode_every_frame(vids, monkeypatch):
    calls = []
    real = video_mod._frame_seconds
    monkeypatch.setattr(video_mod, "_frame_seconds", lambda *a: calls.append(1) or real(*a))
    decode_frames(vids["long"], [10, 150, 290])  # 300 frames, keyframe every 10
    assert 3 <= len(calls) <= 40
    calls.clear()
    decode_all_frames(vids["long"])
    assert len(calls) == 300


def test_decode_past_the_end_and_to_tiles(vids):
    frames, ts = decode_frames(vids["h264"], [29, 500])
    assert np.array_equal(frames[0], frames[1]) and ts[0] == ts[1] == pytest.approx(2.9)
    x, t = video_to_tiles(vids["mpeg4"], [0, 12, 23], tile_size=28)
    assert x.shape == (3, 3, 28, 28) and x.min() >= -1 and x.max() <= 1
    assert t == pytest.approx([0.0, 1.0, 23 / 12])
    assert decode_frames(vids["h264"], []) == ([], [])
