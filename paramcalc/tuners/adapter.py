"""Bottleneck adapters as AdapterHub defines them (the ``adapters`` library, ``methods/modeling.py``).

An adapter is ``adapter_down`` = Linear(H, b) + activation and ``adapter_up`` = Linear(b, H), both with
biases: ``2*H*b + b + H`` parameters, with ``b = H // reduction_factor`` (at least 1). Pfeiffer et al.
2020 (``SeqBnConfig``, arXiv:2005.00247) put one after the FFN of every layer; Houlsby et al. 2019
(``DoubleSeqBnConfig``, arXiv:1902.00751) one after attention and one after the FFN. Both default to a
reduction factor of 16. ``cross=true`` adds one after T5's cross-attention (``cross_adapter``).

AdapterHub cannot be installed beside transformers 5, so there is no config object to convert to or from:
in place of ``to_peft_config``, ``inject`` adds the same modules to the Hugging Face model, meta or real.
On a meta model ``--verify`` matches them like any other row; on a real one (``paramcalc train``) forward
hooks run them where AdapterHub's own model classes do (``WIRING`` below).
"""

from __future__ import annotations

import weakref
from dataclasses import asdict, dataclass, field

from .. import expr
from ..errors import ParamcalcError
from .common import PeftSummary, freeze, make_row, require_family

KINDS = {"pfeiffer": ("output",), "houlsby": ("mh", "output")}
# AdapterHub's configuration.adapter_config: the two settings of SeqBnConfig (Pfeiffer) and DoubleSeqBnConfig
# (Houlsby) that change the forward. The rest they share (residual_before_ln=True, adapter_residual_before_ln
# =False, original_ln_after=True, no adapter LayerNorms, scaling 1.0, dropout 0.0).
ORIGINAL_LN_BEFORE = {"pfeiffer": True, "houlsby": False}  # feed the adapter LN(h + x) (or h + x), not h
NON_LINEARITY = {"pfeiffer": "relu", "houlsby": "swish"}
# AdapterHub's Adapter.__init__ (methods/modeling.py), by its BnConfig.init_weights name:
#   "bert":        every Linear weight ~ N(0, 0.02), biases 0 (Adapter.init_bert_weights; BnConfig's default)
#   "mam_adapter": down weight kaiming_uniform_(a=sqrt(5)), down bias 0, up weight and bias 0
#   "houlsby":     both weights trunc_normal_(std=1e-2, within +-2e-2), biases 0
# paramcalc's default is "mam_adapter": the zero up projection makes the adapted model start out exactly as
# the base model, so a run's first loss is the base model's.
INITS = ("mam_adapter", "bert", "houlsby")


@dataclass
class Options:
    kind: str = field(default="pfeiffer", metadata={"help": "pfeiffer (after the FFN) | houlsby (attention and FFN)"})
    bottleneck: int | None = field(default=None, metadata={"help": "bottleneck width b"})
    reduction: float | None = field(default=None, metadata={"help": "reduction_factor: b = H // reduction (16)"})
    cross: bool = field(default=False, metadata={"help": "cross_adapter: also after cross-attention (T5)"})
    init: str = field(default="mam_adapter", metadata={
        "help": "AdapterHub's init_weights for paramcalc train: mam_adapter (up projection zero: starts as the "
                "base model) | bert (AdapterHub's default, N(0, 0.02)) | houlsby"})

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
        self.init = self.init.lower()
        if self.init not in INITS:
            raise ParamcalcError(f"--adapter: init must be one of {', '.join(INITS)}, got {self.init!r}")


def apply(result, options: Options) -> PeftSummary:
    family = require_family(result, "--adapter")
    task = family.tasks[result.task]
    hidden = family.peft["token_dim"]
    width = options.bottleneck or max(1, int(result.values[hidden] // (options.reduction or 16)))
    result.add_symbol("b", "adapter bottleneck", width, "bottleneck width")
    kinds = set(KINDS[options.kind]) | ({"cross"} if options.cross else set())
    sites = [s for s in family.adapter_sites if s["kind"] in kinds and s["part"] in task.parts]
    if not family.adapter_sites:
        raise ParamcalcError(f"--adapter: the {family.title} family file does not describe where AdapterHub puts "
                             "bottleneck adapters yet; use --lora, --ia3 or a prompt method")
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


# --- where the adapters run -------------------------------------------------------------------------------
#
# AdapterHub replaces each sub-layer's "h = dropout(proj(...)); out = [LN](h + x)" by
# bottleneck_layer_forward(h, x, LN) (methods/bottleneck.py, methods/modeling.py: pre_forward, forward,
# post_forward). With its settings above that is, for one adapter A = adapter_up(act(adapter_down(.))):
#   Pfeiffer (original_ln_before):  out = [LN](h + A([LN](h + x)) + x)
#   Houlsby:                        out = [LN](h + A(h) + x)
# i.e. the sub-layer's own output h becomes h + A(z) and the model's residual add (and LayerNorm) follow
# unchanged. So a forward hook on the module that produces h returns h + A(z); for Pfeiffer z needs the
# sub-layer's residual input x, which a forward pre-hook on the module receiving it keeps for that hook
# (AdapterHub's hooked models do the same: _residual_hook_fn).


@dataclass(frozen=True)
class Wiring:
    output: str  # the module, relative to the adapters' owner, whose output is h (a tuple: its first item)
    residual: str  # the module (relative; "" = the owner) whose input `residual_arg` is the residual x
    residual_arg: tuple[int, str]  # (position, keyword) of x among that module's arguments
    layer_norm: str | None = None  # the owner's LayerNorm that Pfeiffer applies to h + x (post-LN models)


# Bert/RobertaSelfOutput and -Output: forward(hidden_states, input_tensor) =
#   LayerNorm(dropout(dense(hidden_states)) + input_tensor)
_BERT = Wiring("dropout", "", (1, "input_tensor"), "LayerNorm")
# T5LayerSelfAttention, -CrossAttention, -FF: forward(hidden_states, ...) =
#   hidden_states + dropout(sub-layer(layer_norm(hidden_states)))
_T5 = Wiring("dropout", "", (0, "hidden_states"))
# Keyed by (class of the owner, attribute), or (class, None) for every attribute. The owner is the module the
# family rows put "<attribute>.adapters.default" under.
WIRING = {
    # adapters/models/bert/modeling_bert.py: BertSelfOutputWithAdapters / BertOutputWithAdapters; RoBERTa alike
    ("BertSelfOutput", None): _BERT, ("BertOutput", None): _BERT,
    ("RobertaSelfOutput", None): _BERT, ("RobertaOutput", None): _BERT,
    # adapters/models/t5/modeling_t5.py: T5Layer{SelfAttention,CrossAttention,FF}WithAdapters, layer_norm=None
    ("T5LayerSelfAttention", None): _T5, ("T5LayerCrossAttention", None): _T5, ("T5LayerFF", None): _T5,
    # adapters/models/gpt2/modeling_gpt2.py: GPT2BlockWithAdapters, attention_adapters(attn_output, residual,
    # None) and output_adapters(feed_forward_hidden_states, residual, None); the residual is what ln_1 / ln_2 read
    ("GPT2Block", "attention_adapters"): Wiring("attn", "ln_1", (0, "input")),
    ("GPT2Block", "output_adapters"): Wiring("mlp", "ln_2", (0, "input")),
    # AdapterHub has no BLOOM model: the GPT-2 placement, on the output projections. BloomAttention and
    # BloomMLP add the residual (their second argument) themselves in dropout_add(dense(.), residual), so
    # the adapter runs before that dropout (hidden_dropout, 0.0 in BLOOM's configs) where GPT-2's runs after.
    ("BloomBlock", "attention_adapters"): Wiring("self_attention.dense", "self_attention", (1, "residual")),
    ("BloomBlock", "output_adapters"): Wiring("mlp.dense_4h_to_h", "mlp", (1, "residual")),
}


def wiring_for(owner, attribute: str) -> Wiring:
    """Where the adapters under ``owner.<attribute>`` run, from the first of its classes that ``WIRING`` knows."""
    for cls in type(owner).__mro__:
        found = WIRING.get((cls.__name__, attribute)) or WIRING.get((cls.__name__, None))
        if found is not None:
            return found
    raise ParamcalcError(f"--adapter: paramcalc does not know where {type(owner).__name__}'s {attribute} run "
                         f"(it knows {', '.join(sorted({cls for cls, _ in WIRING}))})")


class _Residual:
    """The residual input of one sub-layer, from the forward pre-hook that sees it to the adapter's hook.

    Held by a weak reference: the sub-layer's caller keeps it alive until the adapter has run, and a forward
    cut short (checkpointing's recompute stops once it has what backward needs) leaves nothing behind.
    """

    __slots__ = ("ref",)

    def __init__(self):
        self.ref = None

    def keep(self, position: int, keyword: str):
        def pre_hook(module, args, kwargs):
            self.ref = weakref.ref(args[position] if len(args) > position else kwargs[keyword])
        return pre_hook

    def take(self):
        value, self.ref = (self.ref() if self.ref is not None else None), None
        return value


def _adapter_hook(adapter, residual: _Residual | None, layer_norm):
    """A forward hook that turns the sub-layer output h into h + A(z) (see above)."""

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        z = h
        if residual is not None:  # Pfeiffer: original_ln_before
            x = residual.take()
            if x is None:
                raise RuntimeError(f"adapter hook on {type(module).__name__}: the sub-layer's residual input "
                                   "was not seen before its output")
            z = h + x
            if layer_norm is not None:
                z = layer_norm(z)
        weight = adapter.adapter_up.weight  # a base in another dtype (bitsandbytes' compute dtype): cast in and out
        h = h + adapter.adapter_up(adapter.adapter_down(z.to(weight.dtype))).to(h.dtype)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    return hook


def _placement(owner, model):
    """The device and floating dtype of the owner's parameters (a quantized weight's storage dtype is no guide)."""
    import torch

    params = list(owner.parameters()) or list(model.parameters())
    floating = [p for p in params if p.is_floating_point()]
    if floating:
        return floating[0].device, floating[0].dtype
    return (params[0].device if params else torch.device("cpu")), torch.get_default_dtype()


def _bottleneck(hidden: int, width: int, options: Options, device, dtype):
    """AdapterHub's Adapter with its defaults: parameters only in adapter_down.0 and adapter_up."""
    import math

    import torch

    activation = {"relu": torch.nn.ReLU, "swish": torch.nn.SiLU}[NON_LINEARITY[options.kind]]
    with torch.device("meta"):  # shapes first, then the values AdapterHub's init gives (one draw, seeded)
        adapter = torch.nn.Module()
        adapter.adapter_down = torch.nn.Sequential(torch.nn.Linear(hidden, width, dtype=dtype), activation())
        adapter.adapter_up = torch.nn.Linear(width, hidden, dtype=dtype)
    if device.type == "meta":
        return adapter
    adapter = adapter.to_empty(device=device)
    down, up = adapter.adapter_down[0], adapter.adapter_up
    with torch.no_grad():
        for layer in (down, up):
            torch.nn.init.zeros_(layer.bias)
        if options.init == "mam_adapter":
            torch.nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            torch.nn.init.zeros_(up.weight)
        elif options.init == "bert":
            for layer in (down, up):
                layer.weight.normal_(mean=0.0, std=0.02)
        else:  # houlsby
            for layer in (down, up):
                torch.nn.init.trunc_normal_(layer.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
    return adapter


def inject(model, options: Options, result):
    """Add the adapter modules of ``result``'s rows to ``model``, freeze the base and unfreeze the heads.

    The modules sit where the rows name them (``<owner>.<attribute>.adapters.default``), on the device and
    in the dtype of the owner's parameters, initialised as ``options.init`` says from torch's global RNG
    (seed it first). Forward hooks make them take part in the forward as AdapterHub's models do
    (``WIRING``); on a meta model no forward runs, and the same names and shapes serve ``--verify``.
    """
    import torch

    for handle in getattr(model, "_paramcalc_adapter_hooks", ()):  # injected again: the new adapters replace the old
        handle.remove()
    hooks = []
    for component in result.components:
        if component.kind != "adapter":
            continue
        hidden, width = (expr.evaluate(d, result.values) for d in component.shapes["adapter_up.weight"])
        for i in range(component.repeat_count):
            path = component.param.replace("{i}", str(i))
            owner_path, _, _ = path.partition(".adapters.default")
            parent_path, _, attribute = owner_path.rpartition(".")
            parent = model.get_submodule(parent_path)
            wiring = wiring_for(parent, attribute)
            _check_runs(parent, wiring)
            device, dtype = _placement(parent, model)
            if not hasattr(parent, attribute):
                parent.add_module(attribute, torch.nn.Module())
            layer = getattr(parent, attribute)
            if not hasattr(layer, "adapters"):
                layer.add_module("adapters", torch.nn.ModuleDict())
            adapter = _bottleneck(hidden, width, options, device, dtype)
            layer.adapters["default"] = adapter
            residual = None
            if ORIGINAL_LN_BEFORE[options.kind]:
                residual = _Residual()
                hooks.append(parent.get_submodule(wiring.residual).register_forward_pre_hook(
                    residual.keep(*wiring.residual_arg), with_kwargs=True))
            layer_norm = getattr(parent, wiring.layer_norm) if wiring.layer_norm else None
            hooks.append(parent.get_submodule(wiring.output).register_forward_hook(
                _adapter_hook(adapter, residual, layer_norm)))
    for name, parameter in model.named_parameters():
        parameter.requires_grad = ".adapters.default." in name
    for component in result.components:
        if component.group == "head" and component.trainable:
            model.get_submodule(component.param).requires_grad_(True)
    model._paramcalc_adapter_hooks = hooks  # handles, should anyone want them gone (handle.remove())
    return model


def _check_runs(owner, wiring: Wiring) -> None:
    """Refuse a model whose forward would go around the hooked module (and so around the adapter)."""
    projection = owner.get_submodule(wiring.output.rpartition(".")[0]) if "." in wiring.output else owner
    if getattr(projection, "pretraining_tp", 1) > 1 and getattr(projection, "slow_but_exact", False):
        raise ParamcalcError("--adapter: this BLOOM config has slow_but_exact=true with pretraining_tp > 1, "
                             "whose forward slices the output projection's weight instead of calling it; "
                             "set slow_but_exact=false (--set slow_but_exact=false)")
