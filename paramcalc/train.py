"""``paramcalc train``: fine-tune for real, measure, and hold the prediction to the run.

The trainer is a client of the library like the CLI: it asks ``plan`` for the prediction, builds the
model (``runtime``), runs steps with accelerate's ``Accelerator`` (device placement, mixed precision,
gradient accumulation, data parallelism under ``accelerate launch``), measures with ``measure`` and
hands both to one comparison (``TrainReport``).

Which steps are measured: the first ``warmup`` steps are not (optimizer state is created in the first
one); step ``warmup + 1`` is the memory step, recorded from before the model is built to its end
(allocator events on a CPU, per-phase peaks on CUDA); the steps after it are timed without any
recording, and their median is the step time (when there are none, the memory step is timed too, with
the profiler's overhead in it, and the report says so). Each timed step's phases are timed too (forward:
the model and the loss; backward: ``accelerator.backward``, with checkpointed layers' re-run and DDP's
all-reduce inside it; optimizer: ``optimizer.step`` and ``zero_grad``), summed over its micro-batches;
``measured["phases_s"]`` holds each one's median over the same steps.
"""

from __future__ import annotations

import contextlib
import os
import statistics
from dataclasses import asdict, dataclass, field, replace

from .errors import ParamcalcError

SCHEMA = "paramcalc-train/1"
# The judge's tolerance on the peak: the replay is built to be within 5 % of a real CPU step (3 % on a GPU,
# where the caching allocator's rounding is modelled).
TOLERANCE = {"cpu": 0.05, "cuda": 0.03}


class RunFailed(Exception):
    """The run could not go on (out of memory, or a predicted peak above the device's memory)."""

    def __init__(self, message: str, report: "TrainReport | None" = None):
        super().__init__(message)
        self.report = report


@dataclass
class TrainOptions:
    steps: int = 5
    warmup: int = 1
    device: str = "cpu"
    weights: str | None = None
    data: str | None = None
    tokenizer: str | None = None
    lr: float = 1e-4
    seed: int = 0
    device_mem: str | None = None
    force: bool = False

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ParamcalcError(f"--steps must be a positive integer, got {self.steps!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ParamcalcError(f"--warmup must be 0 or more, got {self.warmup!r}")
        if self.warmup >= self.steps:
            raise ParamcalcError(f"--warmup {self.warmup} leaves no step to measure out of --steps {self.steps}; "
                                 f"use --steps {self.warmup + 2} or more")
        if not self.lr > 0:
            raise ParamcalcError(f"--lr must be positive, got {self.lr!r}")
        if self.device != "cpu" and not (self.device == "cuda" or
                                         (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ParamcalcError(f"--device must be cpu, cuda or cuda:N, got {self.device!r}")

    @property
    def kind(self) -> str:
        return "cpu" if self.device == "cpu" else "cuda"


@dataclass
class TrainReport:
    model: str
    family: str
    task: str
    options: dict
    device: dict
    predicted: dict | None
    measured: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    # the measured step's memory curve (measure.StepTimeline) on a CPU, None on CUDA; not part of the JSON
    timeline: object = field(default=None, repr=False, compare=False)

    @property
    def tolerance(self) -> float:
        return TOLERANCE["cpu" if self.device.get("kind") == "cpu" else "cuda"]

    def errors(self) -> dict:
        """(predicted - measured) / measured for the peak, each phase's peak and the throughput."""
        if not self.predicted or not self.measured.get("memory"):
            return {}
        predicted, measured = self.predicted["memory"], self.measured["memory"]
        overhead = predicted.get("overhead", 0)  # a GPU's context is not an allocation torch sees
        errors = {"peak": _relative(predicted["peak"] - overhead, measured["peak"]),
                  "loaded": _relative(predicted["weights"] + predicted.get("ddp_buckets", 0), measured.get("loaded"))}
        for phase in ("forward", "backward", "optimizer"):
            mine, theirs = (predicted.get("phases") or {}).get(phase), measured.get(phase)
            if mine and theirs:
                errors[phase] = _relative(mine, theirs)
        throughput = self.predicted.get("throughput") or {}
        if throughput.get("step_s") and self.measured.get("step_s"):
            errors["step_s"] = _relative(throughput["step_s"], self.measured["step_s"])
            errors["tokens_per_s"] = _relative(throughput["tokens_per_s"], self.measured["tokens_per_s"])
        timed = self.measured.get("phases_s") or {}
        for phase, seconds in predicted_phases(self.predicted).items():  # forward_s, backward_s, optimizer_s
            if timed.get(phase):
                errors[f"{phase}_s"] = _relative(seconds, timed[phase])
        return errors

    def verdict(self) -> str:
        error = self.errors().get("peak")
        if error is None:
            return "no prediction to judge" if not self.predicted else "not measured"
        return "within tolerance" if abs(error) <= self.tolerance else "OUTSIDE tolerance"

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "model": self.model, "family": self.family, "task": self.task,
                "options": self.options, "device": self.device, "predicted": self.predicted,
                "measured": self.measured, "error": self.errors(), "tolerance": self.tolerance,
                "verdict": self.verdict(), "notes": self.notes}


def predicted_phases(predicted: dict | None) -> dict[str, float]:
    """The plan's phase times as the trainer's clock splits a step: everything ``accelerator.backward`` runs
    is backward (the checkpointed layers' re-run, DDP's all-reduce). {} when the plan gave no phases."""
    phases = ((predicted or {}).get("throughput") or {}).get("phases") or {}
    backward = [phases[k] for k in ("backward", "recompute", "all_reduce") if phases.get(k) is not None]
    combined = {"forward": phases.get("forward"), "backward": sum(backward) if backward else None,
                "optimizer": phases.get("optimizer")}
    return {k: v for k, v in combined.items() if v is not None}


def _relative(predicted, measured) -> float | None:
    if predicted is None or not measured:
        return None
    return (predicted - measured) / measured


def check_device(device: str) -> None:
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise ParamcalcError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__}); "
                             "use --device cpu")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ParamcalcError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")


def predict(result, step, options: TrainOptions, processes: int = 1,
            profile: str | None = None) -> tuple[dict | None, list[str]]:
    """The plan's prediction for the step the trainer will run, as a JSON-ready dict (None when paramcalc
    cannot predict this model or method, with the reason among the notes). ``profile``: the device profile to
    plan on (default: this CPU, or the profile or datasheet matching this GPU)."""
    from .plan import Parallel, plan

    device, device_mem = (profile, options.device_mem) if profile else _plan_device(options)
    try:
        step_plan = plan(result, step, device, device_mem, Parallel(processes) if processes > 1 else None)
    except ParamcalcError as exc:
        return None, [f"no prediction: {exc}"]
    # alive through every phase, beside the replayed tensors: DDP's buckets, cuBLAS's workspaces on a GPU
    constant = step_plan.memory.get("ddp_buckets", 0) + step_plan.memory.get("cublas_workspaces", 0)
    memory = {**step_plan.memory, "phases": {k: v + constant for k, v in step_plan.phase_peaks.items()}}
    throughput = step_plan.throughput or {}
    return {"memory": memory, "throughput": {k: throughput.get(k) for k in ("tokens_per_s", "step_s", "phases")},
            "flops": step_plan.flops, "device_memory": step_plan.profile.memory, "fits": step_plan.fits(),
            "profile": step_plan.profile.name, "phase_of_peak": step_plan.phase_of_peak, "source": step_plan.source,
            "notes": step_plan.notes + ([throughput["why"]] if throughput.get("why") else [])}, []


def _plan_device(options: TrainOptions) -> tuple[str, str | None]:
    """The device profile the plan reads: this CPU, or the GPU's calibrated profile / nearest datasheet."""
    if options.kind == "cpu":
        from .measure import physical_memory

        ram = physical_memory()
        return "cpu", options.device_mem or (f"{ram}B" if ram else None)
    import torch

    from .calibrate import default_name
    from .devices import calibration_dir

    index = int(options.device.partition(":")[2] or 0)
    with torch.cuda.device(index):
        name = default_name("cuda")
        total = torch.cuda.get_device_properties(index).total_memory
    if (calibration_dir() / f"{name}.json").is_file():
        return name, options.device_mem
    known = {"h100": "h100-80gb", "h200": "h100-80gb", "a100": "a100-80gb" if total > 50 * 2**30 else "a100-40gb",
             "l4": "l4", "a10": "a10g", "t4": "t4"}
    profile = next((v for k, v in known.items() if k in name), "a100-80gb")
    return profile, options.device_mem or f"{total}B"


def train(result, step, options: TrainOptions, on_prediction=None, on_step=None, on_model=None) -> TrainReport:
    """Fine-tune ``result``'s model for ``options.steps`` optimizer steps and compare with the prediction.

    ``on_prediction(report)`` is called before training starts, ``on_step(index, loss, seconds)`` after
    each step, ``on_model(model)`` with the trained model (the weights are seeded: ``runtime.build_model``
    with the same seed gives the model as it started). ``report.timeline`` is the measured step's memory curve
    (``measure.StepTimeline``; None on CUDA). Raises ``RunFailed`` (out of memory, or a predicted peak above the
    device's memory without ``force``) with the report so far.
    """
    from .data import make_batches
    from .measure import StepTimer, alive_bytes, is_out_of_memory, meter_for, resident_bytes
    from .runtime import check_weights_dir, make_optimizer
    from .step import resolve_attention

    check_device(options.device)
    if options.weights is not None:
        check_weights_dir(options.weights)
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1 and options.warmup < 2:
        # DDP rebuilds its buckets (in the order gradients arrived) during the second step, holding the old
        # and the new ones at once: the steady step is the third
        if options.steps < 3:
            raise ParamcalcError("data-parallel runs need --steps 3 or more: DDP's second step rebuilds its "
                                 "buckets, so the third is the first steady one to measure")
        options = replace(options, warmup=2)
    batches = make_batches(result, batch=step.batch, seq=step.seq, tgt_seq=step.tgt_seq, data=options.data,
                           tokenizer=options.tokenizer, seed=options.seed)
    predicted, notes = predict(result, step, options, processes)
    step = resolve_attention(step, result)  # build the kernel the prediction assumed
    report = TrainReport(result.model, result.family, result.task, _options(result, step, options),
                         _device(options, processes), predicted, notes=notes)
    if on_prediction:
        on_prediction(report)
    if predicted and predicted["fits"] is False and not options.force:
        raise RunFailed(f"the predicted peak {predicted['memory']['peak']:,} B exceeds the device's "
                        f"{predicted['device_memory']:,} B; not starting (--force runs it anyway)", report)
    meter, losses, index = meter_for(options.device), [], -1
    timer = StepTimer(options.device, inner=meter.phase)  # timer.phase marks the meter's phases too
    # One process: record from before the model exists. Several: gloo's worker threads free some tensors the
    # step's thread allocated, which the profiler cannot see, so record the measured step alone, on top of
    # what is alive then (measure.alive_bytes; DDP reports its buckets itself).
    late = processes > 1 and options.kind == "cpu"
    try:
        with contextlib.nullcontext() if late else meter.recording():
            model, optimizer, accelerator = _prepare(result, step, options, make_optimizer, batches)
            meter.mark("loaded")  # the model states before the first step: weights, buffers, DDP buckets
            loaded = alive_bytes(model, optimizer)
            index = 0
            report.measured["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            started = _fingerprints(accelerator.unwrap_model(model))
            for index in range(options.warmup + 1):
                measured = index == options.warmup
                if measured and late:
                    meter.offset = alive_bytes(model, optimizer)
                with meter.recording() if measured and late else contextlib.nullcontext():
                    with meter.phase("step") if measured else contextlib.nullcontext():
                        with timer.step() if measured else contextlib.nullcontext():
                            loss = _step(model, optimizer, accelerator, batches, step, timer.phase)
                losses.append(loss)
                if on_step:
                    on_step(index, loss, timer.seconds[-1] if measured else None)
        memory, report.timeline = meter.summary(), meter.timeline()
        if late:
            memory["loaded"] = loaded
        under_profiler, timer.inner = (timer.seconds[:], timer.phases[:]), None  # time the rest, record nothing
        timer.clear()
        for index in range(options.warmup + 1, options.steps):
            with timer.step():
                losses.append(_step(model, optimizer, accelerator, batches, step, timer.phase))
            if on_step:
                on_step(index, losses[-1], timer.seconds[-1])
    except Exception as exc:
        if isinstance(exc, ValueError) and not is_out_of_memory(exc):  # transformers / peft refuse the step
            raise ParamcalcError(f"transformers cannot run this {result.hf_class} step: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
        if not is_out_of_memory(exc):
            raise
        where = f"step {index + 1}" if index >= 0 else "building the model"
        report.measured.update({"failed": "out of memory", "failed_at_step": index + 1, "loss": losses})
        raise RunFailed(f"out of memory at {where}: {str(exc).splitlines()[0][:200]}", report) from None
    finally:
        _release_accelerator()
    seconds = timer.seconds or under_profiler[0]
    if not timer.seconds:
        report.notes.append("only one step after warm-up: its time includes the memory profiler's overhead "
                            "(use more --steps)")
    tokens = step.batch * step.seq * step.grad_accum
    step_s = statistics.median(seconds)
    phases_s = timer.median_phases(None if timer.seconds else under_profiler[1])
    if phases_s and not 0.8 <= sum(phases_s.values()) / step_s <= 1.05:  # each phase's median from another step
        report.notes.append(f"the phases' median times add up to {sum(phases_s.values()) / step_s:.0%} of the median "
                            "step: the steps' times varied (other work on this machine?); more --steps steady them")
    memory["resident"] = resident_bytes()
    report.measured.update({"memory": memory, "step_s": step_s, "tokens_per_s": tokens / step_s, "phases_s": phases_s,
                            "timed_steps": len(seconds), "steps": options.steps, "loss": losses})
    report.measured.update(_changed(started, _fingerprints(accelerator.unwrap_model(model))))
    if on_model:
        on_model(accelerator.unwrap_model(model))
    return report


def _fingerprints(model) -> dict[str, tuple[int, bool, bytes]]:
    """name -> (numel, requires_grad, digest of the bytes): which parameters training changed, bit for bit,
    without keeping a copy (on a CPU the bytes are hashed in place)."""
    import hashlib

    import torch

    prints = {}
    for name, parameter in model.named_parameters():
        data = parameter.detach().contiguous().cpu()
        raw = data.view(-1).view(torch.uint8).numpy() if data.numel() else b""
        prints[name] = (parameter.numel(), parameter.requires_grad, hashlib.blake2b(raw, digest_size=16).digest())
    return prints


def _changed(before: dict, after: dict) -> dict:
    """The parameters training changed: every trainable one should, no frozen one may."""
    changed = [name for name in before if before[name][2] != after[name][2]]
    return {"changed_params": sum(before[n][0] for n in changed),
            "frozen_changed": sorted(n for n in changed if not before[n][1])}


def _prepare(result, step, options: TrainOptions, make_optimizer, batches):
    """Model, optimizer and Accelerator, with accelerate doing placement, mixed precision and accumulation."""
    from accelerate import Accelerator

    from .runtime import build_model

    if options.kind == "cuda":
        import gc

        import torch

        # the GPU's counters are absolute: let an earlier run's models in this process go first (peft's
        # wrappers hold reference cycles that only the collector frees)
        gc.collect()
        torch.cuda.empty_cache()
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            torch.cuda.set_device(int(options.device.partition(":")[2] or 0))  # accelerate places on the current GPU
    try:
        accelerator = Accelerator(cpu=options.kind == "cpu", mixed_precision=step.mixed_precision or "no",
                                  gradient_accumulation_steps=step.grad_accum)
    except (ValueError, RuntimeError) as exc:
        raise ParamcalcError(f"accelerate cannot run this step: {str(exc).splitlines()[0][:200]}") from None
    device = accelerator.device if options.kind == "cpu" else options.device
    model = build_model(result, step, seed=options.seed, weights=options.weights, device=str(device),
                        batches=batches)
    optimizer = make_optimizer(step.optimizer, model.parameters(), options.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    # DDP broadcasts the weights from process 0 into a flat buffer that gloo may hold until its work is
    # reaped; a barrier lets it go, so every process starts its steps with the same memory
    accelerator.wait_for_everyone()
    return model, optimizer, accelerator


def _step(model, optimizer, accelerator, batches, step, phase) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss."""
    from .trace import _loss  # the task's loss, or trace's stand-in over a bare backbone's outputs

    total = 0.0
    for micro in range(step.grad_accum):
        batch = {k: v.to(accelerator.device) for k, v in batches.next().items()}
        with accelerator.accumulate(model):
            with phase("forward"):
                loss = _loss(model(**batch))
            del batch
            with phase("backward"):
                accelerator.backward(loss)
            total += loss.item()
            del loss
            if micro == step.grad_accum - 1:
                with phase("optimizer"):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
    return total / step.grad_accum


def _release_accelerator() -> None:
    """Let the next run in this process choose its own precision (accelerate keeps one global state)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)


def _options(result, step, options: TrainOptions) -> dict:
    return {**asdict(step), **{k: v for k, v in asdict(options).items() if k not in ("force",)},
            "peft": [{"method": m, **{k: v for k, v in vars(o).items() if not k.startswith("_")}}
                     for m, o in result.peft_options],
            "quant": asdict(result.quant.options) if result.quant else None}


def _device(options: TrainOptions, processes: int) -> dict:
    import torch

    device = {"name": options.device, "kind": options.kind, "torch": torch.__version__, "processes": processes,
              "rank": int(os.environ.get("RANK", "0"))}
    if options.kind == "cpu":
        from .measure import physical_memory

        device.update(description="this CPU", memory=physical_memory(), threads=torch.get_num_threads())
    else:
        index = int(options.device.partition(":")[2] or 0)
        properties = torch.cuda.get_device_properties(index)
        device.update(description=properties.name, memory=properties.total_memory)
    return device
