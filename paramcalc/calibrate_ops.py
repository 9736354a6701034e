"""What ``paramcalc calibrate`` times, op kind by op kind, for a per-op time model.

A step's time is modelled op by op as a roofline: max(FLOPs / the rate of that kind of matmul at that shape
and dtype, bytes moved / the rate of that kind of elementwise op) + a fixed cost per dispatched op, plus the
optimizer step. This module measures those inputs: GEMM rates over the shape classes a transformer step runs
(square, Linear, LoRA's skinny pair, attention's batched pair), elementwise rates (add, mul, softmax,
layer_norm, GELU, dropout), the per-op overhead and one AdamW step; ``paramcalc.calibrate_step`` times the rest
of a training step (backward kernels, the loss, fused attention, each optimizer) from the same ``PLANS``. Each
result carries a ``how`` string so the saved profile explains every number. torch is handed in by
``paramcalc.calibrate``: importing this module imports no torch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

# Tensors for a kind are made on this torch device. Tests map "cuda" to "cpu" to walk the CUDA branch
# (its dtypes, synchronisation and byte counts) on a machine without a GPU.
TENSOR_DEVICE = {"cpu": "cpu", "cuda": "cuda"}
MIN_TIMED_S = 0.02  # each timed sample repeats the op until it lasts this long: small ops beat the timer
QUICK_TIMED_S = 0.002

# Shapes per class: GEMMs as [batch, m, k, n] (FLOPs 2*batch*m*k*n); elementwise ops as [rows, cols].
# Three GEMM sizes per class (small, typical, large for the device) so a model can interpolate by size;
# two elementwise sizes, one that fits in a CPU's cache and one that does not. The CPU sizes keep a default
# calibration within ~15 s on two cores; the CUDA ones are big enough to fill a GPU, yet fit a 16 GB one.
PLANS = {
    "cpu": {
        "linear": [[1, 512, 768, 768], [1, 2048, 1024, 1024], [1, 4096, 2048, 2048]],  # b*s tokens, hidden
        "lora_down": [[1, 512, 768, 8], [1, 2048, 1024, 16], [1, 4096, 2048, 64]],  # tokens x h @ h x r
        "lora_up": [[1, 512, 8, 768], [1, 2048, 16, 1024], [1, 4096, 64, 2048]],  # tokens x r @ r x h
        "attention_scores": [[96, 128, 64, 128], [48, 512, 64, 512], [16, 1024, 128, 1024]],  # b*h, s, d, s
        "attention_values": [[96, 128, 128, 64], [48, 512, 512, 64], [16, 1024, 1024, 128]],  # b*h, s, s, d
        # the large elementwise sizes stream from memory but write under 32 MiB: bigger new tensors fault in
        # on first write (first_touch, added by the time model on its own), which would count twice
        "add": [[1024, 768], [6144, 1024]], "mul": [[1024, 768], [6144, 1024]],
        "softmax": [[96 * 128, 128], [12288, 512]],  # attention scores, b*h*s rows of s
        "layer_norm": [[1024, 768], [6144, 1024]], "gelu": [[1024, 3072], [2048, 3072]],  # the MLP's 4h
        "dropout": [[1024, 768], [6144, 1024]],
        "optimizer": [[8, 1 << 20], [1024, 256]],  # [tensors, elements each]: bytes-bound, then tensor-bound
        "copy_bytes": 256 * 1024**2, "overhead_ops": 200,
        # what calibrate_step times: backward kernels, the loss, the embedding's gradient, casts, fused
        # attention ([b*h, q, k, d]) and the optimizers' steps ([tensors, rows, cols])
        "softmax_backward": [[96 * 128, 128], [12288, 512]], "layer_norm_backward": [[1024, 768], [6144, 1024]],
        "gelu_backward": [[1024, 3072], [2048, 3072]], "copy": [[1024, 768], [6144, 1024]],
        "log_softmax": [[64, 32000], [128, 50257]], "log_softmax_backward": [[64, 32000], [128, 50257]],
        "embedding_backward": [[1024, 768, 30522], [4096, 1024, 50257]],  # [tokens, hidden, vocab]
        "attention": [[96, 128, 128, 64], [48, 512, 512, 64], [16, 1024, 1024, 64]],
        "optimizers": [[2, 4096, 2048], [128, 16, 16]],
        "first_touch": [8, 16, 32, 64],  # MiB: glibc's mmap threshold grows to at most 32 MiB on 64-bit
    },
    "cuda": {
        "linear": [[1, 4096, 1024, 1024], [1, 8192, 4096, 4096], [1, 16384, 8192, 8192]],
        "lora_down": [[1, 4096, 1024, 8], [1, 8192, 4096, 16], [1, 16384, 8192, 64]],
        "lora_up": [[1, 4096, 8, 1024], [1, 8192, 16, 4096], [1, 16384, 64, 8192]],
        "attention_scores": [[96, 512, 64, 512], [128, 1024, 128, 1024], [64, 2048, 128, 2048]],
        "attention_values": [[96, 512, 512, 64], [128, 1024, 1024, 128], [64, 2048, 2048, 128]],
        "add": [[8192, 1024], [32768, 4096]], "mul": [[8192, 1024], [32768, 4096]],
        "softmax": [[96 * 512, 512], [64 * 2048, 2048]],
        "layer_norm": [[8192, 1024], [32768, 4096]], "gelu": [[8192, 4096], [16384, 16384]],
        "dropout": [[8192, 1024], [32768, 4096]],
        "optimizer": [[16, 1 << 24], [4096, 256]],
        "copy_bytes": 1024**3, "overhead_ops": 1000,
        "softmax_backward": [[96 * 512, 512], [64 * 2048, 2048]],
        "layer_norm_backward": [[8192, 1024], [32768, 4096]], "gelu_backward": [[8192, 4096], [16384, 16384]],
        "copy": [[8192, 1024], [32768, 4096]],
        "log_softmax": [[512, 32000], [8192, 50257]], "log_softmax_backward": [[512, 32000], [8192, 50257]],
        "embedding_backward": [[4096, 1024, 30522], [16384, 4096, 50257]],
        "attention": [[96, 512, 512, 64], [128, 1024, 1024, 128], [64, 4096, 4096, 128]],
        "optimizers": [[16, 4096, 4096], [4096, 16, 16]], "first_touch": [],
    },
    # --quick: the same classes at sizes that take milliseconds (for tests and a first look; small shapes
    # sit in cache and under-use the cores, so these rates are low for matmuls and high for bandwidth)
    "quick": {
        "linear": [[1, 64, 128, 128], [1, 256, 256, 256]],
        "lora_down": [[1, 64, 128, 4], [1, 256, 256, 8]], "lora_up": [[1, 64, 4, 128], [1, 256, 8, 256]],
        "attention_scores": [[8, 32, 16, 32], [8, 64, 32, 64]],
        "attention_values": [[8, 32, 32, 16], [8, 64, 64, 32]],
        "add": [[64, 128], [256, 256]], "mul": [[64, 128], [256, 256]], "softmax": [[256, 32], [512, 64]],
        "layer_norm": [[64, 128], [256, 256]], "gelu": [[64, 512], [256, 1024]], "dropout": [[64, 128], [256, 256]],
        "optimizer": [[4, 1 << 14], [64, 16]],
        "copy_bytes": 8 * 1024**2, "overhead_ops": 50,
        "softmax_backward": [[256, 32], [512, 64]], "layer_norm_backward": [[64, 128], [256, 256]],
        "gelu_backward": [[64, 512], [256, 1024]], "copy": [[64, 128], [256, 256]],
        "log_softmax": [[64, 1000], [256, 4096]], "log_softmax_backward": [[64, 1000], [256, 4096]],
        "embedding_backward": [[64, 128, 1000], [256, 256, 4096]],
        "attention": [[8, 32, 32, 16], [8, 64, 64, 32]],
        "optimizers": [[4, 128, 128], [32, 16, 16]], "first_touch": [1, 4],
    },
}

GEMM_HOW = ("shapes are [batch, m, k, n]; FLOPs = 2*batch*m*k*n (a multiply and an add per term; a bias add is "
            "not counted); rate = FLOPs / seconds, in FLOP/s")
GEMM_CLASSES = {
    "square": "torch.mm(a, b, out=c): n x n @ n x n",
    "linear": "F.linear(x, w, bias), as nn.Linear runs on b*s tokens: tokens x h @ h x h",
    "lora_down": "F.linear(x, A), as PEFT's lora_A runs: tokens x h @ h x r, no bias",
    "lora_up": "F.linear(x, B), as PEFT's lora_B runs: tokens x r @ r x h, no bias",
    "attention_scores": "torch.matmul(q, k.transpose(1, 2)), as eager attention: b*h x (s x d @ d x s)",
    "attention_values": "torch.matmul(p, v), as eager attention: b*h x (s x s @ s x d)",
}
ELEMENTWISE_HOW = ("shapes are [rows, cols]; bytes = the tensors each op must read and write once (what a "
                   "fused kernel moves at least); rate = bytes / seconds, in B/s")
ELEMENTWISE_OPS = {
    "add": "torch.add(x, y): 2 tensors read, 1 written",
    "mul": "torch.mul(x, y): 2 tensors read, 1 written",
    "softmax": "F.softmax(x, dim=-1) on attention scores (b*h*s rows of s): 1 read, 1 written",
    "layer_norm": "F.layer_norm(x, (cols,), w, b): 1 read, 1 written (w, b, statistics not counted)",
    "gelu": "F.gelu(x) (erf, BERT's 'gelu') on the MLP's 4*h: 1 read, 1 written",
    "dropout": "F.dropout(x, 0.1, training=True): 1 read, 1 written + the mask (CPU: x's dtype; CUDA: 1 B)",
}


@dataclass
class Timer:
    """Times ops on one kind of device and remembers what it is timing (for the error message)."""

    torch: object
    kind: str  # cpu or cuda
    repeats: int
    min_sample: float = MIN_TIMED_S
    doing: str = "nothing yet"

    def device(self) -> str:
        return TENSOR_DEVICE[self.kind]

    def randn(self, *shape, dtype=None):
        # drawn in fp32, then cast: the same numbers in every dtype, and CPU randn is slow in half precision
        return self.torch.randn(*shape, device=self.device()).to(dtype or self.torch.float32)

    def seconds(self, op) -> float:
        """Seconds per call of ``op``: the fastest of ``repeats`` samples, after a warm-up call (which pays
        for first-touch page faults, BLAS thread start-up and CUDA kernel selection, and creates AdamW's
        state). The fastest, not the mean: load from elsewhere only ever slows a sample down."""
        sync = self.torch.cuda.synchronize if self.kind == "cuda" else (lambda: None)

        def timed(calls: int) -> float:
            sync()  # CUDA runs asynchronously: wait for what is queued before and after the calls
            start = time.perf_counter()
            for _ in range(calls):
                op()
            sync()
            return time.perf_counter() - start

        once = timed(1)  # warm-up, and a guess at how many calls make a sample long enough to time
        calls = max(1, min(1000, math.ceil(self.min_sample / max(once, 1e-9))))
        return max(min(timed(calls) / calls for _ in range(self.repeats)), 1e-12)


def method(timer: Timer) -> str:
    """How every time in the profile was taken."""
    sync = "; between two torch.cuda.synchronize calls" if timer.kind == "cuda" else ""
    return (f"seconds per call: the fastest of {timer.repeats} samples after a warm-up call; a sample repeats the "
            f"op until it lasts >= {timer.min_sample * 1000:g} ms{sync}; inputs from torch.randn, cast to the "
            "dtype named; forward kernels on inputs needing no gradient, backward kernels called directly as "
            "autograd calls them (attention's backward: forward + backward less forward)")


def gemm_rates(timer: Timer, dtypes: dict, plan: dict, square: list[int]) -> dict:
    """FLOP/s of each GEMM shape class at each of its sizes, per dtype label (``dtypes``: label -> dtype)."""
    classes = {}
    for name, how in GEMM_CLASSES.items():
        shapes = [[1, n, n, n] for n in square] if name == "square" else plan[name]
        flops = [2 * b * m * k * n for b, m, k, n in shapes]
        rates = {}
        for label, dtype in dtypes.items():
            rates[label] = []
            for shape, work in zip(shapes, flops):
                timer.doing = f"{label} {name} matmul {'x'.join(map(str, shape))}"
                rates[label].append(work / timer.seconds(_gemm_op(timer, name, dtype, *shape)))
        classes[name] = {"how": how, "shapes": shapes, "flops": flops, "rate": rates}
    return {"how": GEMM_HOW, "classes": classes}


def _gemm_op(timer: Timer, name: str, dtype, batch: int, m: int, k: int, n: int):
    torch, randn = timer.torch, timer.randn
    functional = torch.nn.functional
    if name == "square":
        a, b = randn(m, k, dtype=dtype), randn(k, n, dtype=dtype)
        out = torch.empty(m, n, device=timer.device(), dtype=dtype)
        return lambda: torch.mm(a, b, out=out)
    if name in ("linear", "lora_down", "lora_up"):
        # nn.Linear keeps its weight as out_features x in_features and computes x @ w.T (+ bias)
        x, w = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype)
        bias = randn(n, dtype=dtype) if name == "linear" else None  # PEFT's lora_A and lora_B have none
        return lambda: functional.linear(x, w, bias)
    if name == "attention_scores":
        q, key = randn(batch, m, k, dtype=dtype), randn(batch, n, k, dtype=dtype)
        return lambda: torch.matmul(q, key.transpose(1, 2))  # k's transposed view, as eager attention passes it
    p, v = randn(batch, m, k, dtype=dtype), randn(batch, k, n, dtype=dtype)
    return lambda: torch.matmul(p, v)


def elementwise_rates(timer: Timer, dtypes: dict, plan: dict) -> dict:
    """Bytes/s of each elementwise op at each of its sizes, per dtype label."""
    ops = {}
    for name, how in ELEMENTWISE_OPS.items():
        shapes, moved, rates = plan[name], {}, {}
        for label, dtype in dtypes.items():
            moved[label], rates[label] = [], []
            for rows, cols in shapes:
                timer.doing = f"{label} {name} {rows}x{cols}"
                op, nbytes = _elementwise_op(timer, name, dtype, rows, cols)
                moved[label].append(nbytes)
                rates[label].append(nbytes / timer.seconds(op))
        ops[name] = {"how": how, "shapes": shapes, "bytes": moved, "rate": rates}
    return {"how": ELEMENTWISE_HOW, "ops": ops}


def _elementwise_op(timer: Timer, name: str, dtype, rows: int, cols: int):
    """The op to time and the bytes it must move."""
    torch = timer.torch
    functional = torch.nn.functional
    x = timer.randn(rows, cols, dtype=dtype)
    size = x.numel() * x.element_size()
    if name in ("add", "mul"):
        y = timer.randn(rows, cols, dtype=dtype)
        return (lambda: torch.add(x, y)) if name == "add" else (lambda: torch.mul(x, y)), 3 * size
    if name == "softmax":
        return lambda: functional.softmax(x, dim=-1), 2 * size
    if name == "layer_norm":
        weight, bias = timer.randn(cols, dtype=dtype), timer.randn(cols, dtype=dtype)
        return lambda: functional.layer_norm(x, (cols,), weight, bias), 2 * size
    if name == "gelu":
        return lambda: functional.gelu(x), 2 * size
    # dropout: a CPU builds a noise tensor in x's dtype; CUDA's fused kernel writes a bool mask
    mask = x.numel() * (x.element_size() if timer.kind == "cpu" else 1)
    return lambda: functional.dropout(x, 0.1, training=True), 2 * size + mask


def copy_bandwidth(timer: Timer, nbytes: int) -> float:
    """Bytes read + written per second by a copy of ``nbytes`` (fp32)."""
    timer.doing = f"a copy of {nbytes} bytes"
    source = timer.torch.ones(max(nbytes // 4, 1), device=timer.device())
    target = timer.torch.empty_like(source)
    return 2 * source.nbytes / timer.seconds(lambda: target.copy_(source))  # every byte read once, written once


def per_op_overhead(timer: Timer, ops: int) -> dict:
    """Seconds per dispatched op when the op does (almost) no work: adds on 1-element tensors, ``ops`` to a call
    so the loop, not the timer, dominates. It holds Python's call, torch's dispatch and (CUDA) the launch."""
    timer.doing = "the per-op overhead"
    a, b = timer.torch.ones(1, device=timer.device()), timer.torch.ones(1, device=timer.device())

    def many():
        for _ in range(ops):
            timer.torch.add(a, b)

    return {"how": f"torch.add on two 1-element fp32 tensors, {ops} in a Python loop per call; seconds per add",
            "ops": ops, "seconds": timer.seconds(many) / ops}


def adamw_step(timer: Timer, runs: list[list[int]]) -> dict:
    """One torch.optim.AdamW step (torch's default implementation) over fp32 parameters, timed for each
    [tensors, elements each] run; the two runs (one bytes-bound, one tensor-count-bound) are solved for
    seconds = per_byte * state bytes + per_tensor * tensors."""
    torch = timer.torch
    measured = []
    for tensors, elements in runs:
        timer.doing = f"an AdamW step over {tensors} tensors of {elements} elements"
        params = [torch.zeros(elements, device=timer.device(), requires_grad=True) for _ in range(tensors)]
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer = torch.optim.AdamW(params, lr=1e-3)  # foreach=None: torch picks, as a user's run does
        # model state per parameter: the weight, its gradient, exp_avg and exp_avg_sq, 4 bytes each
        measured.append({"tensors": tensors, "elements": elements, "state_bytes": 16 * tensors * elements,
                         "seconds": timer.seconds(optimizer.step)})
    per_byte, per_tensor = _split(measured)
    return {"how": ("torch.optim.AdamW(lr=1e-3).step() on fp32 parameters; state = 16 B a parameter (weight, "
                    "gradient, exp_avg, exp_avg_sq); seconds = per_byte x state + per_tensor x tensors, solved "
                    "from the runs"),
            "implementation": _implementation(torch, params), "per_byte": per_byte, "per_tensor": per_tensor,
            "runs": measured}


def _split(runs: list[dict]) -> tuple[float, float]:
    """Solve the two runs' times for a cost per state byte and per tensor. Timing noise can make the 2 x 2
    solution non-positive; then each cost is its own run's time divided by what dominates that run."""
    (a, b), (c, d) = [(r["state_bytes"], r["tensors"]) for r in runs]
    t1, t2 = runs[0]["seconds"], runs[1]["seconds"]
    det = a * d - b * c
    per_byte, per_tensor = ((t1 * d - b * t2) / det, (a * t2 - c * t1) / det) if det else (0.0, 0.0)
    if per_byte <= 0 or per_tensor <= 0:
        per_byte, per_tensor = t1 / a, t2 / d
    return per_byte, per_tensor


def _implementation(torch, params) -> str:
    """Which AdamW implementation torch's default picks for these tensors (foreach on CUDA, a per-tensor
    loop on a CPU in torch 2.x): the private helper torch itself calls, so guarded."""
    try:
        from torch.optim.optimizer import _default_to_fused_or_foreach

        _fused, foreach = _default_to_fused_or_foreach(params, False, False)
    except (ImportError, TypeError, ValueError, AttributeError):
        return "torch's default"
    return "foreach" if foreach else "for-loop (one tensor at a time)"
