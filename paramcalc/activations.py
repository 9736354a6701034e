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
re-run during backward (``paramcalc.recompute``). The peak over forward, backward and the optimizer step is
the step's peak.

PEFT methods that add ops (bottleneck adapters, prefix tuning's encoder and longer keys) extend the flow before
the walk (``paramcalc.replay_methods``); the walk itself, op by op, is ``paramcalc.walk``.

Torch-free: this is the analytic path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import masks, replay_methods
from .errors import ParamcalcError
from .families import concrete_parameters, families
from .flops import _base_name, _layers, _repeated
from .flops_methods import prefix_tokens
from .memory import DTYPE_BYTES, model_states, weights_dtype
from .ops import loss as _loss
from .ledger import CATEGORIES, Ledger as _Ledger, Record as _Record, Timeline, Value, backward as _backward  # noqa: F401
from .recompute import CPU_RNG_STATE, Checkpointed as _Checkpointed, backward_unsaved as _backward_unsaved
from .recompute import recompute as _recompute, saves as _saves
from .step import Step, check_fits_model, resolve_attention
from .walk import SCOPE_END, forward as _forward, forget as _forget, io as _io, last_reads as _last_reads
from .walk import let_go as _let_go, reads as _reads, release as _release

LM_TASKS = ("masked-lm", "causal-lm", "seq2seq-lm")

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
    hooks: replay_methods.Hooks = field(default_factory=replay_methods.Hooks)  # where adapters' hooks run
    stop: bool = False  # a re-run stops before this op's last kernel (activations._recompute)
    prefix_tokens: int = 0  # prefix tuning's virtual tokens, and its cache: layer -> (keys, values)
    prefix_cache: dict = field(default_factory=dict)
    # a checkpointed layer's first forward: autograd keeps nothing for backward, so an op of several nodes frees what
    # each would save as soon as Python lets it go (paramcalc.moe)
    checkpointed: bool = False


def simulate(result, step: Step, device: str = "cpu", accumulating: bool = False, curve: bool = False) -> Timeline:
    """Replay one steady-state training step (optimizer state already allocated) and return its timeline;
    ``curve=True`` also keeps the bytes alive after every allocation and free (``Timeline.curve``)."""
    if result.generic:
        raise ParamcalcError("the memory replay needs a family file (bert, roberta, t5, gpt2, bloom); "
                             "paramcalc.plan traces other models instead")
    check_fits_model(step, result)
    step = resolve_attention(step, result)
    family = families()[result.family]
    if any(method == "prefix" for method, _ in result.peft_options):
        replay_methods.check_prefix(result, family, step)
    values = {**result.values, **step.symbols(result.task)}
    for method, options in result.peft_options:
        if method in ("prompt", "ptuning"):  # soft prompts are prepended to the tokens
            values["s"] += options.tokens
    states = model_states(result, step, device)
    dtype = weights_dtype(result, step)  # under --quant, the dtype the unquantized weights were loaded in
    flow, hooks = replay_methods.flow(result, family)  # the family's flow, with the ops PEFT methods add
    ctx = _Context(step, values, result.config, replay_methods.modules(result, family, values), family,
                   compute=DTYPE_BYTES[step.mixed_precision or dtype], master=DTYPE_BYTES[dtype],
                   autocast=bool(step.mixed_precision), device=device,
                   lora_dropout=next((o.dropout for m, o in result.peft_options if m == "lora"), 0.0),
                   grads=_gradients_by_row(result, step),
                   tied_to={c.name: c.tied_to for c in result.components if c.tied_to},
                   hooks=hooks, prefix_tokens=prefix_tokens(result))
    replay_methods.gradients(result, family, ctx.grads)
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
    # values a forward keeps in a local ("keep"): alive until the step's forward returns (its loss computed),
    # ("keep PART") until the model that part ends returns, or ("keep block") until the layer returns
    pinned: dict[str | None, list[int]] = {}
    parts = family.tasks[result.task].parts
    last_target = _io(flow[parts[-1]][-1])[1]
    sequence = [(op, index == 0) for part in parts for _ in range(_layers(result, part))
                for index, op in enumerate(flow.get(part, []))]
    dies = iter(_last_reads(sequence, set(ctx.modules), keep={"y", "p", last_target}))

    prompted = any(method in ("prompt", "ptuning") for method, _ in result.peft_options)
    first_op = family.flow[parts[0]][0]  # (the model's first op: the prefix encoder runs before it)
    input_embedding = first_op.partition(":")[2].strip()
    leaves: list[int] = []  # frozen lookups made to need a gradient: alive until backward ends

    def run(op, written):
        if op == SCOPE_END:
            next(dies)
            end_of_layer()
            return _Record([], None, [], [], [], op=op)
        name = op.partition(":")[2].split()
        if name and name[0] == "keep" and _io(op)[0][0] in streams:
            until = name[1] if len(name) > 1 else None
            if prompted and _io(op)[0][0] == _io(first_op)[1]:  # peft's forward holds the embeddings it passes in
                until = None
            (block if until == "block" else pinned.setdefault(until, [])).append(ledger.hold(streams[_io(op)[0][0]].tid))
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
        _let_go(record.dead, streams, ctx.hooks.scope(op, scope), ledger, ctx.hooks.temporaries)
        ctx.hooks.after(op, ledger)
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
        ops = flow.get(part, [])
        layers = _layers(result, part)
        checkpoint = step.grad_checkpointing and _repeated(result, part)  # transformers checkpoints one layer too
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
            # torch.utils.checkpoint keeps the CPU generator's state (torch.get_rng_state(), in host memory) to
            # replay dropout in the re-run, until the layer's backward is done
            rng = ledger.new(CPU_RNG_STATE, "activations") if device == "cpu" else None
            layer = []
            last = -1  # the layer's last op that saves anything for backward: where its re-run stops
            for op in ops:  # checkpointing stores nothing for backward: each saved tensor is let go at once
                ctx.checkpointed = True
                record = run(op, written)
                ctx.checkpointed = False
                if _saves(record, ctx):
                    last = len(layer)
                record.release(ledger)
                layer.append(record)
            end_of_block()
            used = {i.tid for record in layer for i in record.inputs}  # the layer keeps only its inputs
            for name, value in list(before.items()):
                if value.tid not in used:
                    ledger.drop(value.tid)
                    del before[name]
            records.append(_Checkpointed(ctx.layer, before, layer, part, last, rng))
        _release(outputs, ledger)
        _release(pinned.pop(part, []), ledger)
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
    for tid in cache + [tid for tids in pinned.values() for tid in tids]:
        ledger.drop(tid)
    ledger.phase = "backward"
    grad_of = {loss.tid: ledger.new(4, "transient")}
    uses: dict[str, int] = {}  # a tied weight's gradient arrives twice; autograd sums them into .grad
    for item in records:
        for record in item.records if isinstance(item, _Checkpointed) else [item]:
            for name, _ in record.weight_grads:
                uses[name] = uses.get(name, 0) + 1
    allocated: dict[str, tuple[int | None, int]] = {}  # weight -> (its pending input buffer, gradients seen)
    for item in reversed(records):
        if isinstance(item, _Checkpointed):  # re-run the layer's forward, then go back through it
            # autograd reaches the layer's last ops first: those that saved nothing run before anything needs the
            # re-run (their gradients, e.g. a residual add's cast to a half-precision input, are alive through it)
            for record in reversed(item.records[item.last_saving + 1:]):
                _backward_unsaved(record, ledger, grad_of, allocated, uses)
            remade = [ledger.new(value.bytes, "transient") for value in masks.remade(family, item)]
            if item.rng is not None:  # the re-run forks the generator: it keeps the current state meanwhile
                remade.append(ledger.new(CPU_RNG_STATE, "transient"))
            rerun = _recompute(item, ledger, ctx, grad_of)
            for tid in remade:  # the re-run's own locals: they die when it returns
                ledger.drop(tid)
            for record in reversed(rerun):
                _backward(record, ledger, grad_of, allocated, uses)
            for tid in [value.tid for value in item.arguments.values()] + [item.rng] * (item.rng is not None):
                ledger.drop(tid)
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
