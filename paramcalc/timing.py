"""How long a training step takes: a roofline over the step's op list, on a device's measured rates.

Each op of ``paramcalc.oplist`` takes ``max(FLOPs / the achieved rate of its kind of matmul at its size and
dtype, bytes moved / the achieved rate of its kind of elementwise op) + dispatches x the per-op cost``. The
rates come from a profile ``paramcalc calibrate`` saved (GEMM rates per shape class, interpolated in size;
elementwise rates per op, interpolated in bytes; the per-op overhead; optimizer steps), or, for a datasheet
GPU, from its datasheet with the assumptions written next to them (``DATASHEET``). The optimizer step is
timed per parameter element and per tensor as torch runs it; gradient accumulation runs forward and backward
once per micro-batch and sums the gradients; data parallelism adds the all-reduce that backward does not
hide.

Torch-free: the analytic path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .oplist import KINDS, PHASES, Op

# What a datasheet GPU profile assumes, beside its peak numbers (a calibrated profile measures all of them):
DATASHEET = {
    # matmuls reach ~40 % of the tensor-core peak over a whole step (PaLM reports 46.2 % MFU, Chowdhery et al.
    # 2022, arXiv:2204.02311, table 3); elementwise kernels ~80 % of the memory bandwidth (a STREAM-like copy
    # reaches 80-90 % on NVIDIA data-centre GPUs)
    "matmul_utilisation": 0.4, "bandwidth_utilisation": 0.8,
    # eager PyTorch pays ~10 us of host time per op (dispatch + kernel launch); the host usually runs ahead of
    # the GPU, so this counts only where kernels are shorter
    "overhead_s": 10e-6,
}
# Bytes an optimizer step moves per fp32 parameter (read + written): the weight is read and written, the
# gradient read, each state tensor read and written. AdamW keeps exp_avg and exp_avg_sq (fp32), SGD with
# momentum a buffer, AdamW-8bit two 1-byte states, Adafactor row and column factors (negligible per element).
OPTIMIZER_TRAFFIC = {"adamw": 28, "adam": 28, "sgd": 12, "sgd-momentum": 20, "adamw-8bit": 16, "adafactor": 16}
# DDP all-reduces gradients in buckets of 25 MiB (torch's bucket_cap_mb) while backward runs: all but the
# last bucket can hide behind it
DDP_BUCKET = 25 * 1024**2
HALF_LABELS = ("bf16", "fp16", "half")


@dataclass
class StepTime:
    """The predicted time of one optimizer step, by phase and op kind."""

    step_s: float
    phases: dict[str, float]
    table: list[dict]  # {phase, kind, flops, bytes, seconds, bound}
    bound: str  # compute | memory | overhead: what most of the step's time is spent on
    # each op, its seconds, its bound and how many times a step runs it
    ops: list[tuple[Op, float, str, int]] = field(default_factory=list, repr=False)


class Rates:
    """A device's achieved rates, from a calibrated profile (dict as saved) or a datasheet entry."""

    def __init__(self, calibrated: dict | None, flops_per_s: float | None, bandwidth: float | None,
                 half_label: str = "bf16", link: float | None = None):
        self.saved = calibrated or {}
        self.flops_per_s, self.bandwidth, self.link = flops_per_s, bandwidth, link
        self.half_label = self.saved.get("half_dtype", half_label)
        self.overhead = (self.saved.get("overhead") or {}).get("seconds", DATASHEET["overhead_s"])

    def first_touch(self, nbytes: int) -> float:
        """Seconds a new tensor of ``nbytes`` costs before its kernel runs at speed: on a CPU, an allocation at
        or above the C library's mmap threshold gets fresh pages from the OS each time, faulted in on first
        write (calibrated: ``first_touch``); CUDA's caching allocator reuses its blocks."""
        touch = self.saved.get("first_touch") or {}
        if not touch.get("threshold") or nbytes < touch["threshold"]:
            return 0.0
        return nbytes / touch["rate"]

    def in_step(self, phase: str) -> tuple[float, float]:
        """(kernel scale, seconds per dispatched op) of a phase: as the reference steps measured them
        (``calibrate_reference``), else (1, the per-op overhead calibrate timed in a loop)."""
        measured = (self.saved.get("in_step") or {}).get("backward" if phase == "recompute" else phase)
        if not measured:
            return 1.0, self.overhead
        return measured["scale"], measured["per_op"]

    def label(self, width: int) -> str:
        return "fp32" if width == 4 else self.half_label

    def gemm(self, kernel: str, flops: int, width: int) -> float:
        """FLOP/s of a matmul of ``kernel``'s shape class and ``flops`` size."""
        if kernel.startswith("sdpa") and "attention" in self.saved:
            fused = self.saved["attention"]
            phase = "backward" if kernel.endswith("backward") else "forward"
            work = [f * (2.5 if phase == "backward" else 1) for f in fused["flops_forward"]]
            label = _pick(fused[phase], self.label(width))
            if label:
                return _interpolate(work, [w / s for w, s in zip(work, fused[phase][label])], flops)
        classes = (self.saved.get("gemm") or {}).get("classes", {})
        name = kernel if kernel in classes else ("attention_scores" if kernel.startswith("sdpa") else "linear")
        if name in classes:
            entry = classes[name]
            label = _pick(entry["rate"], self.label(width))
            if label:
                return _interpolate(entry["flops"], entry["rate"][label], flops)
        return self.flops_per_s

    def stream(self, kernel: str, nbytes: int, width: int) -> float:
        """Bytes/s of an elementwise ``kernel`` moving ``nbytes``."""
        table = (self.saved.get("elementwise") or {}).get("ops", {})
        fallback = {"softmax_backward": "softmax", "layer_norm_backward": "layer_norm", "gelu_backward": "gelu",
                    "log_softmax": "softmax", "log_softmax_backward": "softmax_backward",
                    "embedding_backward": "add", "copy": "add"}
        name = kernel
        while name not in table and name in fallback:
            name = fallback[name]
        if name in table:
            entry = table[name]
            label = _pick(entry["rate"], self.label(width))
            if label:
                # calibrate times an op on the same tensors over and over: below the largest size they sit in
                # cache. In a step an op finds part of what it reads in cache (what the op before wrote) and
                # part not (saved activations, weights): halfway, in log scale, to the streaming rate
                hot = _interpolate(entry["bytes"][label], entry["rate"][label], nbytes)
                streaming = entry["rate"][label][max(range(len(entry["bytes"][label])),
                                                     key=entry["bytes"][label].__getitem__)]
                return math.sqrt(hot * streaming) if hot > streaming else hot
        return self.bandwidth

    def optimizer(self, name: str) -> tuple[float, float]:
        """(seconds per fp32 parameter element, seconds per tensor) of one optimizer step."""
        measured = (self.saved.get("optimizers") or {}).get(name)
        if measured:
            return measured["per_element"], measured["per_tensor"]
        adamw = self.saved.get("optimizer")
        if adamw:  # AdamW measured alone: other optimizers by the bytes they move
            per_element = adamw["per_byte"] * 16 * OPTIMIZER_TRAFFIC[name] / OPTIMIZER_TRAFFIC["adamw"]
            return per_element, adamw["per_tensor"]
        return OPTIMIZER_TRAFFIC[name] / self.bandwidth, self.overhead


def _pick(rates: dict, label: str) -> str | None:
    if label in rates:
        return label
    if label in HALF_LABELS:
        return next((h for h in HALF_LABELS if h in rates), None)
    return None


def _interpolate(xs: list[float], ys: list[float], x: float) -> float:
    """y at x, piecewise linear in log-log between the measured points, flat beyond them."""
    points = sorted(zip(xs, ys))
    if x <= points[0][0] or len(points) == 1:
        return points[0][1]
    if x >= points[-1][0]:
        return points[-1][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0)) if x1 > x0 else 0.0
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return points[-1][1]


def op_seconds(op: Op, rates: Rates) -> tuple[float, str]:
    """An op's roofline time and what bounds it: max(compute, memory) + the first touch of a large new tensor
    + its dispatches' fixed cost; where reference steps were measured (``calibrate_reference``), the kernel part
    scaled and the per-op cost as seen inside a step."""
    compute = op.flops / rates.gemm(op.kernel, op.flops, op.width) if op.matmul and op.flops else 0.0
    if op.matmul:
        memory = op.bytes / rates.bandwidth
    else:
        memory = op.bytes / rates.stream(op.kernel, op.bytes, op.width) if op.bytes else 0.0
    scale, per_op = rates.in_step(op.phase)
    # a new tensor's pages fault in before the kernel can write them: that time adds to the kernel's
    faults = rates.first_touch(op.written)
    compute, memory, overhead = compute * scale, memory * scale, op.dispatches * per_op
    bound = max((compute, "compute"), (memory + faults, "memory"), (overhead, "overhead"))[1]
    return max(compute, memory) + faults + overhead, bound


def step_time(ops: list[Op], rates: Rates, step, optimizer_work: tuple[int, int], gradient_bytes: int,
              weight_bytes: int, gpus: int = 1, zero: int = 0) -> StepTime:
    """Fold a micro-batch's ops into the time of one optimizer step.

    ``optimizer_work``: (trainable parameter elements, trainable tensors); ``gradient_bytes``: the gradients
    summed across micro-batches and all-reduced across ``gpus``; ``weight_bytes``: what ZeRO-3 gathers.
    """
    # (op, seconds, bound, how many times a step runs it): forward and backward once per micro-batch
    timed = [(op, *op_seconds(op, rates), step.grad_accum) for op in ops]
    if step.grad_accum > 1:  # micro-batches after the first add their gradients into .grad
        add = Op("backward", "optimizer", "gradient accumulation", "add", 0, 3 * gradient_bytes, 4, 1)
        timed.append((add, *op_seconds(add, rates), step.grad_accum - 1))
    elements, tensors = optimizer_work
    per_element, per_tensor = rates.optimizer(step.optimizer)
    width = 4 if step.dtype == "fp32" else 2  # per_element is for fp32 parameters: half ones move half the bytes
    update = Op("optimizer", "optimizer", f"{step.optimizer} step", step.optimizer, 0,
                OPTIMIZER_TRAFFIC[step.optimizer] * elements * width // 4, width, max(tensors, 1))
    streaming, per_tensors = per_element * elements * width / 4, per_tensor * tensors
    timed.append((update, streaming + per_tensors, "memory" if streaming >= per_tensors else "overhead", 1))
    phases = dict.fromkeys(PHASES, 0.0)
    for op, seconds, _, times in timed:
        phases[op.phase] += seconds * times
    if gpus > 1:
        exposed = all_reduce_seconds(rates, gradient_bytes, weight_bytes, gpus, zero, phases["backward"])
        reduce = Op("all_reduce", "all-reduce", "gradients", "all_reduce", 0,
                    int(2 * (gpus - 1) / gpus * gradient_bytes), 4, 1)
        timed.append((reduce, exposed, "memory", 1))
        phases["all_reduce"] = exposed
    by_bound: dict[str, float] = {}
    for _, seconds, bound, times in timed:
        by_bound[bound] = by_bound.get(bound, 0.0) + seconds * times
    return StepTime(sum(phases.values()), {k: v for k, v in phases.items() if v or k in ("forward", "backward")},
                    _table(timed), max(by_bound, key=by_bound.get), timed)


def all_reduce_seconds(rates: Rates, gradient_bytes: int, weight_bytes: int, gpus: int, zero: int,
                       backward_s: float) -> float:
    """The communication a data-parallel step waits for: a ring all-reduce of the gradients (ZeRO-2/3:
    reduce-scatter + all-gather, the same bytes) moves 2 (n-1)/n of them over each link, overlapped with
    backward except for the last bucket; ZeRO-3 also gathers the weights in forward and backward."""
    link = rates.link or rates.bandwidth
    share = (gpus - 1) / gpus
    comm = 2 * share * gradient_bytes / link
    last = 2 * share * min(gradient_bytes, DDP_BUCKET) / link
    exposed = max(comm - backward_s, last)
    if zero >= 3:
        exposed += 2 * share * weight_bytes / link
    return exposed


def _table(timed) -> list[dict]:
    """Seconds, FLOPs and bytes per (phase, op kind), each with the bound most of its time is spent on."""
    rows: dict[tuple[str, str], dict] = {}
    for op, seconds, bound, times in timed:
        row = rows.setdefault((op.phase, op.kind), {"phase": op.phase, "kind": op.kind, "flops": 0, "bytes": 0,
                                                     "seconds": 0.0, "_bounds": {}})
        row["flops"] += op.flops * times
        row["bytes"] += op.bytes * times
        row["seconds"] += seconds * times
        row["_bounds"][bound] = row["_bounds"].get(bound, 0.0) + seconds * times
    ordered = sorted(rows.values(), key=lambda r: (PHASES.index(r["phase"]), KINDS.index(r["kind"])))
    for row in ordered:
        bounds = row.pop("_bounds")
        row["bound"] = max(bounds, key=bounds.get)
    return ordered


def throughput(result, step, profile, parallel, records, states) -> dict:
    """The plan's ``throughput``: tokens/s, step and phase seconds, the table by phase and op kind, the bound."""
    from .families import concrete_parameters
    from .oplist import step_ops

    if not profile.flops_per_s:
        why = (profile.source if profile.source.startswith("no ") else
               "no rates for this device: run 'paramcalc calibrate' or name a GPU with --device")
        return {"tokens_per_s": None, "step_s": None, "profile": profile.name, "why": why}
    half = "fp16" if "fp16" in (step.mixed_precision, step.dtype) else "bf16"
    rates = Rates(profile.calibrated, profile.flops_per_s, profile.bandwidth, half, profile.link)
    if profile.calibrated is None:  # a datasheet GPU: what it reaches, by assumption (DATASHEET)
        rates.bandwidth = profile.bandwidth * DATASHEET["bandwidth_utilisation"]
    elif "gemm" not in profile.calibrated:
        rates.overhead = 0.0  # a profile from before per-op calibration: the headline rates only
    trainable = [c for c in result.components if c.trainable]
    tensors = sum(len(concrete_parameters(c, result.values)) for c in trainable)
    elements = sum(c.count for c in trainable)
    timed = step_time(step_ops(result, step, profile.kind, records), rates, step, (elements, tensors),
                      states.gradients, states.weights, parallel.gpus, parallel.zero)
    tokens = step.grad_accum * step.batch * step.symbols(result.task)["s"]
    return {"tokens_per_s": tokens / timed.step_s, "step_s": timed.step_s, "phases": timed.phases,
            "table": timed.table, "bound": timed.bound, "profile": profile.name, "source": profile.source,
            "model": "per-op roofline: max(FLOPs / matmul rate, bytes / elementwise rate) + per-op overhead, "
                     "summed over the step's ops, + the optimizer step"}
