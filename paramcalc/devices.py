"""The devices a step can be planned for: GPUs by their datasheets, profiles ``paramcalc calibrate`` saved, this
CPU, and the memory a GPU takes beyond the step's tensors (the CUDA context, cuBLAS's workspaces)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ParamcalcError
from .step import Step

GIB = 1024**3

# Datasheet figures (dense, no sparsity). memory in bytes, matmul FLOP/s for half precision (tensor cores)
# and fp32, memory bandwidth in bytes/s. Sources: NVIDIA product datasheets (T4, A10, L4, A100, H100 SXM).
# AWS publishes no A10G datasheet; it is the A10's GA102 chip, so the A10 figures stand in for it.
DEVICES = {
    # the T4 (Turing) has fp16 tensor cores but none for bf16: its datasheet gives no bf16 rate. Its 16 GB of
    # GDDR6 lose some to ECC (on by default on data-centre T4s): CUDA reports 15,843,721,216 B in total
    # (deviceQuery, "Total amount of global memory: 15110 MBytes"), and that is what a step can fill.
    "t4": {"memory": 15_843_721_216, "half": 65e12, "fp32": 8.1e12, "bandwidth": 320e9, "kind": "cuda", "bf16": False,
           "link": 16e9, "capability": "7.5"},
    "a10g": {"memory": 24 * 10**9, "half": 125e12, "fp32": 31.2e12, "bandwidth": 600e9, "kind": "cuda", "link": 32e9,
             "capability": "8.6"},
    "l4": {"memory": 24 * 10**9, "half": 121e12, "fp32": 30.3e12, "bandwidth": 300e9, "kind": "cuda", "link": 32e9,
           "capability": "8.9"},
    "a100-40gb": {"memory": 40 * 10**9, "half": 312e12, "fp32": 19.5e12, "bandwidth": 1555e9, "kind": "cuda",
                  "link": 300e9, "capability": "8.0"},
    "a100-80gb": {"memory": 80 * 10**9, "half": 312e12, "fp32": 19.5e12, "bandwidth": 2039e9, "kind": "cuda",
                  "link": 300e9, "capability": "8.0"},
    "h100-80gb": {"memory": 80 * 10**9, "half": 989e12, "fp32": 67e12, "bandwidth": 3350e9, "kind": "cuda",
                  "link": 450e9, "capability": "9.0"},
    "cpu": {"memory": None, "half": None, "fp32": None, "bandwidth": None, "kind": "cpu"},
}
# "link": bytes/s each way between two GPUs, for data-parallel all-reduce: PCIe Gen3 x16 (T4) or Gen4 x16
# (A10, L4) as their datasheets give it, halved from the bidirectional figure; NVLink on the SXM A100 (600 GB/s)
# and H100 (900 GB/s), halved the same way. A CPU's processes exchange gradients through its memory.
# "capability": the GPU's CUDA compute capability, which sizes cuBLAS's workspaces (below).
# Named, not hidden: the CUDA context and the caching allocator's slack take memory no tensor accounts for and
# torch.cuda.max_memory_allocated does not see. 0.5 GiB is an assumption (it varies by driver and GPU), shown as
# its own term.
CUDA_OVERHEAD = GIB // 2
# cuBLAS takes a workspace from torch's caching allocator (so max_memory_allocated sees it) for each (handle,
# stream) it runs on, and keeps it. A training step runs matmuls on two threads, each with a handle of its own:
# forward on the caller's, backward on autograd's device thread: two workspaces, alive from the first step on
# (--infer's generate() runs on one). torch sizes one by CUBLAS_WORKSPACE_CONFIG, by default ":4096:2:16:8"
# (2 x 4096 KiB + 8 x 16 KiB), and 32 MiB on Hopper (compute capability 9.x), cuBLAS's recommendation
# (aten/src/ATen/cuda/CublasHandlePool.cpp, pytorch/pytorch#89027). An H100 step measured 2 x 32 MiB
# (benchmarks/results/cuda-*.md).
CUBLAS_THREADS = {"training": 2, "inference": 1}

# Datasheet peaks are never reached by a training step; 40 % model FLOPs utilisation is an assumption in
# line with what large runs report (PaLM: 46.2 %, Chowdhery et al. 2022, arXiv:2204.02311, table 3).
DATASHEET_UTILISATION = 0.4


def cublas_workspaces(chosen: "Profile", use: str = "training") -> int:
    """Bytes of cuBLAS workspaces a step on ``chosen`` holds (0 on a CPU)."""
    if chosen.kind != "cuda":
        return 0
    major = str(chosen.capability or "").partition(".")[0]
    one = 32 * 1024**2 if major == "9" else (2 * 4096 + 8 * 16) * 1024
    return CUBLAS_THREADS[use] * one


@dataclass
class Profile:
    name: str
    memory: int | None
    flops_per_s: float | None  # achieved matmul FLOP/s at the step's compute precision
    bandwidth: float | None
    kind: str  # cpu | cuda: which rules the activations follow (dropout masks, autocast)
    source: str
    calibrated: dict | None = None  # the saved calibration, with the per-op rates the time model reads
    link: float | None = None  # bytes/s between two devices (data-parallel all-reduce)
    capability: str | None = None  # a GPU's CUDA compute capability ("9.0"); None: not known (a CPU)


def profile(name: str | None, step: Step, device_mem: str | None = None) -> Profile:
    """A named device, a profile saved by ``paramcalc calibrate``, or this CPU when nothing is named."""
    name = name or "cpu"
    half = bool(step.mixed_precision) or step.dtype != "fp32"
    if name in DEVICES:
        spec = DEVICES[name]
        rate = spec["half" if half else "fp32"]
        source = "datasheet" if rate else "this machine"
        if spec.get("bf16") is False and "bf16" in (step.mixed_precision, step.dtype):
            rate, source = None, f"no bf16 on the {name} (its datasheet has fp16 tensor cores only): use fp16"
        result = Profile(name, spec["memory"], rate * DATASHEET_UTILISATION if rate else None, spec["bandwidth"],
                         spec["kind"], source, link=spec.get("link"), capability=spec.get("capability"))
        if name == "cpu":
            saved = _load_calibration("cpu")
            if saved:
                result = Profile("cpu", None, saved["half" if half else "fp32"], saved["bandwidth"], "cpu",
                                 f"calibrated {saved['when']}", saved)
    else:
        saved = _load_calibration(name)
        if saved is None:
            raise ParamcalcError(f"unknown device {name!r}; choose one of: {', '.join(DEVICES)}, or a profile "
                                 "saved by 'paramcalc calibrate --name NAME'")
        result = Profile(name, saved.get("memory"), saved["half" if half else "fp32"], saved["bandwidth"],
                         saved.get("kind", "cpu"), f"calibrated {saved['when']}", saved, saved.get("link"),
                         saved.get("capability"))
    if device_mem is not None:
        result.memory = parse_bytes(device_mem)
    return result


def parse_bytes(text: str) -> int:
    units = {"gib": GIB, "gb": 10**9, "mib": 1024**2, "mb": 10**6, "kib": 1024, "kb": 1000, "b": 1}
    value = str(text).strip().lower().replace(" ", "")
    for unit, scale in units.items():
        if value.endswith(unit):
            number = value[: -len(unit)]
            break
    else:
        number, scale = value, 1
    try:
        amount = float(number)
    except ValueError:
        raise ParamcalcError(f"--device-mem must be a size such as 16GiB or 24GB, got {text!r}") from None
    if amount <= 0:
        raise ParamcalcError(f"--device-mem must be positive, got {text!r}")
    return int(amount * scale)


def calibration_dir() -> Path:
    root = os.environ.get("PARAMCALC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "paramcalc")
    return Path(root) / "profiles"


def _load_calibration(name: str) -> dict | None:
    """The profile ``paramcalc calibrate`` saved as NAME, None when there is none; a damaged or hand-edited
    one is refused by name rather than crashing the estimate."""
    path = calibration_dir() / f"{name}.json"
    try:
        text = path.read_text()
    except OSError:
        return None
    try:
        saved = json.loads(text)
    except ValueError:
        saved = None
    rates = ("half", "fp32", "bandwidth")
    if not isinstance(saved, dict) or not all(
            isinstance(saved.get(key), (int, float)) and 0 < saved[key] < float("inf") for key in rates):
        raise ParamcalcError(f"{path} is not a calibrated profile (it needs positive numbers for "
                             f"{', '.join(rates)}); run 'paramcalc calibrate --name {name}' again")
    saved.setdefault("when", "at an unknown time")
    return saved
