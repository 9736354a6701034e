"""PEFT methods as transforms of the module tree, one module per method with the same roles:

- ``Options``: a dataclass parsed from the CLI spec (``--lora r=8``), fields carry their help text,
  validated in ``__post_init__`` with the bad value quoted;
- ``apply(result, options)``: adds the method's rows (group ``peft``), marks what trains, returns a
  ``PeftSummary``;
- ``from_peft_config`` / ``to_peft_config``: to and from peft's own config objects (the latter only
  for verification, so peft is imported lazily). Adapters come from AdapterHub, not peft: their module
  has ``inject`` in place of both.
"""

from __future__ import annotations

from ..errors import ParamcalcError
from . import adapter, ia3, lora, prefix, prompt, ptuning
from .spec import parse_spec

METHODS = {"lora": lora, "adapter": adapter, "prompt": prompt, "prefix": prefix, "ptuning": ptuning, "ia3": ia3}
PEFT_CONFIG_CLASSES = {"LoraConfig": "lora", "PromptTuningConfig": "prompt", "PrefixTuningConfig": "prefix",
                       "PromptEncoderConfig": "ptuning", "IA3Config": "ia3"}


def parse(method: str, spec: str):
    """Options for ``method`` from its CLI spec string."""
    return parse_spec(f"--{method}", spec, METHODS[method].Options)


def from_peft_config(config) -> tuple[str, object]:
    """(method, options) from a peft config object such as ``LoraConfig(r=8)``."""
    method = PEFT_CONFIG_CLASSES.get(type(config).__name__)
    if method is None:
        raise ParamcalcError(f"{type(config).__name__} is not supported; supported: {', '.join(PEFT_CONFIG_CLASSES)}")
    return method, METHODS[method].from_peft_config(config)


def normalise(peft_methods) -> list[tuple[str, object]]:
    """Accept one or a list of: peft config objects, (method, spec) pairs, or "method:spec" strings."""
    if peft_methods is None:
        return []
    if not isinstance(peft_methods, (list, tuple)) or (
        len(peft_methods) == 2 and isinstance(peft_methods[0], str) and peft_methods[0] in METHODS
    ):
        peft_methods = [peft_methods]
    found = []
    for item in peft_methods:
        if isinstance(item, str):
            method, _, spec = item.partition(":")
            if method not in METHODS:
                raise ParamcalcError(f"unknown PEFT method {method!r}; choose one of: {', '.join(METHODS)}")
            found.append((method, parse(method, spec)))
        elif isinstance(item, tuple):
            method, spec = item
            found.append((method, spec if not isinstance(spec, str) else parse(method, spec)))
        else:
            found.append(from_peft_config(item))
    if len(found) > 1:
        raise ParamcalcError("peft applies one method to a model at a time; got " + ", ".join(m for m, _ in found))
    return found


def apply_all(result, methods: list[tuple[str, object]]) -> None:
    for method, options in methods:
        result.peft.append(METHODS[method].apply(result, options))
        result.peft_options.append((method, options))
