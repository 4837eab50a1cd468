"""One fused AdamW pass over megatron's DistributedOptimizer shards (torch-native).

Without apex/transformer-engine megatron steps ``torch.optim.AdamW`` over hundreds of per-parameter
fp32 master tensors, then clips and copies them back to the bf16 params tensor by tensor: about
50 bytes of memory traffic per parameter in several passes. Here the master weights and both Adam
moments live in flat fp32 buffers laid out exactly like this rank's shard of each DDP bucket, so
one elementwise kernel per bucket reads the gradient straight from the grad buffer, applies the
clip coefficient, updates master weights and moments, and writes the bf16 param buffer (30 bytes
per parameter, plus a bit for its param group). On CUDA the kernel is ``torch.compile``'d (one
Triton kernel, probed against the eager expression before it is used); elsewhere it runs eagerly
with the same arithmetic.

Nothing else changes: the per-parameter master tensors and Adam state stay in the inner
optimizer (as views into the flat buffers), so checkpoints, resharding and ``reload_model_params``
see what they always saw. The buffers are bound at the first step (when torch's AdamW would create
its state); a checkpoint load replaces those tensors, and the next step binds them again. If
binding runs out of memory, megatron's own step takes over for the rest of the run.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional, Protocol

import torch


def group_bits(groups: int) -> int:
    """Bits per element of the packed group table: 1 for two groups (weights; biases and norms)."""
    return next(b for b in (1, 2, 4, 8) if groups <= 2 ** b)


def pack_groups(group_id: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 table holding ``8 // bits`` group ids per byte, lowest bits first."""
    per_byte = 8 // bits
    g = group_id.to(torch.int32)
    g = torch.cat([g, g.new_zeros((-g.numel()) % per_byte)]).view(-1, per_byte)
    shifts = torch.arange(per_byte, device=g.device, dtype=torch.int32) * bits
    return (g << shifts).sum(1).to(torch.uint8)


def packed_group_table(n: int, ranges: list, bits: int, device: torch.device,
                       chunk: int = 1 << 24) -> torch.Tensor:
    """The packed table (:func:`pack_groups`) of ``n`` elements whose groups are given as
    (start, end, group) ranges (elements outside every range: group 0), built chunk by chunk so the
    temporaries stay ~13 bytes x ``chunk`` however large the segment (a whole model's shard)."""
    per_byte = 8 // bits
    chunk -= chunk % per_byte
    out = torch.zeros(-(-n // per_byte), dtype=torch.uint8, device=device)
    ranges = sorted(ranges)
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        gid = torch.zeros(c1 - c0, dtype=torch.uint8, device=device)
        for a, b, gi in ranges:
            if b > c0 and a < c1 and gi:
                gid[max(a, c0) - c0:min(b, c1) - c0] = gi
        out[c0 // per_byte:c0 // per_byte + -(-(c1 - c0) // per_byte)] = pack_groups(gid, bits)
    return out


def adamw_update(master: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 out: Optional[torch.Tensor], groups: torch.Tensor, lr_wd: torch.Tensor, scalars: torch.Tensor,
                 beta1: float, beta2: float, eps: float, *, bits: int) -> None:
    """In place: AdamW on flat fp32 ``master``/moments from ``grad`` (any float dtype), then
    ``out`` (the bf16 params) = master. Each element's param group comes from ``groups`` (packed by
    :func:`pack_groups`: a bit per parameter for two groups, not a byte) and picks its learning rate
    ``lr_wd[0, g]`` and weight decay ``lr_wd[1, g]``; ``scalars`` = [grad scale, 1 - beta1^step,
    sqrt(1 - beta2^step)]. The order of operations is torch's single-tensor AdamW."""
    g = grad.float() * scalars[0]
    per_byte, mask = 8 // bits, (1 << bits) - 1  # Python ints: constants in the compiled kernel
    idx = torch.arange(master.shape[0], device=master.device)
    gid = (groups[idx // per_byte].to(torch.int32) >> ((idx % per_byte) * bits).to(torch.int32)) & mask
    lr = lr_wd[0][gid]
    p = master * (1.0 - lr * lr_wd[1][gid])
    m = exp_avg + (g - exp_avg) * (1.0 - beta1)
    v = exp_avg_sq * beta2 + g * g * (1.0 - beta2)
    denom = v.sqrt() / scalars[2] + eps
    p = p - (lr / scalars[1]) * (m / denom)
    master.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if out is not None:
        out.copy_(p)


_COMPILED: dict = {}  # bits -> compiled kernel (None: compiling failed, run eagerly)
EAGER_CHUNK = 1 << 24  # elements per eager call: bounds the temporaries (a segment can be a whole model)


# One entry point per table width with the width as a literal: dynamo turns ints it reads from
# arguments or closures into symbols under dynamic=True, and a symbolic shift width made inductor
# emit a float pow (a Triton compile error on H100).
def _update_1bit(*args):
    return adamw_update(*args, bits=1)


def _update_2bit(*args):
    return adamw_update(*args, bits=2)


def _update_4bit(*args):
    return adamw_update(*args, bits=4)


def _update_8bit(*args):
    return adamw_update(*args, bits=8)


_ENTRY = {1: _update_1bit, 2: _update_2bit, 4: _update_4bit, 8: _update_8bit}


def _kernel(bits: int):
    """The update compiled for one table width (dynamic in the number of elements)."""
    if bits not in _COMPILED:
        _COMPILED[bits] = torch.compile(_ENTRY[bits], dynamic=True, fullgraph=True)
    return _COMPILED[bits]


def compiled_kernel_works(device: torch.device, bits: int) -> Optional[str]:
    """Compile and run the kernel once on a small problem and compare with the eager expression;
    None if it works, else why not (then the flat step is not used: eagerly it is ~10x slower)."""
    n = 4099
    g = torch.Generator(device="cpu").manual_seed(0)
    t = [torch.randn(n, generator=g).to(device) for _ in range(4)]
    t[3] = t[3].abs()
    groups = pack_groups(torch.randint(0, 2, (n,), generator=g).to(torch.uint8).to(device), bits)
    lr_wd = torch.tensor([[1e-3, 2e-3], [0.1, 0.0]], device=device)
    lr_wd = torch.cat([lr_wd, lr_wd.new_zeros(2, max(2 ** bits - 2, 0))], dim=1)
    scal = torch.tensor([0.5, 0.1, 0.3], device=device)
    a, b = [x.clone() for x in t], [x.clone() for x in t]
    out_a, out_b = (torch.empty(n, dtype=torch.bfloat16, device=device) for _ in range(2))
    try:
        _kernel(bits)(a[0], t[1], a[2], a[3], out_a, groups, lr_wd, scal, 0.9, 0.95, 1e-8)
    except Exception as e:  # noqa: BLE001 - any inductor/Triton failure
        _COMPILED[bits] = None
        return f"torch.compile failed ({type(e).__name__}: {str(e)[:300]})"
    adamw_update(b[0], t[1], b[2], b[3], out_b, groups, lr_wd, scal, 0.9, 0.95, 1e-8, bits=bits)
    if not all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in ((a[0], b[0]), (a[2], b[2]), (a[3], b[3]))):
        _COMPILED[bits] = None
        return "the compiled kernel disagrees with the eager expression"
    return None


def _eager_chunks(master, grad, exp_avg, exp_avg_sq, out, groups, bits, *rest) -> None:
    per_byte = 8 // bits
    for a in range(0, master.shape[0], EAGER_CHUNK):
        b = min(a + EAGER_CHUNK, master.shape[0])
        adamw_update(master[a:b], grad[a:b], exp_avg[a:b], exp_avg_sq[a:b], None if out is None else out[a:b],
                     groups[a // per_byte:], *rest, bits=bits)


def _run_fused(master, grad, exp_avg, exp_avg_sq, out, groups, bits, *rest) -> None:
    """One compiled kernel on CUDA; elsewhere, or if compiling fails, the same arithmetic eagerly."""
    args = (master, grad, exp_avg, exp_avg_sq, out, groups)
    if master.device.type == "cuda" and _COMPILED.get(bits, True) is not None:
        try:
            _kernel(bits)(*args, *rest)
            return
        except Exception as e:  # noqa: BLE001 - an inductor failure must not stop training
            warnings.warn(f"flat AdamW: torch.compile failed ({type(e).__name__}: {str(e)[:300]}); "
                          "running the update eagerly in chunks")
            _COMPILED[bits] = None
    _eager_chunks(*args, bits, *rest)


class FusedClipStep(Protocol):
    """An optimizer part's update that applies the gradient clip itself (no separate clipping pass)."""

    def clip_next_step(self, coeff: float) -> None:
        """Scale the gradients of the coming step by ``coeff`` inside the update."""


_INSTALLED = "_flat_adamw"  # the DistributedOptimizer attribute holding its FlatAdamW (this module's alone)


def installed(part) -> Optional["FlatAdamW"]:
    """The flat step :func:`enable` installed on one optimizer part; None where megatron's step runs."""
    return vars(part).get(_INSTALLED)


@dataclass
class _Segment:
    """This rank's contiguous share of one bucket: [lo, hi) in the bucket's buffers."""
    grad: torch.Tensor      # view of bucket.grad_data
    out: Optional[torch.Tensor]  # view of bucket.param_data (None when the params are fp32 masters)
    master: torch.Tensor    # fp32
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    groups: torch.Tensor    # uint8: each element's inner param group, packed (pack_groups)
    params: list            # (main param, start, end) within the segment


class FlatAdamW:
    """Replaces one DistributedOptimizer's inner AdamW step and main->model param copy."""

    def __init__(self, dist_opt):
        self.opt = dist_opt
        inner = dist_opt.optimizer
        groups = inner.param_groups
        for g in groups:
            if g.get("amsgrad") or g.get("maximize"):
                raise ValueError("flat AdamW: amsgrad/maximize are not supported")
            if tuple(g["betas"]) != tuple(groups[0]["betas"]) or g["eps"] != groups[0]["eps"]:
                raise ValueError("flat AdamW: every param group needs the same betas and eps")
        self.beta1, self.beta2 = (float(b) for b in groups[0]["betas"])
        self.eps = float(groups[0]["eps"])
        self.grad_scale = 1.0  # the clip coefficient of the coming step (reset after it)
        self.wrote_model_params = False
        self.segments: list[_Segment] = []
        self.step_count = 0
        self._step_tensor = torch.zeros((), dtype=torch.float32)
        # Bound at the first step, when the activations are gone (as torch's AdamW creates its
        # state): binding allocates the moments and briefly holds two copies of the master weights.
        self._bound: Optional[list] = None

    # ------------------------------------------------------------------ layout
    def _main_to_model(self) -> dict:
        o = self.opt
        pairs = {}
        for shard_groups, model_groups in ((o.shard_fp32_from_float16_groups, o.model_float16_groups),
                                           (o.shard_fp32_groups, o.model_fp32_groups)):
            for shards, models in zip(shard_groups, model_groups):
                for s, m in zip(shards, models):
                    pairs[s] = m
        return pairs

    def _bind(self) -> None:
        """(Re)build the flat buffers from the current main params and Adam state."""
        o, inner = self.opt, self.opt.optimizer
        main_to_model = self._main_to_model()
        by_bucket: dict = {}
        self.bits = group_bits(len(inner.param_groups))
        for gi, group in enumerate(inner.param_groups):
            for p in group["params"]:
                model_param = main_to_model[p]
                gbuf_index, _, bucket_id = o.model_param_gbuf_map[model_param]
                rng = o._get_model_param_range_map(model_param)["gbuf_world_in_bucket"]
                by_bucket.setdefault((gbuf_index, bucket_id), []).append((p, gi, rng.start, rng.end))
        steps = [float(st["step"]) for st in inner.state.values() if "step" in st]
        self.step_count = int(max(steps)) if steps else self.step_count
        self._step_tensor = torch.tensor(float(self.step_count))
        segments = []
        for (gbuf_index, bucket_id), items in sorted(by_bucket.items(), key=lambda kv: kv[0]):
            bucket = o.buffers[gbuf_index].buckets[bucket_id]
            lo, hi = min(i[2] for i in items), max(i[3] for i in items)
            param_view = bucket.param_data.view(-1)[lo:hi]
            fp32_params = param_view.dtype == torch.float32
            dev = param_view.device
            master = param_view if fp32_params else torch.zeros(hi - lo, dtype=torch.float32, device=dev)
            m = torch.zeros(hi - lo, dtype=torch.float32, device=dev)
            v = torch.zeros_like(m)
            params = []
            ranges = []
            for p, gi, start, end in items:
                a, b = start - lo, end - lo
                st = inner.state.get(p, {})
                if not fp32_params:
                    master[a:b].copy_(p.detach().view(-1))
                for key, buf in (("exp_avg", m), ("exp_avg_sq", v)):
                    if key in st:
                        buf[a:b].copy_(st[key].view(-1))
                ranges.append((a, b, gi))
                params.append((p, a, b))
            segments.append(_Segment(bucket.grad_data.view(-1)[lo:hi], None if fp32_params else param_view,
                                     master, m, v, packed_group_table(hi - lo, ranges, self.bits, dev), params))
        # Point the optimizer's tensors at the flat buffers (same objects, new storage).
        bound = []
        for seg in segments:
            for p, a, b in seg.params:
                p.data = seg.master[a:b].view_as(p)
                st = inner.state[p]
                st["exp_avg"] = seg.exp_avg[a:b].view_as(p)
                st["exp_avg_sq"] = seg.exp_avg_sq[a:b].view_as(p)
                st["step"] = self._step_tensor
                bound.append((p, st["exp_avg"], st["exp_avg_sq"], p.data_ptr()))
        self.segments, self._bound = segments, bound

    def _still_bound(self) -> bool:
        if self._bound is None:
            return False
        state = self.opt.optimizer.state
        for p, m, v, ptr in self._bound:
            st = state.get(p)
            if st is None or st.get("exp_avg") is not m or st.get("exp_avg_sq") is not v or p.data_ptr() != ptr \
                    or st.get("step") is not self._step_tensor:
                return False
        return True

    # ------------------------------------------------------------------ step
    def clip_next_step(self, coeff: float) -> None:
        """Fold the clip coefficient into the coming step (:class:`FusedClipStep`)."""
        self.grad_scale = coeff

    @torch.no_grad()
    def step(self, closure=None):
        """The inner optimizer's step: one fused update per bucket shard."""
        # The kernel reads the grad buffer itself; with bf16 grad buffers megatron's main grads are
        # fp32 copies (4 bytes per parameter): free them before binding allocates anything.
        for group in self.opt.optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        if not self._still_bound():
            try:
                self._bind()
            except torch.OutOfMemoryError:
                # Binding holds the master weights twice for a moment; where that does not fit,
                # step this and every later step on megatron's per-parameter path instead.
                return self._give_back(closure)
        self.step_count += 1
        self._step_tensor.fill_(float(self.step_count))
        groups = self.opt.optimizer.param_groups
        scal = [self.grad_scale, 1.0 - self.beta1 ** self.step_count, math.sqrt(1.0 - self.beta2 ** self.step_count)]
        # one host->device copy per step: the scalars and every group's LR and weight decay
        host = torch.tensor(scal + [float(g["lr"]) for g in groups] + [float(g["weight_decay"]) for g in groups],
                            dtype=torch.float32)
        dev = self.segments[0].master.device if self.segments else torch.device("cpu")
        table = host.to(dev, non_blocking=True) if dev.type == "cuda" else host
        scalars, lr_wd = table[:3], table[3:].view(2, len(groups))
        for seg in self.segments:
            _run_fused(seg.master, seg.grad, seg.exp_avg, seg.exp_avg_sq, seg.out, seg.groups, self.bits, lr_wd,
                       scalars, self.beta1, self.beta2, self.eps)
        self.grad_scale = 1.0
        self.wrote_model_params = True

    def _give_back(self, closure=None):
        """Uninstall: this step and the later ones run megatron's own path (nothing was re-bound)."""
        o, inner = self.opt, self.opt.optimizer
        self.segments, self._bound = [], None
        inner.__dict__.pop("step", None)  # the class's AdamW.step again
        o.__dict__.pop("_copy_main_params_to_model_params", None)
        o.__dict__.pop(_INSTALLED, None)
        warnings.warn("flat AdamW: binding the flat buffers ran out of memory; megatron's optimizer step "
                      "from now on")
        o._copy_model_grads_to_main_grads()  # the main grads this step (freed above)
        if self.grad_scale < 1.0:
            torch._foreach_mul_([p.grad for g in inner.param_groups for p in g["params"] if p.grad is not None],
                                self.grad_scale)
        self.grad_scale, self.wrote_model_params = 1.0, False
        return inner.step(closure)


def enable(optimizer) -> int:
    """Install :class:`FlatAdamW` on every DistributedOptimizer (with a torch AdamW inside) of a
    megatron (chained) optimizer; returns how many were switched. Others keep megatron's path."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    switched = 0
    for part in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(part, "optimizer", None)
        if not isinstance(part, DistributedOptimizer) or type(inner) is not torch.optim.AdamW:
            continue
        if part.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8 or part.ddp_config.use_megatron_fsdp:
            continue
        device = next((p.device for g in inner.param_groups for p in g["params"]), torch.device("cpu"))
        if device.type == "cuda":
            why = compiled_kernel_works(device, group_bits(len(inner.param_groups)))
            if why is not None:
                warnings.warn(f"flat AdamW: {why}; keeping megatron's optimizer step")
                continue
        try:
            flat = FlatAdamW(part)
        except ValueError as e:
            warnings.warn(f"{e}; keeping megatron's optimizer step")
            continue
        copy_main_to_model = part._copy_main_params_to_model_params

        def copy_unless_fused(flat=flat, original=copy_main_to_model):
            if flat.wrote_model_params:  # the fused step already wrote the bf16 params
                flat.wrote_model_params = False
                return
            original()

        inner.step = flat.step
        part._copy_main_params_to_model_params = copy_unless_fused
        setattr(part, _INSTALLED, flat)
        switched += 1
    return switched
