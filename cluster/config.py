"""Typed configs loaded from YAML: one object per job or app, unknown keys are errors."""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import pydantic
import yaml

from cluster.errors import UserError


class StrictConfig(pydantic.BaseModel):
    """Base of every config: unknown keys are rejected, fields are checked on assignment."""

    model_config = pydantic.ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


C = TypeVar("C", bound=StrictConfig)


def describe_validation_error(source: str, error: pydantic.ValidationError) -> str:
    """One line naming the first problem in the user's terms (dotted key path, what was wrong)."""
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        problem = f"unknown key '{where}'"
    elif first["type"] == "missing":
        problem = f"missing key '{where}'"
    else:
        problem = f"bad value for '{where}': {first['msg']}"
    more = len(error.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{source}: {problem}{suffix}"


def parse_config(cls: type[C], data: object, source: str = "config") -> C:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a mapping of keys to values, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except pydantic.ValidationError as exc:
        raise UserError(describe_validation_error(source, exc)) from None


def load_config(cls: type[C], path: str | Path) -> C:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    return parse_config(cls, data if data is not None else {}, source=str(path))
