"""``paramcalc.count``: the analytic parameter count of a model, with its formulas.

This module and everything it imports on the analytic path are torch-free;
the generic path (a model type with no family file) imports torch lazily.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import configs, families
from .errors import ParamcalcError
from .families import Component

SCHEMA = "paramcalc/1"


@dataclass
class CountResult:
    """What paramcalc knows about one model: its components, totals and formulas."""

    model: str
    family: str  # the family file's name, or "generic"
    task: str
    hf_class: str
    components: list[Component]
    config: dict  # the normalised config the counts were computed from
    config_source: str
    symbols: dict[str, tuple[str, int, str]] = field(default_factory=dict)  # symbol -> (key, value, doc)
    closed_form: str | None = None
    closed_form_latex: str | None = None
    notes: list[str] = field(default_factory=list)
    peft: list = field(default_factory=list)  # PeftSummary per applied method
    peft_options: list = field(default_factory=list)  # (method, options), to rebuild the peft model
    quant: object = None  # QuantSummary when --quant was given

    @property
    def values(self) -> dict[str, int]:
        """Symbol -> value, e.g. {"H": 768, "L": 12, "r": 8}."""
        return {s: v for s, (_k, v, _d) in self.symbols.items()}

    def add_symbol(self, symbol: str, key: str, value: int, doc: str) -> None:
        if symbol in self.symbols and self.symbols[symbol][0] != key:
            raise ValueError(f"symbol {symbol!r} is already {self.symbols[symbol][0]}")
        self.symbols[symbol] = (key, value, doc)

    @property
    def generic(self) -> bool:
        return self.family == "generic"

    @property
    def total_params(self) -> int:
        return sum(c.count for c in self.components)

    @property
    def trainable_params(self) -> int:
        return sum(c.count for c in self.components if c.trainable)

    @property
    def active_params(self) -> int | None:
        """Parameters one token runs through: with a mixture of experts (Mixtral), its router's top K of E
        experts' weights and everything else; None for a dense model."""
        modules = {c.param for c in self.components if c.kind == "experts"}
        if not modules:
            return None
        # the experts' weights and the LoRA adapters on them (peft's rows sit under the experts module)
        experts = sum(c.count for c in self.components
                      if c.kind == "experts" or any(c.param.startswith(m) for m in modules) and c.group == "peft")
        values = self.values
        return self.total_params - experts * (values["E"] - values["K"]) // values["E"]

    def group_totals(self, trainable: bool = False) -> dict[str, int]:
        """Parameters per group (``embedding``, ``attention``, ``ffn``...), in the order the rows first use them.

        The anatomy of the model in one call, the sums a chart or a table of groups needs. With
        ``trainable=True`` only trainable rows count; every group stays listed, at 0 when it is all frozen.
        """
        totals: dict[str, int] = {}
        for c in self.components:
            totals[c.group] = totals.get(c.group, 0) + (c.count if c.trainable or not trainable else 0)
        return totals

    def closed_form_expr(self):
        """The closed form as a sympy expression, its symbols plain ``sympy.Symbol``s named as in ``symbols``.

        ``sympy.sympify(result.closed_form)`` reads BERT's ``I`` as the imaginary unit and T5's ``N`` as
        sympy's ``N`` function; this does not. ``expr.subs(result.sympy_values())`` gives ``total_params``.
        """
        if self.closed_form is None:
            why = "a custom or generic model has no formulas" if self.generic else "it was counted with formulas=False"
            raise ParamcalcError(f"{self.model or self.hf_class} has no closed form: {why}")
        from .symbolic import parse_formula  # sympy is imported only here, never on the counting path

        return parse_formula(self.closed_form)

    def sympy_values(self) -> dict:
        """``values`` keyed by plain ``sympy.Symbol``s, ready for ``closed_form_expr().subs(...)``.

        ``expr.subs(result.values)`` would not do: sympy turns the key ``"I"`` into the imaginary unit.
        """
        import sympy

        return {sympy.Symbol(s): v for s, v in self.values.items()}

    def component(self, name: str) -> Component:
        for c in self.components:
            if c.name == name:
                return c
        raise KeyError(f"{name!r}; components are: {', '.join(c.name for c in self.components)}")

    def to_dict(self) -> dict:
        return {
            "schema": SCHEMA,
            "model": self.model,
            "family": self.family,
            "task": self.task,
            "class": self.hf_class,
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            **({"active_params": self.active_params} if self.active_params is not None else {}),
            "closed_form": self.closed_form,
            "symbols": {s: {"key": k, "value": v, "doc": d} for s, (k, v, d) in self.symbols.items()},
            "components": [
                {
                    "name": c.name,
                    "group": c.group,
                    "formula": c.formula,
                    "count": c.count,
                    "trainable": c.trainable,
                    "repeat": c.repeat_count,
                    "parameters": c.param,
                    **({"bytes": c.weight_bytes} if c.weight_bytes is not None else {}),
                    **({"tied_to": c.tied_to} if c.tied_to else {}),
                }
                for c in self.components
            ],
            "peft": [p.to_dict() for p in self.peft],
            **({"quant": self.quant.to_dict(), "peft_print": self.quant.to_dict()["peft_print"]} if self.quant else {}),
            "notes": self.all_notes(),
            "config_source": self.config_source,
        }

    def all_notes(self) -> list[str]:
        notes = self.notes + [n for p in self.peft for n in p.notes]
        if self.active_params is not None:
            values = self.values
            notes.append(f"a token runs {values['K']} of {values['E']} experts per layer: {self.active_params:,} "
                         f"active parameters of {self.total_params:,} (all of them are held in memory)")
            if self.quant:  # bitsandbytes replaces nn.Linear modules; transformers 5's experts are 3-D parameters
                experts = sum(c.count for c in self.components if c.kind == "experts")
                notes.append(f"--quant quantizes nn.Linear modules only: the {experts:,} parameters of the fused "
                             "experts stay in the load dtype, unquantized (as bitsandbytes loads them)")
        return notes + ([self.quant.explanation(self.total_params)] if self.quant else [])

    def to_json(self) -> str:
        import json

        return json.dumps(self.to_dict(), indent=2)

    def to_latex(self) -> str:
        from .report import latex_table

        return latex_table(self)

    def __rich__(self):
        from .report import rich_report

        return rich_report(self)


def count(
    model,
    task: str = "base",
    overrides: dict | None = None,
    num_labels: int | None = None,
    formulas: bool = True,
    peft=None,
    quant=None,
) -> CountResult:
    """Count the parameters of ``model`` for ``task``.

    ``model`` is a catalog name (``"bert-base-uncased"``), a path to a config.json or a
    folder holding one, a config dict, a ``transformers.PretrainedConfig``, or a custom
    ``nn.Module``: ``"package.module:factory"`` naming a function that returns one, the function
    itself (both built on the meta device), or a module instance (counted as it is).
    ``overrides`` are config values to change (the CLI's ``--set KEY=VALUE``).
    ``peft`` is a peft config object (``LoraConfig(r=8)``), a ``"lora:r=8"`` spec, or a list of them.
    ``quant`` is ``"nf4"``, ``"fp4"`` or ``"int8"`` (optionally ``"nf4,double_quant=true,dtype=bf16"``).

    >>> count("bert-base-uncased").total_params
    109482240
    """
    if configs.is_factory_spec(model) or callable(model):  # an nn.Module instance is callable too
        return _custom(model, task, overrides, num_labels, peft, quant)
    resolved = configs.resolve(model)
    overrides = dict(overrides or {})
    if num_labels is not None:
        overrides["num_labels"] = num_labels
    family = families.family_for(resolved.config.get("model_type"))
    if family is None:
        from .meta import config_keys

        config = configs.apply_overrides(resolved.config, overrides, config_keys(resolved.config))
        return _generic(resolved, config, task, f"no formula file for model_type "
                        f"{resolved.config.get('model_type')!r}; counted on the meta device, without formulas", peft, quant)
    overridden = configs.apply_overrides(resolved.config, overrides, family.known_keys())
    if task not in family.tasks:
        raise ParamcalcError(
            f"task {task!r} is not available for {family.title}; choose one of: {', '.join(family.tasks)}"
        )
    config = families.normalise_config(family, overridden)
    unsupported = families.unsupported_settings(family, config)
    if unsupported:
        return _generic(resolved, overridden, task, f"the {family.title} formula file does not model "
                        f"{', '.join(unsupported)}; counted on the meta device, without formulas", peft, quant)
    components = families.bind(family, task, config)
    values = families.symbol_values(family, config)
    result = CountResult(
        model=resolved.name, family=family.name, task=task, hf_class=family.tasks[task].hf_class,
        components=components, config=config, config_source=resolved.source,
        symbols={s: (k, values[s], family.symbol_docs[s]) for s, k in family.symbols.items() if s in values},
        notes=_family_notes(family, config, task, values),
    )
    methods = tuners_normalise(peft)
    if methods:
        from .tuners import apply_all

        apply_all(result, methods)
    if quant is not None:
        from . import quant as quantization

        options = quant if isinstance(quant, quantization.Options) else quantization.parse(quant)
        result.quant = quantization.apply(result, options, family)
    if formulas:
        from .symbolic import attach_formulas

        result.closed_form, result.closed_form_latex = attach_formulas(family, result.components,
                                                                       list(result.symbols))
    return result


def _custom(model, task, overrides, num_labels, peft, quant) -> CountResult:
    """A custom ``nn.Module`` has no config and no formula file: only the module itself is counted."""
    from .generic import count_custom, custom_label

    label = custom_label(model)
    if overrides or num_labels is not None or task != "base":
        raise ParamcalcError(f"--set, --task and --num-labels do not apply to a custom module ({label})")
    if tuners_normalise(peft) or quant is not None:
        asked = "PEFT deltas" if tuners_normalise(peft) else "--quant"
        raise ParamcalcError(f"{asked} need a formula file (bert, roberta, t5, gpt2, bloom); {label} is a custom module")
    return count_custom(model)


def tuners_normalise(peft):
    if peft is None:
        return []
    from .tuners import normalise

    return normalise(peft)


def _family_notes(family, config: dict, task: str, values: dict[str, int]) -> list[str]:
    notes = []
    if family.name == "t5" and task == "seq2seq-lm" and config.get("tie_word_embeddings") is False:
        head = values["V"] * values["D"]
        notes.append(
            "transformers ties T5's lm_head to the shared embedding only when it builds the model from its config "
            "alone (T5Config forces tie_word_embeddings=true); a released v1.1 checkpoint (tie_word_embeddings=false) "
            f"keeps its own head, which from_pretrained leaves untied, as paramcalc counts it: V*D = {head:,}"
        )
    return notes


def _generic(resolved, config, task, why, peft=None, quant=None) -> CountResult:
    from .generic import count_generic

    if tuners_normalise(peft):
        raise ParamcalcError(f"PEFT deltas need a formula file (bert, roberta, t5, gpt2, bloom); {why}")
    if quant is not None:
        raise ParamcalcError(f"--quant needs a formula file (bert, roberta, t5, gpt2, bloom); {why}")
    result = count_generic(config, task)
    result.model, result.config_source = resolved.name, resolved.source
    result.notes.insert(0, why)
    return result
