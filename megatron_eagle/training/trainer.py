"""The training loop: curriculum stages on megatron-core, with exact resume and preemption.

For each stage: build process groups for its layout -> build this rank's model stage ->
load weights (HF, previous stage, or the stage's own checkpoint to resume) -> DDP +
DistributedOptimizer + LR schedule -> for each step: the replica's ranks agree on the packs
(:mod:`.agreement`), forward/backward over this DP rank's micro-batches, guarded optimizer step,
metrics, checkpoint when due. A stage that ends saves a
``stage_done`` checkpoint; the next stage (possibly another layout) starts from its weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_eagle.config import ConfigError, Run
from megatron_eagle.data.loading.pack_builder import pack_tile_count
from megatron_eagle.runtime.distributed import init_distributed, init_model_parallel, replica_group
from megatron_eagle.training.agreement import agree_on_batches, rejected_rows
from megatron_eagle.training.checkpoint import latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from megatron_eagle.training.flops import step_flops
from megatron_eagle.training.metrics import MetricsWriter, peak_memory_gib
from megatron_eagle.training.optimizer import OptimConfig, build_scheduler
from megatron_eagle.training.setup import build_training_state
from megatron_eagle.training.signals import PreemptionFlag
from megatron_eagle.training.step import forward_backward, finish_step, prepare_step

log = logging.getLogger("megatron_eagle.train")


class TooManySkips(RuntimeError):
    pass


@dataclasses.dataclass
class StepStats:
    """What each rank adds to the step's one all-reduce; after it, sums over every rank."""

    loss_sum: float = 0.0  # Σ pack losses (one rank per replica, last PP stage)
    loss_count: float = 0.0  # packs in loss_sum
    tokens: float = 0.0
    flops: float = 0.0
    preempt: float = 0.0  # > 0: a preemption signal arrived
    save_due: float = 0.0  # > 0: the time-based checkpoint is due (rank 0)
    loader_wait_s: float = 0.0
    rejected: float = 0.0  # sub-samples the loader left out or blanked

    def all_reduce(self, device: torch.device) -> "StepStats":
        vec = torch.tensor(dataclasses.astuple(self), dtype=torch.float64, device=device)  # NCCL: CUDA tensors
        dist.all_reduce(vec)
        return StepStats(*vec.tolist())


@dataclasses.dataclass
class StageContext:
    index: int
    stage: Any
    ddp: Any
    optimizer: Any
    scheduler: Any
    loader: Any
    model_cfg: Any
    replica_group: Any = None  # the TP x CP x PP ranks of this DP replica (they agree on every pack)
    step: int = 0


class Trainer:
    def __init__(self, run: Run):
        from megatron_eagle.tokenizer import load_tokenizer, special_token_ids

        cfg = self.cfg = run.config
        self.curriculum = run.curriculum  # checked against the model and this world by load_run
        self.rt = init_distributed()
        self.world = self.rt.world_size
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        cfg.model.image_token_id = special_token_ids(self.tokenizer)["img_context"]
        if len(self.tokenizer) > cfg.model.llm.vocab_size:
            raise ConfigError("model.llm.vocab_size", f"{cfg.model.llm.vocab_size} < tokenizer size "
                              f"{len(self.tokenizer)}", "use a model whose vocabulary covers the tokenizer")
        if cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and self.rt.is_cuda):
            cfg.model.params_dtype = "bfloat16"
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.is_rank0 = self.rt.rank == 0
        if self.is_rank0:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsWriter(self.run_dir, self.is_rank0, cfg.train.log_every, cfg.train.tensorboard,
                                     cfg.train.wandb_project, dataclasses.asdict(cfg),
                                     total_steps=0)
        self.preempt = PreemptionFlag()
        self.global_step = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.last_save_time = time.time()
        self.steps_this_launch = 0

    # -- stage setup --------------------------------------------------------------------
    def _build_stage(self, index: int, weights: Optional[tuple[str, Path]]) -> StageContext:
        from megatron_eagle.data.loading.loader import build_stage_loader

        cfg, stage = self.cfg, self.curriculum.stages[index]
        par = stage.parallel
        init_model_parallel(par.tp, par.pp, par.cp, seed=cfg.seed)
        model_cfg = dataclasses.replace(cfg.model, freeze=stage.freeze())
        optim = OptimConfig(lr=stage.lr.peak, min_lr=stage.lr.min, weight_decay=cfg.optim.weight_decay,
                            adam_beta1=cfg.optim.adam_beta1, adam_beta2=cfg.optim.adam_beta2,
                            adam_eps=cfg.optim.adam_eps, clip_grad=cfg.optim.clip_grad,
                            warmup_fraction=stage.lr.warmup, decay_style=stage.lr.decay,
                            grad_reduce_in_fp32=cfg.optim.grad_reduce_in_fp32, flat_adamw=cfg.optim.flat_adamw,
                            overlap_grad_reduce=cfg.optim.overlap_grad_reduce)
        state = build_training_state(model_cfg, par, optim, chunk_tokens=cfg.loss.chunk_tokens,
                                     before_wrap=self._init_weights if weights is None else None,
                                     seq_len=stage.seq_len)
        ddp, optimizer = state.ddp, state.optimizer
        loader = build_stage_loader(
            self.curriculum, stage.name, self.tokenizer, model_cfg, world_size=self.world,
            dp_rank=ps.get_data_parallel_rank(), pp_rank=ps.get_pipeline_model_parallel_rank(),
            data_dirs=cfg.data or None, base_dir=Path(cfg.curriculum).parent, num_workers=cfg.train.num_workers,
            prefetch=cfg.train.prefetch, tp_mode=cfg.train.tp_data_mode,
            tp_group=ps.get_tensor_model_parallel_group(), cp_rank=ps.get_context_parallel_rank(),
            weighting=cfg.loss.weighting, cache_dir=str(self.run_dir / "cache"))
        scheduler = build_scheduler(optimizer, optim, loader.total_steps)
        ctx = StageContext(index, stage, ddp, optimizer, scheduler, loader, model_cfg,
                           replica_group=replica_group(ps.get_data_parallel_rank()))
        if weights is not None:
            kind, path = weights
            meta = load_checkpoint(path, [ddp], optimizer, load_optimizer=kind == "resume")
            self.global_step, self.skipped_total = meta["global_step"], meta["skipped_total"]
            if kind == "resume":
                scheduler.load_state_dict(meta["scheduler"])
                loader.load_state_dict(meta["loader"])
                ctx.step = meta["step_in_stage"]
                self.consecutive_skips = meta["consecutive_skips"]
            else:
                optimizer.reload_model_params()  # fp32 master weights follow the loaded weights
        # (HF init weights were loaded before the optimizer was built, so its master copy has them.)
        return ctx

    def _init_weights(self, model) -> None:
        """HF weights for a fresh run (``init.checkpoint`` arrives as ``weights`` instead)."""
        init = self.cfg.init
        if init.hf or init.vision:
            from megatron_eagle.convert.load import load_hf_into_model

            load_hf_into_model(model, init.hf if init.hf else (init.vision, init.llm))

    def _first_stage_weights(self) -> tuple[int, Optional[tuple[str, Path]]]:
        """(stage index, weights to load) from the run dir's latest checkpoint or the init config."""
        ck = latest_checkpoint(self.ckpt_root)
        if ck is not None:
            meta = read_meta(ck)
            if meta["stage_done"]:
                return meta["stage_index"] + 1, ("weights", ck)
            return meta["stage_index"], ("resume", ck)
        if self.cfg.init.checkpoint:
            path = Path(self.cfg.init.checkpoint)
            pointer = latest_checkpoint(path)  # a checkpoints/ root or one iter_ dir
            return 0, ("weights", pointer or path)
        return 0, None

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> int:
        """Train every remaining stage. Returns the process exit code (0 also after preemption)."""
        index, weights = self._first_stage_weights()
        stages, end = self.curriculum.stages, len(self.curriculum.stages)
        try:
            if self.cfg.train.only_stage:  # one stage of a chain: the run's next stage, nothing after it
                end = [s.name for s in stages].index(self.cfg.train.only_stage) + 1
                if index >= end:
                    if self.is_rank0:
                        print(f"stage {stages[end - 1].name} is already done", flush=True)
                    return 0
                if index < end - 1:
                    raise ConfigError("train.only_stage", f"stage {stages[end - 1].name} is not the run's next "
                                      f"stage: {self.ckpt_root} continues with stage {stages[index].name}",
                                      f"train stage {stages[index].name} first (train.only_stage="
                                      f"{stages[index].name})")
            while index < end:
                ctx = self._build_stage(index, weights)
                status = self._run_stage(ctx)
                ctx.loader.close()
                if status == "preempted":
                    return 0
                weights = ("weights", self.ckpt_root / f"iter_{self.global_step:07d}")
                index += 1
        except TooManySkips as e:
            if self.is_rank0:
                print(f"error: {e}", flush=True)
            return 3
        finally:
            self.metrics.close()
            self.preempt.restore()
        if self.is_rank0:
            what = f"stage {stages[end - 1].name}" if end < len(stages) else "training"
            print(f"{what} finished: {self.global_step} steps, checkpoints in {self.ckpt_root}", flush=True)
        return 0

    def _run_stage(self, ctx: StageContext) -> str:
        cfg, stage = self.cfg, ctx.stage
        total = ctx.loader.total_steps
        if ctx.step >= total:
            return "done"
        self.metrics.new_stage(stage.name, total, ctx.step)
        if self.is_rank0:
            dp = ps.get_data_parallel_world_size()
            print(f"stage {stage.name}: {total} steps, seq_len {stage.seq_len}, layout tp={stage.parallel.tp} "
                  f"pp={stage.parallel.pp} cp={stage.parallel.cp} dp={dp}, "
                  f"{ctx.loader.micro_batches} micro-batches/rank, trainable {stage.trainable}", flush=True)
        it = iter(ctx.loader)
        while ctx.step < total:
            t0 = time.perf_counter()
            batches = next(it)
            wait = time.perf_counter() - t0
            record, stop = self._train_step(ctx, batches, wait)
            self.metrics.write(record, self.global_step)
            last = ctx.step >= total
            if stop == "skips":
                self._save(ctx, stage_done=False)
                raise TooManySkips(
                    f"{self.consecutive_skips} consecutive steps with a non-finite loss or gradient norm "
                    f"(stage {stage.name}, step {ctx.step}); saved {self.ckpt_root}. Lower the LR, raise "
                    f"optim.clip_grad, or check the data of these steps.")
            if last or stop in ("preempt", "time") or ctx.step % cfg.train.save_every_steps == 0:
                self._save(ctx, stage_done=last)
            if stop == "preempt":
                if self.is_rank0:
                    why = f"preemption signal ({self.preempt.signal_name})" if self.preempt.requested \
                        else f"stop_after_steps={cfg.train.stop_after_steps}"
                    print(f"{why}: saved step {ctx.step} of stage {stage.name}, exiting", flush=True)
                return "preempted"
        return "done"

    def _train_step(self, ctx: StageContext, batches, wait: float) -> tuple[dict, Optional[str]]:
        cfg = self.cfg
        t0 = time.perf_counter()
        ctx.ddp.zero_grad_buffer()
        ctx.optimizer.zero_grad()
        poison = (self.global_step + 1) in cfg.train.inject_nonfinite_steps
        # CP ranks decode different tiles and may see different bad media: agree before the forward.
        batches = agree_on_batches(batches, ctx.replica_group, cfg.loss.weighting, ctx.loader.pack_cfg.pad_id)
        ctx.loader.settle(batches)
        losses = forward_backward(ctx.ddp, batches, self.rt.device, poison_loss=poison)
        found_inf, grad_norm = prepare_step(ctx.optimizer)  # before reading a loss (see prepare_step)

        # What every rank must agree on travels in one all-reduce (StepStats).
        data_rank = ps.get_tensor_model_parallel_rank() == 0 and ps.get_context_parallel_rank() == 0
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        tokens = flops = rejected = 0.0
        if data_rank and first:  # one rank per replica
            rejected = float(rejected_rows(batches))
            for b in batches:
                n_sub = b.num_samples
                bounds = b.cu_seqlens.tolist()
                lens = [bounds[i + 1] - bounds[i] for i in range(n_sub)]
                tokens += sum(lens)
                flops += step_flops(ctx.model_cfg, ctx.model_cfg.freeze, lens, pack_tile_count(b),
                                    int((b.labels >= 0).sum()))
        loss_sum = sum(float(x) for x in losses) if (data_rank and last) else 0.0
        n_loss = float(len(losses)) if (data_rank and last) else 0.0
        time_due = self.is_rank0 and (time.time() - self.last_save_time) > cfg.train.save_every_minutes * 60
        stats = StepStats(loss_sum=loss_sum, loss_count=n_loss, tokens=tokens, flops=flops,
                          preempt=float(self.preempt.requested), save_due=float(time_due), loader_wait_s=wait,
                          rejected=rejected).all_reduce(self.rt.device)
        loss = stats.loss_sum / max(stats.loss_count, 1.0)

        updated = False
        lr = ctx.optimizer.param_groups[0]["lr"]  # the LR this step uses (the scheduler moves it after)
        if math.isfinite(loss) and not found_inf:
            updated = finish_step(ctx.optimizer, cfg.optim.clip_grad, grad_norm)
        elif not math.isfinite(loss):
            grad_norm = float("nan")
        if updated:
            ctx.scheduler.step(increment=1)
            self.consecutive_skips = 0
        else:
            self.skipped_total += 1
            self.consecutive_skips += 1
        ctx.step += 1
        self.global_step += 1
        self.steps_this_launch += 1
        elapsed = time.perf_counter() - t0 + wait
        tokens_total = stats.tokens
        mfu = stats.flops / (elapsed * self.world * cfg.train.peak_tflops * 1e12)
        record = dict(stage=ctx.stage.name, step=ctx.step, global_step=self.global_step, loss=loss,
                      grad_norm=grad_norm, lr=lr, tokens=int(tokens_total),
                      tokens_per_s=tokens_total / elapsed, mfu=mfu, loader_wait_s=stats.loader_wait_s / self.world,
                      peak_mem_gib=peak_memory_gib(), skipped=self.skipped_total, step_time_s=elapsed,
                      updated=updated, loader_errors=int(stats.rejected))
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        stop = None
        if self.consecutive_skips >= cfg.train.max_consecutive_skips:
            stop = "skips"
        elif stats.preempt > 0:
            stop = "preempt"
        elif self.steps_this_launch == cfg.train.stop_after_steps:
            stop = "preempt"
        elif stats.save_due > 0:
            stop = "time"
        return record, stop

    def _save(self, ctx: StageContext, stage_done: bool) -> None:
        meta = dict(stage_index=ctx.index, stage=ctx.stage.name, step_in_stage=ctx.step, stage_done=stage_done,
                    global_step=self.global_step, skipped_total=self.skipped_total,
                    consecutive_skips=self.consecutive_skips, loader=ctx.loader.state_dict(),
                    scheduler=ctx.scheduler.state_dict(), model=dataclasses.asdict(ctx.model_cfg),
                    tokenizer=self.cfg.tokenizer)
        save_checkpoint(self.ckpt_root, self.global_step, [ctx.ddp], ctx.optimizer, meta,
                        keep_last=self.cfg.train.keep_last)
        self.last_save_time = time.time()


def train(run: Run) -> int:
    return Trainer(run).run()
