"""Bottleneck adapters as AdapterHub defines them (the ``adapters`` library, ``methods/modeling.py``).

An adapter is ``adapter_down`` = Linear(H, b) + activation and ``adapter_up`` = Linear(b, H), both with
biases: ``2*H*b + b + H`` parameters, with ``b = H // reduction_factor`` (at least 1). Pfeiffer et al.
2020 (``SeqBnConfig``, arXiv:2005.00247) put one after the FFN of every layer; Houlsby et al. 2019
(``DoubleSeqBnConfig``, arXiv:1902.00751) one after attention and one after the FFN. Both default to a
reduction factor of 16. ``cross=true`` adds one after T5's cross-attention (``cross_adapter``).

AdapterHub cannot be installed beside transformers 5, so there is no config object to convert to or from:
in place of ``to_peft_config``, ``--verify`` injects the same modules into the meta model (``inject``) and
matches them like any other row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .. import expr
from ..errors import ParamcalcError
from .common import PeftSummary, freeze, make_row, require_family

KINDS = {"pfeiffer": ("output",), "houlsby": ("mh", "output")}


@dataclass
class Options:
    kind: str = field(default="pfeiffer", metadata={"help": "pfeiffer (after the FFN) | houlsby (attention and FFN)"})
    bottleneck: int | None = field(default=None, metadata={"help": "bottleneck width b"})
    reduction: float | None = field(default=None, metadata={"help": "reduction_factor: b = H // reduction (16)"})
    cross: bool = field(default=False, metadata={"help": "cross_adapter: also after cross-attention (T5)"})

    def __post_init__(self):
        self.kind = self.kind.lower()
        if self.kind not in KINDS:
            raise ParamcalcError(f"--adapter: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.bottleneck is not None and self.reduction is not None:
            raise ParamcalcError("--adapter: give bottleneck or reduction, not both")
        if self.bottleneck is not None and self.bottleneck <= 0:
            raise ParamcalcError(f"--adapter: bottleneck must be a positive integer, got {self.bottleneck}")
        if self.reduction is not None and self.reduction <= 0:
            raise ParamcalcError(f"--adapter: reduction must be positive, got {self.reduction}")


def apply(result, options: Options) -> PeftSummary:
    family = require_family(result, "--adapter")
    task = family.tasks[result.task]
    hidden = family.peft["token_dim"]
    width = options.bottleneck or max(1, int(result.values[hidden] // (options.reduction or 16)))
    result.add_symbol("b", "adapter bottleneck", width, "bottleneck width")
    kinds = set(KINDS[options.kind]) | ({"cross"} if options.cross else set())
    sites = [s for s in family.adapter_sites if s["kind"] in kinds and s["part"] in task.parts]
    if options.cross and not any(s["kind"] == "cross" for s in sites):
        raise ParamcalcError(f"--adapter: cross=true needs cross-attention, which {family.title} "
                             f"({result.task}) does not have")
    freeze(result.components)
    new_head = result.task in ("seq-cls", "token-cls")  # pretrained LM heads stay frozen
    heads = [c for c in result.components if c.group == "head" and c.count and new_head]
    for head in heads:  # a new classifier has to learn; AdapterHub trains its heads with the adapter
        head.trainable = True
    values = result.values
    rows = []
    for site in sites:
        module = f"{task.prefix}{site['module']}.{site['attribute']}.adapters.default"
        shapes = {"adapter_down.0.weight": ("b", hidden), "adapter_down.0.bias": ("b",),
                  "adapter_up.weight": (hidden, "b"), "adapter_up.bias": (hidden,)}
        rows.append(make_row(f"adapter after {site['after']}", "adapter", site["repeat"],
                             expr.evaluate(site["repeat"], values), shapes, module, values))
    result.components.extend(rows)
    summary = PeftSummary("adapter", {**asdict(options), "bottleneck": width},
                          added_params=sum(r.count for r in rows),
                          trainable_params=sum(c.count for c in result.components if c.trainable))
    if heads:
        summary.notes.append(f"the {result.task} head trains with the adapters (as AdapterHub's heads do)")
    return summary


def inject(model, options: Options, result):
    """Add the adapter modules to a (meta) model, freeze the base and unfreeze the heads, for --verify."""
    import torch

    for component in result.components:
        if component.kind != "adapter":
            continue
        hidden, width = (expr.evaluate(d, result.values) for d in component.shapes["adapter_up.weight"])
        for i in range(component.repeat_count):
            path = component.param.replace("{i}", str(i))
            owner_path, _, _ = path.partition(".adapters.default")
            parent_path, _, attribute = owner_path.rpartition(".")
            parent = model.get_submodule(parent_path)
            if not hasattr(parent, attribute):
                parent.add_module(attribute, torch.nn.Module())
            layer = getattr(parent, attribute)
            if not hasattr(layer, "adapters"):
                layer.add_module("adapters", torch.nn.ModuleDict())
            with torch.device("meta"):
                adapter = torch.nn.Module()
                adapter.adapter_down = torch.nn.Sequential(torch.nn.Linear(hidden, width), torch.nn.ReLU())
                adapter.adapter_up = torch.nn.Linear(width, hidden)
            layer.adapters["default"] = adapter
    for name, parameter in model.named_parameters():
        parameter.requires_grad = ".adapters.default." in name
    for component in result.components:
        if component.group == "head" and component.trainable:
            model.get_submodule(component.param).requires_grad_(True)
    return model
