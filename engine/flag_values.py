"""Flag and YAML values -> typed config values, TRL's way (`--bf16`, `--bf16 true`, `--bf16 None`, JSON dicts).

Pure functions of a value and a type: engine/config.py applies them to TrainConfig's fields.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from typing import Any

from engine.errors import UserError


def strip_optional(annotation: Any) -> tuple[Any, bool]:
    """`int | None` -> (int, True)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = str(text).strip().lower()
    if lowered in ("true", "1", "yes", "y", "on"):
        return True
    if lowered in ("false", "0", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_bool_or_none(text: str) -> bool | None:
    """TRL's optional booleans (`--bf16 None`): none/null means "the default"."""
    return None if str(text).strip().lower() in ("none", "null") else parse_bool(text)


def convert_value(name: str, value: Any, base: Any, optional: bool) -> Any:
    """Convert a YAML value (or a flag string) to a field's type `base` (`optional`: it takes None), with a clear
    error naming the flag."""
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        return None
    if optional and isinstance(value, list) and [str(v).lower() for v in value] in (["none"], ["null"]):
        return None
    try:
        if typing.get_origin(base) is list:
            (item_type,) = typing.get_args(base)
            items = value if isinstance(value, list) else [value]
            return [item_type(v) for v in items]
        if typing.get_origin(base) is dict:  # TRL takes these as JSON strings on the command line
            parsed = value if isinstance(value, dict) else json.loads(value)
            if not isinstance(parsed, dict):
                raise ValueError(value)
            return parsed
        if base is bool:
            return parse_bool(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        return base(value)
    except (ValueError, TypeError, argparse.ArgumentTypeError) as error:
        type_name = "a JSON object" if typing.get_origin(base) is dict else getattr(base, "__name__", str(base))
        raise UserError(f"--{name} {value!r}: expected {type_name}") from error
