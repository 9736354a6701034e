"""The CLI spec of a PEFT method: ``--lora r=4,targets=c_attn,c_proj,bias=all``.

Items are ``KEY=VALUE``; a bare item continues the previous key's list, so the
example's targets are ``[c_attn, c_proj]``. Keys and value types come from the
method's options dataclass, whose fields carry their help text in ``metadata``.
"""

from __future__ import annotations

import dataclasses
import types
import typing

from ..errors import ParamcalcError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_spec(flag: str, spec: str, options_cls):
    """An ``options_cls`` instance from a spec string; errors name the valid keys."""
    fields = {f.name: f for f in dataclasses.fields(options_cls) if f.init}
    hints = typing.get_type_hints(options_cls)
    raw: dict[str, list[str]] = {}
    last = None
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in fields:
                raise ParamcalcError(f"{flag}: unknown key {key!r}; keys are: {', '.join(fields)}")
            raw[key], last = [value.strip()], key
        elif last is not None and _is_list(hints[last]):
            raw[last].append(item)
        else:
            raise ParamcalcError(f"{flag}: expected KEY=VALUE, got {item!r}; keys are: {', '.join(fields)}")
    values = {key: _convert(flag, key, items, hints[key]) for key, items in raw.items()}
    return options_cls(**values)


def _is_list(hint) -> bool:
    return any(typing.get_origin(t) is list for t in _alternatives(hint))


def _alternatives(hint):
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _convert(flag: str, key: str, items: list[str], hint):
    options = _alternatives(hint)
    if len(items) > 1 or any(typing.get_origin(t) is list for t in options) and len(items) == 1 and str not in options:
        return list(items)
    text = items[0]
    for kind in options:
        if kind is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
        elif kind is int:
            try:
                return int(text)
            except ValueError:
                pass
        elif kind is float:
            try:
                return float(text)
            except ValueError:
                pass
        elif kind is str:
            return text
        elif typing.get_origin(kind) is list:
            return [text]
    wanted = " or ".join({bool: "true/false", int: "an integer", float: "a number"}.get(k, str(k)) for k in options)
    raise ParamcalcError(f"{flag}: {key}={text!r} is not {wanted}")


def describe(options_cls) -> str:
    """One line per key with its help text, for --help and error messages."""
    return "; ".join(f"{f.name}: {f.metadata.get('help', '')}" for f in dataclasses.fields(options_cls) if f.init)
