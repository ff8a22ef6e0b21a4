"""Typed field access for plan JSON, so every malformed file is reported by the path of the offending field."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeVar

from ppcl.errors import ArtefactError

T = TypeVar("T")

_TYPE_NAMES = {int: "an integer", str: "a string", list: "a list", dict: "an object", float: "a number"}


def require(data: Mapping[str, Any], key: str, kind: type[T], where: str) -> T:
    """``data[key]`` checked to be of ``kind``; ``where`` is the JSON path of ``data`` (``"replacements[2]"``)."""
    if key not in data:
        raise ArtefactError(
            f"Plan field `{_join(where, key)}` is missing",
            expected=f"{_TYPE_NAMES.get(kind, kind.__name__)} under `{key}`",
            found=f"fields {sorted(data)}",
            fix="add the field (see the format written by PruningPlan.save)",
        )
    return check(data[key], kind, _join(where, key))


def optional(data: Mapping[str, Any], key: str, kind: type[T], where: str, default: T) -> T:
    """``data[key]`` checked to be of ``kind``, or ``default`` when absent."""
    return check(data[key], kind, _join(where, key)) if key in data else default


def check(value: Any, kind: type[T], where: str) -> T:
    """``value`` itself, after checking it is of ``kind`` (ints accepted as floats; bools never as ints)."""
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        raise ArtefactError(
            f"Plan field `{where}` has the wrong type",
            expected=_TYPE_NAMES.get(kind, kind.__name__),
            found=f"{value!r} ({type(value).__name__})",
            fix="correct the field in the file (see the format written by PruningPlan.save)",
        )
    return value


def object_at(value: Any, where: str) -> Mapping[str, Any]:
    """``value`` checked to be a JSON object."""
    return check(value, dict, where)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def dumps(value: Any) -> str:
    """JSON text for humans: objects and lists made only of scalars (and scalar lists) stay on one line.

    One replacement or level per line keeps hand-edited plans short and diffs small.
    """
    return _format(value, 0) + "\n"


def _format(value: Any, depth: int) -> str:
    if _flat(value):
        return json.dumps(value, ensure_ascii=False)
    pad, inner = "  " * depth, "  " * (depth + 1)
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(str(k), ensure_ascii=False)}: {_format(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    items = [f"{inner}{_format(v, depth + 1)}" for v in value]
    return "[\n" + ",\n".join(items) + f"\n{pad}]"


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _flat(value: Any) -> bool:
    if _scalar(value):
        return True
    if isinstance(value, list | tuple):
        return all(_scalar(v) for v in value)
    if isinstance(value, dict):
        return all(_scalar(v) or (isinstance(v, list | tuple) and all(_scalar(x) for x in v)) for v in value.values())
    # Anything else is left for json to reject with its own message.
    return True
