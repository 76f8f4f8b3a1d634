"""Typed run configuration: pydantic models loaded from JSON, overridden with ``--set a.b=value``.

Every config model forbids unknown keys; a bad config fails at start with one line per problem,
naming the key path (``data.datasets.0.weight: Input should be greater than 0 (got -1)``). The
resolved config is written into the run directory, so one file fully describes a run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A configuration problem; the message names the key path."""


class StrictModel(BaseModel):
    """Base of every config section: unknown keys are errors, field docstrings document the field."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


def parse_value(text: str) -> Any:
    """``--set`` values are JSON when they parse as JSON (1, 2.5, true, null, [1,2], {"a":1}), else strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` to a nested dict; list elements are addressed by index (``a.0.b``)."""
    path, sep, raw_value = assignment.partition("=")
    if not sep or not path:
        raise ConfigError(f"--set {assignment!r}: expected KEY.PATH=VALUE")
    parts = path.split(".")
    node: Any = tree
    for depth, part in enumerate(parts[:-1]):
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(node, part, where)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            raise ConfigError(f"--set {path}: {'.'.join(parts[:depth])} is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(node, last, path)] = parse_value(raw_value)
    elif isinstance(node, dict):
        node[last] = parse_value(raw_value)
    else:
        raise ConfigError(f"--set {path}: {'.'.join(parts[:-1])} is a value, not a section")


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"--set {where}: index {part!r} out of range for a list of {len(node)}")
    return int(part)


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = ".".join(str(p) for p in item["loc"]) or "<root>"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif "input" in item and not isinstance(item["input"], (dict, list)):
            message += f" (got {item['input']!r})"
        lines.append(f"{path}: {message}")
    return "\n".join(lines)


def build_config(cls: type[T], tree: dict, source: str = "config") -> T:
    try:
        return cls.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"{source}:\n" + format_validation_error(error)) from None


def load_config(cls: type[T], path: str | Path | None, overrides: list[str] = ()) -> T:
    """Read ``path`` (JSON; None means all defaults), apply ``overrides``, validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            tree = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON: {error}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a JSON object")
    tree = _merge(_defaults(cls), tree)
    for assignment in overrides:
        apply_override(tree, assignment)
    return build_config(cls, tree, str(path) if path else "config")


def _defaults(cls: type[BaseModel]) -> dict:
    """The default tree of ``cls`` (so ``--set`` can reach into default lists), or {} if a field is required."""
    try:
        return cls().model_dump()
    except ValidationError:
        return {}


def _merge(base: dict, update: dict) -> dict:
    """``update`` over ``base``: nested dicts merged key by key, everything else replaced."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def save_config(config: BaseModel, run_dir: str | Path) -> Path:
    """Write the resolved config as ``run_dir/config.json``, atomically: other ranks may be reading it."""
    path = Path(run_dir) / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"config.json.partial-{os.getpid()}")
    partial.write_text(config.model_dump_json(indent=2) + "\n")
    os.replace(partial, path)
    return path


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="JSON config file; omitted keys take their defaults.")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
        help="Override one config value (repeatable), e.g. --set data.batch_size=32",
    )


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return load_config(cls, args.config, args.overrides)
