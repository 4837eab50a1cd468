"""Videos with PyAV: metadata probing (prepare) and sparse frame decoding (training).

Probing reads container metadata and decodes only the first frame and the frames after the last
keyframe, which catches undecodable and truncated files without decoding the whole video.
Training decodes exactly the planned frames: seek to the keyframe before a target, decode
forward to it, and only seek again when the next target is far ahead.
"""

from __future__ import annotations

import contextlib
import io
import os
import struct
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Optional, Sequence, Union

from megatron_eagle.data.media.image import MediaError, MediaLimits

VideoSource = Union[str, Path, bytes, BinaryIO]
# Member extension per demuxer (PyAV's format names are comma lists; the first match wins).
VIDEO_EXT = {"mov": "mp4", "mp4": "mp4", "matroska": "mkv", "webm": "webm", "avi": "avi",
             "mpegts": "ts", "flv": "flv", "mpeg": "mpg", "ogg": "ogv", "gif": "gif"}
_MP4_BRANDS = (b"ftyp",)
ALLOWED_DEMUXERS = {"mov", "mp4", "matroska", "webm", "avi", "mpegts", "flv", "mpeg", "ogg"}


def _quiet_av() -> Any:
    import av

    av.logging.set_level(av.logging.PANIC)  # corrupt inputs are expected; errors surface as exceptions
    return av


@contextlib.contextmanager
def _open(source: VideoSource) -> Iterator[Any]:
    """Open through a Python file object with no ffmpeg protocols allowed, so a playlist-like
    input (HLS, concat) cannot make the demuxer read other files or URLs; then allow-list the demuxer."""
    av = _quiet_av()
    own = None
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    elif isinstance(source, (str, Path)):
        source = own = open(source, "rb")
    try:
        container = av.open(source, mode="r", options={"protocol_whitelist": "fd"})
        try:
            names = set(container.format.name.split(","))
            if not names & ALLOWED_DEMUXERS:
                raise MediaError("undecodable video", f"container format {container.format.name!r} is not allowed")
            yield container
        finally:
            container.close()
    finally:
        if own is not None:
            own.close()


def _mp4_truncated(head: bytes, size: int, f: BinaryIO) -> Optional[str]:
    """For ISO-BMFF files, walk the top-level boxes: a box running past EOF or no ``moov`` means the
    file was cut short (a download or copy that stopped early)."""
    if len(head) < 8 or head[4:8] not in _MP4_BRANDS:
        return None
    pos, seen_moov = 0, False
    while pos + 8 <= size:
        f.seek(pos)
        hdr = f.read(16)
        box_size, box_type = struct.unpack(">I4s", hdr[:8])
        if box_size == 1 and len(hdr) >= 16:
            box_size = struct.unpack(">Q", hdr[8:16])[0]
        elif box_size == 0:
            box_size = size - pos  # extends to end of file
        if box_size < 8:
            return f"bad box size at byte {pos}"
        if pos + box_size > size:
            return f"box {box_type!r} ends at byte {pos + box_size} but the file has {size}"
        seen_moov |= box_type == b"moov"
        pos += box_size
    return None if seen_moov else "no moov box"


def _source_size_and_check(source: VideoSource) -> tuple[int, Optional[str]]:
    if isinstance(source, (str, Path)):
        size = os.path.getsize(source)
        with open(source, "rb") as f:
            return size, _mp4_truncated(f.read(8), size, f) if size else None
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return len(data), _mp4_truncated(data[:8], len(data), io.BytesIO(data)) if data else None
    pos = source.tell()
    source.seek(0, os.SEEK_END)
    size = source.tell() - pos
    source.seek(pos)
    head = source.read(8)
    source.seek(pos)
    return size, None if size == 0 else _mp4_truncated(head, size, source)


def _rate(stream) -> Optional[Fraction]:
    for r in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if r:
            return Fraction(r)
    return None


def _start_seconds(stream) -> float:
    return float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0


def _frame_seconds(frame, stream, start: float) -> Optional[float]:
    t = frame.time  # float computed by PyAV; Fraction arithmetic per frame would dominate forward decoding
    return None if t is None else t - start


def _demux_duration(container, stream, start: float) -> float:
    # No duration in the headers: read packet timestamps (demux only, nothing is decoded).
    last = 0.0
    for pkt in container.demux(stream):
        if pkt.pts is not None:
            last = max(last, float((pkt.pts + (pkt.duration or 0)) * stream.time_base) - start)
    container.seek(0)
    return last


def probe_video(source: VideoSource, limits: MediaLimits = MediaLimits()) -> dict[str, Any]:
    """Container metadata of a video: duration (s), fps, frames, width, height, codec, format.

    Raises MediaError with reason "zero-length video", "truncated video", "undecodable video",
    "video too long" or "video resolution too large".
    """
    size, cut = _source_size_and_check(source)
    if size == 0:
        raise MediaError("zero-length video", "empty file")
    if cut:
        raise MediaError("truncated video", cut)
    try:
        with _open(source) as container:
            return _probe_open(container, limits)
    except MediaError:
        raise
    except Exception as e:
        raise MediaError("undecodable video", f"{type(e).__name__}: {e}") from None


def _probe_open(container, limits: MediaLimits) -> dict[str, Any]:
    if not container.streams.video:
        raise MediaError("undecodable video", "no video stream")
    vs = container.streams.video[0]
    cc = vs.codec_context
    width, height = int(cc.width or 0), int(cc.height or 0)
    if width <= 0 or height <= 0:
        raise MediaError("undecodable video", f"frame size {width}x{height}")
    if width * height > limits.max_video_pixels:
        raise MediaError("video resolution too large", f"{width}x{height} exceeds {limits.max_video_pixels} pixels")
    start = _start_seconds(vs)
    if vs.duration:
        duration = float(vs.duration * vs.time_base)
    elif container.duration:
        duration = container.duration / 1_000_000.0 - max(0.0, start - (container.start_time or 0) / 1e6)
    else:
        duration = _demux_duration(container, vs, start)
    if duration > limits.max_video_seconds:
        raise MediaError("video too long", f"{duration:.1f} s exceeds {limits.max_video_seconds:.0f} s")
    rate = _rate(vs)
    frames = int(vs.frames or 0)
    if rate is None and frames and duration > 0:
        rate = Fraction(frames / duration).limit_denominator(1001)
    if duration <= 0 or rate is None or rate <= 0:
        raise MediaError("zero-length video", f"duration {duration:.3f} s")
    if not frames:
        frames = max(1, round(duration * float(rate)))
    _check_decodes(container, vs, start, duration, float(rate))
    codec = cc.name
    fmt = container.format.name.split(",")[0]
    return {"duration": round(duration, 6), "fps": float(rate), "frames": frames, "width": width,
            "height": height, "codec": codec, "format": fmt}


def _check_decodes(container, vs, start: float, duration: float, fps: float) -> None:
    """Decode the first frame, then seek near the end and decode to EOF: the last frame must be close
    to the declared duration, else the file is truncated."""
    try:
        first = next(iter(container.decode(vs)), None)
    except Exception as e:
        raise MediaError("undecodable video", f"first frame: {type(e).__name__}: {e}") from None
    if first is None:
        raise MediaError("undecodable video", "no frame decodes")
    tol = max(0.5, 3.0 / fps, 0.02 * duration)
    target = max(0.0, duration - tol)
    last = _frame_seconds(first, vs, start) or 0.0
    try:
        container.seek(int((target + start) / vs.time_base), stream=vs, backward=True, any_frame=False)
        for fr in container.decode(vs):
            t = _frame_seconds(fr, vs, start)
            if t is not None:
                last = max(last, t)
    except Exception as e:
        raise MediaError("truncated video", f"decoding stopped after {last:.2f} s: {type(e).__name__}") from None
    if last + 1.0 / fps < duration - tol:
        raise MediaError("truncated video", f"last frame at {last:.2f} s of {duration:.2f} s")


def video_ext(fmt: str) -> str:
    """Member extension for a probed container format."""
    return VIDEO_EXT.get(fmt, "video")


def _should_seek(t: float, cur: float, last_key: Optional[float], spacing: Optional[float], no_key: float,
                 threshold: float, fps: float) -> bool:
    """Seek only when a keyframe is expected in (cur, t]: after the last keyframe plus the learned spacing
    when the keyframes look regular, else when the gap exceeds the threshold / the known keyframe-free span."""
    if t - cur <= 2.0 / fps:
        return False
    gap = max(threshold if spacing is None else spacing, no_key)
    if spacing is not None and last_key is not None and last_key + gap > cur:
        return last_key + gap <= t + 0.5 / fps
    return t - cur > gap


def _rgb_format(size: Optional[tuple[int, int]]) -> dict[str, Any]:
    """``VideoFrame.to_ndarray`` arguments: RGB24, resized by swscale to ``size=(w, h)`` if given."""
    kw: dict[str, Any] = {"format": "rgb24"}
    if size is not None:
        kw.update(width=size[0], height=size[1], interpolation="BICUBIC")
    return kw


def _video_stream(container: Any, threads: int) -> Any:
    """The first video stream, with frame-and-slice threading over ``threads`` when > 0."""
    vs = container.streams.video[0]
    if threads:
        vs.thread_type, vs.thread_count = "AUTO", threads
    return vs


def decode_frames(source: VideoSource, frame_indices: Sequence[int], size: Optional[tuple[int, int]] = None,
                  seek_threshold_s: float = 2.0, threads: int = 0) -> tuple[list[Any], list[float]]:
    """Decode exactly the frames ``frame_indices`` (index = time x fps); returns RGB HWC uint8 arrays in
    the order asked (duplicates allowed) and each frame's time in seconds from the video start.

    Seeks to the keyframe before a target and decodes forward. A seek only pays off when a keyframe
    lies between the current position and the target, so otherwise the target is reached by decoding
    forward; keyframe spacing is learned from the keyframes decoded (``seek_threshold_s`` until then). ``size=(w, h)`` resizes with swscale during colour conversion.
    """
    if not len(frame_indices):
        return [], []
    kw = _rgb_format(size)
    with _open(source) as container:
        vs = _video_stream(container, threads)
        rate = _rate(vs)
        if rate is None:
            raise MediaError("undecodable video", "unknown frame rate")
        fps, start = float(rate), _start_seconds(vs)
        half = 0.5 / fps
        picked: dict[int, tuple[Any, float]] = {}
        it, cur, last, last_key = None, float("-inf"), None, None
        spacing: Optional[float] = None  # largest spacing of two keyframes decoded in one run
        no_key = 0.0  # longest stretch known to hold no keyframe (from where seeks landed)
        for idx in sorted(set(int(i) for i in frame_indices)):
            t = idx / fps
            if it is None or _should_seek(t, cur, last_key, spacing, no_key, seek_threshold_s, fps):
                container.seek(int((max(0.0, t) + start) / vs.time_base), stream=vs, backward=True, any_frame=False)
                it, last_key, landed = container.decode(vs), None, None
            else:
                landed = cur
            got = None
            for fr in it:
                ft = _frame_seconds(fr, vs, start)
                ft = cur + 1.0 / fps if ft is None else ft
                if landed is None:  # first frame after a seek: no keyframe lies in (ft, t]
                    landed = ft
                    no_key = max(no_key, t - ft)
                if fr.key_frame:
                    if last_key is not None:
                        spacing = max(spacing or 0.0, ft - last_key)
                    last_key = ft
                cur, last = ft, (fr, ft)
                if ft >= t - half:
                    got = (fr.to_ndarray(**kw), ft)  # convert now so decoder buffers are recycled
                    break
            if got is None:  # asked past the last frame: the last decoded frame stands in
                if last is None:
                    raise MediaError("undecodable video", f"no frame at or after index {idx}")
                got = (last[0].to_ndarray(**kw), last[1])
            picked[idx] = got
    out = [picked[int(i)] for i in frame_indices]
    return [a for a, _ in out], [round(t, 6) for _, t in out]


def decode_all_frames(source: VideoSource, size: Optional[tuple[int, int]] = None,
                      keep: Optional[set[int]] = None, threads: int = 0) -> tuple[list[Any], list[float]]:
    """Decode every frame in order (the baseline); converts to RGB only the frames whose ordinal is in ``keep``."""
    frames, times = [], []
    with _open(source) as container:
        vs = _video_stream(container, threads)
        start = _start_seconds(vs)
        kw = _rgb_format(size)
        for n, fr in enumerate(container.decode(vs)):
            if keep is None or n in keep:
                frames.append(fr.to_ndarray(**kw))
                times.append(round(_frame_seconds(fr, vs, start) or 0.0, 6))
    return frames, times


def video_to_tiles(source: VideoSource, frame_indices: Sequence[int], tile_size: int):
    """Planned frames as normalised tiles [n, 3, S, S] plus their times (seconds from video start)."""
    import numpy as np
    import torch

    from megatron_eagle.pixels import normalize

    frames, times = decode_frames(source, frame_indices, size=(tile_size, tile_size))
    if not frames:
        return torch.zeros(0, 3, tile_size, tile_size), times
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
    return normalize(x), times
