"""LoRA (Hu et al. 2021, arXiv:2106.09685): a frozen weight W plus a trainable low-rank update B @ A.

For a module with ``in`` inputs and ``out`` outputs, A is [r, in] and B is [out, r], so LoRA adds
``r*(in + out)`` parameters per adapted module; DoRA (Liu et al. 2024, arXiv:2402.09353) adds a
magnitude vector of ``out`` more. Parameter names and defaults follow peft's ``tuners/lora``.
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

    def __post_init__(self):
        if self.r <= 0:
            raise ParamcalcError(f"--lora: r must be a positive integer, got {self.r}")
        if self.bias not in BIAS_MODES:
            raise ParamcalcError(f"--lora: bias must be one of {', '.join(BIAS_MODES)}, got {self.bias!r}")
        if not 0 <= self.dropout < 1:
            raise ParamcalcError(f"--lora: dropout must be in [0, 1), got {self.dropout}")
        if self.targets == []:
            raise ParamcalcError("--lora: targets is empty")

    @property
    def all_linear(self) -> bool:
        return self.targets is not None and [t.lower() for t in self.targets] == ["all-linear"]


def apply(result, options: Options) -> PeftSummary:
    family = require_family(result, "--lora")
    # what peft itself cannot do with this family, or does in a way not modelled yet (family file, [peft])
    refusal = family.peft.get("lora_all_linear_refused" if options.all_linear else
                              "lora_default_refused" if not options.targets else "")
    if refusal:
        raise ParamcalcError(f"--lora: {refusal}")
    targets = options.targets or family.peft.get("lora_targets")
    if not targets:
        raise ParamcalcError(f"--lora: peft has no default targets for {family.title}; give targets=...")
    task_saved, saved, guarded = saved_modules(result.task, options.modules_to_save)
    result.add_symbol("r", "lora r", options.r, "LoRA rank")
    values = result.values

    adapted = []  # (component, matched module keys)
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
                    f"--lora: peft adapts {family.title}'s {component.kind} through target_parameters (3-D "
                    "weights), which paramcalc does not model yet; target the attention projections")
            if component.kind not in ("linear", "conv1d", "embedding"):
                raise ParamcalcError(
                    f"--lora: target {component.param.rsplit('.', 1)[-1]!r} is a {component.kind} module, which "
                    f"LoRA cannot adapt; adaptable modules are: {', '.join(leaf_names(result.components))}")
            adapted.append((component, keys))
    if not adapted:
        raise ParamcalcError(f"--lora: targets {', '.join(targets)} match no module of {family.title}; "
                             f"adaptable modules are: {', '.join(leaf_names(result.components))}")

    freeze(result.components)
    rows = [row for component, keys in adapted for row in _lora_rows(component, keys, options, values)]
    _train_biases(result, options, [c for c, _ in adapted], values)
    copies, used = save_modules(result, saved, values)
    unused = [m for m in options.modules_to_save or [] if m not in used]
    if unused:
        raise ParamcalcError(f"--lora: modules_to_save {', '.join(unused)} match no module; module names are: "
                             f"{', '.join(leaf_names(result.components, kinds=('linear', 'conv1d', 'embedding', 'layernorm', 'rmsnorm')))}")
    result.components.extend(rows)
    added = sum(r.count for r in rows) + sum(c.count for c in copies)
    config = {**asdict(options), "targets": targets, "task_modules_to_save": task_saved or None}
    summary = PeftSummary("lora", config, added_params=added,
                          trainable_params=sum(c.count for c in result.components if c.trainable))
    if family.name == "t5" and any(c.name == "shared embeddings" for c, _ in adapted):
        summary.notes.append("LoRA on T5's `shared` adds parameters that never train: the encoder and decoder "
                             "look tokens up through their embed_tokens, tied to shared's weight, not through it")
    return summary


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
                                                         "exclude_modules", "target_parameters")}
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
                   dora=bool(config.use_dora))


def to_peft_config(options: Options, task_type: str | None, result=None):
    import peft

    targets = "all-linear" if options.all_linear else options.targets
    return peft.LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                           target_modules=targets, bias=options.bias, modules_to_save=options.modules_to_save,
                           use_dora=options.dora, task_type=task_type)
