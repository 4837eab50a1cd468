"""`megatron-eagle` command line: one subcommand per tool.

Each entry maps a subcommand to ``module:register`` where ``register(subparsers)`` adds
its parser and sets ``func``. Modules are imported lazily so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, str] = {
    "convert": "megatron_eagle.convert.cli",
    "generate": "megatron_eagle.inference.cli",
    "demo": "megatron_eagle.demo",
    "prepare": "megatron_eagle.data.prepare.pipeline",
    "inspect": "megatron_eagle.data.prepare.inspect_shards",
    "verify": "megatron_eagle.data.prepare.verify",
    "reshard": "megatron_eagle.data.prepare.reshard",
    "plan": "megatron_eagle.data.packing.cli",
    "train": "megatron_eagle.training.cli",
    "submit": "megatron_eagle.launch.cli",
    "status": "megatron_eagle.launch.status",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-eagle", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name, help=f"(see megatron-eagle {name} --help)")
            continue
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(first if first in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    rc = args.func(args)
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
