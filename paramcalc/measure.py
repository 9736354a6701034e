"""Measuring real training steps: peak memory per phase, step time, process memory.

One module for everything that measures, used by ``paramcalc train``, the benchmarks and the tests:

- **CPU**: torch's own allocator events. ``torch.profiler.profile(profile_memory=True)`` records one
  ``[memory]`` event per allocation and free, with its byte delta; summed in time order from the moment
  recording starts (before the model exists) they give the bytes alive at every instant, parameters,
  quantization state, optimizer state, DDP buckets and batches included. This agrees byte for byte
  with what a step allocates; RSS (``resident``) is reported only as context, since it also holds the
  Python heap, libraries and pages the allocator keeps.
- **CUDA**: ``torch.cuda.max_memory_allocated``, with the peak reset at the start of each phase;
  ``memory_reserved`` (the caching allocator's blocks) as context.

The profiler records the allocations and frees of the thread that runs the step only: a tensor another
thread lets go of stays alive in its sum. DDP's first weight broadcast is such a tensor (gloo's worker
thread often drops it last), so in data-parallel processes only the measured step is recorded, on top of
``alive_bytes``: the storages the model and optimizer hold, and the bucket bytes DDP itself reports.

A measured step is split into phases (``forward``, ``backward``, ``optimizer``; a step with gradient
accumulation runs forward and backward several times, and a phase's peak is its highest). ``before``
is what is alive when the measured step starts: the model states (weights, optimizer state) and
whatever else the process keeps between steps. On a CPU ``CpuMeter.timeline()`` gives the whole curve
of the measured step (``StepTimeline``: bytes alive after every allocation and free, and the phases'
spans); CUDA's counters have no such curve (``CudaMeter.timeline()`` is None).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

PHASES = ("forward", "backward", "optimizer")
_LABEL = "paramcalc::"


def resident_bytes() -> int | None:
    """The process's resident set size (context only: not what tensors take)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def physical_memory() -> int | None:
    """This machine's RAM, the CPU's 'device memory'."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError):
        return None


class CpuMeter:
    """Allocator-level CPU memory from torch.profiler's ``[memory]`` events.

    ``with meter.recording():`` wraps everything from building the model to the end of the measured
    step; ``with meter.phase("step"):`` marks the measured step and ``meter.phase("forward")`` etc. its
    phases. ``summary()`` reads the events once recording has stopped.
    """

    device = "cpu"

    def __init__(self):
        self._profiler = None
        self._events = None
        self.offset = 0  # bytes alive when recording starts, where recording starts after the model exists

    @contextlib.contextmanager
    def recording(self):
        import gc

        from torch.profiler import ProfilerActivity, profile

        gc.collect()  # garbage of earlier work freed mid-step would read as negative bytes
        # kineto prints 'USDT: ... profiler_start/stop' lines to stderr at its default log level; a user's
        # terminal (or notebook) is no place for them. Read when the profiler first starts; a user's own setting wins.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")

        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        with self._profiler:
            yield self
        self._events = self._profiler.profiler.kineto_results.events()

    def phase(self, name: str):
        if self._profiler is None:  # not recording (a timed step): nothing to mark
            return contextlib.nullcontext()
        from torch.profiler import record_function

        return record_function(_LABEL + name)

    def mark(self, name: str) -> None:
        """Remember the bytes alive now under ``name`` (read back by ``summary``)."""
        with self.phase(name):
            pass

    def _read(self):
        """The recorded ``[memory]`` deltas as (ns, bytes) in time order, the marked ranges by name, and the
        measured step's (start, end)."""
        if self._events is None:
            raise RuntimeError("nothing was recorded")
        deltas, ranges = [], {}
        for event in self._events:
            name = event.name()
            if name == "[memory]" and str(event.device_type()).endswith("CPU"):
                deltas.append((event.start_ns(), event.nbytes()))
            elif name.startswith(_LABEL):
                ranges.setdefault(name[len(_LABEL):], []).append((event.start_ns(), event.end_ns()))
        deltas.sort()
        if "step" not in ranges:
            raise RuntimeError("no measured step was marked")
        return deltas, ranges, ranges["step"][-1]

    def summary(self) -> dict:
        """{before, peak, forward, backward, optimizer, and each mark}: bytes alive before the measured step,
        its peak, each phase's peak (None for a phase that did not run) and the bytes alive at each mark."""
        deltas, ranges, (step_start, step_end) = self._read()
        windows = {phase: [r for r in ranges.get(phase, []) if step_start <= r[0] <= step_end] for phase in PHASES}
        peaks = dict.fromkeys(PHASES)
        marks = {name: spans[0][0] for name, spans in ranges.items() if name not in PHASES and name != "step"}
        at_mark = dict.fromkeys(marks, 0)
        alive = before = step_peak = 0
        for when, delta in deltas:
            for name, moment in marks.items():
                if when < moment:
                    at_mark[name] = alive + delta
            if when < step_start:
                alive += delta
                before = alive
                continue
            if when > step_end:
                break
            alive += delta
            step_peak = max(step_peak, alive)
            for phase, spans in windows.items():
                if any(start <= when <= end for start, end in spans):
                    peaks[phase] = max(peaks[phase] or 0, alive)
        figures = {"before": before, "peak": max(step_peak, before), **peaks, **at_mark}
        return {k: None if v is None else v + self.offset for k, v in figures.items()}

    def timeline(self) -> StepTimeline:
        """The measured step's memory curve: bytes alive after every allocation and free, in ns since the step
        started, and its phases' spans. Its maximum is ``summary()["peak"]``, its first point ``before``."""
        deltas, ranges, (step_start, step_end) = self._read()
        alive = sum(delta for when, delta in deltas if when < step_start) + self.offset
        points = [(0, alive)]
        for when, delta in deltas:
            if step_start <= when <= step_end:
                alive += delta
                points.append((when - step_start, alive))
        phases = sorted((start - step_start, end - step_start, phase) for phase in PHASES
                        for start, end in ranges.get(phase, []) if step_start <= start <= step_end)
        return StepTimeline(points, [(phase, start, end) for start, end, phase in phases], step_end - step_start)

    def marks(self) -> dict[str, list[int]]:
        """When each mark (``mark(name)``) was made, in ns since the measured step started (``timeline()``'s
        clock), for every time it was made."""
        _, ranges, (step_start, _) = self._read()
        return {name: [start - step_start for start, _ in spans] for name, spans in ranges.items()
                if name not in PHASES and name != "step"}


@dataclass
class StepTimeline:
    """The bytes alive through one measured step (CPU only: CUDA has no allocator event stream).

    ``points``: (ns since the step started, bytes alive just after that allocation or free), the first
    point being what is alive when the step starts; ``phases``: (name, start ns, end ns) of each forward,
    backward and optimizer span, in order (a step with gradient accumulation has several).
    """

    points: list[tuple[int, int]]
    phases: list[tuple[str, int, int]]
    duration_ns: int

    @property
    def peak(self) -> int:
        return max(alive for _, alive in self.points)

    @property
    def before(self) -> int:
        return self.points[0][1]

    @property
    def after(self) -> int:
        """What is alive when the step has ended: the next step's ``before``."""
        return self.points[-1][1]


class CudaMeter:
    """``torch.cuda.max_memory_allocated`` per phase on one GPU."""

    def __init__(self, device):
        self.device = str(device)
        self._peaks: dict[str, int] = {}
        self._marks: dict[str, int] = {}
        self._before = None
        self._recording = False

    @contextlib.contextmanager
    def recording(self):
        self._recording = True
        try:
            yield self
        finally:
            self._recording = False

    def mark(self, name: str) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        self._marks[name] = torch.cuda.memory_allocated(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        if not self._recording:
            yield
            return
        import torch

        torch.cuda.synchronize(self.device)
        if name == "step":
            self._before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        try:
            yield
        finally:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self._peaks[name] = max(self._peaks.get(name, 0), peak)
            if name != "step":  # the step's peak is the highest of its phases' (each reset the counter)
                self._peaks["step"] = max(self._peaks.get("step", 0), peak)

    def timeline(self) -> None:
        """None: CUDA keeps counters (allocated, peak), not a stream of allocations to draw a curve from."""
        return None

    def summary(self) -> dict:
        import torch

        if self._before is None:
            raise RuntimeError("no measured step was marked")
        return {"before": self._before, "peak": self._peaks.get("step", self._before),
                **{phase: self._peaks.get(phase) for phase in PHASES},
                "reserved": torch.cuda.max_memory_reserved(self.device), **self._marks}


def alive_bytes(model, optimizer=None) -> int:
    """Bytes of every storage the model and optimizer hold (parameters, buffers, gradients, optimizer state,
    bitsandbytes' quantization state: ``quantized.quantization_tensors``), each counted once, plus the
    gradient buckets DDP reports."""
    import torch

    from .quantized import quantization_tensors

    storages = {}

    def add(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()

    for parameter in model.parameters():
        add(parameter)
        add(parameter.grad)
    for tensor in [*model.buffers(), *quantization_tensors(model)]:
        add(tensor)
    for state in (optimizer.state.values() if optimizer is not None else ()):
        for value in state.values():
            add(value)
    total = sum(storages.values())
    if hasattr(model, "_get_ddp_logging_data"):  # torch's own account of its flat gradient buckets
        logged = model._get_ddp_logging_data()
        if not logged.get("gradient_as_bucket_view"):
            total += sum(int(size) for size in str(logged.get("bucket_sizes", "")).split(",") if size.strip())
    return total


def meter_for(device) -> CpuMeter | CudaMeter:
    return CpuMeter() if str(device) == "cpu" else CudaMeter(device)


class StepTimer:
    """Wall-clock seconds of whole steps and of their phases (synchronising the GPU first, so its queued work
    is counted).

    ``with timer.step():`` times one step; inside it, ``with timer.phase("forward"):`` etc. time its phases,
    summed over a step's micro-batches (``phases[i]`` belongs to ``seconds[i]``). Outside a timed step a
    phase only runs ``inner(name)`` (the memory meter's marks), so one ``phase`` serves every step.
    ``perf_counter`` around each phase is all a CPU step pays; on CUDA each phase boundary also waits for
    the GPU, or the clock would read when the work was queued, not done.
    """

    def __init__(self, device, inner=None):
        self.device = str(device)
        self.inner = inner  # name -> context manager entered around each phase (the memory meter's)
        self.seconds: list[float] = []
        self.phases: list[dict[str, float]] = []
        self._current: dict[str, float] | None = None

    def _sync(self):
        if self.device != "cpu":
            import torch

            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def step(self):
        self._sync()
        self._current = current = {}
        start = time.perf_counter()
        try:
            yield
            self._sync()
            self.seconds.append(time.perf_counter() - start)
            self.phases.append(current)
        finally:
            self._current = None

    @contextlib.contextmanager
    def phase(self, name: str):
        with self.inner(name) if self.inner else contextlib.nullcontext():
            current = self._current
            if current is None:
                yield
                return
            self._sync()
            start = time.perf_counter()
            yield
            self._sync()
            current[name] = current.get(name, 0.0) + time.perf_counter() - start

    def clear(self) -> None:
        self.seconds.clear()
        self.phases.clear()

    def median_phases(self, phases: list[dict[str, float]] | None = None) -> dict[str, float]:
        """Each phase's median seconds over the timed steps (``phases``: other steps' record, e.g. the
        memory step's when it was the only one)."""
        import statistics

        steps = self.phases if phases is None else phases
        names = [name for name in PHASES if any(name in step for step in steps)]
        return {name: statistics.median(step.get(name, 0.0) for step in steps) for name in names}


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's allocation failures: CUDA's OutOfMemoryError, and the CPU allocator's RuntimeError."""
    if type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "can't allocate memory" in text or "out of memory" in text.lower())
