"""Reading configs: YAML (safe loader), dotted ``--set`` overrides, typed dataclasses, presets.

Every error names the offending field and says how to fix it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from megatron_eagle.config.errors import ConfigError
from megatron_eagle.config.model import preset_model_config


def read_yaml(path: str | Path, fix: str) -> dict[str, Any]:
    """The mapping at the top of a YAML file (safe loader); ``fix`` says what the file should hold."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), "top level is not a mapping", fix)
    return data


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(name, f"expected a mapping, got {value!r}", "give a YAML mapping")
        return from_dict(tp, value, prefix=name)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(name, f"{value!r} is not allowed", f"use one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], name)
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {value!r}", "give a YAML list")
        return [_coerce(v, inner, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(name, f"expected true/false, got {value!r}", "write true or false")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, str) and value.lstrip("-").isdigit())):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(name, f"expected an integer, got {value!r}", "write a whole number")
        return int(value)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, f"expected a number, got {value!r}", "write a number such as 1e-4") from None
    if tp is str:
        return str(value)
    return value


def from_dict(cls, data: dict[str, Any], prefix: str = ""):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in (data or {}).items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(path, "unknown field", f"remove it or use one of {sorted(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


def to_dict(obj) -> dict[str, Any]:
    return dataclasses.asdict(obj)


def _parse_scalar(text: str) -> Any:
    return yaml.safe_load(text) if text != "" else ""


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML scalars) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override has no '='", "write --set section.key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(key, f"`{p}` is not a section", "override a leaf field")
        node[parts[-1]] = _parse_scalar(raw)
    return data


def merge_preset(data: dict[str, Any]) -> dict[str, Any]:
    """Expand ``model.preset`` into full vision/llm sections; explicit keys win."""
    model = data.get("model") or {}
    name = model.get("preset", "tiny")
    base = to_dict(preset_model_config(name))
    for section in ("vision", "llm"):
        base[section].update(model.get(section) or {})
    merged = {**base, **{k: v for k, v in model.items() if k not in ("vision", "llm")}}
    merged["vision"], merged["llm"] = base["vision"], base["llm"]
    data = dict(data)
    data["model"] = merged
    return data
