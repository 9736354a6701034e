"""``--verify``: match every parameter of the real model to exactly one formula row.

The model is built from the same config on the meta device (real shapes, no
memory). Each row's expected parameter names and shapes come from the family
file; every parameter the model has must be claimed by exactly one row, with
the same shape. Tied rows must really share their tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .configs import is_factory_spec
from .counting import CountResult
from .families import concrete_parameters
from .meta import build_meta_model


@dataclass
class ComponentCheck:
    name: str
    expected: int
    actual: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and self.expected == self.actual


@dataclass
class Verification:
    model_class: str
    meta_total: int  # sum of numel over model.parameters(), as torch counts it
    checks: list[ComponentCheck]
    unclaimed: list[str]  # parameters of the real model that no row accounts for
    generic: bool = False  # counted from the model itself, so nothing independent was compared
    peft_counts: tuple[int, int] | None = None  # peft's own get_nb_trainable_parameters(): (trainable, all)

    @property
    def ok(self) -> bool:
        return not self.unclaimed and all(c.ok for c in self.checks)

    def mismatches(self) -> list[str]:
        lines = [f"{c.name}: formula {c.expected:,} vs model {c.actual:,}; " + "; ".join(c.problems)
                 for c in self.checks if not c.ok]
        if self.unclaimed:
            lines.append("parameters no formula row accounts for: " + ", ".join(self.unclaimed))
        return lines


def verify(result: CountResult, model=None) -> Verification:
    """Check ``result`` against the real model (built on the meta device unless given)."""
    if model is None and result.generic and is_factory_spec(result.config_source):
        from .generic import build_factory_model

        model = build_factory_model(result.config_source)
    if model is None:
        model = build_meta_model(result.config, class_name=result.hf_class, task=result.task)
        if result.quant is not None:  # from_pretrained loads quantized weights frozen
            from .quantized import freeze_quantized

            freeze_quantized(model, result.quant.options)
    if result.peft_options:
        model = apply_real_peft(model, result)
    wrapper = _peft_wrapper(model)
    actual = {peft_free_name(name, wrapper): p for name, p in model.named_parameters()}
    aliases = {peft_free_name(name, wrapper): p for name, p in model.named_parameters(remove_duplicate=False)}
    meta_total = sum(p.numel() for p in model.parameters())
    if result.generic:  # counted from the model itself: nothing independent to compare
        checks = [ComponentCheck(c.name, c.count, c.count) for c in result.components]
        return Verification(type(model).__name__, meta_total, checks, [], generic=True)

    values = {s: v for s, (_k, v, _d) in result.symbols.items()}
    by_name = {c.name: c for c in result.components}
    claimed: set[str] = set()
    checks = []
    for component in result.components:
        check = ComponentCheck(component.name, component.count, 0)
        if component.tied_to:
            _check_tied(component, by_name, values, aliases, check)
        for name, shape in concrete_parameters(component, values).items():
            parameter = actual.get(name)
            if parameter is None:
                check.problems.append(f"model has no parameter {name}")
                continue
            if name in claimed:
                check.problems.append(f"{name} is claimed by two rows")
            claimed.add(name)
            check.actual += parameter.numel()
            if tuple(parameter.shape) != shape:
                check.problems.append(f"{name} has shape {tuple(parameter.shape)}, formula says {shape}")
            if parameter.requires_grad != component.trainable:
                state = "trainable" if parameter.requires_grad else "frozen"
                check.problems.append(f"{name} is {state} in the model")
        checks.append(check)
    unclaimed = [name for name in actual if name not in claimed]
    peft_counts = None
    if result.peft_options:  # peft's own figures, or the same sums over an injected model
        peft_counts = model.get_nb_trainable_parameters() if hasattr(model, "get_nb_trainable_parameters") else (
            sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))
    return Verification(type(model).__name__, meta_total, checks, unclaimed, peft_counts=peft_counts)


def apply_real_peft(model, result):
    """Apply the same methods with peft itself (``get_peft_model``), on the meta device for ``--verify`` or
    on a real model for ``paramcalc train``; bottleneck adapters with paramcalc's own injected modules."""
    import warnings

    import peft

    from .tuners import METHODS
    from .tuners.common import PEFT_TASK_TYPES

    for method, options in result.peft_options:
        if hasattr(METHODS[method], "inject"):  # not a peft method: the same modules, injected by hand
            model = METHODS[method].inject(model, options, result)
            continue
        config = METHODS[method].to_peft_config(options, PEFT_TASK_TYPES.get(result.task), result)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # peft warns about meta tensors and fan_in_fan_out; not ours to fix
            model = peft.get_peft_model(model, config)
    return model


def _peft_wrapper(model) -> str:
    """What peft puts in front of the task model's parameter names: ``base_model.model.`` where a tuner (LoRA,
    IA3, ...) wraps it, ``base_model.`` where prompt learning holds it directly (a Llama's own ``model.`` prefix
    then follows: ``base_model.model.embed_tokens`` is the task model's ``model.embed_tokens``), nothing without
    peft."""
    base = getattr(model, "base_model", None)
    if base is None or base is model or not type(model).__module__.startswith("peft."):
        return ""
    return "base_model.model." if type(base).__module__.startswith("peft.") else "base_model."


def peft_free_name(name: str, wrapper: str | None = None) -> str:
    """A peft-wrapped parameter's name as paramcalc's rows spell it.

    ``base_model.model.x.query.base_layer.weight`` -> ``x.query.weight``; ``wrapper`` is what the model puts in
    front (``_peft_wrapper``), or, unknown, whichever of ``base_model.model.`` and ``base_model.`` the name has
    (ambiguous only for prompt learning on a model whose own prefix is ``model.``);
    ``classifier.original_module.weight`` -> ``classifier.weight`` (the frozen original of a saved module).
    """
    for prefix in (wrapper,) if wrapper is not None else ("base_model.model.", "base_model."):
        if prefix and name.startswith(prefix):
            name = name[len(prefix):]
            break
    # peft nests one lora.ParamWrapper per adapted parameter of a module (Mixtral's fused experts: gate_up_proj's
    # inside down_proj's): the base weights lose every base_layer (experts.base_layer.base_layer.gate_up_proj ->
    # experts.gate_up_proj), an inner wrapper's own A and B keep theirs (experts.base_layer.lora_A.default.weight)
    if ".base_layer." in name and not any(part.startswith("lora_") for part in name.split(".")):
        name = name.replace(".base_layer", "")
    return name.replace(".original_module.", ".")


def _check_tied(component, by_name, values, aliases, check) -> None:
    target = by_name.get(component.tied_to)
    if target is None:
        check.problems.append(f"tied to {component.tied_to!r}, which this model does not have")
        return
    own = aliases.get(f"{component.param}.weight")
    shared = next(iter(concrete_parameters(target, values)))
    if own is None:
        check.problems.append(f"model has no parameter {component.param}.weight")
    elif own is not aliases.get(shared):
        check.problems.append(f"{component.param}.weight is not tied to {shared}: it adds {own.numel():,}")
        check.actual += own.numel()
