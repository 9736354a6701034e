"""``paramcalc calibrate``: measure this machine's matmul FLOP/s and memory bandwidth, once, and save them.

Datasheet peaks say little about a CPU or an unlisted GPU, so the throughput estimate
(``paramcalc.plan._throughput``: FLOPs / matmul rate + model-state bytes / bandwidth) reads a saved
profile instead: ``calibration_dir()/NAME.json``, usable as ``--device NAME`` (``cpu.json`` is what the
default device reads). torch is imported inside the functions: the analytic path stays torch-free.
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

from .errors import ParamcalcError
from .plan import DEVICES, calibration_dir

KINDS = ("cpu", "cuda")
MIN_SIZE = 64
DEFAULT_SIZE = {"cpu": 2048, "cuda": 8192}  # large enough for the BLAS to reach its steady rate
# The copy must dwarf the last-level cache, or it measures the cache: 256 MiB is several times the
# largest server L3; a GPU's L2 is at most tens of MiB but its bandwidth needs a longer copy to time.
COPY_BYTES = {"cpu": 256 * 1024**2, "cuda": 1024**3}
MIN_TIMED_S = 0.02  # each timed sample repeats the op until it lasts this long: small ops beat the timer
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


def calibrate(name: str | None = None, device: str = "cpu", size: int | None = None, repeats: int = 5,
              copy_bytes: int | None = None) -> dict:
    """Time ``torch.mm`` on ``size`` x ``size`` matrices (2*size**3 FLOPs) in fp32 and half precision, and
    a ``copy_bytes`` tensor copy; the best of ``repeats`` samples after a warm-up, as a profile dict."""
    if device not in KINDS:
        raise ParamcalcError(f"--device must be cpu or cuda, got {device!r}")
    size = DEFAULT_SIZE[device] if size is None else size
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise ParamcalcError(f"--size must be an integer of at least {MIN_SIZE} (the matrix side), got {size!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ParamcalcError(f"repeats must be a positive integer, got {repeats!r}")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ParamcalcError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU here; calibrate the CPU "
                             "with --device cpu")
    name = check_name(default_name(device) if name is None else name, device)
    copy_bytes = COPY_BYTES[device] if copy_bytes is None else copy_bytes
    # CPU autocast runs bf16; on a GPU mixed precision may be either, and plan.profile() reads one
    # 'half' rate for both, so it takes the faster: the one a user would pick on that GPU.
    halves = ["bf16"] if device == "cpu" else ["fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    try:
        rates = {label: _matmul_rate(torch, device, dtypes[label], size, repeats) for label in ["fp32", *halves]}
        bandwidth = _copy_bandwidth(torch, device, copy_bytes, repeats)
    except (RuntimeError, MemoryError) as exc:  # out of memory, mostly: the message is torch's first line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ParamcalcError(f"calibration failed at --size {size}: {first}; try a smaller --size") from None
    profile = {"name": name, "kind": device, "device": _describe(torch, device),
               "fp32": rates["fp32"], "half": max(rates[h] for h in halves), "half_dtype": max(halves, key=rates.get),
               **{h: rates[h] for h in halves}, "bandwidth": bandwidth, "memory": _memory(torch, device),
               "threads": torch.get_num_threads(), "torch": torch.__version__, "size": size,
               "copy_bytes": copy_bytes, "when": datetime.now().astimezone().isoformat(timespec="seconds")}
    return profile


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


def _best_seconds(torch, device: str, op, repeats: int) -> float:
    """Seconds per call of ``op``: the fastest of ``repeats`` samples, after a warm-up call (which pays
    for first-touch page faults, BLAS thread start-up and CUDA kernel selection)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed(calls: int) -> float:
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            op()
        sync()
        return time.perf_counter() - start

    once = timed(1)  # warm-up, and a guess at how many calls make a sample long enough to time
    calls = max(1, min(1000, math.ceil(MIN_TIMED_S / max(once, 1e-9))))
    best = min(timed(calls) / calls for _ in range(repeats))
    return max(best, 1e-12)


def _matmul_rate(torch, device: str, dtype, size: int, repeats: int) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds = _best_seconds(torch, device, lambda: torch.mm(a, b, out=out), repeats)
    return 2 * size**3 / seconds  # a multiply and an add per term of each of the size**2 dot products


def _copy_bandwidth(torch, device: str, nbytes: int, repeats: int) -> float:
    source = torch.ones(max(nbytes // 4, 1), device=device)
    target = torch.empty_like(source)
    seconds = _best_seconds(torch, device, lambda: target.copy_(source), repeats)
    return 2 * source.nbytes / seconds  # every byte is read once and written once


def _memory(torch, device: str) -> int | None:
    if device == "cuda":
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


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
