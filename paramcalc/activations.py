"""The memory of one training step over time, by replaying the family file's ``[flow]`` op by op.

Model states (weights, gradients, optimizer state) are static; what makes a step run out of memory is
what autograd keeps between forward and backward. Each op of the flow says what it allocates and what
it saves, following what torch's derivative formulas save (``tools/autograd/derivatives.yaml``):

- a Linear saves its input when its weight trains, and its weight when its input needs a gradient
  (free in full precision, a half-precision copy under autocast, which also casts the input);
- LayerNorm saves its input (plus a mean and a reciprocal deviation per token); T5's RMSNorm, written
  out in Python, saves its input and the normalised tensor;
- dropout saves its mask (on the CPU a full tensor of the input's dtype, on CUDA one byte per value);
- GELU saves its input, ReLU its output, GPT-2's tanh GELU four tensors (it is written out in Python);
- attention keeps what the kernel that really runs keeps (``paramcalc.attention``): eager attention and
  torch's math path (sdpa with attention dropout on a CPU) the ``b*heads*q*k`` probabilities and dropout
  mask, the fused kernels only q, k, v, the output and a log-sum-exp per row;
- the loss keeps the log-probabilities (``tokens*V`` in fp32) for its backward;
- the masks and position biases the model makes once per forward (``paramcalc.masks``) live from the first
  layer that reads them until the stack returns, and checkpointed layers keep them as arguments; a layer
  keeps the attention weights eager attention returns until it returns (BLOOM's model: until the next one).

A tensor saved by several ops (the input of q, k and v) is held once. Backward runs the flow in
reverse: it frees what each op saved, holds the gradients flowing between ops, and allocates weight
gradients as it reaches the weights. With gradient checkpointing a layer keeps only its inputs and is
re-run during backward. The peak over forward, backward and the optimizer step is the step's peak.

Torch-free: this is the analytic path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import attention, masks
from .errors import ParamcalcError
from .families import concrete_parameters, families
from .flops import ELEMENTWISE, _base_name, _layers, _modules
from .memory import DTYPE_BYTES, model_states, weights_dtype
from .ops import activation as _activation, dropout as _dropout, loss as _loss, module as _module
from .ledger import CATEGORIES, Ledger as _Ledger, Record as _Record, Timeline, Value, backward as _backward  # noqa: F401
from .step import Step, check_fits_model, resolve_attention

SCOPE_END = "|"  # in a flow: a Python function returns here, and the values only it still held are freed
LM_TASKS = ("masked-lm", "causal-lm", "seq2seq-lm")



@dataclass
class _Checkpointed:
    """A checkpointed layer: the streams it was called with, kept; its ops, re-run in backward."""

    layer: int
    arguments: dict[str, Value]
    records: list[_Record]
    part: str = ""


@dataclass
class _Context:
    step: Step
    values: dict
    config: dict
    modules: dict
    family: object
    compute: int  # bytes per activation element (2 under autocast)
    master: int  # bytes per parameter element
    autocast: bool
    device: str
    lora_dropout: float
    grads: dict[str, list[list[tuple[str, int]]]]  # row name -> per layer, its trainable tensors' gradients
    tied_to: dict[str, str]  # a tied row -> the row that owns the weight
    layer: int = 0  # the layer the replay is in
    quant: object = None  # --quant options, and the quantized rows (-> whether their bias trains)
    quantized: dict = field(default_factory=dict)


def simulate(result, step: Step, device: str = "cpu", accumulating: bool = False, curve: bool = False) -> Timeline:
    """Replay one steady-state training step (optimizer state already allocated) and return its timeline;
    ``curve=True`` also keeps the bytes alive after every allocation and free (``Timeline.curve``)."""
    if result.generic:
        raise ParamcalcError("the memory replay needs a family file (bert, roberta, t5, gpt2, bloom); "
                             "paramcalc.plan traces other models instead")
    if any(method in ("adapter", "prefix") for method, _ in result.peft_options):
        raise ParamcalcError("the memory replay covers full fine-tuning, LoRA, IA3, prompt tuning and p-tuning; "
                             "adapters and prefix tuning are not modelled yet ('paramcalc trace' measures the "
                             "whole step)")
    check_fits_model(step, result)
    step = resolve_attention(step, result)
    family = families()[result.family]
    values = {**result.values, **step.symbols(result.task)}
    for method, options in result.peft_options:
        if method in ("prompt", "ptuning"):  # soft prompts are prepended to the tokens
            values["s"] += options.tokens
    states = model_states(result, step)
    dtype = weights_dtype(result, step)  # under --quant, the dtype the unquantized weights were loaded in
    ctx = _Context(step, values, result.config, _modules(result, family, values), family,
                   compute=DTYPE_BYTES[step.mixed_precision or dtype], master=DTYPE_BYTES[dtype],
                   autocast=bool(step.mixed_precision), device=device,
                   lora_dropout=next((o.dropout for m, o in result.peft_options if m == "lora"), 0.0),
                   grads=_gradients_by_row(result, step),
                   tied_to={c.name: c.tied_to for c in result.components if c.tied_to})
    if result.quant:
        ctx.quant = result.quant.options
        ctx.quantized = {_base_name(name): False for name in result.quant.quantized}
        for c in result.components:
            if c.trainable and c.group != "peft" and "bias" in c.shapes and _base_name(c.name) in ctx.quantized:
                ctx.quantized[_base_name(c.name)] = True
    ledger = _Ledger()
    ledger.timeline.curve = [] if curve else None
    ledger.new(states.weights, "weights")
    ledger.new(states.optimizer, "optimizer")
    if accumulating:  # a micro-batch after the first: the gradients summed so far are alive throughout
        ledger.accumulating = True
        ledger.new(states.gradients, "gradients")
    streams: dict[str, Value] = {}
    records: list[_Record | _Checkpointed] = []
    cache: list[int] = []  # autocast's cached weight copies and the key/value cache: alive until the forward ends
    pinned: list[int] = []  # values the model's forward keeps in a local ("keep"), alive until it returns
    parts = family.tasks[result.task].parts
    last_target = _io(family.flow[parts[-1]][-1])[1]
    sequence = [(op, index == 0) for part in parts for _ in range(_layers(result, part))
                for index, op in enumerate(family.flow.get(part, []))]
    dies = iter(_last_reads(sequence, set(ctx.modules), keep={"y", "p", last_target}))

    prompted = any(method in ("prompt", "ptuning") for method, _ in result.peft_options)
    first_op = family.flow[parts[0]][0]
    input_embedding = first_op.partition(":")[2].strip()
    leaves: list[int] = []  # frozen lookups made to need a gradient: alive until backward ends

    def run(op, written):
        if op == SCOPE_END:
            next(dies)
            end_of_layer()
            return _Record([], None, [], [], [], op=op)
        if op.endswith(": keep") and _io(op)[0][0] in streams:
            pinned.append(ledger.hold(streams[_io(op)[0][0]].tid))
        record = _forward(op, streams, ledger, ctx, cache, written, held)
        lookup = op.startswith("->") and op.partition(":")[2].strip() == input_embedding
        if lookup and step.grad_checkpointing and record.output and not record.output.grad:
            # transformers' gradient_checkpointing_enable hooks the input embeddings so that their output
            # needs a gradient: with a frozen embedding that output is a leaf the graph holds
            record.output.grad = record.leaf = True
            leaves.append(ledger.hold(record.output.tid))
        if prompted and op is first_op:  # peft prepends trainable soft prompts to these embeddings
            record.output.grad = True
        record.op, record.dead = op, tuple(next(dies))
        _let_go(record.dead, streams, scope, ledger)
        return record

    def end_of_layer():
        _release(scope, ledger)

    def end_of_block():
        _release(scope, ledger)
        _release(block, ledger)
        _release(outputs, ledger)  # the previous layer's returned values: the model holds this layer's instead
        outputs.extend(returned)
        returned.clear()

    scope: list[int] = []
    block: list[int] = []  # values the layer's own locals hold until it returns (the attention weights)
    returned: list[int] = []  # values the layer returns, which the model holds until the next layer returns
    outputs: list[int] = []
    held = {"return": scope, "block": block, "next block": returned}

    for part in parts:
        ops = family.flow.get(part, [])
        layers = _layers(result, part)
        checkpoint = step.grad_checkpointing and layers > 1
        for spec in family.forward_tensors:  # masks and position biases the model makes for this part's layers
            made = masks.forward_tensor(spec, ledger, ctx, checkpoint) if spec["part"] == part else None
            if made:
                streams[spec["name"]], record = made
                records.append(record)
        for ctx.layer in range(layers):
            written: set[str] = set()
            if not checkpoint:
                # the layer's forward holds its arguments (the streams it reads) until it returns
                arguments = [ledger.hold(streams[n].tid) for n in _reads(ops) if n in streams]
                records.extend(run(op, written) for op in ops)
                end_of_block()
                for tid in arguments:
                    ledger.drop(tid)
                continue
            before = {name: value for name, value in streams.items()}
            for value in before.values():
                ledger.hold(value.tid)
            layer = []
            for op in ops:  # checkpointing stores nothing for backward: each saved tensor is let go at once
                record = run(op, written)
                record.release(ledger)
                layer.append(record)
            end_of_block()
            used = {i.tid for record in layer for i in record.inputs}  # the layer keeps only its inputs
            for name, value in list(before.items()):
                if value.tid not in used:
                    ledger.drop(value.tid)
                    del before[name]
            records.append(_Checkpointed(ctx.layer, before, layer, part))
        _release(outputs, ledger)
        for spec in family.forward_tensors:  # the stack's forward returns: what it made for its layers dies
            if spec["until"] == part:
                _forget(streams, spec["name"], ledger)
    loss_records = _loss(result, streams, ledger, ctx, last_target)
    records.extend(loss_records)
    ledger.timeline.records = [(r, index if isinstance(item, _Checkpointed) else None)
                               for index, item in enumerate(records)
                               for r in (item.records if isinstance(item, _Checkpointed) else [item])]
    loss = loss_records[-1].output
    for value in streams.values():
        ledger.drop(value.tid)
    for tid in cache + pinned:
        ledger.drop(tid)
    ledger.phase = "backward"
    grad_of = {loss.tid: ledger.new(4, "transient")}
    uses: dict[str, int] = {}  # a tied weight's gradient arrives twice; autograd sums them into .grad
    for item in records:
        for record in item.records if isinstance(item, _Checkpointed) else [item]:
            for name, _ in record.weight_grads:
                uses[name] = uses.get(name, 0) + 1
    allocated: dict[str, int | None] = {}
    for item in reversed(records):
        if isinstance(item, _Checkpointed):  # re-run the layer's forward, then go back through it
            remade = [ledger.new(value.bytes, "transient") for value in masks.remade(family, item)]
            rerun = _recompute(item, ledger, ctx, grad_of)
            for tid in remade:  # the re-run's own locals: they die when it returns
                ledger.drop(tid)
            for record in reversed(rerun):
                _backward(record, ledger, grad_of, allocated, uses)
            for value in item.arguments.values():
                ledger.drop(value.tid)
        else:
            _backward(item, ledger, grad_of, allocated, uses)
    for tid in list(grad_of.values()) + leaves:
        ledger.drop(tid)
    missing = states.gradients - sum(ledger.size[t][0] for t in ledger.size if ledger.size[t][1] == "gradients")
    if missing > 0 and not accumulating:  # trainable tensors no op of the flow reached (e.g. a pooler a task does not run)
        ledger.new(missing, "gradients")
    ledger.phase = "optimizer"
    ledger.new(states.optimizer_transient, "transient")
    return ledger.timeline


def _let_go(names, streams: dict[str, Value], scope: list[int], ledger: _Ledger) -> None:
    """Streams nothing reads again leave the flow; the function's Python locals hold them until it returns."""
    for name in names:
        if name in streams:
            scope.append(ledger.hold(streams[name].tid))
            _forget(streams, name, ledger)


def _release(scope: list[int], ledger: _Ledger) -> None:
    """A Python function returns: the values only its locals still held are freed."""
    for tid in scope:
        ledger.drop(tid)
    scope.clear()


def _recompute(item: _Checkpointed, ledger: _Ledger, ctx: _Context, grad_of: dict[int, int]) -> list[_Record]:
    """Re-run a checkpointed layer's forward in backward, keeping what its ops save this time.

    The re-run's outputs are new tensors: the gradients waiting for the first run's outputs move to them.
    Autocast's weight copies live only as long as the re-run.
    """
    streams = dict(item.arguments)
    for value in streams.values():
        ledger.hold(value.tid)
    ctx.layer, scope, block, returned, cache, written = item.layer, [], [], [], [], set()
    records = []
    for first in item.records:
        if first.op == SCOPE_END:
            _release(scope, ledger)
            continue
        record = _forward(first.op, streams, ledger, ctx, cache, written,
                          {"return": scope, "block": block, "next block": returned})
        record.op, record.dead = first.op, first.dead
        if first.output is not None and record.output is not None and first.output.tid in grad_of:
            grad_of[record.output.tid] = grad_of.pop(first.output.tid)
        _let_go(record.dead, streams, scope, ledger)
        records.append(record)
    for tid in scope + block + returned + cache:
        ledger.drop(tid)
    for value in streams.values():
        ledger.drop(value.tid)
    return records


def _gradients_by_row(result, step: Step) -> dict[str, list[list[tuple[str, int]]]]:
    """row name -> per layer, the (parameter name, gradient bytes) of its trainable tensors."""
    width = DTYPE_BYTES[weights_dtype(result, step)]
    rows: dict[str, list[tuple[str, int]]] = {}
    for component in result.components:
        if not component.trainable:
            continue
        own = 4 if component.group == "peft" and "modules_to_save" not in component.name else width
        key = component.name
        if component.group == "peft":
            key = component.name.removeprefix("LoRA ").removeprefix("IA3 ")
            key = key.removesuffix(" (trainable copy, modules_to_save)")
        key = _base_name(key)
        layers = component.repeat_count if "{i}" in component.param else 1
        tensors = list(concrete_parameters(component, result.values).items())
        per_layer = len(tensors) // layers
        row = rows.setdefault(key, [[] for _ in range(layers)])
        for index in range(layers):
            row[index].extend((name, math.prod(shape) * own)
                              for name, shape in tensors[index * per_layer:(index + 1) * per_layer])
    return rows


def _forward(op: str, streams: dict[str, Value], ledger: _Ledger, ctx: _Context, cache: list[int],
             written: set[str], held: dict[str, list[int]]) -> _Record:
    flow, _, name = op.partition(":")
    sources, _, target = flow.partition("->")
    names = [s.strip() for s in sources.split(",") if s.strip()]
    name, target = name.strip(), target.strip()
    record = _Record([], None, [], [], [])
    if any(n not in streams for n in names):  # a branch this config does not have
        return record
    inputs = [streams[n] for n in names]
    record.inputs = inputs
    grad_in = any(v.grad for v in inputs)

    def save(value: Value) -> None:
        if value.tid not in record.saved:
            record.saved.append(ledger.hold(value.tid))
            record.saved_sizes.append((value.bytes, "activations"))

    def new(elements: int, width: int, grad: bool) -> Value:
        return Value(ledger.new(elements * width, "activations"), elements, width, grad)

    if name == "keep":  # the value stays as it is (and is pinned by the caller)
        out = inputs[0]
        ledger.hold(out.tid)
    elif name == "first-token":  # features[:, 0]: a view of the first position
        out = Value(ledger.hold(inputs[0].tid), inputs[0].elements // ctx.values["s"], inputs[0].width, grad_in)
    elif name in ("+", "*", "scale"):
        width = max(v.width for v in inputs)
        out = new(inputs[0].elements, width, grad_in)
        if name == "*":  # each factor is saved for the other's gradient
            for value, other in ((inputs[0], inputs[1]), (inputs[1], inputs[0])):
                if other.grad:
                    save(value)
    elif name.startswith("dropout"):
        out = _dropout(inputs[0], float(ctx.config.get(name.split()[1], 0.0)), ledger, ctx, save)
    elif name.startswith("act"):
        out = _activation(name.split()[1], inputs[0], ledger, ctx, new, save, record)
    elif name.startswith("upcast"):  # T5 casts the FFN's hidden state to wo's weight dtype
        out = new(inputs[0].elements, ctx.master, grad_in) if inputs[0].width != ctx.master else inputs[0]
        if out is inputs[0]:
            ledger.hold(out.tid)
    elif name.startswith("attention core"):
        core = ctx.family.attention[int(name.rsplit(" ", 1)[-1]) - 1]
        out = attention.replay(core, inputs, ledger, ctx, new, save,
                               lambda x, p, keep: _dropout(x, p, ledger, ctx, keep), record, cache, streams, held)
    else:
        module = ctx.modules.get(name.removesuffix(" [tied]"))
        if module is None:  # a row this config does not have (e.g. the ungated FFN of a gated T5):
            if target not in written:  # a stream left over from the previous layer is not this one's
                _forget(streams, target, ledger)
            return record
        out = _module(name, module, inputs[0] if inputs else None, ledger, ctx, new, save, cache, record)
    if out is not inputs[0] if inputs else True:
        record.output = out
    else:  # an identity (dropout with p=0, a cast to the dtype it has): nothing for backward to do
        record.inputs = []
    written.add(target)
    if target in streams:
        ledger.drop(streams[target].tid)
    streams[target] = out
    return record


def _reads(ops: list[str]) -> list[str]:
    """The streams a part reads before writing them: its arguments."""
    written, reads = set(), []
    for op in ops:
        inputs, target = _io(op)
        reads += [n for n in inputs if n not in written and n not in reads]
        written.add(target)
    return reads


def _io(op: str) -> tuple[list[str], str]:
    if op == SCOPE_END:
        return [], ""
    flow = op.partition(":")[0]
    sources, _, target = flow.partition("->")
    return [s.strip() for s in sources.split(",") if s.strip()], target.strip()


def _last_reads(sequence: list[tuple[str, bool]], modules: set[str], keep: set[str]) -> list[set[str]]:
    """For each op of the unrolled flow (op, starts a layer), the streams it is the last to read.

    A dry run over stream names first decides which ops run (the same rules as ``_forward``: a module the
    config lacks is skipped, so is an op whose inputs do not exist), so a skipped op neither reads nor
    rewrites anything.
    """
    dies: list[set[str]] = [set() for _ in sequence]
    present: set[str] = set()
    written: set[str] = set()
    pending: dict[str, int] = {}  # stream -> the op that read it last so far
    for index, (op, new_layer) in enumerate(sequence):
        if new_layer:
            written = set()
        inputs, target = _io(op)
        if op == SCOPE_END or any(n not in present for n in inputs):
            continue
        name = op.partition(":")[2].strip()
        is_module = not (name.split(" ")[0] in ELEMENTWISE or name.startswith("attention core"))
        if is_module and name.removesuffix(" [tied]") not in modules:
            if target not in written:
                present.discard(target)
                if target in pending:
                    dies[pending.pop(target)].add(target)
            continue
        for stream in inputs:
            pending[stream] = index
        if target in pending and target not in inputs:  # rewritten: its previous value died at its last read
            dies[pending.pop(target)].add(target)
        present.add(target)
        written.add(target)
    for stream, index in pending.items():
        if stream not in keep:
            dies[index].add(stream)
    return dies


def _forget(streams, target, ledger) -> None:
    if target in streams:
        ledger.drop(streams.pop(target).tid)
