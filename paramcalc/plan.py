"""Will it fit, and how long will it take? A training step's memory, FLOPs and throughput on a device.

Builds on three torch-free pieces: ``memory.model_states`` (weights, gradients, optimizer state),
``activations.simulate`` (the step replayed op by op, for activations and transient peaks) and
``flops.step_flops``. Here they are sharded across GPUs, put on a device and turned into time. A model
without a family file has no flow to replay: its step is traced on fake tensors (``trace.trace_step``,
which imports torch; such a model was counted with transformers already).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from .devices import CUDA_OVERHEAD, Profile, cublas_workspaces, profile
from .devices import DEVICES, calibration_dir  # noqa: F401 - where the notebooks and users have found them
from .errors import ParamcalcError
from .step import Step

SHARDING = ("zero", "fsdp")


@dataclass(frozen=True)
class Parallel:
    """Data-parallel sharding of the model states (ZeRO stages, Rajbhandari et al. 2020, arXiv:1910.02054)."""

    gpus: int = 1
    zero: int = 0  # 1: optimizer state, 2: + gradients, 3: + weights, each split across the GPUs

    def __post_init__(self):
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise ParamcalcError(f"--gpus must be a positive integer, got {self.gpus!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ParamcalcError(f"--zero must be 0, 1, 2 or 3, got {self.zero!r}")

    @classmethod
    def from_options(cls, gpus: int = 1, zero: int | None = None, fsdp: str | None = None) -> "Parallel":
        if zero is not None and fsdp is not None:
            raise ParamcalcError("--zero and --fsdp both shard the model states; give one of them")
        stages = {None: 0, "full": 3, "grad-op": 2}
        if fsdp not in stages:
            raise ParamcalcError(f"--fsdp must be full or grad-op, got {fsdp!r}")
        return cls(gpus, zero if zero is not None else stages[fsdp])

    def shard(self, weights: int, gradients: int, optimizer: int) -> tuple[int, int, int]:
        """Bytes of each model state one GPU holds."""
        n = self.gpus
        return (-(-weights // n) if self.zero >= 3 else weights, -(-gradients // n) if self.zero >= 2 else gradients,
                -(-optimizer // n) if self.zero >= 1 else optimizer)


@dataclass
class Plan:
    memory: dict[str, int]
    formulas: dict[str, str]
    flops: dict[str, int] | None
    throughput: dict | None
    profile: Profile
    parallel: Parallel
    phase_of_peak: str
    notes: list[str] = field(default_factory=list)
    step: Step | None = None  # the step predicted, its attention resolved (resolve_attention)
    phase_peaks: dict[str, int] = field(default_factory=dict)  # the high-water mark of each phase
    source: str = "replay"  # replay: the family file's flow, op by op; trace: one step on fake tensors

    def fits(self) -> bool | None:
        return None if self.profile.memory is None else self.memory["peak"] <= self.profile.memory

    def to_dict(self) -> dict:
        return {"memory": self.memory, "flops": self.flops, "throughput": self.throughput,
                "device": {"profile": self.profile.name, "memory": self.profile.memory, "fits": self.fits(),
                           "gpus": self.parallel.gpus, "zero": self.parallel.zero},
                "phase_of_peak": self.phase_of_peak, "source": self.source, "notes": self.notes}


# The band around the predicted peak: the replay matched traced steps within 5 % (tests/test_memory.py);
# allocator rounding and fragmentation on a real device only add memory.
BAND = (0.95, 1.10)


def plan(result, step: Step, device: str | None = None, device_mem: str | None = None,
         parallel: Parallel | None = None) -> Plan:
    """The memory, FLOPs and throughput of ``step`` for ``result``'s model on a device.

    ``step.attention="auto"`` is resolved to what transformers builds (``Plan.step`` holds the step as
    predicted, and a note says which kernel was assumed). A model without a family file is traced on
    fake tensors (``paramcalc trace``): its memory and FLOPs are the traced step's.
    """
    from .attention import runs_note
    from .step import attention_note, check_fits_model, resolve_attention

    parallel = parallel or Parallel()
    chosen = profile(device, step, device_mem)
    check_fits_model(step, result)
    notes = [attention_note(step, result)]
    step = resolve_attention(step, result)
    notes += filter(None, [runs_note(step, result, chosen.kind)])
    if not replayable(result):
        states, at_peak, phases, flops, why = _traced(result, step, chosen)
        notes.append(why)
        if step.grad_accum > 1:
            notes.append("the trace is of one micro-batch: later micro-batches also hold the gradients summed so "
                         f"far ({states.gradients:,} B more)")
        source = "trace"
    else:
        states, at_peak, phases, flops, records = _replayed(result, step, chosen, notes)
        source = "replay"
    # the terms alive at the peak, with the model states each GPU keeps under sharding
    weights, gradients, optimizer = parallel.shard(at_peak["weights"], at_peak["gradients"], at_peak["optimizer"])
    if parallel.zero >= 3:  # ZeRO-3/FSDP gather one layer's full weights at a time
        weights += _largest_layer_bytes(result, step)
    overhead = CUDA_OVERHEAD if chosen.kind == "cuda" else 0
    # DDP (data parallelism without sharding) copies the gradients into flat buckets for the all-reduce
    # (torch's default gradient_as_bucket_view=False): one more gradient-sized buffer, alive throughout
    buckets = states.gradients if parallel.gpus > 1 and parallel.zero == 0 else 0
    workspaces = cublas_workspaces(chosen)  # alive through every phase, from the first step on
    peak = (weights + gradients + optimizer + at_peak["activations"] + at_peak["transient"] + overhead + buckets
            + workspaces)
    memory = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "ddp_buckets": buckets,
              "activations": at_peak["activations"], "transient": at_peak["transient"],
              "cublas_workspaces": workspaces, "overhead": overhead,
              "peak": peak, "band": [int(peak * BAND[0]), int(peak * BAND[1])]}
    formulas = _formulas(step, parallel)
    all_gradients = parallel.shard(0, states.gradients, 0)[1]
    if gradients < all_gradients:  # a peak inside backward: only the gradients computed so far are alive
        formulas["gradients"] += f" = {all_gradients:,} B by the end of backward; alive at the peak: those computed so far"
    if result.quant:
        formulas["weights"] = formulas["weights"].replace("params x bytes(dtype)", "quantized weights as stored "
                                                          "(packed values + scales) + other params x bytes(dtype)")
        notes.append(_quant_note(result.quant.options, chosen.kind))
    if source == "trace":
        formulas["activations"] = "what the traced step's forward kept, alive at the peak (fake tensors)"
    if source == "replay" and flops:
        from .timing import throughput as timed

        throughput = timed(result, step, chosen, parallel, records, states)
    else:
        throughput = _throughput(flops, states, step, chosen, result) if flops else None
    return Plan(memory, formulas, flops, throughput, chosen, parallel, phases[0], notes, step, phases[1], source)


def _replayed(result, step: Step, chosen: Profile, notes: list[str]):
    """Model states, the replayed timeline's peak terms and phases, and FLOPs (None where not modelled)."""
    from . import activations
    from .flops import step_flops
    from .memory import model_states

    states = model_states(result, step, chosen.kind)
    timeline = activations.simulate(result, step, device=chosen.kind)
    if step.grad_accum > 1:  # a later micro-batch runs with every gradient alive: the step's peak is the higher
        later = activations.simulate(result, step, device=chosen.kind, accumulating=True)
        phases = {k: max(v, later.phase_peaks.get(k, 0)) for k, v in timeline.phase_peaks.items()}
        timeline = later if later.peak > timeline.peak else timeline
        timeline.phase_peaks = phases
    flops = None
    try:
        counted = step_flops(result, step, device=chosen.kind)
    except ParamcalcError as exc:  # a method or layout the analytic FLOPs do not model: no FLOPs, no time
        notes.append(f"no FLOPs or throughput: {exc}")
    else:
        optimizer_flops = 0  # the update is elementwise: FlopCounterMode counts no matmul in it
        # backward includes the checkpointed layers' second forward, also shown on its own as recompute
        flops = {"forward": counted.forward, "backward": counted.backward,
                 **({"recompute": counted.recompute} if step.grad_checkpointing else {}),
                 "optimizer": optimizer_flops, "total": counted.total + optimizer_flops}
    return states, timeline.at_peak, (timeline.phase_of_peak, dict(timeline.phase_peaks)), flops, timeline.records


def replayable(result) -> bool:
    """Whether the memory replay can walk the model: its family file describes the step's data flow (a family that
    drops modules its parent's flow runs and describes no op in their place inherits none, ``family_loader._inherit``;
    Mixtral's routed experts are a flow op of their own, ``paramcalc.moe``)."""
    from .families import families

    return not result.generic and bool(families()[result.family].flow)


def _traced(result, step: Step, chosen: Profile):
    """A model without a family file, or one whose file has no [flow] yet: one steady step traced on fake tensors
    gives every term."""
    from .memory import ModelStates
    from .trace import trace_step

    report = trace_step(result, step)
    names = {"weights": "parameters", "gradients": "gradients", "optimizer": "optimizer",
             "activations": "activations", "transient": "transient"}
    at_peak = {ours: report.at_peak[theirs] for ours, theirs in names.items()}
    after = report.after_step
    states = ModelStates(after["parameters"], after["gradients"], after["optimizer"], 0)
    what = "no family file" if result.generic else f"no replay flow in the {result.family} family file yet"
    why = (f"{what}: memory and FLOPs are those of one training step of {report.model_class} traced on "
           "fake tensors ('paramcalc trace'), with this CPU's kernels")
    if chosen.kind == "cuda":
        why += "; on a GPU dropout keeps 1-byte masks and sdpa runs fused, so expect less activation memory"
    return states, at_peak, (report.phase_of_peak, dict(report.phase_peaks)), dict(report.flops), why


def _largest_layer_bytes(result, step: Step) -> int:
    """ZeRO-3 and FSDP gather one wrapped unit's full weights at a time: a whole transformer layer (every
    row of a repeated part), or a module outside the layers, such as an embedding, when that is larger."""
    from .memory import DTYPE_BYTES

    units: dict[tuple[str, str], int] = {}
    width = 1 if result.quant else DTYPE_BYTES[step.dtype]  # --quant: the bytes each row is stored in
    for c in result.components:
        key = (c.part, "one layer") if c.repeat_count > 1 else (c.part, c.name)
        units[key] = units.get(key, 0) + (c.weight_bytes if result.quant else c.count) // max(c.repeat_count, 1)
    return max(units.values(), default=0) * width


def _quant_note(options, kind: str) -> str:
    if options.type == "int8":
        note = ("int8 (bitsandbytes' MatMul8bitFp, as it trains on a CPU): each quantized Linear dequantizes its "
                "weight into its input's dtype in forward and again in backward, and keeps its input for backward")
        return note + ("; on a GPU bitsandbytes runs MatMul8bitLt instead, which is not modelled" if kind == "cuda"
                       else "")
    return (f"{options.type}: each 4-bit Linear dequantizes its whole weight ({options.compute_dtype}) for its "
            f"matmul in forward, and again ({options.dtype}) in backward; its output keeps its input's dtype "
            "(fp32 under autocast when the input is fp32)")


def _throughput(flops: dict, states, step: Step, chosen: Profile, result) -> dict | None:
    if not chosen.flops_per_s:
        why = (chosen.source if chosen.source.startswith("no ") else
               "no FLOP rate for this device: run 'paramcalc calibrate' or name a GPU with --device")
        return {"tokens_per_s": None, "step_s": None, "profile": chosen.name, "why": why}
    # A model without a family file has no op list (its step was traced): a lower bound, the matmuls at the
    # achieved rate plus the optimizer pass streaming the model states through memory (read weights,
    # gradients and state, write weights and state)
    compute_s = step.grad_accum * flops["total"] / chosen.flops_per_s  # one forward+backward per micro-batch
    memory_s = (2 * states.weights + states.gradients + 2 * states.optimizer) / chosen.bandwidth
    step_s = compute_s + memory_s
    tokens = step.grad_accum * step.batch * step.symbols(result.task)["s"]
    return {"tokens_per_s": tokens / step_s, "step_s": step_s, "profile": chosen.name, "source": chosen.source,
            "model": "lower bound: matmul FLOPs / rate + model states / bandwidth (no op list without a family file)"}


def _formulas(step: Step, parallel: Parallel) -> dict[str, str]:
    n = parallel.gpus
    return {
        "weights": "params x bytes(dtype) + buffers" + (f" / {n} (ZeRO-3)" if parallel.zero >= 3 else ""),
        "gradients": "trainable x bytes(dtype)" + (f" / {n} (ZeRO-2)" if parallel.zero >= 2 else ""),
        "optimizer": {"adamw": "trainable x 2 x bytes(dtype) + 4 B per tensor", "adam": "trainable x 2 x bytes(dtype) + 4 B per tensor",
                      "sgd-momentum": "trainable x bytes(dtype)", "sgd": "0", "adamw-8bit": "trainable x 2 B + absmax",
                      "adafactor": "(rows + cols) x 4 B per matrix"}[step.optimizer]
                     + (f" / {n} (ZeRO-1)" if parallel.zero >= 1 else ""),
        "activations": "what the flow's ops save for backward, alive at the peak (replayed op by op)",
        "transient": "gradients flowing between ops, recomputed layers, the optimizer's temporaries",
        "overhead": "CUDA context + allocator (assumed 0.5 GiB on a GPU, none on the CPU)",
        "cublas_workspaces": "2 threads (forward; autograd's backward) x one cuBLAS workspace (32 MiB on Hopper, "
                             "8.1 MiB on other GPUs)",
        "ddp_buckets": "trainable x bytes(dtype): DDP's flat gradient buckets" if n > 1 and not parallel.zero else "0",
    }


def fit_batch(result, step: Step, device: str | None = None, device_mem: str | None = None,
              parallel: Parallel | None = None, limit: int = 4096) -> tuple[int, list[tuple[int, int]]]:
    """The largest batch whose predicted peak fits, and the (batch, peak) curve it was found on."""
    from dataclasses import replace

    chosen = profile(device, step, device_mem)
    if chosen.memory is None:
        raise ParamcalcError("--fit-batch needs the device's memory: give --device-mem (e.g. 16GiB) or a GPU "
                             "--device")
    curve = []

    def peak(batch: int) -> int:
        value = plan(result, replace(step, batch=batch), device, device_mem, parallel).memory["peak"]
        curve.append((batch, value))
        return value

    if peak(1) > chosen.memory:
        return 0, curve
    low, high = 1, 2
    while high <= limit and peak(high) <= chosen.memory:  # double until it no longer fits
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        if peak(middle) <= chosen.memory:
            low = middle
        else:
            high = middle
    return low, sorted(set(curve))
