"""Masks and position biases: tensors a model's forward makes once and hands to every layer's attention.

transformers 5.23 builds them in the model's forward, not in a layer: the causal mask of eager attention
(``masking_utils.eager_mask``: ``b x 1 x q x k`` in the input embeddings' dtype; for sdpa it is skipped, and
sdpa is told ``is_causal``; without padding the bidirectional masks are skipped for both kernels), T5's
relative position bias (``compute_bias``, made by the first block and passed on: ``1 x heads x q x k``),
BLOOM's ALiBi (``b*heads x 1 x k``). A family file declares each (``[[forward_tensors]]``):

- ``made``: ``mask`` (needs no gradient; ``rotary`` and ``sliding`` tables and masks need none either), ``lookup`` (an embedding lookup of the row ``row``: it needs a
  gradient when that row trains, and then keeps its ``indices`` (int64) for backward), ``zeros`` (T5's
  cross-attention bias: a leaf that needs a gradient when ``grad = "checkpointing"`` and checkpointing is on);
- ``elements``, ``dtype``: ``master`` (the weights' dtype: what an embedding lookup returns under autocast),
  ``compute`` (autocast's dtype), ``norm`` (what a LayerNorm returns: fp32 under autocast), ``bool``;
- ``kernels``: the attention kernels the model makes it for (all by default); ``from_keys``: a symbol the keys must
  reach for the model to make it (Mistral's sliding window: below it sdpa is told ``is_causal`` instead);
- ``part`` / ``until``: made before the first layer of ``part``, freed when part ``until`` has run (the
  stack's forward returns); a checkpointed layer keeps what it reads as an argument until its backward.

Each attention core names what it reads: ``bias`` (added to the scores, broadcast over the batch), ``mask``
(added to the scores), ``reads`` (passed to the layer only). sdpa gets the bias as its float ``attn_mask``,
made as the core's ``sdpa_mask`` says (transformers' ``create_position_bias_mask``): ``copy`` (``contiguous()``
of a permuted view), ``causal`` (``torch.where(causal, bias, min)``, which keeps the ``q x k`` boolean
condition for backward), ``as-is``; under autocast sdpa casts it to half precision (sdpa is on autocast's
lower-precision list). On a CPU a mask that needs a gradient sends sdpa to its math path: torch's fused CPU
kernel computes no mask gradient. A boolean ``mask`` sdpa gets (Mistral's sliding window) it turns into a float
one in the query's dtype (``paramcalc.attention``).

Torch-free: the analytic path.
"""

from __future__ import annotations

from . import expr
from .ledger import Record, Value

ROLES = ("bias", "mask")  # what an attention core adds to its scores, in this order


def spec_of(family, name: str) -> dict:
    return next(spec for spec in family.forward_tensors if spec["name"] == name)


def made_for(spec: dict, attention: str) -> bool:
    return attention in spec.get("kernels", (attention,))


def needs_grad(spec: dict, step, row_trains) -> bool:
    """Whether the tensor needs a gradient: ``row_trains(row)`` says whether a row's weight trains."""
    if spec["made"] == "lookup":
        return row_trains(spec["row"])
    return spec["made"] == "zeros" and spec.get("grad") == "checkpointing" and step.grad_checkpointing


def mask_grad(core: dict, family, step, row_trains) -> bool:
    """Whether the float mask sdpa gets for ``core`` (its bias) needs a gradient."""
    name = core.get("bias")
    return bool(name) and needs_grad(spec_of(family, name), step, row_trains)


def forward_tensor(spec: dict, ledger, ctx, checkpointed: bool = False) -> tuple[Value, Record] | None:
    """The tensor as a value, and the record backward reaches it by (last, as it was made first); None when
    the model does not make it (another kernel, a row this config does not have). ``checkpointed``: the part's
    layers are checkpointed (the first makes the tensor, and keeps nothing for backward)."""
    if not made_for(spec, ctx.step.attention) or not _reached(spec, ctx):
        return None
    row = _row_key(spec.get("row", ""))
    if spec["made"] == "lookup" and row not in ctx.modules:
        return None
    elements = expr.evaluate(spec["elements"], ctx.values) * _wider(spec, ctx)
    width = {"master": ctx.master, "compute": ctx.compute, "norm": 4 if ctx.autocast else ctx.master,
             "bool": 1}[spec["dtype"]]
    grad = needs_grad(spec, ctx.step, lambda name: getattr(ctx.modules.get(_row_key(name)), "weight_trains", False))
    elements = int(elements)
    value = Value(ledger.new(elements * width, "activations"), elements, width, grad)
    record = Record([], value, [], [], [], leaf=grad and spec["made"] == "zeros")
    if grad and spec["made"] == "lookup":
        if not checkpointed:  # embedding's backward keeps the indices (made by a checkpointed layer: not yet)
            indices = int(expr.evaluate(spec["indices"], ctx.values) * _wider(spec, ctx)) * 8
            record.saved.append(ledger.new(indices, "activations"))
            record.saved_sizes.append((indices, "activations"))
        per_layer = ctx.grads.get(row, [])
        record.weight_grads = list(per_layer[0]) if per_layer else []
    return value, record


def _reached(spec: dict, ctx) -> bool:
    """``from_keys``: a symbol (Mistral's sliding window) the keys must reach for the model to make the tensor; a
    config without it never makes it."""
    if "from_keys" not in spec:
        return True
    window = ctx.values.get(spec["from_keys"])
    return window is not None and ctx.values["s"] + getattr(ctx, "prefix_tokens", 0) >= window


def remade(family, item) -> list[Value]:
    """What a checkpointed layer's re-run makes again beside what its ops replay: the first layer computes the
    position biases (``lookup``, ``zeros``). A re-made lookup stands in for the first one, which that layer no
    longer needs; zeros that need a gradient are a leaf the graph keeps, so the re-made ones are more."""
    if item.layer != 0:
        return []
    return [item.arguments[spec["name"]] for spec in family.forward_tensors
            if spec["part"] == item.part and spec["made"] == "zeros" and spec["name"] in item.arguments
            and item.arguments[spec["name"]].grad]


def _wider(spec: dict, ctx) -> float:
    """How much wider prefix tuning makes a mask or position bias (``paramcalc.replay_methods``): a prefixed
    attention core that adds it to its scores reads ``n_v`` more keys."""
    from .flops_methods import prefixed

    n = getattr(ctx, "prefix_tokens", 0)
    for core in ctx.family.attention if n else ():
        if spec["name"] in (core.get(role) for role in ROLES) and prefixed(core, ctx.family):
            keys = expr.evaluate(core["k_len"], ctx.values)
            return (keys + n) / keys
    return 1


def _row_key(name: str) -> str:
    """How the replay keys a row (``flops._base_name``: rows that bias=all splits end in " weight"/" bias")."""
    return name.removesuffix(" weight").removesuffix(" bias")


def read_by(core: dict, streams: dict) -> dict[str, Value]:
    """The forward tensors ``core`` reads, by role (bias, mask, and the names it only reads)."""
    names = {role: core.get(role) for role in ROLES} | {name: name for name in core.get("reads", ())}
    return {role: streams[name] for role, name in names.items() if name and name in streams}


def sdpa_mask(core: dict, bias: Value, ledger, ctx, new, stage, batch: int = 1) -> tuple[Value, list[Value]]:
    """The float attn_mask sdpa gets for ``bias``, and the copies made for it (freed when sdpa returns,
    unless the kernel keeps them). ``stage(inputs, output, passes=None, saves=())`` adds an autograd node.
    ``batch``: the causal mask has a batch dimension (prefix tuning's, ``paramcalc.replay_methods``), which the
    masked bias then gets too."""
    mask, made = bias, []
    how = core.get("sdpa_mask", "as-is")
    if how == "copy":  # contiguous(): its backward hands the gradient on
        mask = new(bias.elements, bias.width, bias.grad)
        made.append(mask)
        stage([bias], mask, passes=bias)
    elif how == "causal":  # torch.where keeps its condition: a boolean q x k (broadcast over heads); then contiguous()
        heads = expr.evaluate(core["heads"], ctx.values)
        where = new(bias.elements * batch, bias.width, bias.grad)
        condition = Value(ledger.new(where.elements // heads, "activations"), where.elements // heads, 1, False)
        stage([bias], where, saves=[condition] * bias.grad)
        ledger.drop(condition.tid)
        mask = new(where.elements, where.width, where.grad)
        stage([where], mask, passes=where)
        ledger.drop(where.tid)
        made.append(mask)
    if ctx.autocast and mask.width != ctx.compute:  # autocast casts sdpa's float inputs
        cast = new(mask.elements, ctx.compute, mask.grad)
        stage([mask], cast)
        made.append(cast)
        mask = cast
    return mask, made
