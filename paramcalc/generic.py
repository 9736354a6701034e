"""Count any transformers model that has no family file, on the meta device.

Slower than the analytic path and without formulas, but exact: it sums
``numel`` over the real module tree. Rows group parameters by module path with
layer indices folded (``h.{i}.attn.c_attn``), so a 48-layer model still reads
as a short table.
"""

from __future__ import annotations

import os
import re
import sys

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


def count_factory(spec: str) -> CountResult:
    """Count a custom ``nn.Module`` returned by ``package.module:factory()`` (built on the meta device)."""
    model = build_factory_model(spec)
    return CountResult(
        model=spec, family="generic", task="base", hf_class=type(model).__name__, components=rows_of(model),
        config={}, config_source=spec, notes=["a custom module, counted on the meta device, without formulas"],
    )


def build_factory_model(spec: str):
    import importlib

    import torch

    module_name, _, factory_name = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: a module in the current folder is importable
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except Exception as exc:  # ImportError, AttributeError, or the module's own error
        raise ParamcalcError(f"cannot import {spec!r}: {type(exc).__name__}: {exc}") from None
    try:
        with torch.device("meta"):
            model = factory()
    except Exception as exc:
        raise ParamcalcError(f"{spec}() failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise ParamcalcError(f"{spec!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model


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
