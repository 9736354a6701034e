"""What ``paramcalc calibrate`` times of a training step beyond its forward kernels, for the per-op time model.

- backward elementwise kernels (softmax, layer_norm, GELU), the LM loss's ``log_softmax`` and its backward,
  the embedding's dense gradient and a dtype cast, as more ``elementwise`` entries (same structure as
  ``paramcalc.calibrate_ops``: shapes [rows, cols], bytes read + written once, rate in B/s). The backward
  kernels are the aten ops autograd itself calls, called directly on random inputs;
- ``attention``: the fused kernel, ``F.scaled_dot_product_attention`` forward, and its backward as
  (forward + backward) - forward, in seconds per call beside the FLOPs torch's counter gives each;
- ``optimizers``: one step of each optimizer paramcalc trains with (built by ``runtime.make_optimizer``, as
  ``paramcalc train`` builds it), as seconds per parameter element plus seconds per tensor.

torch comes in through the ``Timer``; transformers and bitsandbytes are imported only to time their optimizers.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

from .calibrate_ops import Timer, _implementation, _split

STEP_OPS = {
    "softmax_backward": "aten._softmax_backward_data(grad, out, -1, dtype), softmax's backward as autograd calls "
                        "it: reads out and grad, writes grad_in: 3 tensors",
    "layer_norm_backward": "aten.native_layer_norm_backward(grad, x, (cols,), mean, rstd, w, b, [True]*3), weight "
                           "and bias grads included: x, grad_out, grad_in counted (3 tensors; w, b, their grads "
                           "and the statistics not)",
    "gelu_backward": "aten.gelu_backward(grad, x) (erf): reads grad and x, writes grad_in: 3 tensors",
    "log_softmax": "F.log_softmax(x, dim=-1) on [tokens, vocab] logits, as the LM loss runs it: 1 read, 1 written; "
                   "timed in fp32 only (transformers' loss upcasts the logits) and stored under every dtype",
    "log_softmax_backward": "aten._log_softmax_backward_data(grad, out, -1, fp32), the LM loss's backward: reads "
                            "out and grad, writes grad_in: 3 tensors; fp32 only, stored under every dtype",
    "embedding_backward": "aten.embedding_dense_backward(grad, ids, vocab, -1, False): [tokens, hidden] grads "
                          "summed into a dense [vocab, hidden] weight gradient; bytes = vocab*hidden (the "
                          "gradient zeroed and written) + 2*tokens*hidden (ids not counted)",
    "copy": "aten._to_copy(x, dtype) from fp32, what x.to(dtype) runs: in fp32 a plain copy (4 + 4 B an "
            "element), in a half dtype the cast autocast makes (4 + 2 B): read once, written once",
}
FP32_ONLY = ("log_softmax", "log_softmax_backward")  # the loss runs in fp32 whatever the model's dtype

ATTENTION_HOW = ("F.scaled_dot_product_attention(q, k, v), no mask, dropout or causal masking, on [1, b*h, s, d] "
                 "inputs that require grad, as in training; shapes are [b*h, q, k, d]; forward: seconds per call, "
                 "autograd recording; backward: torch.autograd.grad(forward) less the forward; FLOPs as torch's "
                 "counter (and paramcalc trace) counts them: 4*b*h*q*k*d forward, 10*b*h*q*k*d backward (the "
                 "scores recomputed); backend: the kernel torch's dispatcher picks, per dtype")

MIN_8BIT = (64, 64)  # bitsandbytes keeps 32-bit state for tensors under 4096 elements (min_8bit_size)
OPTIMIZERS = {
    "adamw": "torch.optim.AdamW(params, lr=1e-3)",
    "adam": "torch.optim.Adam(params, lr=1e-3)",
    "sgd": "torch.optim.SGD(params, lr=1e-3) (no momentum: no state)",
    "sgd-momentum": "torch.optim.SGD(params, lr=1e-3, momentum=0.9)",
    "adafactor": "transformers.optimization.Adafactor(params, lr=1e-3, relative_step=False, scale_parameter="
                 "False): 2-D parameters keep factored (row and column) second moments",
    "adamw-8bit": "bitsandbytes.optim.AdamW8bit(params, lr=1e-3): blockwise 8-bit state for tensors of at least "
                  "4096 elements, so both runs use such tensors (the tensor-bound one a quarter as many, of 64x64; "
                  "smaller tensors keep 32-bit state and are not timed)",
}
OPTIMIZERS_HOW = ("one .step() on fp32 2-D parameters [rows, cols] with random gradients, the optimizer built as "
                  "paramcalc train builds it (runtime.make_optimizer), after a warm-up step that creates its "
                  "state; seconds = per_element x elements + per_tensor x tensors, solved from a bytes-bound run "
                  "and a tensor-count-bound run")


def elementwise_rates(timer: Timer, dtypes: dict, plan: dict) -> dict:
    """The step's extra elementwise entries (``STEP_OPS``), per dtype label; fp32-only ops repeat the fp32
    figures under the other labels."""
    ops = {}
    for name, how in STEP_OPS.items():
        shapes, moved, rates = plan[name], {}, {}
        for label, dtype in dtypes.items():
            if name in FP32_ONLY and label != "fp32":  # "fp32" is always the first label
                moved[label], rates[label] = list(moved["fp32"]), list(rates["fp32"])
                continue
            moved[label], rates[label] = [], []
            for shape in shapes:
                timer.doing = f"{label} {name} {'x'.join(map(str, shape))}"
                op, nbytes = _step_op(timer, name, dtype, shape)
                moved[label].append(nbytes)
                rates[label].append(nbytes / timer.seconds(op))
        ops[name] = {"how": how, "shapes": [shape[:2] for shape in shapes], "bytes": moved, "rate": rates}
        if name == "embedding_backward":
            ops[name]["vocab"] = [shape[2] for shape in shapes]
    return ops


def _step_op(timer: Timer, name: str, dtype, shape: list[int]):
    """The op to time and the bytes it must move."""
    torch = timer.torch
    aten, functional = torch.ops.aten, torch.nn.functional
    if name == "embedding_backward":
        tokens, hidden, vocab = shape
        grad = timer.randn(tokens, hidden, dtype=dtype)
        ids = torch.randint(0, vocab, (tokens,), device=timer.device())
        return (lambda: aten.embedding_dense_backward(grad, ids, vocab, -1, False),
                (vocab * hidden + 2 * tokens * hidden) * grad.element_size())
    rows, cols = shape
    if name == "copy":
        source = timer.randn(rows, cols)
        width = torch.empty((), dtype=dtype).element_size()
        return lambda: aten._to_copy(source, dtype=dtype), source.nbytes + source.numel() * width
    dtype = torch.float32 if name in FP32_ONLY else dtype
    x = timer.randn(rows, cols, dtype=dtype)
    size = x.nbytes
    if name == "log_softmax":
        return lambda: functional.log_softmax(x, dim=-1), 2 * size
    if name in ("softmax_backward", "log_softmax_backward"):
        grad = x  # the forward's input doubles as the incoming gradient: one random tensor fewer to draw
        if name == "softmax_backward":
            out, backward = aten._softmax(x, -1, False), aten._softmax_backward_data
        else:
            out, backward = aten._log_softmax(x, -1, False), aten._log_softmax_backward_data
        return lambda: backward(grad, out, -1, dtype), 3 * size
    grad = timer.randn(rows, cols, dtype=dtype)
    if name == "layer_norm_backward":
        weight, bias = timer.randn(cols, dtype=dtype), timer.randn(cols, dtype=dtype)
        _, mean, rstd = aten.native_layer_norm(x, [cols], weight, bias, 1e-5)
        return (lambda: aten.native_layer_norm_backward(grad, x, [cols], mean, rstd, weight, bias,
                                                         [True, True, True]), 3 * size)
    return lambda: aten.gelu_backward(grad, x), 3 * size  # gelu_backward


def attention_times(timer: Timer, dtypes: dict, plan: dict) -> dict:
    """Seconds per call of the fused attention kernel, forward and backward, at each [b*h, q, k, d] shape."""
    torch = timer.torch
    sdpa = torch.nn.functional.scaled_dot_product_attention
    shapes = plan["attention"]
    forward, backward, backend = {}, {}, {}
    for label, dtype in dtypes.items():
        forward[label], backward[label] = [], []
        for heads, q, k, d in shapes:
            timer.doing = f"{label} attention {heads}x{q}x{k}x{d}"
            query = timer.randn(1, heads, q, d, dtype=dtype).requires_grad_()
            key = timer.randn(1, heads, k, d, dtype=dtype).requires_grad_()
            value = timer.randn(1, heads, k, d, dtype=dtype).requires_grad_()
            grad = timer.randn(1, heads, q, d, dtype=dtype)
            with torch.enable_grad():
                alone = timer.seconds(lambda: sdpa(query, key, value))
                both = timer.seconds(lambda: torch.autograd.grad(sdpa(query, key, value), (query, key, value), grad))
            forward[label].append(alone)
            backward[label].append(max(both - alone, 1e-12))  # noise could make a tiny shape's difference <= 0
        backend[label] = _sdpa_backend(torch, query, key, value)
    return {"how": ATTENTION_HOW, "shapes": shapes,
            "flops_forward": [4 * h * q * k * d for h, q, k, d in shapes],
            "flops_backward": [10 * h * q * k * d for h, q, k, d in shapes],
            "forward": forward, "backward": backward, "backend": backend}


def _sdpa_backend(torch, query, key, value) -> str:
    """The kernel torch's dispatcher picks for these inputs (flash_attention, efficient_attention, math, ...):
    a private helper, so guarded."""
    try:
        from torch.nn.attention import SDPBackend

        return SDPBackend(torch._fused_sdp_choice(query, key, value)).name.lower()
    except (ImportError, AttributeError, RuntimeError, TypeError, ValueError):
        return "unknown"


def optimizer_steps(timer: Timer, plan: dict) -> tuple[dict, dict]:
    """(optimizers, missing): per optimizer name its per_element and per_tensor seconds; missing says why an
    optional one (the 8-bit AdamW, which needs bitsandbytes) was not measured."""
    from .runtime import make_optimizer

    found, missing = {}, {}
    for name, how in OPTIMIZERS.items():
        runs = [list(run) for run in plan["optimizers"]]
        if name == "adamw-8bit":  # a quarter as many tensors: each 8-bit update is a few slow calls on a CPU
            runs[1] = [max(runs[1][0] // 4, 1), *MIN_8BIT]
        try:
            measured, implementation = _optimizer_runs(timer, make_optimizer, name, runs)
        except Exception as exc:  # noqa: BLE001  (bitsandbytes fails in many ways where it cannot run)
            if name != "adamw-8bit":
                raise
            missing[name] = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            continue
        per_element, per_tensor = _split([{**run, "state_bytes": run["tensors"] * run["elements"]}
                                          for run in measured])
        found[name] = {"how": f"{how}; {OPTIMIZERS_HOW}", "implementation": implementation,
                       "per_element": per_element, "per_tensor": per_tensor, "runs": measured}
    return found, missing


def _optimizer_runs(timer: Timer, make_optimizer, name: str, runs: list[list[int]]):
    torch = timer.torch
    measured = []
    for tensors, rows, cols in runs:
        timer.doing = f"a {name} step over {tensors} tensors of {rows}x{cols}"
        params = [torch.zeros(rows, cols, device=timer.device(), requires_grad=True) for _ in range(tensors)]
        for p in params:
            p.grad = torch.randn_like(p)
        with _quiet():
            optimizer = make_optimizer(name, params, 1e-3)
        measured.append({"tensors": tensors, "shape": [rows, cols], "elements": rows * cols,
                         "seconds": timer.seconds(optimizer.step)})
        implementation = _describe(torch, name, params)
        del optimizer, params, p  # free this run's parameters and state before the next run allocates its own
    return measured, implementation


def _describe(torch, name: str, params) -> str:
    if name == "adafactor":
        return "transformers' Adafactor: a Python loop over the tensors"
    if name == "adamw-8bit":
        import bitsandbytes

        return f"bitsandbytes {bitsandbytes.__version__}, one blockwise 8-bit kernel per tensor"
    return _implementation(torch, params)


@contextlib.contextmanager
def _quiet():
    """bitsandbytes logs a warning on import where an optional CPU kernel package is missing; it says nothing
    about the optimizer, so it stays off the calibrate table."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


FIRST_TOUCH_HOW = ("seconds to fill a freshly allocated fp32 tensor (torch.empty(n).fill_) less a fill of one "
                   "allocated before, at each size; 'threshold': the smallest size at which the fresh one takes "
                   "over twice as long (the C library hands allocations that large straight to the OS, whose "
                   "new pages fault in on first write, every time); 'rate': bytes / the extra seconds there")


def first_touch(timer: Timer, sizes_mib: list[int]) -> dict:
    """What a step pays, on a CPU, for each large tensor it allocates: pages the OS maps in on first write.
    CUDA's caching allocator reuses its blocks, so a GPU profile has no threshold."""
    torch = timer.torch
    if timer.kind != "cpu":
        return {"how": "CUDA's caching allocator reuses freed blocks: no first-touch cost", "threshold": None,
                "rate": None, "runs": []}
    runs, threshold, rate = [], None, None
    for mib in sizes_mib:
        elements = mib * 1024**2 // 4
        timer.doing = f"filling a fresh {mib} MiB tensor"
        kept = torch.empty(elements)
        warm = timer.seconds(lambda: kept.fill_(1.0))
        fresh = timer.seconds(lambda: torch.empty(elements).fill_(1.0))
        del kept
        runs.append({"mib": mib, "warm_s": warm, "fresh_s": fresh})
        if threshold is None and fresh > 2 * warm:
            threshold, rate = mib * 1024**2, mib * 1024**2 / (fresh - warm)
    return {"how": FIRST_TOUCH_HOW, "threshold": threshold, "rate": rate, "runs": runs}
