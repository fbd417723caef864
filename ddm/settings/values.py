"""Typed settings groups: the frozen base class, the check of each value against its type, and unset values.

A settings group is a frozen dataclass whose fields are the keys of one config
group (``expert``, ``sample``, ...). ``build`` makes one from the plain values
the config holds, checking each against its field's annotation: a value of the
wrong type is refused in one line naming the key, the type it needs and the
group's settings. A mandatory value nobody gave (``???``) is kept as ``UNSET``
and refused only where a stage reads it, naming the key and how to give it.
Keys the chosen option of a group does not declare (``data.urls`` outside
``data=webdataset``) are None and left out of ``to_dict``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union

from ddm.errors import BadInput


class _Unset:
    """A mandatory value (``???`` in a config file) that nobody gave."""

    def __repr__(self) -> str:
        return "???"


UNSET: Any = _Unset()
_OMIT = "_declared"  # the field that holds which keys the config gave


class MissingValue(BadInput):
    """A mandatory value a stage read and nobody gave."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Group:
    """Base of every settings group. Reading an unset mandatory value raises ``MissingValue`` naming it."""

    _declared: frozenset = dataclasses.field(default=frozenset(), repr=False, compare=False)
    _key: str = dataclasses.field(default="", repr=False, compare=False)

    def __getattribute__(self, name: str):
        value = object.__getattribute__(self, name)
        if value is UNSET:
            key = f"{object.__getattribute__(self, '_key')}.{name}".lstrip(".")
            raise MissingValue(
                f"{key} has no value and this stage needs it: give it on the command line ({key}=...), "
                f"or in an experiment file (`ddm <stage> --help` lists the groups and keys)"
            )
        return value

    def to_dict(self) -> dict:
        """The values the config gave, nested groups as dicts (unset ones as ``???``), for records and logs."""
        out = {}
        for f in settings_fields(type(self)):
            if f.name not in self._declared:
                continue
            value = object.__getattribute__(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Group) else _plain(value)
        return out


def _plain(value):
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return "???" if value is UNSET else value


def settings_fields(cls) -> list[dataclasses.Field]:
    """The fields of a settings group that are settings (not the bookkeeping of ``Group``)."""
    return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def _name(annotation) -> str:
    if annotation is type(None):
        return "null"
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(_name(a) for a in typing.get_args(annotation))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(annotation))
    if origin is list:
        return f"a list of {_name(typing.get_args(annotation)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


_NO = object()


def _convert(annotation, value):
    """``value`` as ``annotation`` says, or ``_NO`` when it is not one."""
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if annotation is type(None):
        return None if value is None else _NO
    if origin in (Union, types.UnionType):
        for option in typing.get_args(annotation):
            out = _convert(option, value)
            if out is not _NO:
                return out
        return _NO
    if origin is Literal:
        return value if value in typing.get_args(annotation) else _NO
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _NO
        inner = typing.get_args(annotation)[0]
        items = [_convert(inner, v) for v in value]
        return _NO if any(i is _NO for i in items) else items
    if annotation is bool:
        return value if isinstance(value, bool) else _NO
    if annotation is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if annotation is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO
    if annotation is str:  # a name or path the command line parsed as a number (name=2024) is still that text
        return str(value) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else _NO
    if annotation is dict:
        return dict(value) if isinstance(value, dict) else _NO
    raise TypeError(f"no check for settings of type {annotation!r}")


def build(cls, values: dict, key: str = ""):
    """A ``cls`` settings group from a config group's plain values, each checked against its type."""
    if not isinstance(values, dict):
        raise BadInput(f"{key} is a group of settings, not a value ({values!r}): set its keys, e.g. {key}.<key>=...")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in settings_fields(cls)}
    kwargs = {}
    for name, value in values.items():
        where = f"{key}.{name}".lstrip(".")
        if name not in fields:
            raise BadInput(f"{where} is not a setting ({_group_keys(cls, key)})")
        annotation = hints[name]
        if value is UNSET or (isinstance(value, str) and value == "???"):
            kwargs[name] = UNSET
        elif isinstance(annotation, type) and issubclass(annotation, Group):
            kwargs[name] = build(annotation, value, where)
        else:
            out = _convert(annotation, value)
            if out is _NO:
                raise BadInput(
                    f"{where}={value!r} is not {_name(annotation)}: give {where} {_name(annotation)} "
                    f"({_group_keys(cls, key)})"
                )
            kwargs[name] = out
    for name, f in fields.items():
        if name not in kwargs:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                kwargs[name] = None  # a key this option of the group does not have
    return cls(**kwargs, _declared=frozenset(values), _key=key)


def _group_keys(cls, key: str) -> str:
    names = ", ".join(f.name for f in settings_fields(cls))
    return f"{key}'s settings: {names}" if key else f"the top-level settings: {names}"


def changed(group, changes: dict):
    """A copy of ``group`` with dotted keys changed (``{"expert.id": 3, "redo": False}``), values checked."""
    out = group
    for dotted, value in changes.items():
        out = _set(out, dotted.split("."), value)
    return out


def _set(group, path: list[str], value):
    name, rest = path[0], path[1:]
    hints = typing.get_type_hints(type(group))
    if name not in hints or name.startswith("_"):
        where = f"{group._key}.{name}".lstrip(".")
        raise BadInput(f"{where} is not a setting ({_group_keys(type(group), group._key)})")
    where = f"{group._key}.{name}".lstrip(".")
    if rest:
        new = _set(object.__getattribute__(group, name), rest, value)
    else:
        annotation = hints[name]
        if isinstance(value, Group) or value is UNSET:
            new = value
        elif isinstance(annotation, type) and issubclass(annotation, Group):
            new = build(annotation, value, where)
        else:
            new = _convert(annotation, value)
            if new is _NO:
                raise BadInput(f"{where}={value!r} is not {_name(annotation)}")
    kwargs = {f.name: object.__getattribute__(group, f.name) for f in dataclasses.fields(group)}
    kwargs.update({name: new, "_declared": group._declared | {name}})
    return type(group)(**kwargs)
