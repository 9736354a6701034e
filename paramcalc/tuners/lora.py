"""LoRA (Hu et al. 2021, arXiv:2106.09685): a frozen weight W plus a trainable low-rank update B @ A.

For a module with ``in`` inputs and ``out`` outputs, A is [r, in] and B is [out, r], so LoRA adds
``r*(in + out)`` parameters per adapted module; DoRA (Liu et al. 2024, arXiv:2402.09353) adds a
magnitude vector of ``out`` more. Parameter names and defaults follow peft's ``tuners/lora``.

A mixture of experts' weights are parameters, not Linear modules (Mixtral's router, its fused 3-D experts): peft
adapts them through ``target_parameters``, one ``lora.ParamWrapper`` per parameter, with rank r per expert: a
[E, out, in] stack gets A [r*E, in] and B [out, r*E], ``r*E*(in + out)`` parameters. A family file's
``lora_renamed_targets`` says which target names peft turns into such parameters (``_parameter_targets``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import ParamcalcError
from .common import (
    PeftSummary, freeze, is_saved_module, is_target, leaf_names, make_row, module_keys,
    require_family, save_modules, saved_modules, split,
)

BIAS_MODES = ("none", "all", "lora_only")


@dataclass
class Options:
    r: int = field(default=8, metadata={"help": "rank of the update (peft default 8)"})
    alpha: int = field(default=8, metadata={"help": "scaling lora_alpha; no effect on counts"})
    dropout: float = field(default=0.0, metadata={"help": "lora_dropout; no effect on counts"})
    targets: list[str] | None = field(default=None, metadata={
        "help": "module-name suffixes as peft matches them, or all-linear (default: peft's for the family)"})
    bias: str = field(default="none", metadata={"help": "none | all | lora_only: which biases train"})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "modules trained in full (a trainable copy is kept next to the frozen original)"})
    dora: bool = field(default=False, metadata={"help": "DoRA: add a magnitude vector per adapted module"})
    parameters: list[str] | None = field(default=None, metadata={
        "help": "peft's target_parameters: mixture-of-experts weights adapted in place by name suffix (Mixtral: "
                "gate_up_proj, down_proj, gate.weight), rank r per expert"})

    def __post_init__(self):
        if self.r <= 0:
            raise ParamcalcError(f"--lora: r must be a positive integer, got {self.r}")
        if self.bias not in BIAS_MODES:
            raise ParamcalcError(f"--lora: bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        if not 0 <= self.dropout < 1:
            raise ParamcalcError(f"--lora: dropout must be in [0, 1), got {self.dropout}")
        if self.targets == []:
            raise ParamcalcError("--lora: targets is empty")
        if self.parameters == []:
            raise ParamcalcError("--lora: parameters is empty")

    @property
    def all_linear(self) -> bool:
        return self.targets is not None and [t.lower() for t in self.targets] == ["all-linear"]


def apply(result, options: Options) -> PeftSummary:
    family = require_family(result, "--lora")
    # what peft itself cannot do with this family, or does in a way not modelled yet (family file, [peft])
    refusal = family.peft.get("lora_default_refused") if not options.targets and not options.parameters else None
    if refusal:
        raise ParamcalcError(f"--lora: {refusal}")
    renamed = family.peft.get("lora_renamed_targets", {})
    # peft's conversion for transformers 5 leaves no default targets where it renames any (Mixtral)
    targets = options.targets or (None if renamed and options.parameters else family.peft.get("lora_targets"))
    if targets is None and not options.parameters:
        raise ParamcalcError(f"--lora: peft has no default targets for {family.title}; give targets=...")
    targets, parameters, ranks = _parameter_targets(family, targets or [], options)
    task_saved, saved, guarded = saved_modules(result.task, options.modules_to_save)
    result.add_symbol("r", "lora r", options.r, "LoRA rank")
    values = result.values

    adapted = []  # (component, matched module keys)
    wrapped = []  # (component, its adapted parameter suffixes in the order the module registers them)
    for component in result.components:
        keys = [k for k in module_keys(component) if _wanted(component, k, targets, options, guarded)]
        clash = [k for k in keys if is_saved_module(k, task_saved)]
        if clash:
            raise ParamcalcError(
                f"--lora: peft cannot adapt {clash[0]} for {result.task}: its task type also trains that module "
                "in full (modules_to_save) and peft raises a TypeError; leave it out of targets")
        if keys:
            if component.kind in ("router", "experts"):
                raise ParamcalcError(
                    f"--lora: peft cannot adapt {family.title}'s {component.kind} module "
                    f"{component.param.rsplit('.', 1)[-1]!r} itself (not a Linear: ValueError); "
                    f"{_parameter_hint(family)}")
            if component.kind not in ("linear", "conv1d", "embedding"):
                raise ParamcalcError(
                    f"--lora: target {component.param.rsplit('.', 1)[-1]!r} is a {component.kind} module, which "
                    f"LoRA cannot adapt; adaptable modules are: {', '.join(leaf_names(result.components))}")
            adapted.append((component, keys))
        suffixes = _wrapped_parameters(component, parameters, saved)
        if suffixes:
            wrapped.append((component, suffixes))
    if not adapted and not wrapped:
        asked = options.targets or targets or []
        raise ParamcalcError(f"--lora: targets {', '.join([*asked, *(options.parameters or [])])} match no module "
                             f"of {family.title}; adaptable modules are: {', '.join(leaf_names(result.components))}"
                             + (f"; {_parameter_hint(family)}" if renamed else ""))
    if wrapped and (options.dora or options.dropout):
        what = "use_dora=True" if options.dora else "lora_dropout != 0"
        raise ParamcalcError(f"--lora: peft's lora.ParamWrapper, which adapts {family.title}'s "
                             f"{' and '.join(sorted({c.kind for c, _ in wrapped}))} weights, does not work with "
                             f"{what} (ValueError); leave {'dora' if options.dora else 'dropout'} out or target "
                             "Linear modules only")

    freeze(result.components)
    rows = [row for component, keys in adapted for row in _lora_rows(component, keys, options, values)]
    rows += [row for component, suffixes in wrapped for row in _wrapper_rows(component, suffixes, ranks, values)]
    _train_biases(result, options, [c for c, _ in adapted], values)
    copies, used = save_modules(result, saved, values)
    unused = [m for m in options.modules_to_save or [] if m not in used]
    if unused:
        raise ParamcalcError(f"--lora: modules_to_save {', '.join(unused)} match no module; module names are: "
                             f"{', '.join(leaf_names(result.components, kinds=('linear', 'conv1d', 'embedding', 'layernorm', 'rmsnorm')))}")
    result.components.extend(rows)
    added = sum(r.count for r in rows) + sum(c.count for c in copies)
    config = {**asdict(options), "targets": options.targets or targets, "task_modules_to_save": task_saved or None}
    del config["parameters"]
    if parameters:  # what peft adapts through target_parameters, the user's and those its conversion renames
        config["target_parameters"] = parameters
    summary = PeftSummary("lora", config, added_params=added,
                          trainable_params=sum(c.count for c in result.components if c.trainable))
    if family.name == "t5" and any(c.name == "shared embeddings" for c, _ in adapted):
        summary.notes.append("LoRA on T5's `shared` adds parameters that never train: the encoder and decoder "
                             "look tokens up through their embed_tokens, tied to shared's weight, not through it")
    for name, factor in ranks.items():
        summary.notes.append(
            f"peft fuses {' and '.join(family.peft['lora_fused_targets'][name])} into the experts' {name}: rank "
            f"{factor}r = {factor * options.r} per expert (and alpha {factor}x); its RuntimeWarning that "
            f"rank_pattern / alpha_pattern '.*\\.{name}' matched no targeted module is about module names only, "
            "the pattern does set the parameter's rank")
    return summary


def _parameter_targets(family, targets: list[str], options: Options) -> tuple[list[str], list[str], dict[str, int]]:
    """(module targets, target parameters, rank factor per fused parameter) as peft 0.21 sees them on transformers 5.

    peft's ``_convert_peft_config_moe`` (peft/utils/transformers_weight_conversion.py) renames a target that equals
    or ends in one of the family's ``lora_renamed_targets`` keys (the v4 Linear names: Mixtral's ``gate``, ``w1``,
    ``w3``, ``w2``) into a target parameter; all-linear takes every key. A fused parameter (``lora_fused_targets``:
    gate_up_proj holds w1 and w3) needs all its sources, and then gets their number times the rank.
    """
    renamed = family.peft.get("lora_renamed_targets", {})
    fused = family.peft.get("lora_fused_targets", {})
    parameters = list(options.parameters or [])
    if not renamed:
        return targets, parameters, {}
    modules, sources = [], {}
    for target in list(renamed) if options.all_linear else targets:
        old = next((old for old in renamed if target == old or target.endswith(f".{old}")), None)
        if old is None:
            modules.append(target)
            continue
        if renamed[old] not in parameters:
            parameters.append(renamed[old])
        sources.setdefault(renamed[old], set()).add(old)
    ranks = {}
    for name, needed in fused.items():
        present = sources.get(name, set())
        if 0 < len(present) < len(needed):
            raise ParamcalcError(
                f"--lora: peft cannot convert target(s) {', '.join(sorted(present))} without also targeting "
                f"{', '.join(sorted(set(needed) - present))}: {family.title} fuses {' and '.join(needed)} into "
                f"{name} (ValueError); name all of them")
        if len(present) == len(needed) > 1:
            ranks[name] = len(needed)
    return (targets if options.all_linear else modules), parameters, ranks


def _parameter_hint(family) -> str:
    renamed = family.peft.get("lora_renamed_targets", {})
    if not renamed:
        return "target its Linear modules"
    names = {}
    for old, new in renamed.items():
        names.setdefault(new, []).append(old)
    return (f"peft reaches {family.title}'s mixture of experts by its v4 names, " +
            ", ".join(f"{','.join(olds)} ({new})" for new, olds in names.items()) +
            "; or by parameter name, parameters=... (peft's target_parameters); or targets=all-linear")


def _wrapped_parameters(component, parameters: list[str], saved: list[str]) -> list[str]:
    """The parameters of ``component`` peft wraps for ``parameters`` (its ``_inject_parameters``: the key
    ``<module>.<parameter>`` equals a target or ends in ``.<target>``), in the order the module registers them."""
    if not parameters or component.group == "peft" or component.kind == "tied":
        return []
    found = [suffix for suffix in component.shapes
             if any(_parameter_matches(f"{key}.{suffix}", parameters) for key in module_keys(component))]
    if not found:
        return []
    if component.kind not in ("router", "experts"):
        raise ParamcalcError(f"--lora: parameters {', '.join(parameters)} reach {component.param}.{found[0]} "
                             f"({component.kind}); paramcalc models target_parameters on mixture-of-experts weights "
                             "(router, experts) only; name Linear modules in targets=...")
    if any(is_saved_module(key, saved) for key in module_keys(component)):
        raise ParamcalcError(f"--lora: peft cannot save {component.param.rsplit('.', 1)[-1]!r} whole "
                             "(modules_to_save) and adapt its weights too (TypeError); leave it out of one of them")
    return found


def _parameter_matches(key: str, parameters: list[str]) -> bool:
    return key in parameters or any(key.endswith(f".{p}") for p in parameters)


def _wrapper_rows(component, suffixes, ranks, values):
    """lora.ParamWrapper on each adapted parameter: a 2-D [out, in] weight (the router) gets A [R, in] and B [out, R];
    a 3-D [E, out, in] stack of experts (stored not transposed, as the experts primitive is) A [R*E, in] and
    B [out, R*E]. R is r, times the number of fused sources where peft fuses them (gate_up_proj: 2r). peft nests one
    wrapper per parameter of a module, the first registered innermost, so with both of the experts' parameters
    adapted, gate_up_proj's A and B sit under ``experts.base_layer``."""
    rows = []
    for depth, suffix in enumerate(suffixes):
        shape = component.shapes[suffix]
        rank = "r" if suffix not in ranks else f"{ranks[suffix]}*r"
        if len(shape) == 3:
            experts, rows_out, rows_in = shape
            width = f"{rank}*{experts}"
        else:
            rows_out, rows_in = shape
            width = rank
        shapes = {"lora_A.default.weight": (width, rows_in), "lora_B.default.weight": (rows_out, width)}
        param = component.param + ".base_layer" * (len(suffixes) - 1 - depth)
        label = f"LoRA {component.name}" + (f" {suffix}" if len(component.shapes) > 1 else "")
        rows.append(make_row(label, "lora", component.repeat, component.repeat_count, shapes, param, values))
    return rows


def _wanted(component, key, targets, options, saved) -> bool:
    if component.group == "peft" or component.kind == "tied" or is_saved_module(key, saved):
        return False
    if options.all_linear:  # peft: every Linear/Conv1D except the output embedding (the LM head)
        return component.kind in ("linear", "conv1d") and component.role != "output-embedding"
    return is_target(key, targets)


def _lora_rows(component, keys, options, values):
    if component.kind == "embedding":
        rows_in, rows_out = component.args["num_embeddings"], component.args["embedding_dim"]
        shapes = {"lora_embedding_A.default": ("r", rows_in), "lora_embedding_B.default": (rows_out, "r")}
        magnitude = rows_out
    else:
        rows_in, rows_out = component.args["in_features"], component.args["out_features"]
        shapes = {"lora_A.default.weight": ("r", rows_in), "lora_B.default.weight": (rows_out, "r")}
        magnitude = rows_out
    if options.dora:
        shapes["lora_magnitude_vector.default.weight"] = (magnitude,)
    if len(keys) == component.repeat_count:  # every layer: one row, the layer symbol as its repeat
        return [make_row(f"LoRA {component.name}", "lora", component.repeat, component.repeat_count, shapes,
                         component.param, values)]
    return [make_row(f"LoRA {key}", "lora", "1", 1, shapes, key, values) for key in keys]


def _train_biases(result, options, adapted, values) -> None:
    """bias=all trains every parameter named bias; bias=lora_only the biases of adapted modules (peft)."""
    if options.bias == "none":
        return
    rows = []
    for component in result.components:
        wanted = options.bias == "all" or component in adapted
        if wanted and "bias" in component.shapes:
            parts = split(component, {"bias"}, values)
            parts[-1].trainable = True
            rows.extend(parts)
        else:
            rows.append(component)
    result.components[:] = rows


def from_peft_config(config) -> Options:
    unsupported = {k: getattr(config, k, None) for k in ("rank_pattern", "alpha_pattern", "layers_to_transform",
                                                         "exclude_modules")}
    unsupported = {k: v for k, v in unsupported.items() if v}
    if unsupported:
        raise ParamcalcError(f"LoraConfig options not modelled yet: {', '.join(unsupported)}")
    targets = config.target_modules
    if isinstance(targets, str):
        targets = [targets] if targets.lower() == "all-linear" else None
        if targets is None:
            raise ParamcalcError("LoraConfig with a regex target_modules is not modelled yet; give a list")
    return Options(r=config.r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   targets=sorted(targets) if targets else None, bias=config.bias,
                   modules_to_save=list(config.modules_to_save) if config.modules_to_save else None,
                   dora=bool(config.use_dora),
                   parameters=sorted(config.target_parameters) if getattr(config, "target_parameters", None) else None)


def to_peft_config(options: Options, task_type: str | None, result=None):
    import peft

    targets = "all-linear" if options.all_linear else options.targets
    extra = {"target_parameters": list(options.parameters)} if options.parameters else {}
    return peft.LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                           target_modules=targets, bias=options.bias, modules_to_save=options.modules_to_save,
                           use_dora=options.dora, task_type=task_type, **extra)
