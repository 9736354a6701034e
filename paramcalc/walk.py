"""The replay's walk over a family's flow: one op at a time (``forward``: what it allocates and saves), and the
stream bookkeeping around it (which streams an op reads, when each dies, Python scopes that free them).

An op is ``"in1,in2 -> target : NAME"``: NAME an elementwise op (``paramcalc.flops.ELEMENTWISE``; ``rotary TABLES``
reads the forward tensor TABLES too), an attention core, a mixture of experts (``paramcalc.moe``), or a row of
the replay's modules; ``"|"`` (``SCOPE_END``) marks where a Python function returns.
``paramcalc.activations.simulate`` runs the walk; ``paramcalc.recompute`` re-runs checkpointed layers with it.

Torch-free: the analytic path.
"""

from __future__ import annotations

from . import attention, moe, replay_methods
from .flops import ELEMENTWISE
from .ledger import Ledger, Record, Value, promoted as _promoted
from .ops import activation as _activation, dropout as _dropout, module as _module, rotary as _rotary

SCOPE_END = "|"  # in a flow: a Python function returns here, and the values only it still held are freed


def let_go(names, streams: dict[str, Value], scope: list[int], ledger: Ledger, temporaries=()) -> None:
    """Streams nothing reads again leave the flow; the function's Python locals hold them until it returns
    (``temporaries``: those no local holds, freed at once)."""
    for name in names:
        if name in temporaries:
            forget(streams, name, ledger)
        elif name in streams:
            scope.append(ledger.hold(streams[name].tid))
            forget(streams, name, ledger)


def release(scope: list[int], ledger: Ledger) -> None:
    """A Python function returns: the values only its locals still held are freed."""
    for tid in scope:
        ledger.drop(tid)
    scope.clear()


def forward(op: str, streams: dict[str, Value], ledger: Ledger, ctx, cache: list[int],
             written: set[str], held: dict[str, list[int]]) -> Record:
    flow, _, name = op.partition(":")
    sources, _, target = flow.partition("->")
    names = [s.strip() for s in sources.split(",") if s.strip()]
    name, target = name.strip(), target.strip()
    record = Record([], None, [], [], [])
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

    if name.split(" ")[0] == "keep":  # the value stays as it is (and is pinned by the caller)
        out = inputs[0]
        ledger.hold(out.tid)
    elif name == "first-token":  # features[:, 0]: a view of the first position
        out = Value(ledger.hold(inputs[0].tid), inputs[0].elements // ctx.values["s"], inputs[0].width, grad_in)
    elif name in ("+", "*", "scale"):
        width = max(v.width for v in inputs)
        out = new(inputs[0].elements, width, grad_in)
        for tid in _promoted(inputs, width, ledger):
            ledger.drop(tid)
        if name == "*":  # each factor is saved for the other's gradient
            for value, other in ((inputs[0], inputs[1]), (inputs[1], inputs[0])):
                if other.grad:
                    save(value)
    elif name.startswith("dropout"):
        out = _dropout(inputs[0], float(ctx.config.get(name.split()[1], 0.0)), ledger, ctx, save)
    elif name.startswith("act"):
        out = _activation(name.split()[1], inputs[0], ledger, ctx, new, save, record)
    elif name.startswith("rotary"):  # the tables the model made once (a forward tensor), read as well
        tables = streams[name.partition(" ")[2]]
        record.inputs = [*inputs, tables]
        out = _rotary(inputs[0], tables, ledger, new, save)
    elif name.startswith("upcast"):  # T5 casts the FFN's hidden state to wo's weight dtype
        out = new(inputs[0].elements, ctx.master, grad_in) if inputs[0].width != ctx.master else inputs[0]
        if out is inputs[0]:
            ledger.hold(out.tid)
        if target == replay_methods.PREFIX:  # peft casts its prefix to the model's dtype; the cache copies it
            if out is not inputs[0]:
                record.stages.append(Record([inputs[0]], out, [], [], []))
            ctx.prefix_cache = replay_methods.cache_prefix(out, record, ledger, ctx)
    elif name.startswith("attention core"):
        core = ctx.family.attention[int(name.rsplit(" ", 1)[-1]) - 1]
        out = attention.replay(core, inputs, ledger, ctx, new, save,
                               lambda x, p, keep: _dropout(x, p, ledger, ctx, keep), record, cache, streams, held)
    elif moe.combines(name):
        out = moe.combine(moe.spec_of(ctx.family, name), inputs[0], ledger, ctx, new, record)
    elif name.startswith(moe.OP):
        out = moe.replay(moe.spec_of(ctx.family, name), inputs[0], ledger, ctx, new, record, cache)
    else:
        module = ctx.modules.get(name.removesuffix(" [tied]"))
        if module is None:  # a row this config does not have (e.g. the ungated FFN of a gated T5):
            if target not in written:  # a stream left over from the previous layer is not this one's
                forget(streams, target, ledger)
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


def reads(ops: list[str]) -> list[str]:
    """The streams a part reads before writing them: its arguments."""
    written, reads = set(), []
    for op in ops:
        inputs, target = io(op)
        reads += [n for n in inputs if n not in written and n not in reads]
        written.add(target)
    return reads


def io(op: str) -> tuple[list[str], str]:
    if op == SCOPE_END:
        return [], ""
    flow = op.partition(":")[0]
    sources, _, target = flow.partition("->")
    return [s.strip() for s in sources.split(",") if s.strip()], target.strip()


def last_reads(sequence: list[tuple[str, bool]], modules: set[str], keep: set[str]) -> list[set[str]]:
    """For each op of the unrolled flow (op, starts a layer), the streams it is the last to read.

    A dry run over stream names first decides which ops run (the same rules as ``forward``: a module the
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
        inputs, target = io(op)
        if op == SCOPE_END or any(n not in present for n in inputs):
            continue
        name = op.partition(":")[2].strip()
        is_module = not (name.split(" ")[0] in ELEMENTWISE or name.startswith(("attention core", moe.OP)))
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


def forget(streams, target, ledger) -> None:
    if target in streams:
        ledger.drop(streams.pop(target).tid)
