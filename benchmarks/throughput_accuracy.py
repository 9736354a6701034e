"""Predicted vs measured step time of real CPU training steps, on the calibrated CPU profile.

    python benchmarks/throughput_accuracy.py [--quick] [--saved]

Calibrates this CPU again right before each row (a shared machine's speed drifts within minutes),
into a temporary profile folder; ``--saved`` uses the ``cpu`` profile ``paramcalc calibrate`` saved.
Each row trains a small BERT / GPT-2 config (random weights, fp32, AdamW, eager attention) for a few
real steps on this CPU and compares the median step time with ``paramcalc.plan.plan(..., device="cpu")``.
Absolute times depend on the machine and its load; the ratio measured / predicted is the figure to read.
The plan's time is FLOPs / matmul rate + model-state bytes / bandwidth; the measured step is split
the same way: the time inside matmul kernels (a few more steps, timed op by op), and the rest
(elementwise ops, softmax, layer norm, the loss, the optimizer, Python); ``optim`` is optimizer.step().
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import paramcalc
from paramcalc.calibrate import calibrate, save_profile
from paramcalc.plan import _load_calibration, plan
from paramcalc.step import Step

BERT = {"model_type": "bert", "hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
        "intermediate_size": 1024, "vocab_size": 30522, "max_position_embeddings": 512}
GPT2 = {"model_type": "gpt2", "n_embd": 256, "n_layer": 4, "n_head": 4, "vocab_size": 50257, "n_positions": 1024}
BERT_WIDE = {**BERT, "hidden_size": 512, "num_attention_heads": 8, "intermediate_size": 2048}
MODELS = [("bert-4x256", BERT, "seq-cls"), ("gpt2-4x256", GPT2, "causal-lm"), ("bert-4x512", BERT_WIDE, "seq-cls")]
SHAPES = [(4, 128), (16, 128), (4, 512)]
WARMUP, TIMED, MATMUL_TIMED = 2, 5, 3
MATMULS = ("mm", "addmm", "bmm", "baddbmm")  # the aten ops FlopCounterMode counts FLOPs for, as paramcalc does


def _matmul_timer():
    """Seconds spent inside matmul kernels while active (backward runs on this thread on a CPU)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    kernels = {getattr(torch.ops.aten, name).default for name in MATMULS}

    class MatmulTimer(TorchDispatchMode):
        seconds = 0.0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func not in kernels:
                return func(*args, **(kwargs or {}))
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            self.seconds += time.perf_counter() - start
            return out

    return MatmulTimer()


def _model_and_inputs(result, batch: int, seq: int):
    import torch
    import transformers

    from paramcalc.meta import hf_config

    hf = hf_config(result.config)
    hf._attn_implementation = "eager"  # the plan's default step
    model = getattr(transformers, result.hf_class)(hf)
    ids = torch.randint(0, hf.vocab_size, (batch, seq))
    labels = ids if result.task == "causal-lm" else torch.randint(0, 2, (batch,))
    return model.train(), {"input_ids": ids, "labels": labels}


def measure(result, batch: int, seq: int) -> dict:
    """Median seconds of a whole step and of its optimizer.step(), then of the matmuls in a few more steps
    (timed apart: the timer's per-op overhead would slow the steps it watches)."""
    import torch

    torch.manual_seed(0)
    model, inputs = _model_and_inputs(result, batch, seq)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # torch's default implementation on a CPU

    def one_step() -> tuple[float, float]:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        middle = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        return end - start, end - middle

    for _ in range(WARMUP):
        one_step()
    steps, updates = zip(*(one_step() for _ in range(TIMED)))
    matmuls = []
    for _ in range(MATMUL_TIMED):
        with _matmul_timer() as timer:
            one_step()
        matmuls.append(timer.seconds)
    return {"step_s": statistics.median(steps), "optimizer_s": statistics.median(updates),
            "matmul_s": statistics.median(matmuls)}


def main(quick: bool, use_saved: bool) -> None:
    if use_saved:
        saved = _load_calibration("cpu")
        if saved is None:
            sys.exit("no saved cpu profile: run 'paramcalc calibrate' first, or drop --saved")
        print(f"saved cpu profile ({saved['when']}): fp32 {saved['fp32'] / 1e9:.1f} GFLOP/s, "
              f"bandwidth {saved['bandwidth'] / 1e9:.1f} GB/s, {saved.get('threads', '?')} threads")
    else:  # keep the user's own profile as it is
        os.environ["PARAMCALC_CACHE_DIR"] = tempfile.mkdtemp(prefix="paramcalc-bench-")
        print("calibrating this CPU again before each row: a shared machine's speed drifts within minutes")
    print(f"{'model':10} {'task':9} {'b x s':>6} {'GFLOP':>6} {'GFLOP/s':>7} | {'predicted':>9} = {'flops':>6} + "
          f"{'bytes':>6} | {'measured':>8} = {'matmul':>6} + {'rest':>6} ({'optim':>5}) | {'ratio':>5} {'matmul':>6}")
    ratios, matmul_ratios, rest_shares = [], [], []
    for label, config, task in MODELS[:2] if quick else MODELS:
        result = paramcalc.count(config, task=task, formulas=False)
        for batch, seq in SHAPES[:2] if quick else SHAPES:
            if not use_saved:
                save_profile(calibrate())
            step = Step(batch=batch, seq=seq)
            predicted = plan(result, step, device="cpu")
            compute_s = predicted.flops["total"] / predicted.profile.flops_per_s
            step_s = predicted.throughput["step_s"]
            measured = measure(result, batch, seq)
            ratio = measured["step_s"] / step_s
            matmul_s = min(measured["matmul_s"], measured["step_s"])
            rest_s = measured["step_s"] - matmul_s
            ratios.append(ratio)
            matmul_ratios.append(matmul_s / compute_s)
            rest_shares.append(rest_s / measured["step_s"])
            print(f"{label:10} {task:9} {f'{batch}x{seq}':>6} {predicted.flops['total'] / 1e9:>6.1f} "
                  f"{predicted.profile.flops_per_s / 1e9:>7.0f} | "
                  f"{step_s:>8.3f}s = {compute_s:>5.3f}s + {step_s - compute_s:>5.3f}s | "
                  f"{measured['step_s']:>7.3f}s = {matmul_s:>5.3f}s + {rest_s:>5.3f}s ({measured['optimizer_s']:>.3f}) | "
                  f"{ratio:>5.2f} {matmul_s / compute_s:>6.2f}", flush=True)
    print(f"measured / predicted step time: median {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f} - {max(ratios):.2f}) over {len(ratios)} steps")
    print(f"measured matmul time / predicted FLOPs time: median {statistics.median(matmul_ratios):.2f}; "
          f"time outside matmuls: median {statistics.median(rest_shares):.0%} of the step")


if __name__ == "__main__":
    main("--quick" in sys.argv, "--saved" in sys.argv)
