"""The replay's bookkeeping: values, what each op keeps for backward, and a reference-counted ledger of
bytes by category with its running peak; ``backward`` walks one op's record back (``paramcalc.activations``
runs the walk).

Torch-free: the analytic path.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "transient")


@dataclass
class Value:
    """One tensor flowing between ops."""

    tid: int
    elements: int
    width: int  # bytes per element
    grad: bool  # it needs a gradient (something before it trains)

    @property
    def bytes(self) -> int:
        return self.elements * self.width


@dataclass
class Record:
    """What backward needs to know about one forward op."""

    inputs: list[Value]
    output: Value | None
    saved: list[int]  # tensor ids held for backward
    saved_sizes: list[tuple[int, str]]  # (bytes, category) to re-create them when a checkpointed layer re-runs
    weight_grads: list[tuple[str, int]]  # (parameter tensor name, gradient bytes)
    scratch: int = 0  # bytes of temporaries its backward holds before it returns the input's gradient
    held: int = 0  # bytes its backward holds while it computes the input's gradient (a dequantized weight)
    leaf: bool = False  # its output is a leaf made to need a gradient: the gradient stays as its .grad
    passes: Value | None = None  # the input an addition hands its output's gradient to, as it is (no copy)
    op: str = ""  # the flow op it ran, and the streams nothing reads after it (to re-run checkpointed layers)
    dead: tuple[str, ...] = ()
    # an op that runs as several autograd nodes (attention's matmuls, softmax, dropout): backward walks them
    # in reverse, and each frees what it saved as soon as it has run
    stages: list[Record] = field(default_factory=list)

    def release(self, ledger: Ledger) -> None:
        """Free what this op (and its stages) saved: when backward has run it, or at once in a checkpointed
        layer's forward."""
        for tid in self.saved:
            ledger.drop(tid)
        self.saved = []
        for stage in self.stages:
            stage.release(ledger)


@dataclass
class Timeline:
    """Peak bytes, when it happens, and what was alive then."""

    peak: int = 0
    phase_of_peak: str = ""
    at_peak: dict[str, int] = field(default_factory=dict)
    phase_peaks: dict[str, int] = field(default_factory=dict)
    # (phase, bytes alive) after every allocation and free, in replay order, when asked for (simulate(curve=True))
    curve: list[tuple[str, int]] | None = None
    # the forward records in run order, each with the checkpointed layer it belongs to (an index; None when
    # its layer keeps what it saves): the op list the time model folds over (paramcalc.oplist)
    records: list[tuple[Record, int | None]] = field(default_factory=list)


class Ledger:
    """Reference-counted allocations by category, with the running peak."""

    def __init__(self):
        self.size: dict[int, tuple[int, str]] = {}
        self.refs: dict[int, int] = {}
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.current = 0
        self.phase = "forward"
        self.timeline = Timeline()
        self._next = 0
        # a later micro-batch of gradient accumulation: every .grad exists, and autograd adds each new
        # gradient into it in place, so a weight's gradient is a transient the size of the weight
        self.accumulating = False

    def new(self, nbytes: int, category: str) -> int:
        if category == "activations" and self.phase != "forward":  # a checkpointed layer's re-run
            category = "transient"
        self._next += 1
        tid = self._next
        self.size[tid], self.refs[tid] = (nbytes, category), 1
        self.totals[category] += nbytes
        self.current += nbytes
        timeline = self.timeline
        timeline.phase_peaks[self.phase] = max(timeline.phase_peaks.get(self.phase, 0), self.current)
        if self.current > timeline.peak:
            timeline.peak, timeline.phase_of_peak, timeline.at_peak = self.current, self.phase, dict(self.totals)
        if timeline.curve is not None:
            timeline.curve.append((self.phase, self.current))
        return tid

    def hold(self, tid: int) -> int:
        self.refs[tid] += 1
        return tid

    def drop(self, tid: int) -> None:
        self.refs[tid] -= 1
        if self.refs[tid] == 0:
            nbytes, category = self.size.pop(tid)
            del self.refs[tid]
            self.totals[category] -= nbytes
            self.current -= nbytes
            if self.timeline.curve is not None:
                self.timeline.curve.append((self.phase, self.current))


def promoted(values, width: int, ledger: Ledger) -> list[int]:
    """TensorIterator's common dtype: an op over tensors of two dtypes (bf16 scores + an fp32 mask, a bf16 output
    added to the fp32 residual stream) first copies each narrower input into the wider dtype, on a CPU a temporary
    alive while the op runs (measured with torch 2.13). Returns those temporaries, for the caller to drop."""
    return [ledger.new(value.elements * width, "transient") for value in values if value.width < width]


def backward(record: Record, ledger: Ledger, grad_of: dict[int, int], allocated: dict[str, tuple[int | None, int]],
             uses: dict[str, int]) -> None:
    """Run one op's backward: the gradients of its inputs (and weights) while its output's gradient and its
    saved tensors are alive, then free both."""
    for stage in reversed(record.stages):
        backward(stage, ledger, grad_of, allocated, uses)
    out = record.output
    if not record.stages and out is not None and out.tid in grad_of:
        if record.scratch:
            ledger.drop(ledger.new(record.scratch, "transient"))
        held = ledger.new(record.held, "transient") if record.held else None
        for value in record.inputs:
            if value.grad and value.tid not in grad_of:
                if value is record.passes:
                    grad_of[value.tid] = ledger.hold(grad_of[out.tid])
                else:
                    grad_of[value.tid] = ledger.new(value.bytes, "transient")
        if held is not None:
            ledger.drop(held)
        for name, nbytes in record.weight_grads:
            if name not in allocated:
                # a weight used more than once (tied) waits in autograd's input buffer for its other gradients
                kind = "transient" if uses.get(name, 1) > 1 else "gradients"
                allocated[name] = (ledger.new(nbytes, kind), 1) if kind == "transient" else (None, 1)
                if kind == "gradients":
                    if ledger.accumulating:
                        ledger.drop(ledger.new(nbytes, "transient"))
                    else:
                        ledger.new(nbytes, kind)
            elif allocated[name][0] is not None:  # another gradient, summed out of place
                buffer, seen = allocated[name]
                incoming = ledger.new(nbytes, "transient")
                last = seen + 1 >= uses.get(name, 1)
                if last:  # the sum becomes .grad
                    summed = None
                    if not ledger.accumulating:
                        ledger.new(nbytes, "gradients")
                else:
                    summed = ledger.new(nbytes, "transient")
                ledger.drop(incoming)
                ledger.drop(buffer)
                allocated[name] = (summed, seen + 1)
        if record.leaf:  # accumulated into the leaf's .grad, freed with the graph when backward ends
            grad_of[-out.tid] = grad_of.pop(out.tid)
        else:
            ledger.drop(grad_of.pop(out.tid))
    record.release(ledger)
