"""A mixture of experts (Mixtral's MixtralSparseMoeBlock) as one flow op, ``"b -> o : mixture of experts N"``: the
family file's N-th ``[[moe]]`` table names its router and experts rows and the symbols of its sizes.

What one step runs, as transformers 5.24 runs it on a CPU (``experts_implementation`` grouped_mm, its default with
torch > 2.8: ``transformers/integrations/moe.py``), over T tokens, E experts, the top K of them per token
(S = T*K routed rows), hidden size H and expert width I:

- the router (``MixtralTopKRouter``): logits ``x @ W^T`` [T, E], ``softmax(logits.float())``, ``topk`` (values
  [T, K] and int64 indices), the values divided in place by their sum (autograd keeps a clone of them and the sum);
- ``grouped_mm_experts_forward``: the S picks sorted by expert (int64 values and order), each pick's token gathered
  (``hidden_states[perm // K]``, [S, H]; the int64 row index kept), its weight gathered ([S], the order kept), the
  rows per expert counted (``histc`` over an fp32 copy of the sorted ids, ``cumsum`` to int32 offsets);
  ``torch._grouped_mm`` with gate_up [S, 2I] (not autocast: the weights' dtype), ``act(gate) * up`` [S, I] (the
  activation keeps the whole [S, 2I] output, its ``gate`` being a view of it), the down grouped matmul [S, H],
  times the pick's weight (fp32: a half output is promoted), put back in token order by the inverse permutation
  (int64, kept) and summed over the K picks, then cast to the input's dtype.

Every token picks K distinct experts, so every size above is fixed by T and K; how the S rows split between the
experts depends on the routing, and no tensor's size does (the grouped matmul's output is [S, ...] however it
splits). Its FLOPs are those of one matmul over all S rows (FlopCounterMode has no formula for ``_grouped_mm``;
``paramcalc.trace`` gives it 2 * rows * in * out, as here).

peft's LoRA on the router or the fused experts (``target_parameters``: a ``lora.ParamWrapper`` each) builds the
weight the op reads as a parametrization while the experts run: the router's ``W + B @ A * scaling``; an
experts tensor's ``baddbmm(W, lhs, rhs)`` (peft's ``_LoraFactorsProxy``, E > 1), a new tensor the size of the
whole stack, which the grouped matmul keeps for backward and whose gradient backward makes.

``replay`` is the memory replay's op (``paramcalc.walk``); ``matmuls`` the matmuls every fold counts (FLOPs,
``paramcalc.flops``; the time model's kernels, ``kernels``). The inference walk can run ``replay`` with nothing
needing a gradient: then nothing is saved and it gives the op's transient peak over b*q tokens.

Torch-free: the analytic path.
"""

from __future__ import annotations

from . import expr
from .ledger import Record, Value, promoted

OP = "mixture of experts"  # the flow op: "x -> y : mixture of experts N" runs the family's N-th [[moe]]
INDEX = 8  # int64 indices (sort, topk, the gathers' rows)


def spec_of(family, name: str) -> dict:
    """The ``[[moe]]`` table a flow op ``mixture of experts N`` (or ``... N combine``) runs."""
    return family.moe[int(name.removeprefix(OP).split()[0]) - 1]


def combines(name: str) -> bool:
    """Whether a flow op is the combine half of a mixture of experts (``mixture of experts N combine``)."""
    return name.startswith(OP) and name.endswith(" combine")


def sizes(spec: dict, values: dict) -> tuple[int, int, int, int, int]:
    """(tokens T, experts E, top K, hidden H, expert width I)."""
    return tuple(expr.evaluate(spec[key], values) for key in ("tokens", "num_experts", "top_k", "hidden",
                                                              "intermediate"))


def lora_ranks(router, experts) -> dict[str, int]:
    """peft's ParamWrapper ranks on the router ("router") and on the experts' tensors ("gate_up_proj", "down_proj":
    per expert; gate_up_proj fuses w1 and w3, 2r), from the replay's modules (``flops._modules``)."""
    return ({"router": router.lora_rank} if router.lora_rank else {}) | dict(experts.lora_params)


def matmuls(spec: dict, values: dict, grad_in: bool, router, experts, ranks: dict) -> list[tuple]:
    """The op's matmuls as ``(phase, kernel, batch, m, k, n)`` (forward or backward; FLOPs 2*batch*m*k*n), in the
    order torch runs them. A weight pays for its gradient when it trains or peft's LoRA makes it from trainable
    factors; an input when it needs a gradient."""
    T, E, K, H, I = sizes(spec, values)
    S = T * K
    router_w = router.weight_trains or "router" in ranks
    gate_up_w = experts.weight_trains or "gate_up_proj" in ranks
    down_w = experts.weight_trains or "down_proj" in ranks
    mid = grad_in or gate_up_w  # act(gate) * up needs a gradient
    ops = []
    if "router" in ranks:  # B @ A, the router's delta
        ops.append(("forward", "lora_up", 1, E, ranks["router"], H))
    ops.append(("forward", "linear", 1, T, H, E))
    for name, out, inner in (("down_proj", H, I), ("gate_up_proj", 2 * I, H)):
        # baddbmm(W, lhs, rhs): per expert [out, r] @ [r, in]. register_parametrization runs it once to check what
        # it returns (outer wrapper, down_proj, first), then the experts' forward once more (E = 1: peft's B @ A,
        # made once before registering, and W + it)
        for _ in range(2 if E > 1 else 1) if name in ranks else ():
            ops.append(("forward", "lora_up", E, out, ranks[name], inner))
    for name, out, inner in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
        ops.append(("forward", "grouped_mm", 1, S, inner, out))
    backward = []
    for name, out, inner, weight, needs in (("down_proj", H, I, down_w, mid), ("gate_up_proj", 2 * I, H, gate_up_w,
                                                                                 grad_in)):
        if weight:
            backward.append(("backward", "grouped_mm", 1, inner, S, out))
        if needs:
            backward.append(("backward", "grouped_mm", 1, S, out, inner))
        if name in ranks:  # the factors' gradients
            backward += [("backward", "lora_down", E, out, inner, ranks[name]),
                         ("backward", "lora_down", E, ranks[name], out, inner)]
    if router_w:
        backward.append(("backward", "linear", 1, E, T, H))
    if grad_in:
        backward.append(("backward", "linear", 1, T, E, H))
    if "router" in ranks:
        backward += [("backward", "lora_down", 1, E, H, ranks["router"]), ("backward", "lora_down", 1, ranks["router"],
                                                                           E, H)]
    return ops + backward


def _node(record: Record, ledger, inputs, output, saves=(), held: int = 0, scratch: int = 0, grads=(),
           checkpointed: bool = False) -> Record:
    """One autograd node of the op (a stage of its record): backward walks them in reverse. ``held``: what its
    backward holds while it makes its inputs' gradients (index's zero-filled buffer, a product summed away).
    In a checkpointed layer's first forward nothing is kept: a placeholder says that the node saves."""
    node = Record(list(inputs), output, [], [], list(grads), scratch=scratch, held=held)
    for value in saves:
        if checkpointed:
            node.saved.append(ledger.new(0, "activations"))
        elif value.tid not in node.saved:
            node.saved.append(ledger.hold(value.tid))
    record.stages.append(node)
    return node


def _weight_grads(ctx, row: str, parameter: str | None = None) -> list[tuple[str, int]]:
    """This layer's gradients of a row's trainable tensors (``parameter``: of one of its tensors and the LoRA
    factors peft puts on it)."""
    found = []
    for key in (row, f"{row} {parameter}") if parameter else (row,):
        per_layer = ctx.grads.get(key, [])
        if per_layer:
            found += [g for g in per_layer[min(ctx.layer, len(per_layer) - 1)]
                      if key != row or parameter is None or g[0].endswith(f".{parameter}")]
    return found


def replay(spec: dict, x: Value, ledger, ctx, new, record: Record, cache: list[int]) -> Value:
    """Allocate what the mixture of experts makes in forward and keep what autograd saves, as stages of ``record``
    (module docstring); returns its output. Locals die where the functions that hold them return."""
    T, E, K, H, I = sizes(spec, ctx.values)
    S = T * K
    router, experts = ctx.modules[spec["router"]], ctx.modules[spec["experts"]]
    ranks = lora_ranks(router, experts)
    unsaved = getattr(ctx, "checkpointed", False)

    def _stage(*args, **kwargs):
        return _node(*args, checkpointed=unsaved, **kwargs)

    grad = x.grad
    router_w = router.weight_trains or "router" in ranks
    logits_grad = grad or router_w
    weights = {name: experts.weight_trains or name in ranks for name in ("gate_up_proj", "down_proj")}
    mid_grad = grad or weights["gate_up_proj"]
    out_grad = mid_grad or weights["down_proj"] or logits_grad
    width = ctx.master  # the experts' weights: the grouped matmul is not autocast, it runs in their dtype
    block: list[Value] = []  # MixtralSparseMoeBlock's and the router's locals, freed when the block returns

    # ---- the router: F.linear (autocast casts x, and the weight), softmax in fp32, topk, renormalised in place
    rw = ctx.compute if ctx.autocast else x.width
    weight = None
    if "router" in ranks:  # peft's parametrization: B @ A, scaled, plus W (an [E, H] tensor, alive meanwhile)
        delta = new(E * H, ctx.master, True)
        weight = new(E * H, ctx.master, True)
        ledger.drop(delta.tid)
        _stage(record, ledger, [], weight, grads=_weight_grads(ctx, spec["router"]))
    operand = new(T * H, rw, grad) if rw != x.width else x
    if ctx.autocast and rw != ctx.master and (grad or router_w):
        copy = new(E * H, rw, False)
        if router.weight_trains:  # autocast caches casts of trainable leaves until the forward ends
            cache.append(ledger.hold(copy.tid))
        block.append(copy)
    logits = new(T * E, rw, logits_grad)
    # backward: x's gradient (cast back to x's dtype), summed into the one the gather gave it first
    held = T * H * (rw + x.width * (rw != x.width)) * grad
    _stage(record, ledger, [x] + [weight] * (weight is not None), logits,
           [operand] * router_w + [weight] * (weight is not None and grad), held=held,
           grads=_weight_grads(ctx, spec["router"]) * (weight is None))
    if operand is not x:
        ledger.drop(operand.tid)
    if weight is not None:  # the parametrization's cache: alive while the router runs
        block.append(weight)
    block.append(logits)  # the block keeps the logits the router returns (in "_") until it returns
    logits32 = logits
    if rw != 4:  # router_logits.float()
        logits32 = new(T * E, 4, logits_grad)
        _stage(record, ledger, [logits], logits32)
    probs = new(T * E, 4, logits_grad)
    _stage(record, ledger, [logits32], probs, [probs] * logits_grad)
    if logits32 is not logits:
        ledger.drop(logits32.tid)
    top = new(T * K, 4, logits_grad)
    index = new(T * K, INDEX, False)
    _stage(record, ledger, [probs], top, [index] * logits_grad)  # backward: scattered into zeros
    total = new(T, 4, logits_grad)
    _stage(record, ledger, [top], total)
    original = new(T * K, 4, False)  # div_ in place: autograd keeps a clone of what it overwrites
    scores = Value(ledger.new(0, "activations"), T * K, 4, logits_grad)  # the same storage as top
    _stage(record, ledger, [top, total], scores, [original, total] * logits_grad, scratch=2 * T * K * 4)
    for value in (original, total, probs):  # (the router returns)
        ledger.drop(value.tid)
    block += [top, scores, index]

    # ---- peft's ParamWrappers on the experts (outermost down_proj's) register their parametrizations, each run once
    # to check what it returns: a tensor the size of the stack, let go at once
    for name, elements in (("down_proj", E * H * I), ("gate_up_proj", E * 2 * I * H)):
        if name in ranks:
            ledger.drop(new(elements, width, False).tid)

    # ---- grouped_mm_experts_forward
    local = [new(S, INDEX, False), new(S, INDEX, False)]  # sort: the sorted expert ids and the order (perm)
    rows = new(S, INDEX, False)  # perm // K: which token each pick is
    gathered = new(S * H, x.width, grad)
    _stage(record, ledger, [x], gathered, [rows] * grad)  # backward: index_put into zeros
    ledger.drop(rows.tid)
    picked = new(S, 4, logits_grad)  # sample_weights[perm]
    _stage(record, ledger, [scores], picked, [local[1]] * logits_grad)
    local += [picked, new(S, 4, False), new(E, 4, False)]  # histc's fp32 input, tokens per expert
    offsets = new(E, 4, False)  # cumsum to int32
    local.append(offsets)
    rows_in = gathered
    if gathered.width != width:  # input.to(weight.dtype)
        rows_in = new(S * H, width, grad)
        _stage(record, ledger, [gathered], rows_in)
        ledger.drop(gathered.tid)
        local.append(rows_in)
    else:
        local.append(gathered)
    up_weight = _effective(E * 2 * I * H, "gate_up_proj", ranks, record, ledger, ctx, new, spec)
    gate_up = new(S * 2 * I, width, mid_grad)
    inputs = [rows_in] + [up_weight] * (up_weight is not None)
    _stage(record, ledger, inputs, gate_up, [rows_in] * weights["gate_up_proj"] + [offsets] * mid_grad
           + [up_weight] * (up_weight is not None and grad),
           grads=_weight_grads(ctx, spec["experts"], "gate_up_proj") * (up_weight is None))
    # chunk(2): gate and up are views; backward concatenates their gradients into one [S, 2I] (at the gate's node,
    # the first backward reaches, while the up half's gradient waits)
    up, gate = (Value(ledger.new(0, "activations"), S * I, width, mid_grad) for _ in range(2))
    _stage(record, ledger, [gate_up], up)
    _stage(record, ledger, [gate_up], gate)
    act = new(S * I, width, mid_grad)  # act(gate): silu keeps its input, a view of the whole gate_up output
    _stage(record, ledger, [gate], act, [gate_up] * mid_grad)
    product = new(S * I, width, mid_grad)  # act(gate) * up: each factor kept for the other's gradient
    _stage(record, ledger, [act, up], product, [act, gate_up] * mid_grad)
    for value in (act, gate, up, gate_up):
        ledger.drop(value.tid)
    down_weight = _effective(E * H * I, "down_proj", ranks, record, ledger, ctx, new, spec)
    down = new(S * H, width, out_grad)
    inputs = [product] + [down_weight] * (down_weight is not None)
    _stage(record, ledger, inputs, down, [product] * weights["down_proj"] + [offsets] * out_grad
           + [down_weight] * (down_weight is not None and mid_grad),
           grads=_weight_grads(ctx, spec["experts"], "down_proj") * (down_weight is None))
    ledger.drop(product.tid)
    for value in (up_weight, down_weight):  # the parametrization's cache ends with the experts' forward
        if value is not None:
            block.append(value)
    wide = max(width, 4)  # times the fp32 pick weights
    casts = promoted([down], wide, ledger)
    weighted = new(S * H, wide, out_grad)
    _stage(record, ledger, [down, picked], weighted, [down] * logits_grad + [picked] * out_grad,
           held=S * H * wide * out_grad)  # the product summed into the weights' gradient
    for tid in casts:
        ledger.drop(tid)
    local.append(down)  # (proj_out, a local until the function returns)
    inverse = new(S, INDEX, False)
    ledger.drop(new(S, INDEX, False).tid)  # arange, scattered into the inverse permutation
    local.append(inverse)
    # the gather that puts the picks back in token order keeps the inverse permutation: the op's last save, where a
    # checkpointed re-run ends (torch's early stop: the gather itself does not run)
    stop = ctx.stop
    ordered = Value(ledger.new(0, "activations"), S * H, wide, out_grad) if stop else new(S * H, wide, out_grad)
    _stage(record, ledger, [weighted], ordered, [inverse] * out_grad)
    ledger.drop(weighted.tid)
    for value in local + block:  # the experts' function returns (after the combine: a few ops, no allocation
        ledger.drop(value.tid)   # in between that these would add to), then the block
    return ordered


def combine(spec: dict, x: Value, ledger, ctx, new, record: Record) -> Value:
    """``mixture of experts N combine``: the picks, in token order, summed over the K of each token
    (``view(T, K, H).sum(1)``; backward: the gradient expanded K times, a copy) and cast to the hidden states' dtype
    (the weights': the RMSNorm before gives its output theirs). An op of its own because it saves nothing: backward
    reaches it before a checkpointed layer's re-run, so the gradient it hands back is alive through the re-run."""
    T, _, _, H, _ = sizes(spec, ctx.values)
    out = new(T * H, x.width, x.grad)
    if x.width == ctx.master:
        return out
    _node(record, ledger, [x], out)
    cast = new(T * H, ctx.master, x.grad)
    _node(record, ledger, [out], cast)
    ledger.drop(out.tid)
    return cast


def _effective(elements, name, ranks, record, ledger, ctx, new, spec) -> Value | None:
    """peft's parametrized experts tensor (LoRA on it): baddbmm(W, lhs, rhs), made when the experts' forward first
    reads it; its factors' gradients come in its backward."""
    if name not in ranks:
        return None
    weight = new(elements, ctx.master, True)
    _node(record, ledger, [], weight, grads=_weight_grads(ctx, f"{spec['experts']} {name}"))
    return weight


def kernels(record: Record, name: str, ops, where, backward: bool) -> None:
    """The op's kernels for the time model (``paramcalc.oplist``): its matmuls (``matmuls``; a grouped matmul at the
    rates of a Linear's), and the elementwise work around them (one pass a tensor read or written): the router's
    softmax, the gathers, SwiGLU, the weighting; the combine's sum over the picks and its cast."""
    spec = spec_of(where.family, name)
    T, E, K, H, I = sizes(spec, where.values)
    S = T * K
    x, out = record.inputs[0], record.output
    ops.phase = "forward"
    if combines(name):
        ops.ew("add", (S + T) * H * x.width, x.width)
        if backward and out is not None and out.grad:
            ops.phase = "backward"
            ops.ew("copy", (S + T) * H * x.width, x.width)
        return
    router, experts = where.modules[spec["router"]], where.modules[spec["experts"]]
    width = where.master
    for kernel, nbytes in (("softmax", 2 * T * E * 4), ("copy", S * H * (x.width + width)),
                           ("gelu", 3 * S * I * width), ("mul", 3 * S * I * width), ("mul", S * H * (width + 8)),
                           ("copy", 2 * S * H * 4)):
        ops.ew(kernel, nbytes, width)
    for phase, kernel, batch, m, k, n in matmuls(spec, where.values, x.grad, router, experts,
                                                 lora_ranks(router, experts)):
        if phase == "forward" or backward:
            ops.phase = phase
            ops.mm(kernel, batch, m, k, n, where.compute if kernel == "linear" else width)
    if backward and out is not None and out.grad:
        ops.phase = "backward"
        for kernel, nbytes in (("copy", 2 * S * H * 4), ("mul", 6 * S * H * 4), ("mul", 5 * S * I * width),
                               ("gelu_backward", 3 * S * I * width), ("copy", 4 * S * I * width),
                               ("add", 2 * T * H * x.width), ("softmax_backward", 3 * T * E * 4)):
            ops.ew(kernel, nbytes, width)
