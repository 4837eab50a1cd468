"""`megatron-eagle` command line: one subcommand per tool.

This module is the one registry of subcommands: name, module and one-line help. Each module
defines ``add_arguments(parser)`` (its flags) and ``run(args) -> int`` (the command). Only the
chosen command's module is imported, so `--help` and every command start fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional


@dataclass(frozen=True)
class Command:
    """A subcommand: the module with ``add_arguments`` and ``run``, and its line in `--help`."""

    module: str
    help: str
    usage_doc: bool = False  # the module docstring is the command's usage text (shown verbatim by --help)


COMMANDS: dict[str, Command] = {
    "convert": Command("megatron_eagle.convert.cli", "HF checkpoint conversion and verification", usage_doc=True),
    "generate": Command("megatron_eagle.inference.cli", "greedy generation from an HF Eagle 2.5 dir", usage_doc=True),
    "demo": Command("megatron_eagle.demo", "the end-to-end tiny demo (what `make demo` runs)"),
    "prepare": Command("megatron_eagle.data.prepare.recipe",
                       "JSONL + media, or an Eagle 2.5 recipe -> webdataset shards with a metadata index"),
    "inspect": Command("megatron_eagle.data.prepare.inspect_shards",
                       "counts and token/duration histograms of prepared shards"),
    "verify": Command("megatron_eagle.data.prepare.verify", "check shards, index offsets, decoding and manifest counts"),
    "reshard": Command("megatron_eagle.data.prepare.reshard",
                       "rewrite prepared shards at a new size (no raw media needed)"),
    "plan": Command("megatron_eagle.data.packing.cli", "plan sequence packs for a curriculum stage", usage_doc=True),
    "train": Command("megatron_eagle.training.cli", "train through a curriculum on megatron-core"),
    "submit": Command("megatron_eagle.launch.cli", "submit training to Slurm (one job per stage, chained)",
                      usage_doc=True),
    "status": Command("megatron_eagle.launch.status", "a run's Slurm jobs, last step, loss and checkpoints"),
}


def _add_command(sub: Any, name: str) -> None:
    cmd = COMMANDS[name]
    mod = importlib.import_module(cmd.module)
    doc = mod.__doc__ or ""
    if cmd.usage_doc:
        p = sub.add_parser(name, help=cmd.help, description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    else:
        p = sub.add_parser(name, help=cmd.help, description=doc.strip().splitlines()[0] if doc.strip() else None)
    p.set_defaults(func=mod.run)
    mod.add_arguments(p)


def build_parser(load: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """The `megatron-eagle` parser. Commands in ``load`` (default: all) get their flags; the others
    are listed with their help line only, and their modules are not imported."""
    parser = argparse.ArgumentParser(prog="megatron-eagle", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = set(COMMANDS if load is None else load)
    for name, cmd in COMMANDS.items():
        if name in wanted:
            _add_command(sub, name)
        else:
            sub.add_parser(name, help=cmd.help)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser([first] if first in COMMANDS else [])
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
