"""Turn what a user typed (catalog name, config.json path, directory) into a config dict."""

from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from . import catalog
from .errors import ParamcalcError


@dataclass
class ResolvedConfig:
    name: str  # what the report calls the model
    config: dict
    source: str  # where the values came from


def is_factory_spec(model) -> bool:
    """``package.module:factory`` (a custom nn.Module), as opposed to a name or a path."""
    return (isinstance(model, str) and re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", model) is not None
            and not Path(model).exists())


def resolve(model) -> ResolvedConfig:
    """Resolve MODEL: a catalog name, a config.json path, a directory, a dict or a PretrainedConfig."""
    if isinstance(model, dict):
        return ResolvedConfig(model.get("_name_or_path") or model.get("model_type", "config"), dict(model), "dict")
    if hasattr(model, "to_dict") and hasattr(model, "model_type"):  # transformers.PretrainedConfig
        config = model.to_dict()
        config.setdefault("model_type", model.model_type)
        return ResolvedConfig(getattr(model, "name_or_path", "") or model.model_type, config, "PretrainedConfig")
    name = str(model)
    entry = catalog.lookup(name)
    if entry is not None:
        return ResolvedConfig(entry.name, dict(entry.config), entry.source)
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ParamcalcError(f"directory {name!r} holds no config.json")
    if path.is_file():
        return ResolvedConfig(name, _read_config(path), str(path))
    hint = catalog.suggestions(name)
    did_you_mean = f"; did you mean {', '.join(hint)}?" if hint else ""
    raise ParamcalcError(
        f"unknown model {name!r}: not in the catalog (see 'paramcalc list') and no such config.json{did_you_mean}"
    )


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ParamcalcError(f"cannot read {str(path)!r}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParamcalcError(f"{str(path)!r} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(config, dict):
        raise ParamcalcError(f"{str(path)!r} must hold a JSON object, not {type(config).__name__}")
    if "model_type" not in config:
        raise ParamcalcError(f"{str(path)!r} has no 'model_type', so paramcalc cannot tell which model it describes")
    if not isinstance(config["model_type"], str):
        raise ParamcalcError(f"{str(path)!r}: model_type must be a string such as \"bert\", got {config['model_type']!r}")
    return config


def parse_override(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` from --set; VALUE is read as JSON when it can be (ints, floats, true/false, null)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ParamcalcError(f"--set expects KEY=VALUE, got {item!r}")
    raw = raw.strip()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare string such as gated-gelu
    return key, value


def apply_overrides(config: dict, overrides: dict, known: dict) -> dict:
    """Apply --set values; a key must exist, and the value must have the key's type.

    ``known`` maps the keys the family reads to their defaults (None when there is none),
    so a key the config.json omits can still be set.
    """
    config = dict(config)
    for key, value in overrides.items():
        if key == "model_type":
            raise ParamcalcError("--set model_type: the model type picks the formulas; pass another model instead")
        if key not in config and key not in known:
            close = sorted(k for k in set(config) | set(known) if not k.startswith("_"))
            hint = difflib.get_close_matches(key, close, n=3)
            raise ParamcalcError(
                f"--set {key}: no such config key"
                + (f"; did you mean {', '.join(hint)}?" if hint else f"; keys are: {', '.join(close[:12])}, ...")
            )
        current = config[key] if config.get(key) is not None else known.get(key)
        if current is not None and not _same_type(current, value):
            raise ParamcalcError(
                f"--set {key}={value!r}: expected {_type_name(current)} (current value {current!r})"
            )
        config[key] = value
    return config


def _same_type(current, value) -> bool:
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(current))


def _type_name(value) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), type(value).__name__
    )
