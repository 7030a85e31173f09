"""Typed parsing of plain dicts (TOML tables, CLI options) into config dataclasses.

Errors name the file and the dotted field, and say what was expected.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from pocketformer.errors import BadInputError


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (arg, *_) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(arg)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is dict:
        return "a table"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp, *, field: str, file: str | None = None) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, field=field, file=file)
            except BadInputError:
                continue
        raise BadInputError(f"expected {_type_name(tp)}, got {value!r}", file=file, field=field)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise BadInputError(f"expected {_type_name(tp)}, got {value!r}", file=file, field=field)
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(v, arg, field=f"{field}[{i}]", file=file) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise BadInputError(f"expected a table, got {value!r}", file=file, field=field)
        _, vt = typing.get_args(tp)
        return {str(k): coerce(v, vt, field=f"{field}.{k}", file=file) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadInputError(f"expected a number, got {value!r}", file=file, field=field)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadInputError(f"expected an integer, got {value!r}", file=file, field=field)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise BadInputError(f"expected true or false, got {value!r}", file=file, field=field)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise BadInputError(f"expected a string, got {value!r}", file=file, field=field)
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, file=file, prefix=field)
    raise TypeError(f"unsupported annotation {tp!r} for {field}")


def from_dict(cls, data: Any, *, file: str | None = None, prefix: str = ""):
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise BadInputError(f"expected a table, got {data!r}", file=file, field=prefix or None)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise BadInputError(f"unknown field; expected one of: {', '.join(sorted(fields))}",
                            file=file, field=where)
    kwargs = {}
    for name, f in fields.items():
        where = f"{prefix}.{name}" if prefix else name
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], field=where, file=file)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BadInputError("required field is missing", file=file, field=where)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except BadInputError as e:
            if e.file is None:
                e.file = file
            if prefix and e.field and not e.field.startswith(prefix):
                e.field = f"{prefix}.{e.field}"
            e.args = (e.describe(),)
            raise
    return obj


def to_dict(obj) -> dict:
    return {k: v for k, v in dataclasses.asdict(obj).items()}
