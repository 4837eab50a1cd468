"""One planned pack -> one model-ready micro-batch (:class:`LoaderBatch`, a ``PackedBatch``).

For every sub-sample of the pack (``(dataset, index)`` rows of the plan):

1. read its index record (random access, :mod:`.sources`) and run ADS at the stage length: the
   same pure function the planner ran, so frames and tile grids are exactly the planned ones;
2. read the sample JSON and, on stages that embed images, its media members from the shard, and
   decode: images -> IAP tiles (+ thumbnail), videos -> the planned frames (sparse seeking);
3. tokenize with the chat template (labels only on assistant turns), media expanded to
   ``<img>`` + tiles x tokens_per_tile ``<IMG_CONTEXT>`` + ``</img>``;
4. with CP > 1 pad the sub-sample to a multiple of 2*CP (pad id, ignored labels), so cu_seqlens
   are ready for the zigzag split.

Then ``pack_samples`` shifts labels, pads the tail (to ``pad_to_multiple`` = lcm(TP if SP, 2*CP),
or to exactly L with ``fixed_length``) as its own segment, and computes loss weights.

Bad data never crashes training: a sub-sample that fails to read, decode or tokenize is logged
(dataset, shard, key, error), left out of the pack and counted; the failure is a function of
the data, so a resumed run leaves out the same sub-samples. A pack whose sub-samples all failed
becomes a single padding segment with zero loss weight. I/O errors are retried first.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch

from megatron_eagle.config import ConfigError, ModelConfig, ParallelConfig
from megatron_eagle.data.ads import ImagePlan, VideoPlan, plan_sample
from megatron_eagle.data.media import IMAGE_MEAN, IMAGE_STD, decode_image, normalize
from megatron_eagle.data.prompt import IGNORE_INDEX, tokenize_conversation
from megatron_eagle.data.sources import DataSource
from megatron_eagle.data.video import decode_frames
from megatron_eagle.models.batch import PackedBatch, pack_samples

log = logging.getLogger("megatron_eagle.loader")
PixelDType = Literal["float32", "uint8"]


@dataclasses.dataclass
class LoaderBatch(PackedBatch):
    """A PackedBatch plus where its tiles go and which samples it holds (all tensors, so ``to`` moves them).

    ``pixel_values`` is float32 normalised (model-ready) or, with ``pixel_dtype="uint8"``, raw
    RGB bytes (4x less to move); call :func:`normalize_pixels` on the device then.
    """

    tile_positions: torch.Tensor = None  # [n_tiles] int64: token index of each tile's first <IMG_CONTEXT>
    sample_ids: torch.Tensor = None  # [n_sub, 2] int64: (dataset, index in dataset) of each packed sub-sample

    @property
    def num_samples(self) -> int:
        return int(self.sample_ids.shape[0])

    def pin_memory(self) -> "LoaderBatch":
        """Page-locked copy (DataLoader ``pin_memory=True`` calls this) for async host-to-device copies."""
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).pin_memory()
                                            for f in dataclasses.fields(self) if f.name != "max_seqlen"})


def normalize_pixels(batch: PackedBatch, dtype: torch.dtype = torch.float32) -> PackedBatch:
    """uint8 pixel values -> the normalised floats the ViT expects (bit-identical to the float32 path).
    Run it after moving the batch to the GPU: 4x fewer bytes travel."""
    if batch.pixel_values.dtype != torch.uint8:
        return batch
    return dataclasses.replace(batch, pixel_values=normalize(batch.pixel_values).to(dtype))


@dataclass(frozen=True)
class PackConfig:
    """How packs are built for one stage and layout."""

    seq_len: int
    tokens_per_tile: int
    tile_size: int
    image_token_id: int
    pad_id: int
    cp: int = 1
    pad_to_multiple: int = 1
    weighting: Literal["sqrt", "token"] = "sqrt"
    decode_media: bool = True  # False on pipeline stages that never embed images
    pixel_dtype: PixelDType = "float32"
    fixed_length: bool = False  # pad every pack to exactly seq_len (static shapes, e.g. for PP p2p)
    read_retries: int = 2  # extra attempts on OSError (transient storage errors) before a sample counts as bad
    decode_threads: int = 1  # ffmpeg threads per video decode; parallelism comes from the loader's workers

    def validate(self) -> None:
        if self.seq_len % self.pad_to_multiple:
            raise ConfigError("seq_len", f"{self.seq_len} is not a multiple of the pack padding {self.pad_to_multiple}",
                              "use a seq_len divisible by lcm(tp if sequence parallel, 2*cp)")
        if self.pixel_dtype not in ("float32", "uint8"):
            raise ConfigError("pixel_dtype", f"unknown {self.pixel_dtype!r}", "use float32 or uint8")


def pack_padding(parallel: ParallelConfig) -> int:
    """Pack lengths must divide by TP under sequence parallelism; with CP by 2*CP (zigzag split) and
    each CP rank's share (length / CP) by TP under SP, i.e. by CP * lcm(2, TP)."""
    a = parallel.tp if parallel.sp else 1
    if parallel.cp > 1:
        return parallel.cp * (2 * a // math.gcd(2, a))
    return a


def pack_config(model: ModelConfig, parallel: ParallelConfig, seq_len: int, tokenizer, **kw: Any) -> PackConfig:
    """A PackConfig from the model (tile geometry), layout (padding) and tokenizer (image / pad ids)."""
    from megatron_eagle.tokenizer import special_token_ids

    img = special_token_ids(tokenizer)["img_context"]
    if img != model.image_token_id:
        raise ConfigError("model.image_token_id",
                          f"is {model.image_token_id} but the tokenizer's <IMG_CONTEXT> is {img}",
                          f"set model.image_token_id = {img} (the trainer should take it from the tokenizer)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    cfg = PackConfig(seq_len, model.tokens_per_tile, model.vision.image_size, img, pad, cp=parallel.cp,
                     pad_to_multiple=pack_padding(parallel), **kw)
    cfg.validate()
    return cfg


@dataclass
class PackInfo:
    """What happened while building one pack (returned next to the batch)."""

    errors: list[str] = dataclasses.field(default_factory=list)
    frames: int = 0  # video frames decoded
    tiles: int = 0  # tiles + frames handed to the ViT
    real_tokens: int = 0  # tokens of sub-samples, CP padding excluded
    build_s: float = 0.0


class SampleError(Exception):
    """A sub-sample that cannot be used; the message names dataset, shard and key."""


class PackBuilder:
    """Builds LoaderBatches from plan rows. Picklable; readers and files open lazily per process."""

    def __init__(self, sources: Sequence[DataSource], tokenizer, cfg: PackConfig):
        cfg.validate()
        self.sources = list(sources)
        self.tok = tokenizer
        self.cfg = cfg

    # -- one sub-sample --------------------------------------------------------------
    def _read(self, fn, what: str):
        for attempt in range(self.cfg.read_retries + 1):
            try:
                return fn()
            except OSError as e:
                if attempt == self.cfg.read_retries:
                    raise SampleError(f"{what}: {type(e).__name__}: {e}") from None
                time.sleep(0.05 * 2 ** attempt)

    def sample(self, ds: int, idx: int, info: PackInfo) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(input_ids, labels unshifted, tiles per medium) of one sub-sample, CP-padded."""
        src, c = self.sources[ds], self.cfg
        rec = self._read(lambda: src.index[idx], f"{src.name}: index record {idx}")
        where = f"{src.name}: {rec.get('shard')}:{rec.get('key')}"
        res = plan_sample(rec, c.seq_len, src.ads)
        if res.plan is None:
            raise SampleError(f"{where}: ADS drops it at {c.seq_len} ({res.drop_reason}); was it planned with "
                              "another model config?")
        reader = src.reader()
        sample = self._read(lambda: reader.read_json(rec), f"{where}.json")
        tiles: list[torch.Tensor] = []
        n_tiles = 0
        for i, mp in enumerate(res.plan.media):
            n_tiles += mp.num_tiles if isinstance(mp, ImagePlan) else mp.num_frames
            if not c.decode_media:
                continue
            member = rec["media"][i]["member"]
            data = self._read(lambda: reader.read_media(rec, i), f"{where}.{member}")
            try:
                tiles.append(self._decode(data, mp, info))
            except Exception as e:  # any decoder failure is bad data, not a crash
                raise SampleError(f"{where}.{member}: cannot decode: {type(e).__name__}: {e}") from None
        try:
            ids, labels = tokenize_conversation(self.tok, sample["conversations"], res.plan.media, c.tokens_per_tile)
        except Exception as e:
            raise SampleError(f"{where}: cannot tokenize: {type(e).__name__}: {e}") from None
        n_ctx = sum(1 for t in ids if t == c.image_token_id)
        if n_ctx != n_tiles * c.tokens_per_tile:
            raise SampleError(f"{where}: {n_ctx} <IMG_CONTEXT> tokens for {n_tiles} tiles")
        if len(ids) > res.plan.num_tokens:
            raise SampleError(f"{where}: {len(ids)} tokens but ADS planned at most {res.plan.num_tokens}; "
                              "the tokenizer differs from the one used by prepare")
        info.real_tokens += len(ids)
        info.tiles += n_tiles
        if c.cp > 1:
            pad = (-len(ids)) % (2 * c.cp)
            ids = ids + [c.pad_id] * pad
            labels = labels + [IGNORE_INDEX] * pad
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long), tiles

    def _decode(self, data: bytes, mp, info: PackInfo) -> torch.Tensor:
        """Encoded medium -> uint8 tiles [n, 3, S, S] (normalised once per pack, in :meth:`build`)."""
        s = self.cfg.tile_size
        if isinstance(mp, VideoPlan):
            frames, _ = decode_frames(io.BytesIO(data), mp.frame_indices, size=(s, s), threads=self.cfg.decode_threads)
            info.frames += len(frames)
            out = torch.empty((len(frames), 3, s, s), dtype=torch.uint8)
            for i, f in enumerate(frames):
                out[i].copy_(torch.from_numpy(f).permute(2, 0, 1))
            return out
        return image_tiles_uint8(decode_image(data), mp.grid, s)

    # -- one pack ----------------------------------------------------------------------
    def build(self, rows: Sequence[tuple[int, int]]) -> tuple[LoaderBatch, PackInfo]:
        """The micro-batch of one pack; ``rows`` are its (dataset, index) sub-samples in plan order."""
        t0 = time.perf_counter()
        c = self.cfg
        info = PackInfo()
        subs: list[tuple[torch.Tensor, torch.Tensor]] = []
        pixels: list[torch.Tensor] = []
        kept: list[tuple[int, int]] = []
        used = 0
        for ds, idx in rows:
            try:
                ids, labels, tiles = self.sample(int(ds), int(idx), info)
            except SampleError as e:
                info.errors.append(str(e))
                log.warning("loader: skipping a sample: %s", e)
                continue
            if used + ids.numel() > c.seq_len:  # cannot happen with a plan made for this config; never exceed L
                msg = f"{self.sources[ds].name}: sample {idx} would make the pack exceed {c.seq_len} tokens"
                info.errors.append(msg)
                log.warning("loader: skipping a sample: %s", msg)
                continue
            used += ids.numel()
            subs.append((ids, labels))
            pixels.extend(tiles)
            kept.append((int(ds), int(idx)))
        if not subs:  # every sub-sample failed: one all-padding segment, zero loss weight
            n = c.seq_len if c.fixed_length else max(c.pad_to_multiple, 2 * c.cp if c.cp > 1 else 1)
            subs.append((torch.full((n,), c.pad_id, dtype=torch.long),
                         torch.full((n,), IGNORE_INDEX, dtype=torch.long)))
        pad_to = c.seq_len if c.fixed_length else c.pad_to_multiple
        shape = (3, c.tile_size, c.tile_size)
        pb = pack_samples(subs, [], shape, pad_to_multiple=pad_to, pad_id=c.pad_id, weighting=c.weighting)
        pv = assemble_pixels(pixels, shape, c.pixel_dtype)
        ctx = torch.nonzero(pb.tokens == c.image_token_id).squeeze(1)
        batch = LoaderBatch(tokens=pb.tokens, labels=pb.labels, loss_weights=pb.loss_weights,
                            position_ids=pb.position_ids, cu_seqlens=pb.cu_seqlens, pixel_values=pv,
                            max_seqlen=pb.max_seqlen, tile_positions=ctx[::c.tokens_per_tile].contiguous(),
                            sample_ids=torch.tensor(kept, dtype=torch.long).reshape(-1, 2))
        info.build_s = time.perf_counter() - t0
        return batch, info


def image_tiles_uint8(pil_image, grid: tuple[int, int], tile_size: int) -> torch.Tensor:
    """:func:`megatron_eagle.data.media.image_to_tiles` before normalisation: uint8 [n, 3, S, S].

    Same resize (bicubic to cols*S x rows*S), row-major tiles and thumbnail, but the tiles are cut
    as one strided copy of the resized array (tests check equality with ``image_to_tiles``)."""
    from PIL import Image

    cols, rows = grid
    s = tile_size
    img = pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")
    big = np.array(img.resize((cols * s, rows * s), Image.BICUBIC), dtype=np.uint8)
    n = cols * rows + (1 if cols * rows > 1 else 0)
    out = torch.empty((n, 3, s, s), dtype=torch.uint8)
    grid_view = torch.from_numpy(big).view(rows, s, cols, s, 3).permute(0, 2, 4, 1, 3)  # r, c, ch, y, x
    out[:cols * rows].view(rows, cols, 3, s, s).copy_(grid_view)
    if n > cols * rows:
        thumb = np.array(img.resize((s, s), Image.BICUBIC), dtype=np.uint8)
        out[-1].copy_(torch.from_numpy(thumb).permute(2, 0, 1))
    return out


def _empty_for_ipc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """In a DataLoader worker, allocate straight in shared memory: sending the tensor to the main
    process is then a file-descriptor handoff instead of a copy into a fresh shared segment."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_shared(max(nbytes, 1)), 0, shape)


def assemble_pixels(chunks: Sequence[torch.Tensor], shape: tuple[int, int, int], dtype: PixelDType) -> torch.Tensor:
    """Concatenate uint8 tiles; for float32, into one buffer normalised in place with the very
    operations of ``media.normalize`` (bit-identical, without its full-size temporaries)."""
    n = sum(int(t.shape[0]) for t in chunks)
    out = _empty_for_ipc((n, *shape), torch.uint8 if dtype == "uint8" else torch.float32)
    i = 0
    for t in chunks:
        out[i:i + t.shape[0]].copy_(t)
        i += t.shape[0]
    if dtype != "uint8" and n:
        out.div_(255.0).sub_(IMAGE_MEAN[0]).div_(IMAGE_STD[0])
    return out


def check_batch(batch: LoaderBatch, cfg: PackConfig) -> None:
    """Invariants the model relies on; raises AssertionError (used by tests and the benchmark)."""
    T = batch.num_tokens
    assert T <= cfg.seq_len and T % cfg.pad_to_multiple == 0, (T, cfg.seq_len, cfg.pad_to_multiple)
    assert int(batch.cu_seqlens[-1]) == T and batch.cu_seqlens.dtype == torch.int32
    n_ctx = int((batch.tokens == cfg.image_token_id).sum())
    assert batch.tile_positions.numel() * cfg.tokens_per_tile == n_ctx
    if cfg.decode_media:
        assert batch.pixel_values.shape[0] * cfg.tokens_per_tile == n_ctx
    if cfg.cp > 1:
        assert bool((torch.diff(batch.cu_seqlens) % (2 * cfg.cp) == 0).all())


def rows_of(dataset: Sequence[int], index: Sequence[int]) -> list[tuple[int, int]]:
    return [(int(d), int(i)) for d, i in zip(dataset, index)]


__all__ = ["LoaderBatch", "PackBuilder", "PackConfig", "PackInfo", "SampleError", "check_batch", "normalize_pixels",
           "pack_config", "pack_padding", "rows_of"]
