"""IA3 (Liu et al. 2022, arXiv:2205.05638): learned vectors that rescale activations, base frozen.

peft's ``IA3Layer`` adds one vector per adapted Linear/Conv1D: ``[out, 1]`` scaling its output, or, for a
feed-forward module, ``[1, in]`` scaling its input. Defaults per family come from peft's target and
feed-forward mappings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import ParamcalcError
from .common import (
    PeftSummary, freeze, is_saved_module, is_target, leaf_names, make_row, module_keys, require_family,
    save_modules, saved_modules,
)


@dataclass
class Options:
    targets: list[str] | None = field(default=None, metadata={
        "help": "module-name suffixes to rescale (default: peft's for the family)"})
    ff: list[str] | None = field(default=None, metadata={
        "help": "feedforward_modules: targets whose input, not output, is rescaled (a subset of targets)"})

    def __post_init__(self):
        if self.targets is not None and self.ff is not None and not set(self.ff) <= set(self.targets):
            raise ParamcalcError(f"--ia3: ff {sorted(set(self.ff) - set(self.targets))} must also be in targets "
                                 "(peft: feedforward_modules should be a subset of target_modules)")


def apply(result, options: Options) -> PeftSummary:
    family = require_family(result, "--ia3")
    targets = options.targets or family.peft["ia3_targets"]
    feedforward = options.ff if options.ff is not None else (
        family.peft["ia3_feedforward"] if options.targets is None else [])
    saved, _, guarded = saved_modules(result.task, None)
    rows = []
    for component in list(result.components):
        if component.group == "peft" or component.kind == "tied":
            continue
        keys = [k for k in module_keys(component) if is_target(k, targets) and not is_saved_module(k, guarded)]
        if not keys:
            continue
        if component.kind not in ("linear", "conv1d"):
            raise ParamcalcError(f"--ia3: target {component.param.rsplit('.', 1)[-1]!r} is a {component.kind} "
                                 "module; IA3 adapts Linear and Conv1D modules: "
                                 f"{', '.join(leaf_names(result.components, kinds=('linear', 'conv1d')))}")
        if any(is_saved_module(k, saved) for k in keys):
            raise ParamcalcError(f"--ia3: peft cannot adapt {keys[0]} for {result.task}: the task type also "
                                 "trains it in full (modules_to_save); leave it out of targets")
        feed = [k for k in keys if any(k.endswith(f) for f in feedforward)]
        for group, is_ff in ((feed, True), ([k for k in keys if k not in feed], False)):
            if group:
                rows.extend(_rows(component, group, is_ff, result.values))
    if not rows:
        raise ParamcalcError(f"--ia3: targets {', '.join(targets)} match no module of {family.title}; modules are: "
                             f"{', '.join(leaf_names(result.components, kinds=('linear', 'conv1d')))}")
    freeze(result.components)
    copies, _ = save_modules(result, saved, result.values)
    result.components.extend(rows)
    return PeftSummary("ia3", {**asdict(options), "targets": targets, "ff": feedforward},
                       added_params=sum(r.count for r in rows + copies),
                       trainable_params=sum(c.count for c in result.components if c.trainable))


def _rows(component, keys, feedforward, values):
    shape = ("1", component.args["in_features"]) if feedforward else (component.args["out_features"], "1")
    label = f"IA3 {component.name} ({'input' if feedforward else 'output'} scale)"
    if len(keys) == component.repeat_count:
        return [make_row(label, "ia3", component.repeat, component.repeat_count, {"ia3_l.default": shape},
                         component.param, values)]
    return [make_row(f"IA3 {key}", "ia3", "1", 1, {"ia3_l.default": shape}, key, values) for key in keys]


def from_peft_config(config) -> Options:
    def as_list(value):
        if isinstance(value, str):
            raise ParamcalcError("IA3Config with regex target_modules is not modelled yet; give a list")
        return sorted(value) if value is not None else None

    return Options(targets=as_list(config.target_modules), ff=as_list(config.feedforward_modules))


def to_peft_config(options: Options, task_type: str | None, result=None):
    import peft

    # the defaults paramcalc resolved, spelled out, so peft sees exactly what was counted
    summary = next(p for p in result.peft if p.method == "ia3")
    return peft.IA3Config(target_modules=summary.config["targets"], feedforward_modules=summary.config["ff"],
                          task_type=task_type)
