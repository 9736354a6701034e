"""What every PEFT method needs: target matching, freezing, new rows, modules_to_save.

Matching follows peft's ``check_target_module_exists`` in one function
(``is_target``), so every method matches modules exactly as peft would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import ParamcalcError
from ..families import Component, numel

# peft's task types wrap the classification head in a trainable copy (ModulesToSaveWrapper)
TASK_MODULES_TO_SAVE = {"seq-cls": ["classifier", "score"], "token-cls": ["classifier", "score"]}
PEFT_TASK_TYPES = {"base": "FEATURE_EXTRACTION", "masked-lm": "FEATURE_EXTRACTION", "seq-cls": "SEQ_CLS",
                   "token-cls": "TOKEN_CLS", "causal-lm": "CAUSAL_LM", "seq2seq-lm": "SEQ_2_SEQ_LM"}
ADAPTABLE_KINDS = ("linear", "conv1d", "embedding")


@dataclass
class PeftSummary:
    method: str
    config: dict
    added_params: int = 0
    trainable_params: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "config": self.config, "added_params": self.added_params,
                "trainable_params": self.trainable_params}


def module_keys(component: Component) -> list[str]:
    """The concrete module paths a row stands for (one per layer when it repeats)."""
    if "{i}" not in component.param:
        return [component.param]
    return [component.param.replace("{i}", str(i)) for i in range(component.repeat_count)]


def is_target(key: str, targets: list[str] | str) -> bool:
    """peft's rule: a string is a regex that must match the whole key; a list entry matches the key
    itself or its dotted suffix (``query`` matches ``encoder.layer.0.attention.self.query``)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, key) is not None
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def is_saved_module(key: str, modules_to_save: list[str]) -> bool:
    # peft never adapts a module inside one it saves whole
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", key) for m in modules_to_save)


def saved_modules(task: str, user_saved: list[str] | None) -> tuple[list[str], list[str], list[str]]:
    """(task's saved heads, all saved modules, those that guard targets) as peft handles them.

    peft never adapts a module it saves whole, except that its TOKEN_CLS model adds the classifier to
    modules_to_save only after injecting (PeftModelForTokenClassification.__init__), so there only the
    user's own modules_to_save guard the targets.
    """
    task_saved = TASK_MODULES_TO_SAVE.get(task, [])
    saved = task_saved + list(user_saved or [])
    guarded = saved if task != "token-cls" else list(user_saved or [])
    return task_saved, saved, guarded


def leaf_names(components: list[Component], kinds=ADAPTABLE_KINDS) -> list[str]:
    return sorted({c.param.rsplit(".", 1)[-1] for c in components if c.kind in kinds and c.group != "peft"})


def freeze(components: list[Component]) -> None:
    for c in components:
        c.trainable = False


def make_row(name: str, kind: str, repeat: str, repeat_count: int, shapes: dict, param: str,
             values: dict[str, int], trainable: bool = True, group: str = "peft") -> Component:
    per_module = sum(numel(shape, values) for shape in shapes.values())
    return Component(name=name, group=group, kind=kind, repeat=repeat, repeat_count=repeat_count, shapes=shapes,
                     param=param, count=repeat_count * per_module, trainable=trainable)


def split(component: Component, suffixes: set[str], values: dict[str, int]) -> list[Component]:
    """Split a row so the parameters named by ``suffixes`` (e.g. {"bias"}) get a row of their own."""
    chosen = {s: shape for s, shape in component.shapes.items() if s in suffixes}
    rest = {s: shape for s, shape in component.shapes.items() if s not in suffixes}
    if not chosen or not rest:
        return [component]
    rows = []
    for label, shapes in (("weight", rest), ("/".join(sorted(chosen)), chosen)):
        row = make_row(f"{component.name} {label}", component.kind, component.repeat, component.repeat_count,
                       shapes, component.param, values, component.trainable, component.group)
        row.args, row.role, row.part, row.tokens = component.args, component.role, component.part, component.tokens
        rows.append(row)
    return rows


def save_modules(result, names: list[str], values: dict[str, int]) -> list[Component]:
    """peft's modules_to_save: the original stays (frozen), a trainable copy is added next to it.

    A module is saved when its path ends with one of ``names`` (peft's ``_set_trainable``); the copy's
    parameters live under ``<module>.modules_to_save.default``.
    """
    copies, used = [], set()
    for component in list(result.components):
        if component.group == "peft" or component.kind == "tied":
            continue
        parts = component.param.split(".")
        prefixes = [".".join(parts[: n + 1]) for n in range(len(parts))]
        saved = next((p for p in prefixes if any(p.endswith(name) for name in names)), None)
        if saved is None:
            continue
        used.update(name for name in names if saved.endswith(name))
        rest = component.param[len(saved):]
        copies.append(make_row(f"{component.name} (trainable copy, modules_to_save)", component.kind,
                               component.repeat, component.repeat_count, component.shapes,
                               f"{saved}.modules_to_save.default{rest}", values))
        component.trainable = False
    result.components.extend(copies)
    return copies, used


def prompt_learning_setup(result, flag: str):
    """What peft does for every prompt-learning method: freeze the whole model, and for the seq-cls and
    token-cls task types train a copy of the head (PeftModelFor*Classification)."""
    family = require_family(result, flag)
    freeze(result.components)
    copies, _ = save_modules(result, TASK_MODULES_TO_SAVE.get(result.task, []), result.values)
    return family, copies


def require_family(result, flag: str):
    from .. import families

    if result.generic:
        raise ParamcalcError(f"{flag} needs a model with a formula file (bert, roberta, t5, gpt2, bloom); "
                             f"{result.model} was counted generically")
    return families.families()[result.family]
