"""``paramcalc calibrate``: measure this machine once (matmul FLOP/s, memory bandwidth, and the per-op rates a
per-op time model needs) and save it as a device profile.

Datasheet peaks say little about a CPU or an unlisted GPU, so the throughput estimate
(``paramcalc.plan._throughput``: FLOPs / matmul rate + model-state bytes / bandwidth) reads a saved
profile instead: ``calibration_dir()/NAME.json``, usable as ``--device NAME`` (``cpu.json`` is what the
default device reads). What is timed, op kind by op kind, lives in ``paramcalc.calibrate_ops``; this module
checks the input, runs the measurements and saves the profile. torch is imported inside the functions: the
analytic path stays torch-free.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import time
from datetime import datetime
from pathlib import Path

from . import calibrate_ops as ops
from . import calibrate_step as step
from .errors import ParamcalcError
from .devices import DEVICES, calibration_dir

KINDS = ("cpu", "cuda")
MIN_SIZE = 64
DEFAULT_SIZE = {"cpu": 2048, "cuda": 8192}  # large enough for the BLAS to reach its steady rate
QUICK_SIZE = 256
# The copy must dwarf the last-level cache, or it measures the cache: 256 MiB is several times the
# largest server L3; a GPU's L2 is at most tens of MiB but its bandwidth needs a longer copy to time.
COPY_BYTES = {kind: ops.PLANS[kind]["copy_bytes"] for kind in KINDS}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def check_name(name: str, kind: str = "cpu") -> str:
    """A profile name is a plain file name and must not shadow a datasheet device (only ``cpu`` is meant
    to be filled in by calibration)."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ParamcalcError(f"--name must be 1-64 letters, digits, '-', '_' or '.', starting with a letter or "
                             f"digit, got {name!r}")
    if name.lower() in DEVICES and name != "cpu":
        raise ParamcalcError(f"--name {name!r} is a datasheet device, which calibration cannot override; "
                             "choose another name (e.g. my-" + name.lower() + ")")
    if name == "cpu" and kind != "cpu":
        raise ParamcalcError("--name cpu is the CPU's own profile; name a GPU profile something else "
                             "(the default is the GPU's name)")
    return name


def default_name(kind: str) -> str:
    """``cpu`` for the CPU, the GPU's name as a slug (``nvidia-a100-sxm4-40gb``) for CUDA."""
    if kind == "cpu":
        return "cpu"
    import torch

    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")[:64] or "cuda"


def calibrate(name: str | None = None, device: str = "cpu", size: int | None = None, repeats: int | None = None,
              copy_bytes: int | None = None, quick: bool = False) -> dict:
    """Measure this machine for the time model and return the profile dict (``save_profile`` writes it).

    The headline keys plan.py reads: ``fp32`` and ``half`` are ``torch.mm`` on ``size`` x ``size`` matrices
    (2*size**3 FLOPs), ``bandwidth`` a ``copy_bytes`` tensor copy. The per-op keys (``gemm``,
    ``elementwise``, ``overhead``, ``optimizer``) are described in ``paramcalc.calibrate_ops``; the training
    step's (``elementwise``'s backward entries, ``attention``, ``optimizers``, ``optimizers_missing``) in
    ``paramcalc.calibrate_step``. Each time is
    the best of ``repeats`` samples after a warm-up. ``quick``: small shapes, two samples, a few seconds.
    """
    if device not in KINDS:
        raise ParamcalcError(f"--device must be cpu or cuda, got {device!r}")
    size = (QUICK_SIZE if quick else DEFAULT_SIZE[device]) if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ParamcalcError(f"--size must be an integer of at least {MIN_SIZE} (the matrix side), got {size!r}")
    repeats = (2 if quick else 5) if repeats is None else repeats
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ParamcalcError(f"repeats must be a positive integer, got {repeats!r}")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ParamcalcError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU here; calibrate the CPU "
                             "with --device cpu")
    name = check_name(default_name(device) if name is None else name, device)
    plan = ops.PLANS["quick" if quick else device]
    copy_bytes = (min(COPY_BYTES[device], plan["copy_bytes"]) if quick else COPY_BYTES[device]) \
        if copy_bytes is None else copy_bytes
    # CPU autocast runs bf16; on a GPU mixed precision may be either, and plan.profile() reads one
    # 'half' rate for both, so it takes the faster: the one a user would pick on that GPU.
    halves = ["bf16"] if device == "cpu" else ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    dtypes = {label: {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[label]
              for label in ["fp32", *halves]}
    # the square class ends at --size, whose rates are the headline fp32 / half figures
    square = sorted({max(size // 4, 16), max(size // 2, 16), size})
    busy = _cpu_seconds()  # to tell, afterwards, how much other work ran meanwhile
    timer = ops.Timer(torch, device, repeats, ops.QUICK_TIMED_S if quick else ops.MIN_TIMED_S)
    try:
        gemm = ops.gemm_rates(timer, dtypes, plan, square)
        bandwidth = ops.copy_bandwidth(timer, copy_bytes)
        elementwise = ops.elementwise_rates(timer, dtypes, plan)
        elementwise["ops"].update(step.elementwise_rates(timer, dtypes, plan))
        attention = step.attention_times(timer, dtypes, plan)
        overhead = ops.per_op_overhead(timer, plan["overhead_ops"])
        optimizer = ops.adamw_step(timer, plan["optimizer"])
        optimizers, optimizers_missing = step.optimizer_steps(timer, plan)
        touch = step.first_touch(timer, plan["first_touch"])
    except (RuntimeError, MemoryError) as exc:  # out of memory, mostly: the message is torch's first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ParamcalcError(f"calibration failed timing {timer.doing}: {first}; try a smaller --size "
                             "or --quick") from None
    measured = {"fp32": gemm["classes"]["square"]["rate"]["fp32"][-1], "bandwidth": bandwidth, "gemm": gemm,
                "elementwise": elementwise, "overhead": overhead, "attention": attention, "optimizers": optimizers,
                "first_touch": touch}
    try:
        from .calibrate_reference import in_step

        reference = in_step(timer, measured, quick)
    except (RuntimeError, MemoryError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ParamcalcError(f"calibration failed timing {timer.doing}: {first}") from None
    load = _other_load(busy)
    rates = {label: gemm["classes"]["square"]["rate"][label][-1] for label in dtypes}
    half = max(halves, key=rates.get)
    tf32 = device == "cuda" and bool(torch.backends.cuda.matmul.allow_tf32)
    how = {"method": ops.method(timer),
           "fp32": f"torch.mm {size}x{size} in fp32 (the largest square matmul), 2*n**3 FLOPs / s"
                   + (" (TF32 allowed)" if tf32 else ""),
           "half": f"the faster of {', '.join(halves)} torch.mm {size}x{size}: {half}",
           "bandwidth": f"a {copy_bytes}-byte fp32 tensor copy, bytes read + written / s",
           "memory": "physical RAM" if device == "cpu" else "the GPU's total memory",
           "load": "CPU cores kept busy by other processes while measuring, on average (/proc/stat less this "
                   "process): other work slows every figure, and on a CPU a busy core stalls each threaded op"}
    return {"name": name, "kind": device, "device": _describe(torch, device),
            "fp32": rates["fp32"], "half": rates[half], "half_dtype": half, **{h: rates[h] for h in halves},
            "bandwidth": bandwidth, "memory": _memory(torch, device),
            # sizes cuBLAS's workspaces in the memory plan (devices.cublas_workspaces)
            **({"capability": _capability(torch)} if device == "cuda" else {}),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "size": size,
            "copy_bytes": copy_bytes, "when": datetime.now().astimezone().isoformat(timespec="seconds"),
            # the per-op time model's inputs (new in profiles from this version; plan.py needs none of them)
            "quick": quick, "repeats": repeats, "load": load, "dtypes": list(dtypes), "how": how,
            "gemm": gemm, "elementwise": elementwise, "overhead": overhead, "optimizer": optimizer,
            "attention": attention, "optimizers": optimizers, "optimizers_missing": optimizers_missing,
            "first_touch": touch, "in_step": reference}


def save_profile(profile: dict) -> Path:
    """Write ``profile`` to ``calibration_dir()/NAME.json`` atomically: a reader never sees half a file."""
    name = check_name(profile.get("name"), profile.get("kind", "cpu"))
    for key in ("fp32", "half", "bandwidth"):
        value = profile.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ParamcalcError(f"a profile's {key} must be a positive number, got {value!r}")
    folder = calibration_dir()
    path = folder / f"{name}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "w") as out:
                json.dump(profile, out, indent=2)
                out.write("\n")
                out.flush()
                os.fsync(out.fileno())
            os.chmod(temporary, 0o644)  # mkstemp makes it private; a profile is no secret
            os.replace(temporary, path)
        except BaseException:
            os.unlink(temporary)
            raise
    except OSError as exc:
        raise ParamcalcError(f"cannot save the profile to {path}: {exc.strerror or exc}") from None
    return path


def _capability(torch) -> str:
    properties = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{properties.major}.{properties.minor}"


def _memory(torch, device: str) -> int | None:
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds the whole machine was busy, CPU seconds of this process); None off Linux."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(field) for field in stat.readline().split()[1:8]]  # user nice system idle iowait irq softirq
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _other_load(before) -> float | None:
    after = _cpu_seconds()
    if before is None or after is None or after[0] <= before[0]:
        return None
    others = (after[1] - before[1]) - (after[2] - before[2])
    return round(max(others, 0.0) / (after[0] - before[0]), 2)


def _describe(torch, device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"
