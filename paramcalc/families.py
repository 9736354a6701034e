"""Load the declarative family files (``formulas/<family>.toml``) and bind a config to them.

A family file is the single description of a model family: its config symbols,
its tasks (which Hugging Face class, which parts), and every parameter-bearing
module with its primitive kind, symbolic shape and parameter name. Binding a
config yields a list of :class:`Component` rows; counts, formulas and the
meta-device verification all start from those rows.

Reading a file and what it extends (``extends`` chains, ``[flow_pieces]``, ``drop_modules``, module swaps)
lives in :mod:`paramcalc.family_loader`; this module makes a :class:`Family` of the merged table.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from . import expr
from .errors import ParamcalcError
from .family_loader import _expand, _read
from .primitives import PRIMITIVES, Shape

GROUPS = ("embedding", "attention", "ffn", "layernorm", "pooler", "head", "peft", "other")
UNSET = "<unset>"  # in `when`: the key is missing from the config or null


@dataclass(frozen=True)
class Task:
    name: str
    hf_class: str
    prefix: str  # where the backbone sits inside the task model, e.g. "bert."
    parts: tuple[str, ...]


@dataclass(frozen=True)
class ModuleSpec:
    name: str
    group: str
    kind: str
    part: str
    param: str  # module path; "{i}" stands for the layer index
    shape: dict
    repeat: str = "1"
    when: dict = field(default_factory=dict)
    unless: dict = field(default_factory=dict)
    tied_to: str | None = None
    role: str | None = None  # "output-embedding": the LM head peft's all-linear leaves alone
    tokens: str | None = None  # token positions per step when not the part's (cross-attention keys/values)


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    model_types: tuple[str, ...]
    reference: str
    symbols: dict[str, str]  # symbol -> config key
    optional: frozenset[str]  # symbols whose key may be null (modules then use `when`)
    symbol_docs: dict[str, str]
    defaults: dict
    # [fixed]: switches this model type does not read, at the value its code behaves as (Mistral has no
    # attention_bias: its projections never have biases, whatever a config says)
    fixed: dict
    derived_defaults: dict[str, str]  # key -> expression over other keys' symbols
    key_aliases: dict[str, str]  # legacy key -> canonical key
    divisible: tuple[tuple[str, str], ...]
    unsupported: dict
    tasks: dict[str, Task]
    modules: tuple[ModuleSpec, ...]
    peft: dict  # peft's per-family defaults (LoRA/IA3 targets), from peft/utils/constants.py
    adapter_sites: tuple[dict, ...]  # where bottleneck adapters go (after attention / FFN / cross-attention)
    # [keep_fp32]: what from_pretrained keeps in fp32 (the model class's _keep_in_fp32_modules and
    # _keep_in_fp32_modules_strict); see loaded_dtype
    keep_fp32: tuple[str, ...]
    keep_fp32_strict: tuple[str, ...]
    tokens: dict  # part -> token positions it processes per step ("b*s"), for FLOPs and activations
    attention: tuple[dict, ...]  # attention cores: heads, head_dim, q_len, k_len, repeat
    attention_kernels: tuple[str, ...]  # eager / sdpa / flash: what transformers can run for this family
    buffers: tuple[dict, ...]  # non-parameter tensors the model holds (name, shape, bytes per element)
    # tensors the model's forward makes once and hands to every layer (masks, position biases): what they
    # hold, when they are made and freed (paramcalc.attention.forward_tensor)
    forward_tensors: tuple[dict, ...]
    flow: dict  # part -> ordered data flow ["inputs -> output : row"], for which gradients backward computes
    digest: str  # hash of the file text; keys the formula cache
    # how its RMSNorm computes (paramcalc.ops.rmsnorm): "t5" (T5LayerNorm: the variance of an fp32 copy, the input
    # times its rsqrt, cast to the weight's dtype when half) or "llama" (LlamaRMSNorm: all of it in fp32, cast back
    # to the input's dtype, then weight * it)
    rmsnorm: str = "t5"
    # streams of the flow that live in a Python expression, not a local: each dies at its last read (Llama's MLP,
    # down_proj(act(gate_proj(x)) * up_proj(x)))
    temporaries: tuple[str, ...] = ()
    # [[moe]]: mixtures of experts a flow op "mixture of experts N" runs (paramcalc.moe): router and experts rows,
    # tokens, experts and top-k symbols
    moe: tuple[dict, ...] = ()

    @property
    def prefix_token_dim(self) -> str:
        """The width of one layer's prefix keys (or values) as peft sizes prefix tuning: its token_dim, which for a
        grouped-query model it sets to head_dim * num_key_value_heads (``[peft] prefix_token_dim``)."""
        return self.peft.get("prefix_token_dim", self.peft["token_dim"])

    def known_keys(self) -> dict:
        """Every config key this family reads, with its default (None when it has none)."""
        switches = dict.fromkeys(k for m in self.modules for k in (*m.when, *m.unless)) | dict.fromkeys(self.unsupported)
        return dict.fromkeys(self.symbols.values()) | dict.fromkeys(self.key_aliases) | switches | self.defaults

    def loaded_dtype(self, parameter: str, dtype: str) -> str:
        """The dtype ``from_pretrained(..., dtype=dtype)`` leaves ``parameter`` (its full name) in.

        transformers 5 (modeling_utils.py, ``PreTrainedModel._get_dtype_plan``) keeps the model's
        ``_keep_in_fp32_modules`` in fp32 when it loads in fp16 (not bf16: they guard against fp16 overflow, e.g.
        T5's ``wo``, huggingface/transformers#20287) and its ``_keep_in_fp32_modules_strict`` in fp32 in fp16 and
        bf16. The loader (core_model_loading.py) matches each pattern as a regex *search* in the parameter's full
        name, ``*`` standing for any text. Only loading does this: building the class (``Model(config)``,
        ``from_config(config, dtype=...)``) leaves every parameter in ``dtype``.
        """
        patterns = self.keep_fp32_strict if dtype in ("fp16", "bf16") else ()
        if dtype == "fp16":
            patterns += self.keep_fp32
        if any(re.search(pattern.replace("*", ".*"), parameter) for pattern in patterns):
            return "fp32"
        return dtype

    def condition_types(self) -> dict[str, type]:
        """The type each switch the family reads must have (bool for tie_word_embeddings, str for ...)."""
        types = {}
        conditions = [*self.unsupported.items(), *(i for m in self.modules for i in (m.when | m.unless).items())]
        for key, wanted in conditions:
            for value in wanted if isinstance(wanted, list) else [wanted]:
                if value != UNSET:
                    types[key] = type(value)
        return types


@dataclass
class Component:
    """One row of the report: a module (repeated ``repeat`` times) and its parameters."""

    name: str
    group: str
    kind: str
    repeat: str  # symbolic repeat, e.g. "L"
    repeat_count: int
    shapes: dict[str, Shape]  # parameter suffix -> symbolic shape
    param: str  # full module path pattern in the task model
    count: int
    trainable: bool = True
    tied_to: str | None = None
    formula: str = ""
    latex: str = ""
    args: dict = field(default_factory=dict)  # the primitive's symbolic arguments (in_features, ...)
    role: str | None = None
    part: str = ""  # the family part it belongs to (tokens per step are declared per part)
    tokens: str | None = None  # its own token count per step, when it differs from its part's
    weight_bytes: int | None = None  # set by --quant: bytes as stored

    def numel_expression(self) -> str:
        """The count as one arithmetic expression, e.g. ``L*((H)*(H) + (H))``."""
        terms = [" * ".join(f"({d})" for d in shape) for shape in self.shapes.values()]
        body = " + ".join(terms) if terms else "0"
        return body if self.repeat == "1" else f"({self.repeat})*({body})"


def _family_dir() -> Path:
    installed = Path(__file__).with_name("family_files")
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parent.parent / "formulas"  # a source checkout


def family_path(name: str) -> Path:
    """The formula file of family ``name`` (e.g. ``"gpt2"``), installed or in a source checkout: the file to read
    next to a count's rows, or to start from when adding a family."""
    path = _family_dir() / f"{name}.toml"
    if not path.is_file():
        raise ParamcalcError(f"no formula file for family {name!r}; the families are: {', '.join(sorted(families()))}")
    return path


@functools.cache
def families() -> dict[str, Family]:
    """All family files, by family name."""
    found = {}
    for path in sorted(_family_dir().glob("*.toml")):
        family = _parse(path)
        found[family.name] = family
    return found


def family_for(model_type: str | None) -> Family | None:
    for family in families().values():
        if model_type in family.model_types:
            return family
    return None


def _parse(path: Path) -> Family:
    raw, text = _read(path)
    symbols = {s: v["key"] for s, v in raw["symbols"].items()}
    modules = []
    for m in raw["modules"]:
        if m["kind"] not in PRIMITIVES:
            raise ValueError(f"{path.name}: unknown kind {m['kind']!r} (known: {', '.join(PRIMITIVES)})")
        if m["group"] not in GROUPS:
            raise ValueError(f"{path.name}: unknown group {m['group']!r}")
        modules.append(
            ModuleSpec(
                name=m["name"], group=m["group"], kind=m["kind"], part=m["part"], param=m["param"],
                shape=m.get("shape", {}), repeat=str(m.get("repeat", "1")), when=m.get("when", {}),
                unless=m.get("unless", {}), tied_to=m.get("tied_to"), role=m.get("role"), tokens=m.get("tokens"),
            )
        )
    tasks = {
        name: Task(name, t["class"], t.get("prefix", ""), tuple(t["parts"])) for name, t in raw["tasks"].items()
    }
    return Family(
        name=raw["family"], title=raw.get("title", raw["family"]), model_types=tuple(raw["model_types"]),
        reference=raw.get("reference", ""), symbols=symbols,
        symbol_docs={s: v.get("doc", "") for s, v in raw["symbols"].items()},
        optional=frozenset(s for s, v in raw["symbols"].items() if v.get("optional")),
        defaults=raw.get("defaults", {}), fixed=raw.get("fixed", {}), derived_defaults=raw.get("derived_defaults", {}),
        key_aliases=raw.get("key_aliases", {}),
        divisible=tuple((d["value"], d["by"]) for d in raw.get("divisible", [])),
        unsupported=raw.get("unsupported", {}), tasks=tasks, modules=tuple(modules), peft=raw.get("peft", {}),
        adapter_sites=tuple(raw.get("adapter_sites", [])), **_keep_fp32(path, raw.get("keep_fp32", {})),
        tokens=raw.get("tokens", {}), attention=tuple(raw.get("attention", [])),
        attention_kernels=tuple(raw.get("attention_kernels", ["eager"])), buffers=tuple(raw.get("buffers", [])),
        forward_tensors=tuple(raw.get("forward_tensors", [])),
        flow=_expand(path, raw.get("flow", {}), raw.get("flow_pieces", {})), moe=tuple(raw.get("moe", [])),
        digest=hashlib.sha256(text).hexdigest()[:16], rmsnorm=raw.get("rmsnorm", "t5"),
        temporaries=tuple(raw.get("temporaries", [])),
    )


def _keep_fp32(path: Path, table: dict) -> dict:
    """The ``[keep_fp32]`` table: ``modules`` (the class's ``_keep_in_fp32_modules``) and ``strict`` (its
    ``_keep_in_fp32_modules_strict``), each a list of transformers' patterns; both empty when the table is absent."""
    unknown = set(table) - {"modules", "strict"}
    if unknown:
        raise ValueError(f"{path.name}: [keep_fp32] knows modules and strict, not {', '.join(sorted(unknown))}")
    return {"keep_fp32": tuple(table.get("modules", [])), "keep_fp32_strict": tuple(table.get("strict", []))}


# ---- binding a config ----------------------------------------------------------------


def normalise_config(family: Family, config: dict) -> dict:
    """The config with legacy keys renamed, defaults filled in and sizes validated."""
    config = dict(config)
    for alias, canonical in family.key_aliases.items():
        if config.get(alias) is not None:  # transformers' attribute_map: the alias sets the real key
            config[canonical] = config.pop(alias)
    # a saved config records its labels as id2label, as transformers does
    if config.get("id2label") and "num_labels" not in config:
        if not isinstance(config["id2label"], (dict, list)):
            raise ParamcalcError(f"id2label must map label ids to names, got {config['id2label']!r}")
        config["num_labels"] = len(config["id2label"])
    for key, value in family.defaults.items():
        if config.get(key) is None:
            config[key] = value
    config.update(family.fixed)
    for key, expected in family.condition_types().items():
        value = config.get(key)
        if value is not None and key not in family.symbols.values() and type(value) is not expected:
            wanted = {bool: "true or false", str: "a string", int: "an integer"}.get(expected, expected.__name__)
            raise ParamcalcError(f"{key} must be {wanted}, got {value!r}")
    values = symbol_values(family, config, fill_derived=False)
    for key, expression in family.derived_defaults.items():
        if config.get(key) is None:
            config[key] = expr.evaluate(expression, values)
    symbol_values(family, config)  # validates every symbol
    for value_symbol, by_symbol in family.divisible:
        values = symbol_values(family, config)
        if values[value_symbol] % values[by_symbol]:
            v_key, b_key = family.symbols[value_symbol], family.symbols[by_symbol]
            raise ParamcalcError(
                f"{v_key} ({values[value_symbol]}) must be divisible by {b_key} ({values[by_symbol]})"
            )
    return config


def symbol_values(family: Family, config: dict, fill_derived: bool = True) -> dict[str, int]:
    values = {}
    for symbol, key in family.symbols.items():
        value = config.get(key)
        if value is None:
            if symbol in family.optional or (not fill_derived and key in family.derived_defaults):
                continue
            raise ParamcalcError(f"config has no value for {key!r}, which the {family.title} formulas need")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamcalcError(f"{key} must be a positive integer, got {value!r}")
        if value <= 0:
            raise ParamcalcError(f"{key} must be a positive integer, got {value}")
        values[symbol] = value
    return values


def unsupported_settings(family: Family, config: dict) -> list[str]:
    """Config settings the family file does not model (the generic path must count those)."""
    return [f"{k}={config[k]!r}" for k, v in family.unsupported.items() if _matches(config.get(k), v)]


def _matches(actual, wanted) -> bool:
    if isinstance(wanted, list):
        return any(_matches(actual, w) for w in wanted)
    if wanted == UNSET:
        return actual is None
    if isinstance(wanted, str) and isinstance(actual, str):
        return fnmatch.fnmatchcase(actual, wanted)
    return type(actual) is type(wanted) and actual == wanted


def _active(spec: ModuleSpec, config: dict) -> bool:
    if any(not _matches(config.get(k), v) for k, v in spec.when.items()):
        return False
    return not any(_matches(config.get(k), v) for k, v in spec.unless.items())


def bind(family: Family, task_name: str, config: dict) -> list[Component]:
    """The component rows of ``family``'s ``task`` model for a normalised ``config``."""
    task = family.tasks[task_name]
    values = symbol_values(family, config)
    components = []
    for spec in family.modules:
        if spec.part not in task.parts or not _active(spec, config):
            continue
        shapes = PRIMITIVES[spec.kind](**spec.shape)
        repeat_count = expr.evaluate(spec.repeat, values)
        per_module = sum(numel(shape, values) for shape in shapes.values())
        prefix = "" if spec.group == "head" else task.prefix
        components.append(
            Component(
                name=spec.name, group=spec.group, kind=spec.kind, repeat=spec.repeat,
                repeat_count=repeat_count, shapes=shapes, param=prefix + spec.param,
                count=repeat_count * per_module, tied_to=spec.tied_to, args=dict(spec.shape),
                role=spec.role, part=spec.part, tokens=spec.tokens,
            )
        )
    return components


def concrete_parameters(component: Component, values: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Every parameter name the component owns in the real model, with its shape."""
    indices = range(component.repeat_count) if "{i}" in component.param else [None]
    names = {}
    for i in indices:
        module = component.param.replace("{i}", str(i)) if i is not None else component.param
        for suffix, shape in component.shapes.items():
            names[f"{module}.{suffix}"] = tuple(expr.evaluate(d, values) for d in shape)
    return names


def numel(shape: Shape, values: dict[str, int]) -> int:
    """Elements of a symbolic shape for these symbol values."""
    return math.prod(expr.evaluate(dim, values) for dim in shape)
