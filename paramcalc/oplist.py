"""One training step as a list of ops: what each runs (kernel, FLOPs, bytes moved), phase by phase.

The memory replay (``paramcalc.activations.simulate``) walks the family file's flow once and keeps the forward
record of every op that ran (``Timeline.records``: its inputs, output and what it saved, with their sizes and
dtypes). This module turns each record into the kernels torch runs for it in forward, in backward and, for a
checkpointed layer, in the re-run inside backward; ``paramcalc.timing`` folds the list into time. Memory is
the replay's own fold over the same walk, and the FLOPs of the list equal ``paramcalc.flops.step_flops``
(tests/test_oplist.py), which ``FlopCounterMode`` judges.

An op's ``bytes`` are the tensors its kernel must read and write once (what a fused kernel moves at least);
its ``dispatches`` the torch ops it takes, each paying a fixed cost on the host.

Torch-free: the analytic path.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import flops_methods, moe
from .flops import ELEMENTWISE, SAVING, _base_name
from .replay_methods import modules as replay_modules
from .kernels import FUSED_ACTIVATION, WRITTEN_OUT, attention_ops, module_ops
from .ops import activation_name

# The time table's op kinds, in the order it shows them
KINDS = ("matmuls", "attention core", "elementwise", "embeddings and loss", "optimizer", "all-reduce")
PHASES = ("forward", "backward", "recompute", "optimizer", "all_reduce")

@dataclass
class Op:
    """One kernel of the step."""

    phase: str  # forward | backward | recompute | optimizer | all_reduce
    kind: str  # one of KINDS
    name: str  # the flow op or row it belongs to
    kernel: str  # a gemm class (linear, lora_down, ...) or an elementwise op (softmax, layer_norm, add, ...)
    flops: int = 0
    bytes: int = 0  # read + written
    width: int = 4  # bytes per element of what it computes in
    dispatches: int = 1
    shape: tuple[int, ...] = ()  # a matmul's [batch, m, k, n]
    written: int = 0  # bytes of the new tensor it allocates and writes (on a CPU, large ones fault in: timing)

    @property
    def matmul(self) -> bool:
        return bool(self.shape)


class _Ops(list):
    """The list being built, with the phase and name the next ops get."""

    def __init__(self):
        super().__init__()
        self.phase, self.name = "forward", ""

    def mm(self, kernel: str, batch: int, m: int, k: int, n: int, width: int, kind: str = "matmuls",
           dispatches: int = 1) -> None:
        self.append(Op(self.phase, kind, self.name, kernel, 2 * batch * m * k * n,
                       (batch * m * k + batch * k * n + batch * m * n) * width, width, dispatches, (batch, m, k, n),
                       batch * m * n * width))

    def ew(self, kernel: str, nbytes: int, width: int, kind: str = "elementwise", dispatches: int = 1,
           written: int | None = None) -> None:
        """An elementwise op moving ``nbytes``; by default it writes one new tensor the size of each it reads
        (a third of what a binary op or a backward kernel moves, half of what a unary op moves)."""
        if written is None:
            written = nbytes // (3 if kernel in ("add", "mul") or kernel.endswith("_backward") else 2)
        self.append(Op(self.phase, kind, self.name, kernel, 0, int(nbytes), width, dispatches, (), int(written)))


@dataclass
class _Where:
    """What the mapping needs to know of the step: shapes, modules, dtypes, the attention kernel."""

    result: object
    step: object
    device: str
    family: object
    values: dict
    modules: dict
    compute: int
    master: int
    autocast: bool
    lora_dropout: float
    quantized: set
    prefix: int


def step_ops(result, step, device: str, records) -> list[Op]:
    """The kernels of one micro-batch's forward, backward and checkpointed re-run, from the replay's records
    (``simulate(...).records``, for ``step`` with its attention resolved)."""
    from .families import families
    from .memory import DTYPE_BYTES, weights_dtype

    family = families()[result.family]
    values = {**result.values, **step.symbols(result.task)}
    values["s"] += flops_methods.prepended_tokens(result)
    dtype = weights_dtype(result, step)
    where = _Where(result, step, device, family, values, replay_modules(result, family, values),
                   DTYPE_BYTES[step.mixed_precision or dtype], DTYPE_BYTES[dtype], bool(step.mixed_precision),
                   next((o.dropout for m, o in result.peft_options if m == "lora"), 0.0),
                   {_base_name(n) for n in result.quant.quantized} if result.quant else set(),
                   flops_methods.prefix_tokens(result))
    ops = _Ops()
    # p-tuning's prompt encoder runs before the model: a few small Linears, all trainable (backward twice the
    # forward). (Prefix tuning's encoder is in the replay's records, row by row.)
    encoder = flops_methods.encoder_flops(result, values, family, methods=("ptuning",))
    if encoder:
        ops.name = "prompt encoder"
        ops.append(Op("forward", "matmuls", "prompt encoder", "linear", encoder, 0, 4, 3, (1, 1, 1, encoder // 2)))
        ops.append(Op("backward", "matmuls", "prompt encoder", "linear", 2 * encoder, 0, 4, 6, (1, 1, 1, encoder)))
    loss_from = len(records)
    while loss_from and records[loss_from - 1][0].op == "" and records[loss_from - 1][1] is None:
        loss_from -= 1  # the loss's records close the list (masks' records, also op-less, come first)
    layer: list = []
    for index, (record, checkpointed) in enumerate(records):
        if index >= loss_from:
            _loss(record, ops, index == len(records) - 1)
            continue
        _record(record, ops, where)
        if checkpointed is not None:
            layer.append(record)
        if layer and (index + 1 == len(records) or records[index + 1][1] != checkpointed):
            _recompute(layer, ops, where)
            layer = []
    return ops


def _recompute(layer: list, ops: _Ops, where: _Where) -> None:
    """A checkpointed layer's forward, run again in backward, up to torch's early stop: the re-run ends once
    every tensor the first run saved is saved again, so nothing after the last op that saves runs, and when that
    op is a matmul (which saves its inputs before its kernel runs) its last kernel does not run either
    (``paramcalc.flops`` counts it the same way). A layer none of whose outputs needs a gradient is not re-run."""
    if not any(record.output is not None and record.output.grad for record in layer):
        return
    saving = [i for i, record in enumerate(layer) if _saves(record, where)]
    if not saving:
        return
    again = _Ops()
    for record in layer[:saving[-1] + 1]:
        _record(record, again, where, forward_only=True)
    last = layer[saving[-1]]
    module = where.modules.get(last.op.partition(":")[2].strip())
    if module is not None and not module.ia3_output and not module.dora and module.fan_in and module.kind in (
            "linear", "conv1d", "tied", "adapter"):
        matmuls = [i for i, op in enumerate(again) if op.matmul]
        if matmuls:
            del again[matmuls[-1]]
    for op in again:
        op.phase = "recompute"
    ops.extend(again)


def _saves(record, where: _Where) -> bool:
    """Whether autograd saves anything for this op's backward (a frozen weight counts: it is saved, as a
    reference)."""
    name = record.op.partition(":")[2].strip()
    kind = name.split(" ")[0]
    grad_in = any(v.grad for v in record.inputs)
    if record.output is None:
        return False
    if kind in ELEMENTWISE:
        if kind == "dropout":
            return grad_in and float(where.result.config.get(name.split()[1], 0.0) or 0.0) > 0
        return grad_in and kind in SAVING
    if name.startswith(("attention core", moe.OP)):
        return record.output.grad and not moe.combines(name)
    module = where.modules.get(name.removesuffix(" [tied]"))
    return (module is not None and not name.endswith(" [tied]") and record.output.grad
            and not module.hooks_see_nothing)


def _record(record, ops: _Ops, where: _Where, forward_only: bool = False) -> None:
    op = record.op
    if op == "|" or (record.output is None and not record.stages):
        return  # a scope's end, a branch this config lacks, or an identity (nothing for backward either)
    flow, _, name = op.partition(":")
    name = name.strip()
    ops.name = name or "masks and position biases"
    x = record.inputs[0] if record.inputs else None
    out = record.output
    backward = not forward_only
    kind = name.split(" ")[0]
    if not name:  # a mask or position bias the model makes once per forward
        ops.phase = "forward"
        ops.ew("copy", out.bytes, out.width)
        if backward and record.weight_grads:
            ops.phase = "backward"
            ops.ew("embedding_backward", sum(b for _, b in record.weight_grads) + 2 * out.bytes, out.width,
                   "embeddings and loss", written=0)  # calibrated as it runs: into a fresh gradient
        return
    if name.startswith("attention core"):
        attention_ops(record, name, ops, where, backward)
        return
    if name.startswith(moe.OP):
        moe.kernels(record, name, ops, where, backward)
        return
    if kind in ELEMENTWISE:
        _elementwise(name, kind, record, x, out, ops, where, backward)
        return
    module = where.modules.get(name.removesuffix(" [tied]"))
    if module is not None:
        module_ops(name, module, record, x, out, ops, where, backward)


def _elementwise(name, kind, record, x, out, ops: _Ops, where: _Where, backward: bool) -> None:
    if kind in ("first-token", "keep") or out is None:
        return  # views
    grads = [v for v in record.inputs if v.grad]
    ops.phase = "forward"
    if kind == "+":
        ops.ew("add", sum(v.bytes for v in record.inputs) + out.bytes, out.width)
        return  # its backward hands the gradient on as it is
    if kind in ("*", "scale", "upcast"):
        ops.ew("mul" if kind != "upcast" else "copy", sum(v.bytes for v in record.inputs) + out.bytes, out.width)
        if backward and grads:
            ops.phase = "backward"
            for value in grads:
                ops.ew("mul" if kind != "upcast" else "copy", (3 if kind == "*" else 2) * value.bytes, value.width)
        return
    if kind == "dropout":  # p > 0 (p = 0 is an identity): a noise tensor or mask, then a product
        ops.ew("dropout", 2 * x.bytes + x.elements * (x.width if where.device == "cpu" else 1), x.width,
               dispatches=3)
        if backward and x.grad:
            ops.phase = "backward"
            ops.ew("mul", 3 * x.bytes, x.width)
        return
    if kind == "rotary":  # apply_rotary_pos_emb, written out in Python (its cos and sin tables are tiny)
        forward, back, calls, back_calls = WRITTEN_OUT["rotary"]
        ops.ew("mul", forward * out.bytes, out.width, dispatches=calls)
        if backward and x.grad:
            ops.phase = "backward"
            ops.ew("mul", back * out.bytes, out.width, dispatches=back_calls)
        return
    if kind == "act":
        act = activation_name(name.split()[1], where.result.config)
        if act in WRITTEN_OUT:
            forward, back, calls, back_calls = WRITTEN_OUT[act]
            ops.ew("mul", forward * x.bytes, x.width, dispatches=calls)
            if backward and x.grad:
                ops.phase = "backward"
                ops.ew("mul", back * x.bytes, x.width, dispatches=back_calls)
            return
        ops.ew(FUSED_ACTIVATION.get(act, "gelu"), 2 * x.bytes, x.width)
        if backward and x.grad:
            ops.phase = "backward"
            ops.ew(FUSED_ACTIVATION.get(act, "gelu") + "_backward", 3 * x.bytes, x.width)


def _loss(record, ops: _Ops, last: bool) -> None:
    """Cross-entropy (an fp32 upcast of half logits, log_softmax, then the picked log-probabilities) or the
    tracer's stand-in over a bare backbone (the mean square of its outputs)."""
    ops.name = "loss"
    out, inputs = record.output, record.inputs
    if not last:  # the upcast, or log_softmax
        logits = inputs[0]
        ops.phase = "forward"
        if record.saved_sizes:
            ops.ew("log_softmax", logits.bytes + out.bytes, 4, "embeddings and loss")
            if logits.grad:
                ops.phase = "backward"
                ops.ew("log_softmax_backward", 3 * out.bytes, 4, "embeddings and loss")
        else:
            ops.ew("copy", logits.bytes + out.bytes, 4, "embeddings and loss")
            if logits.grad:
                ops.phase = "backward"
                ops.ew("copy", logits.bytes + out.bytes, 4, "embeddings and loss")
        return
    ops.phase = "forward"
    total = sum(v.bytes for v in inputs)
    if record.saved_sizes:  # the stand-in keeps its inputs: x.pow(2).mean(), backward 2 * x * grad
        ops.ew("mul", 3 * total, 4, "embeddings and loss", dispatches=2 * len(inputs))
        ops.phase = "backward"
        ops.ew("mul", 3 * total, 4, "embeddings and loss", dispatches=2 * len(inputs))
        return
    # nll_loss reads one log-probability a token; its backward writes a zero-filled [tokens, V] gradient
    ops.ew("copy", 0, 4, "embeddings and loss", dispatches=2)
    if inputs and inputs[0].grad:
        ops.phase = "backward"
        ops.ew("copy", inputs[0].bytes, 4, "embeddings and loss", dispatches=2, written=inputs[0].bytes)
