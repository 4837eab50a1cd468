"""The one error a config raises: it names the field, the problem and the fix."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is invalid. The message names the field and the fix."""

    def __init__(self, field_name: str, problem: str, fix: str):
        self.field, self.problem, self.fix = field_name, problem, fix
        super().__init__(f"config field `{field_name}`: {problem}. Fix: {fix}")
