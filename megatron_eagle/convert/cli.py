"""`megatron-eagle convert`: HF checkpoint tools.

    megatron-eagle convert verify --hf DIR [--tp N --pp N] [--tol 1e-5]
        load DIR into our model, compare logits with a transformers reference on random inputs
    megatron-eagle convert make-tiny --out DIR [--seed 0]
        write a tiny random Eagle 2.5 HF dir (tiny preset + tiny tokenizer), e.g. for the demo
    megatron-eagle convert roundtrip --hf DIR --out DIR [--tp N --pp N] [--max-shard-size 5GB]
        load DIR into our model at that layout and export it back to HF (streaming)

With ``--tp/--pp`` > 1 run under torchrun with tp*pp processes.
"""

from __future__ import annotations

import argparse
import sys


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of `megatron-eagle convert`: one action each, and the action's flags."""
    sub = p.add_subparsers(dest="convert_command", metavar="ACTION")

    v = sub.add_parser("verify", help="max logits difference vs the transformers reference")
    v.add_argument("--hf", required=True, help="HF Eagle 2.5 directory")
    v.add_argument("--tp", type=int, default=1)
    v.add_argument("--pp", type=int, default=1)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--tol", type=float, default=1e-5, help="max relative difference allowed (default 1e-5)")
    v.add_argument("--json", action="store_true", help="print the results as one JSON object")
    v.set_defaults(func=run_verify)

    t = sub.add_parser("make-tiny", help="write a tiny random HF Eagle 2.5 dir with a tiny tokenizer")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    t.add_argument("--max-shard-size", default="5GB")
    t.set_defaults(func=run_make_tiny)

    r = sub.add_parser("roundtrip", help="HF -> our model (any TP/PP) -> HF")
    r.add_argument("--hf", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--tp", type=int, default=1)
    r.add_argument("--pp", type=int, default=1)
    r.add_argument("--max-shard-size", default="5GB")
    r.add_argument("--dtype", default=None, help="stored dtype (default: the checkpoint's)")
    r.set_defaults(func=run_roundtrip)
    th = sub.add_parser("to-hf", help="training checkpoint (any layout) -> self-contained HF Eagle 2.5 dir")
    th.add_argument("--ckpt", required=True, help="RUN_DIR/checkpoints/iter_N, or a run dir (latest)")
    th.add_argument("--out", required=True)
    th.add_argument("--tokenizer", default=None, help="tokenizer dir (default: the one the run used)")
    th.add_argument("--max-shard-size", default="5GB")
    th.add_argument("--dtype", default=None, help="stored dtype (default: the checkpoint's)")
    th.add_argument("--tp", type=int, default=1)
    th.add_argument("--pp", type=int, default=1)
    th.add_argument("--max-tiles", type=int, default=12,
                    help="max tiles per image in config.json / preprocessor_config.json (default 12)")
    th.set_defaults(func=run_to_hf)

    fh = sub.add_parser("from-hf", help="HF dir(s) -> a checkpoint that `train` can start from")
    fh.add_argument("--hf", default=None, help="Eagle 2.5 HF dir")
    fh.add_argument("--vision", default=None, help="SigLIP HF dir (with --llm)")
    fh.add_argument("--llm", default=None, help="Qwen2.5 or Qwen3 HF dir (with --vision)")
    fh.add_argument("--out", required=True, help="checkpoint root to write (iter_0000000 + latest)")
    fh.add_argument("--tp", type=int, default=1)
    fh.add_argument("--pp", type=int, default=1)
    fh.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    fh.set_defaults(func=run_from_hf)
    p.set_defaults(print_convert_help=p.print_help)


def run(args: argparse.Namespace) -> int:
    """`convert` without an action (each action sets its own ``func``): print the help."""
    args.print_convert_help()
    return 2


def run_to_hf(args) -> int:
    _quiet_transformers()
    from megatron_eagle.convert.checkpoint_io import checkpoint_to_hf

    out = checkpoint_to_hf(args.ckpt, args.out, args.tokenizer, args.max_shard_size, args.dtype, args.tp, args.pp,
                           args.max_tiles)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"wrote HF Eagle 2.5 checkpoint to {out}")
    return 0


def run_from_hf(args) -> int:
    _quiet_transformers()
    if bool(args.hf) == bool(args.vision or args.llm) or bool(args.vision) != bool(args.llm):
        print("error: give --hf DIR, or both --vision DIR and --llm DIR", file=sys.stderr)
        return 2
    from megatron_eagle.convert.checkpoint_io import hf_to_checkpoint

    source = args.hf if args.hf else (args.vision, args.llm)
    path = hf_to_checkpoint(source, args.out, args.tp, args.pp, args.dtype)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(f"wrote checkpoint {path} (start a run from it with init.checkpoint: {args.out})")
    return 0


def run_verify(args) -> int:
    _quiet_transformers()
    import json

    import torch
    import torch.distributed as dist

    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.convert.load import build_model_from_hf, init_process_groups
    from megatron_eagle.convert.verify import TransformersReference, verify
    from megatron_eagle.runtime.distributed import shutdown

    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 parity check: no TF32 on GPU
    torch.backends.cudnn.allow_tf32 = False
    init_process_groups(args.tp, args.pp)
    try:
        model, report = build_model_from_hf(args.hf, ParallelConfig(tp=args.tp, pp=args.pp))
        reporter = dist.get_rank() == dist.get_world_size() - 1  # on the last pipeline stage
        ref = TransformersReference.from_pretrained(args.hf) if reporter else None
        results = verify(model, ref, model.model_cfg, args.seed, reporter)
        ok = True
        if reporter:
            worst = max(rel for _, rel in results.values())
            ok = worst <= args.tol
            if args.json:
                print(json.dumps({"cases": {k: {"max_abs": a, "max_rel": r} for k, (a, r) in results.items()},
                                  "max_rel": worst, "tol": args.tol, "ok": ok,
                                  "unused_hf_tensors": report.unused_hf}))
            else:
                if report.unused_hf:
                    print(f"note: {len(report.unused_hf)} HF tensors unused, e.g. {report.unused_hf[:3]}")
                for k, (a, r) in results.items():
                    print(f"{k:>14}: max |Δlogit| = {a:.3e}   relative = {r:.3e}")
                print(f"{'PASS' if ok else 'FAIL'}: max relative difference {worst:.3e} (tolerance {args.tol:.0e})")
        failed = torch.tensor([0 if ok else 1])
        if dist.get_world_size() > 1:  # every rank exits with the reporter's verdict
            dist.all_reduce(failed)
        return int(failed.item() != 0)
    finally:
        shutdown()


def run_make_tiny(args) -> int:
    _quiet_transformers()
    import tempfile

    from megatron_eagle.config import preset_model_config
    from megatron_eagle.convert.reference import make_random_hf_checkpoint
    from megatron_eagle.tokenizer import build_tiny_tokenizer

    cfg = preset_model_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = build_tiny_tokenizer(tmp)
        out = make_random_hf_checkpoint(args.out, cfg, tok_dir, seed=args.seed, max_shard_size=args.max_shard_size)
    print(f"wrote random {args.preset} Eagle 2.5 HF checkpoint to {out}")
    return 0


def run_roundtrip(args) -> int:
    _quiet_transformers()
    import json
    from pathlib import Path

    from megatron_eagle.config import ParallelConfig
    from megatron_eagle.convert.load import build_model_from_hf, export_model_to_hf, init_process_groups
    from megatron_eagle.runtime.distributed import shutdown

    init_process_groups(args.tp, args.pp)
    try:
        stored = json.loads((Path(args.hf) / "config.json").read_text()).get("torch_dtype", "float32")
        dtype = args.dtype or stored
        model, _ = build_model_from_hf(args.hf, ParallelConfig(tp=args.tp, pp=args.pp),
                                       "bfloat16" if dtype == "bfloat16" else "float32")
        index = export_model_to_hf(model, args.out, tokenizer_dir=args.hf, max_shard_size=args.max_shard_size,
                                   dtype=dtype)
        if index is not None:
            print(f"wrote {len(index['weight_map'])} tensors in "
                  f"{len(set(index['weight_map'].values()))} shards to {args.out}")
        return 0
    finally:
        shutdown()


if __name__ == "__main__":
    from megatron_eagle.cli import main

    sys.exit(main(["convert", *sys.argv[1:]]))
