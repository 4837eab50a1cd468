"""The `megatron-eagle` registry: every command builds, `--help` imports no command module."""

from __future__ import annotations

import argparse
import importlib

import pytest

from megatron_eagle import cli

NAMES = ["convert", "generate", "demo", "prepare", "inspect", "verify", "reshard", "plan", "train", "submit", "status"]


def test_registry_names_and_modules():
    assert list(cli.COMMANDS) == NAMES
    for name, cmd in cli.COMMANDS.items():
        mod = importlib.import_module(cmd.module)
        assert callable(mod.add_arguments) and callable(mod.run), name


def test_every_command_builds_and_dispatches_to_its_module():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, cmd in cli.COMMANDS.items():
        assert sub.choices[name].get_default("func") is importlib.import_module(cmd.module).run, name


def test_top_level_help_imports_no_command_module(monkeypatch, capsys):
    imported = []
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: imported.append(name) or real(name, *a))
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and imported == []
    out = " ".join(capsys.readouterr().out.split())  # help lines wrap with the terminal width
    for name, cmd in cli.COMMANDS.items():
        assert f"{name} {cmd.help}" in out, name


def test_convert_without_action_prints_its_help(capsys):
    assert cli.main(["convert"]) == 2
    assert "ACTION" in capsys.readouterr().out
