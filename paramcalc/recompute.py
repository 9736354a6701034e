"""Gradient checkpointing in the replay: a checkpointed layer keeps only its inputs (and the random generator's
state) from its forward, and backward re-runs it (torch.utils.checkpoint, non-reentrant, as transformers runs it).

Torch-free: the analytic path.
"""

from __future__ import annotations

from dataclasses import dataclass

from .flops import MATMUL_KINDS
from .ledger import Ledger, Record, Value, backward
from .walk import SCOPE_END, forward, io, let_go, release

CPU_RNG_STATE = 5056  # bytes of torch.get_rng_state() (the CPU generator's mt19937 state), torch 2.x


@dataclass
class Checkpointed:
    """A checkpointed layer: the streams it was called with, kept; its ops, re-run in backward."""

    layer: int
    arguments: dict[str, Value]
    records: list[Record]
    part: str = ""
    last_saving: int = -1  # the index of its last record that saves anything for backward (-1: none)
    rng: int | None = None  # the random generator's state checkpointing keeps for the re-run


def recompute(item: Checkpointed, ledger: Ledger, ctx, grad_of: dict[int, int]) -> list[Record]:
    """Re-run a checkpointed layer's forward in backward, keeping what its ops save this time.

    The re-run's outputs are new tensors: the gradients waiting for the first run's outputs move to them.
    Autocast's weight copies live only as long as the re-run. torch stops the re-run early (non-reentrant
    checkpointing's early stop, on by default) once every tensor the first run saved is saved again: nothing
    after the layer's last saving op runs, and when that op saves only its inputs (a matmul: autograd saves
    them before the kernel runs) its own output is not made either. Backward goes through the ops that were
    not re-run (they saved nothing) before it: the gradients they leave for the first run's outputs move to the
    re-run's.
    """
    streams = dict(item.arguments)
    for value in streams.values():
        ledger.hold(value.tid)
    ctx.layer, scope, block, returned, cache, written = item.layer, [], [], [], [], set()
    records = []
    for index, first in enumerate(item.records[:item.last_saving + 1]):
        if first.op == SCOPE_END:
            release(scope, ledger)
            continue
        ctx.stop = index == item.last_saving
        record = forward(first.op, streams, ledger, ctx, cache, written,
                         {"return": scope, "block": block, "next block": returned})
        ctx.stop = False
        if first.op.endswith(": keep block") and io(first.op)[0][0] in streams:
            block.append(ledger.hold(streams[io(first.op)[0][0]].tid))
        record.op, record.dead = first.op, first.dead
        if record.output is not None and ledger.size.get(record.output.tid, (None,))[0] == 0:
            stopped, record.output = record.output, first.output  # the kernel that would make it did not run
            for stage in record.stages:  # (an op of several nodes, paramcalc.moe: its last one)
                if stage.output is stopped:
                    stage.output = first.output
        elif first.output is not None and record.output is not None and first.output.tid in grad_of:
            grad_of[record.output.tid] = grad_of.pop(first.output.tid)
        let_go(record.dead, streams, ctx.hooks.scope(first.op, scope), ledger, ctx.hooks.temporaries)
        ctx.hooks.after(first.op, ledger)
        records.append(record)
    for tid in scope + block + returned + cache + ctx.hooks.held:
        ledger.drop(tid)
    ctx.hooks.held.clear()
    ctx.hooks.running = False
    for value in streams.values():
        ledger.drop(value.tid)
    return records


def backward_unsaved(record: Record, ledger: Ledger, grad_of: dict[int, int], allocated, uses) -> None:
    """Backward through an op that saved nothing, ahead of its layer's re-run. A residual add hands each input
    the gradient as it is (the same tensor; a copy only when it casts to a narrower input)."""
    out = record.output
    if record.op.partition(":")[2].strip() != "+" or out is None or out.tid not in grad_of:
        backward(record, ledger, grad_of, allocated, uses)
        return
    for value in record.inputs:
        if value.grad and value.tid not in grad_of:
            same = value.width == out.width
            grad_of[value.tid] = ledger.hold(grad_of[out.tid]) if same else ledger.new(value.bytes, "transient")
    ledger.drop(grad_of.pop(out.tid))


def saves(record: Record, ctx) -> bool:
    """Whether autograd saves anything for this op's backward: a tensor the replay keeps, or a frozen weight
    (a reference, no bytes) for its input's gradient."""
    module = ctx.modules.get(record.op.partition(":")[2].strip().removesuffix(" [tied]"))
    if module is not None and module.hooks_see_nothing:  # (bitsandbytes keeps what it needs out of their sight)
        return False
    if record.saved or any(stage.saved for stage in record.stages):
        return True
    return bool(module and module.kind in MATMUL_KINDS and module.fan_in and any(v.grad for v in record.inputs))
