"""Count any transformers model that has no family file, on the meta device, and any custom ``nn.Module``.

Slower than the analytic path and without formulas, but exact: it sums
``numel`` over the real module tree. Rows group parameters by module path with
layer indices folded (``h.{i}.attn.c_attn``), so a 48-layer model still reads
as a short table.
"""

from __future__ import annotations

import os
import re
import sys

from .configs import is_factory_spec
from .counting import CountResult
from .errors import ParamcalcError
from .families import Component
from .meta import AUTO_CLASSES, build_meta_model

_GROUP_HINTS = (  # first match wins; by substring of the lower-cased module path
    ("embed", "embedding"), ("wte", "embedding"), ("wpe", "embedding"), ("shared", "embedding"),
    ("norm", "layernorm"), ("ln_", "layernorm"),
    ("pooler", "pooler"),
    ("lm_head", "head"), ("classifier", "head"), ("score", "head"), ("qa_outputs", "head"), ("cls.", "head"),
    ("attn", "attention"), ("attention", "attention"),
    ("mlp", "ffn"), ("ffn", "ffn"), ("feed_forward", "ffn"), ("fc", "ffn"), ("intermediate", "ffn"),
)


def guess_group(path: str) -> str:
    lowered = path.lower()
    return next((group for hint, group in _GROUP_HINTS if hint in lowered), "other")


def count_generic(config: dict, task: str) -> CountResult:
    if task not in AUTO_CLASSES:
        raise ParamcalcError(f"unknown task {task!r}; choose one of: {', '.join(AUTO_CLASSES)}")
    model = build_meta_model(config, task=task)
    return CountResult(
        model="", family="generic", task=task, hf_class=type(model).__name__, components=rows_of(model),
        config=config, config_source="",
    )


def count_custom(model) -> CountResult:
    """Count a custom ``nn.Module``: a ``"package.module:factory"`` spec, a factory callable, or an instance.

    A factory (named or passed) is called on the meta device, so even a model too large for memory is
    counted; an instance is counted as it is, without a copy, so its ``requires_grad`` flags decide what
    trains (a model you froze or wrapped yourself reads as you left it).
    """
    label = custom_label(model)
    if is_module(model):
        return _custom_result(model, label, "nn.Module instance",
                              "a custom module instance, counted as it is (trainable = requires_grad), without formulas")
    return _custom_result(build_factory_model(model), label, factory_source(model),
                          "a custom module, counted on the meta device, without formulas")


def _custom_result(model, label: str, source: str, note: str) -> CountResult:
    """A custom module has no config, task or formulas: its rows are its module paths (see ``rows_of``)."""
    return CountResult(
        model=label, family="generic", task="base", hf_class=type(model).__name__, components=rows_of(model),
        config={}, config_source=source, notes=[note],
    )


def is_module(model) -> bool:
    """An ``nn.Module`` instance. Checked without importing torch: if torch is not loaded, it cannot be one."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(model, torch.nn.Module)


def custom_label(model) -> str:
    """What the report calls a custom module: its spec, ``module:name`` of a factory, or ``Class instance``."""
    if isinstance(model, str):
        return model
    if is_module(model):
        return f"{type(model).__name__} instance"
    name = getattr(model, "__qualname__", None) or type(model).__name__
    return f"{getattr(model, '__module__', None) or '?'}:{name}"


def factory_source(factory) -> str:
    """The factory's spec when importing it by that name finds the same object (so ``verify`` can rebuild
    the model from the result alone); otherwise a description, and ``verify`` needs the model passed."""
    if isinstance(factory, str):
        return factory
    spec = custom_label(factory)
    module_name, _, name = spec.partition(":")
    if is_factory_spec(spec) and getattr(sys.modules.get(module_name), name, None) is factory:
        return spec
    return f"factory {spec} (not importable by that name)"


def build_factory_model(factory):
    """Call ``factory`` (a ``"package.module:factory"`` spec or a callable) on the meta device."""
    import torch

    label = custom_label(factory)
    function = _import_factory(factory) if isinstance(factory, str) else factory
    try:
        with torch.device("meta"):
            model = function()
    except Exception as exc:
        raise ParamcalcError(f"{label}() failed: {_one_line(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ParamcalcError(f"{label!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _import_factory(spec: str):
    import importlib

    module_name, _, factory_name = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: a module in the current folder is importable
    try:
        return getattr(importlib.import_module(module_name), factory_name)
    except Exception as exc:  # ImportError, AttributeError, or the module's own error
        raise ParamcalcError(f"cannot import {spec!r}: {_one_line(exc)}") from None


def _one_line(exc: Exception) -> str:
    """``Type: first line of the message``: errors paramcalc shows are one line, whatever the factory raised."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__


def rows_of(model) -> list[Component]:
    """One row per module path, layer indices folded, in the model's own order."""
    rows: dict[str, Component] = {}
    for name, parameter in model.named_parameters():
        module, _, suffix = name.rpartition(".")
        pattern = re.sub(r"\.\d+(?=\.|$)", ".{i}", module)
        row = rows.get(pattern)
        if row is None:
            row = rows[pattern] = Component(
                name=pattern, group=guess_group(pattern), kind="module", repeat="1", repeat_count=0,
                shapes={}, param=pattern, count=0, trainable=True,
            )
        if suffix not in row.shapes:
            row.shapes[suffix] = tuple(str(d) for d in parameter.shape)
        if suffix == next(iter(row.shapes)):
            row.repeat_count += 1
        row.count += parameter.numel()
        row.trainable = row.trainable and parameter.requires_grad
    return list(rows.values())
