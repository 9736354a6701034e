"""Predicted (replayed) vs traced peak memory of a training step on real catalog sizes.

    python benchmarks/memory_accuracy.py [--quick]

Each row runs one fake-tensor training step (``paramcalc trace``) and the analytic replay
(``paramcalc.activations.simulate``) for the same step, and prints both peaks and the relative error;
the last lines give the median and the largest error. fp32 and bf16 autocast, AdamW, eager attention.
"""

import statistics
import sys

import paramcalc
from paramcalc.activations import simulate
from paramcalc.step import Step
from paramcalc.trace import trace_step

MODELS = [("bert-base-uncased", "seq-cls"), ("roberta-base", "seq-cls"), ("t5-small", "seq2seq-lm"),
          ("gpt2", "causal-lm"), ("bloom-560m", "causal-lm")]
SHAPES = [(1, 128), (8, 128), (4, 512)]


def main(quick: bool) -> None:
    errors = []
    print(f"{'model':18} {'task':11} {'batch x seq':>11} {'precision':>9} {'predicted':>15} {'traced':>15} {'error':>7}")
    for model, task in MODELS:
        result = paramcalc.count(model, task=task, formulas=False)
        for batch, seq in SHAPES[:2] if quick else SHAPES:
            for precision in ("fp32", "bf16"):
                step = Step(batch=batch, seq=seq, mixed_precision=None if precision == "fp32" else "bf16")
                predicted, traced = simulate(result, step).peak, trace_step(result, step).peak
                error = (predicted - traced) / traced
                errors.append(abs(error))
                print(f"{model:18} {task:11} {f'{batch} x {seq}':>11} {precision:>9} {predicted:>15,} {traced:>15,} "
                      f"{error:>+7.2%}", flush=True)
    print(f"median |error| {statistics.median(errors):.2%}, max |error| {max(errors):.2%} over {len(errors)} steps")


if __name__ == "__main__":
    main("--quick" in sys.argv)
