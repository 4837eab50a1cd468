"""One planned pack -> one model-ready micro-batch (:class:`LoaderBatch`, a ``PackedBatch``).

A pack is built in two passes over its sub-samples (``(dataset, index)`` rows of the plan):

1. the token side, identical on every rank of a replica: read the index record and run ADS at
   the stage length (the same pure function the planner ran, so frames and tile grids are
   exactly the planned ones and every tile count is known before anything is decoded), read
   the sample JSON, tokenize with the chat template (labels only on assistant turns, media
   expanded to ``<img>`` + tiles x tokens_per_tile ``<IMG_CONTEXT>`` + ``</img>``) and, with
   CP > 1, pad to a multiple of 2*CP so cu_seqlens are ready for the zigzag split;
2. the pixels, on stages that embed images: only the pack tiles this rank encodes, i.e. with
   ``cp_rank`` set its contiguous share ``tile_shares(n_tiles, cp)[cp_rank]`` (the share
   ``encode_and_route`` encodes), else all of them. Only the media overlapping that range are
   read, and of a video only the frames in it are decoded.

Then ``pack_samples`` shifts labels, pads the tail (to ``pad_to_multiple`` = lcm(TP if SP, 2*CP),
or to exactly L with ``fixed_length``) as its own segment, and computes loss weights.

Bad data never crashes training. A sub-sample whose token side fails (read, parse, tokenize)
is left out of the pack; one whose medium fails to read or decode stays in the pack *blanked*
(zero loss weight, blank tiles), so the token side never depends on which tiles a rank decoded.
Both are logged (dataset, shard, key, error), counted and recorded per plan row in
``row_status``; the training step agrees on the union over the replica's ranks
(:mod:`megatron_eagle.training.agreement`). I/O errors are retried first. The failure is a
function of the data, so a resumed run leaves out the same sub-samples. A pack whose
sub-samples all failed becomes a single padding segment with zero loss weight.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch

from megatron_eagle.batch import PackedBatch, loss_weights_for, pack_samples
from megatron_eagle.config import ConfigError, ModelConfig, ParallelConfig
from megatron_eagle.data.loading.sources import DataSource
from megatron_eagle.data.media.ads import ImagePlan, MediaPlan, VideoPlan, plan_sample
from megatron_eagle.data.media.image import decode_image
from megatron_eagle.data.media.prompt import IGNORE_INDEX, tokenize_conversation
from megatron_eagle.data.media.video import decode_frames
from megatron_eagle.parallel.vision_cp import tile_shares
from megatron_eagle.pixels import IMAGE_MEAN, IMAGE_STD

log = logging.getLogger("megatron_eagle.loader")
PixelDType = Literal["float32", "uint8"]

# row_status values, per plan row of a pack
ROW_USED = 0  # in the pack
ROW_BLANKED = 1  # in the pack with zero loss weight and blank tiles (a medium failed)
ROW_LEFT_OUT = 2  # not in the pack (its token side failed)
BLANK_FLOAT = (0.0 / 255.0 - IMAGE_MEAN[0]) / IMAGE_STD[0]  # a blank (uint8 0) pixel, normalised


@dataclasses.dataclass
class LoaderBatch(PackedBatch):
    """A PackedBatch plus where its tiles go, which samples it holds and which of the pack's tiles it carries.

    ``pixel_values`` is float32 normalised (model-ready) or, with ``pixel_dtype="uint8"``, raw
    RGB bytes (4x less to move), which the ViT normalises on the device. It holds pack
    tiles ``[tile_offset, tile_offset + len)`` of ``pack_tiles``: with CP > 1 this CP rank's share,
    which ``encode_and_route`` encodes without slicing again (``pack_tiles=None``: the whole pack).
    """

    tile_positions: torch.Tensor = None  # [n_tiles] int64: token index of each pack tile's first <IMG_CONTEXT>
    sample_ids: torch.Tensor = None  # [n_sub, 2] int64: (dataset, index in dataset) of each segment's sub-sample
    row_status: Optional[torch.Tensor] = None  # [n_rows] int64 per plan row: ROW_USED / ROW_BLANKED / ROW_LEFT_OUT
    tile_offset: int = 0  # pack index of pixel_values[0]
    pack_tiles: Optional[int] = None  # tiles of the whole pack; None: pixel_values holds them all

    @property
    def num_samples(self) -> int:
        """Segments holding a sub-sample (blanked ones included; tail padding excluded)."""
        return int(self.sample_ids.shape[0])

    @property
    def total_tiles(self) -> int:
        """Tiles of the whole pack, whichever share of them this batch carries."""
        return int(self.pixel_values.shape[0]) if self.pack_tiles is None else int(self.pack_tiles)

    def statuses(self) -> torch.Tensor:
        """``row_status``, or every segment ROW_USED for a batch built without one."""
        if self.row_status is not None:
            return self.row_status
        return torch.zeros(self.num_samples, dtype=torch.int64, device=self.tokens.device)

    def pin_memory(self) -> "LoaderBatch":
        """Page-locked copy (DataLoader ``pin_memory=True`` calls this) for async host-to-device copies."""
        return dataclasses.replace(self, **{k: v.pin_memory() for k, v in self._tensors().items()})


def pack_tile_count(batch: PackedBatch) -> int:
    """Tiles of the whole pack (a LoaderBatch may carry only this CP rank's share of them)."""
    return batch.total_tiles if isinstance(batch, LoaderBatch) else int(batch.pixel_values.shape[0])


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
    # With cp > 1: this rank's CP rank; only its share of the pack's tiles is decoded. None: every tile
    # (tools and benchmarks that want whole packs; encode_and_route slices those itself).
    cp_rank: Optional[int] = None

    def validate(self) -> None:
        if self.seq_len % self.pad_to_multiple:
            raise ConfigError("seq_len", f"{self.seq_len} is not a multiple of the pack padding {self.pad_to_multiple}",
                              "use a seq_len divisible by lcm(tp if sequence parallel, 2*cp)")
        if self.pixel_dtype not in ("float32", "uint8"):
            raise ConfigError("pixel_dtype", f"unknown {self.pixel_dtype!r}", "use float32 or uint8")
        if self.cp_rank is not None and not 0 <= self.cp_rank < self.cp:
            raise ConfigError("cp_rank", f"{self.cp_rank} is outside cp={self.cp}",
                              "pass this rank's context-parallel rank (parallel_state.get_context_parallel_rank())")


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
    """What happened while building one pack on this rank (returned next to the batch)."""

    errors: list[str] = dataclasses.field(default_factory=list)
    frames: int = 0  # video frames this rank decoded
    tiles: int = 0  # tiles + frames of the whole pack
    share_tiles: int = 0  # tiles this rank assembled: its CP share (blank ones included; 0 without media)
    media: int = 0  # media members this rank read and decoded
    real_tokens: int = 0  # tokens of sub-samples, CP padding excluded
    build_s: float = 0.0


class SampleError(Exception):
    """A sub-sample that cannot be used; the message names dataset, shard and key."""


def media_tiles(mp: MediaPlan) -> int:
    """Tiles one planned medium feeds the ViT (image tiles + thumbnail, or video frames)."""
    return mp.num_tiles if isinstance(mp, ImagePlan) else mp.num_frames


@dataclass
class _Sub:
    """A sub-sample whose token side is built; its tiles are decoded later, as far as this rank needs them."""

    ds: int
    rec: dict[str, Any]
    where: str  # "dataset: shard:key", for messages
    media: tuple[MediaPlan, ...]
    ids: torch.Tensor
    labels: torch.Tensor  # unshifted
    n_tiles: int
    n_real: int  # tokens before CP padding


class PackBuilder:
    """Builds LoaderBatches from plan rows. Picklable; readers and files open lazily per process."""

    def __init__(self, sources: Sequence[DataSource], tokenizer, cfg: PackConfig):
        cfg.validate()
        self.sources = list(sources)
        self.tok = tokenizer
        self.cfg = cfg

    # -- one sub-sample --------------------------------------------------------------
    def _read(self, fn, what: str):
        """``fn()``, retrying OSError; any failure becomes a SampleError (bad data never crashes)."""
        for attempt in range(self.cfg.read_retries + 1):
            try:
                return fn()
            except OSError as e:
                if attempt == self.cfg.read_retries:
                    raise SampleError(f"{what}: {type(e).__name__}: {e}") from None
                time.sleep(0.05 * 2 ** attempt)
            except Exception as e:  # a corrupt record or JSON member
                raise SampleError(f"{what}: {type(e).__name__}: {e}") from None

    def describe(self, ds: int, idx: int) -> str:
        """"dataset: shard:key" of a plan row, for messages (never raises)."""
        src = self.sources[ds]
        try:
            rec = src.index[idx]
            return f"{src.name}: {rec.get('shard')}:{rec.get('key')}"
        except Exception:
            return f"{src.name}: index record {idx}"

    def tokens(self, ds: int, idx: int) -> _Sub:
        """The token side of one sub-sample (nothing decoded), CP-padded. Raises SampleError."""
        src, c = self.sources[ds], self.cfg
        rec = self._read(lambda: src.index[idx], f"{src.name}: index record {idx}")
        where = f"{src.name}: {rec.get('shard')}:{rec.get('key')}"
        res = plan_sample(rec, c.seq_len, src.ads)
        if res.plan is None:
            raise SampleError(f"{where}: ADS drops it at {c.seq_len} ({res.drop_reason}); was it planned with "
                              "another model config?")
        sample = self._read(lambda: src.reader().read_json(rec), f"{where}.json")
        n_tiles = sum(media_tiles(mp) for mp in res.plan.media)
        try:
            ids, labels = tokenize_conversation(self.tok, sample["conversations"], res.plan.media, c.tokens_per_tile,
                                                fmt=src.prompt)
        except Exception as e:
            raise SampleError(f"{where}: cannot tokenize: {type(e).__name__}: {e}") from None
        n_ctx = sum(1 for t in ids if t == c.image_token_id)
        if n_ctx != n_tiles * c.tokens_per_tile:
            raise SampleError(f"{where}: {n_ctx} <IMG_CONTEXT> tokens for {n_tiles} tiles")
        if len(ids) > res.plan.num_tokens:
            raise SampleError(f"{where}: {len(ids)} tokens but ADS planned at most {res.plan.num_tokens}; "
                              "the tokenizer differs from the one used by prepare")
        n_real = len(ids)
        if c.cp > 1:
            pad = (-len(ids)) % (2 * c.cp)
            ids = ids + [c.pad_id] * pad
            labels = labels + [IGNORE_INDEX] * pad
        return _Sub(ds, rec, where, res.plan.media, torch.tensor(ids, dtype=torch.long),
                    torch.tensor(labels, dtype=torch.long), n_tiles, n_real)

    def tiles(self, sub: _Sub, a: int, b: int, info: PackInfo) -> list[torch.Tensor]:
        """uint8 tiles [a, b) of one sub-sample (indices inside it), reading only the media in that range
        and decoding, of a video, only the frames in it. Raises SampleError."""
        reader = self.sources[sub.ds].reader()
        out: list[torch.Tensor] = []
        start = 0
        for i, mp in enumerate(sub.media):
            lo, hi = max(a - start, 0), min(b - start, media_tiles(mp))
            start += media_tiles(mp)
            if hi <= lo:
                continue
            member = sub.rec["media"][i]["member"]
            data = self._read(lambda: reader.read_media(sub.rec, i), f"{sub.where}.{member}")  # noqa: B023
            try:
                t = self._decode(data, mp, info, lo, hi)
            except Exception as e:  # any decoder failure is bad data, not a crash
                raise SampleError(f"{sub.where}.{member}: cannot decode: {type(e).__name__}: {e}") from None
            if t.shape[0] != hi - lo:  # the token side was built for the planned count
                raise SampleError(f"{sub.where}.{member}: decoded {t.shape[0]} tiles, planned {hi - lo}")
            info.media += 1
            out.append(t)
        return out

    def _decode(self, data: bytes, mp: MediaPlan, info: PackInfo, lo: int = 0, hi: Optional[int] = None
                ) -> torch.Tensor:
        """Tiles [lo, hi) of an encoded medium -> uint8 [n, 3, S, S] (normalised once per pack, in :meth:`build`)."""
        s = self.cfg.tile_size
        if isinstance(mp, VideoPlan):
            wanted = mp.frame_indices[lo:hi]
            frames, _ = decode_frames(io.BytesIO(data), wanted, size=(s, s), threads=self.cfg.decode_threads)
            info.frames += len(frames)
            out = torch.empty((len(frames), 3, s, s), dtype=torch.uint8)
            for i, f in enumerate(frames):
                out[i].copy_(torch.from_numpy(f).permute(2, 0, 1))
            return out
        return image_tiles_uint8(decode_image(data), mp.grid, s, lo, hi)

    # -- one pack ----------------------------------------------------------------------
    def share(self, n_tiles: int) -> tuple[int, int]:
        """Pack tiles [lo, hi) this rank assembles: its CP share, or every tile without ``cp_rank``."""
        c = self.cfg
        if c.cp_rank is None or c.cp == 1:
            return 0, n_tiles
        return tile_shares(n_tiles, c.cp)[c.cp_rank]

    def _reject(self, info: PackInfo, msg: str) -> None:
        info.errors.append(msg)
        log.warning("loader: bad sample: %s", msg)

    def _token_side(self, rows: Sequence[tuple[int, int]], info: PackInfo, status: list[int]) -> list[_Sub]:
        """Sub-samples whose token side builds and fits, in plan order; marks the others ROW_LEFT_OUT."""
        subs: list[_Sub] = []
        used = 0
        for r, (ds, idx) in enumerate(rows):
            try:
                sub = self.tokens(int(ds), int(idx))
            except SampleError as e:
                self._reject(info, f"{e} (left out)")
                continue
            if used + sub.ids.numel() > self.cfg.seq_len:  # cannot happen with a plan made for this config
                self._reject(info, f"{self.sources[ds].name}: sample {idx} would make the pack exceed "
                                   f"{self.cfg.seq_len} tokens (left out)")
                continue
            used += sub.ids.numel()
            subs.append(sub)
            status[r] = ROW_USED
            info.real_tokens += sub.n_real
        return subs

    def _pixels(self, subs: list[_Sub], lo: int, hi: int, info: PackInfo) -> tuple[list[torch.Tensor], set[int]]:
        """uint8 chunks of pack tiles [lo, hi) and the sub-samples (positions) blanked because a medium failed."""
        s = self.cfg.tile_size
        chunks: list[torch.Tensor] = []
        blanked: set[int] = set()
        start = 0
        for k, sub in enumerate(subs):
            a, b = max(lo, start), min(hi, start + sub.n_tiles)  # pack tiles of this sub-sample in the share
            if b > a:
                try:
                    chunks.extend(self.tiles(sub, a - start, b - start, info))
                except SampleError as e:
                    self._reject(info, f"{e} (blanked)")
                    blanked.add(k)
                    chunks.append(torch.zeros((b - a, 3, s, s), dtype=torch.uint8))
            start += sub.n_tiles
        info.share_tiles = hi - lo
        return chunks, blanked

    def build(self, rows: Sequence[tuple[int, int]]) -> tuple[LoaderBatch, PackInfo]:
        """The micro-batch of one pack; ``rows`` are its (dataset, index) sub-samples in plan order."""
        t0 = time.perf_counter()
        c = self.cfg
        info = PackInfo()
        status = [ROW_LEFT_OUT] * len(rows)
        subs = self._token_side(rows, info, status)
        n_tiles = sum(sub.n_tiles for sub in subs)
        lo, hi = self.share(n_tiles) if c.decode_media else (0, 0)
        chunks, blanked = self._pixels(subs, lo, hi, info) if c.decode_media else ([], set())
        kept = [r for r, st in enumerate(status) if st == ROW_USED]
        for k in blanked:
            status[kept[k]] = ROW_BLANKED
        seqs = [(sub.ids, torch.full_like(sub.labels, IGNORE_INDEX) if k in blanked else sub.labels)
                for k, sub in enumerate(subs)]
        if not seqs:  # every sub-sample failed: one all-padding segment, zero loss weight
            n = c.seq_len if c.fixed_length else max(c.pad_to_multiple, 2 * c.cp if c.cp > 1 else 1)
            seqs.append((torch.full((n,), c.pad_id, dtype=torch.long),
                         torch.full((n,), IGNORE_INDEX, dtype=torch.long)))
        pad_to = c.seq_len if c.fixed_length else c.pad_to_multiple
        shape = (3, c.tile_size, c.tile_size)
        pb = pack_samples(seqs, [], shape, pad_to_multiple=pad_to, pad_id=c.pad_id, weighting=c.weighting)
        ctx = torch.nonzero(pb.tokens == c.image_token_id).squeeze(1)
        info.tiles = n_tiles
        batch = LoaderBatch(tokens=pb.tokens, labels=pb.labels, loss_weights=pb.loss_weights,
                            position_ids=pb.position_ids, cu_seqlens=pb.cu_seqlens,
                            pixel_values=assemble_pixels(chunks, shape, c.pixel_dtype), max_seqlen=pb.max_seqlen,
                            tile_positions=ctx[::c.tokens_per_tile].contiguous(),
                            sample_ids=torch.tensor([rows[r] for r in kept], dtype=torch.long).reshape(-1, 2),
                            row_status=torch.tensor(status, dtype=torch.long), tile_offset=lo, pack_tiles=n_tiles)
        info.build_s = time.perf_counter() - t0
        return batch, info


def image_tiles_uint8(pil_image, grid: tuple[int, int], tile_size: int, lo: int = 0,
                      hi: Optional[int] = None) -> torch.Tensor:
    """:func:`megatron_eagle.data.media.image.image_to_tiles` before normalisation: uint8 [n, 3, S, S], or only
    its tiles [lo, hi) (a CP share; the thumbnail is resized only when wanted).

    Same resize (bicubic to cols*S x rows*S), row-major tiles and thumbnail, but the tiles are cut
    as strided copies of the resized array (tests check equality with ``image_to_tiles``)."""
    from PIL import Image

    cols, rows = grid
    s = tile_size
    n_grid = cols * rows
    hi = n_grid + (1 if n_grid > 1 else 0) if hi is None else hi
    img = pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")
    out = torch.empty((hi - lo, 3, s, s), dtype=torch.uint8)
    g_lo, g_hi = min(lo, n_grid), min(hi, n_grid)
    if g_hi > g_lo:
        big = np.array(img.resize((cols * s, rows * s), Image.BICUBIC), dtype=np.uint8)
        grid_view = torch.from_numpy(big).view(rows, s, cols, s, 3).permute(0, 2, 4, 1, 3)  # r, c, ch, y, x
        if (g_lo, g_hi) == (0, n_grid):
            out[:n_grid].view(rows, cols, 3, s, s).copy_(grid_view)
        else:
            for j, t in enumerate(range(g_lo, g_hi)):
                out[j].copy_(grid_view[t // cols, t % cols])
    if hi > n_grid:  # the thumbnail
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
    operations of ``pixels.normalize`` (bit-identical, without its full-size temporaries)."""
    n = sum(int(t.shape[0]) for t in chunks)
    out = _empty_for_ipc((n, *shape), torch.uint8 if dtype == "uint8" else torch.float32)
    i = 0
    for t in chunks:
        out[i:i + t.shape[0]].copy_(t)
        i += t.shape[0]
    if dtype != "uint8" and n:
        out.div_(255.0).sub_(IMAGE_MEAN[0]).div_(IMAGE_STD[0])
    return out


def blank_subsamples(batch: LoaderBatch, segments: Sequence[int], weighting: Literal["sqrt", "token"]
                     ) -> LoaderBatch:
    """``batch`` with the sub-samples of ``segments`` (cu_seqlens segment indices) blanked, as the loader
    blanks a sub-sample whose medium failed: labels ignored, loss weights recomputed over the others
    (exactly ``loss_weights_for``), their tiles in this batch's share blank. Returns a new batch."""
    if not len(segments):
        return batch
    cu = batch.cu_seqlens.long()
    seg = torch.as_tensor(list(segments), dtype=torch.long, device=cu.device)
    labels = batch.labels.clone()
    token_seg = torch.searchsorted(cu[1:], torch.arange(labels.numel(), device=cu.device), right=True)
    labels[torch.isin(token_seg, seg)] = IGNORE_INDEX
    weights = loss_weights_for(labels.cpu(), batch.cu_seqlens.cpu(), weighting).to(batch.loss_weights.device)
    pixels = batch.pixel_values
    n_local = int(pixels.shape[0])
    if n_local:
        pos = batch.tile_positions[batch.tile_offset:batch.tile_offset + n_local].to(cu.device)
        hit = torch.isin(torch.searchsorted(cu[1:], pos, right=True), seg).to(pixels.device)
        if bool(hit.any()):
            pixels = pixels.clone()
            pixels[hit] = 0 if pixels.dtype == torch.uint8 else BLANK_FLOAT
    status = batch.statuses().clone()
    in_pack = torch.nonzero(status != ROW_LEFT_OUT).squeeze(1)
    status[in_pack[seg.to(in_pack.device)]] = ROW_BLANKED
    return dataclasses.replace(batch, labels=labels, loss_weights=weights, pixel_values=pixels, row_status=status)


def check_batch(batch: LoaderBatch, cfg: PackConfig) -> None:
    """Invariants the model relies on; raises AssertionError (used by tests and the benchmark)."""
    T = batch.num_tokens
    assert T <= cfg.seq_len and T % cfg.pad_to_multiple == 0, (T, cfg.seq_len, cfg.pad_to_multiple)
    assert int(batch.cu_seqlens[-1]) == T and batch.cu_seqlens.dtype == torch.int32
    n_ctx = int((batch.tokens == cfg.image_token_id).sum())
    assert batch.tile_positions.numel() * cfg.tokens_per_tile == n_ctx == batch.total_tiles * cfg.tokens_per_tile
    if cfg.decode_media:
        lo, hi = tile_shares(batch.total_tiles, cfg.cp)[cfg.cp_rank] if cfg.cp_rank is not None and cfg.cp > 1 \
            else (0, batch.total_tiles)
        assert (batch.tile_offset, batch.tile_offset + batch.pixel_values.shape[0]) == (lo, hi)
    if cfg.cp > 1:
        assert bool((torch.diff(batch.cu_seqlens) % (2 * cfg.cp) == 0).all())
    status = batch.statuses()
    assert int((status != ROW_LEFT_OUT).sum()) == batch.num_samples


def rows_of(dataset: Sequence[int], index: Sequence[int]) -> list[tuple[int, int]]:
    return [(int(d), int(i)) for d, i in zip(dataset, index)]


__all__ = ["BLANK_FLOAT", "LoaderBatch", "PackBuilder", "PackConfig", "PackInfo", "ROW_BLANKED", "ROW_LEFT_OUT",
           "ROW_USED", "SampleError", "blank_subsamples", "check_batch", "pack_config",
           "pack_padding", "pack_tile_count", "rows_of"]
