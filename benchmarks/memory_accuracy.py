"""Predicted (replayed) vs traced peak memory of a training step on real catalog sizes.

    python benchmarks/memory_accuracy.py [--quick]

Each row runs one fake-tensor training step (``paramcalc trace``) and the analytic replay
(``paramcalc.activations.simulate``) for the same step, and prints both peaks and the relative error;
the last lines give the median and the largest error. Full fine-tuning in fp32 and bf16 autocast over
three shapes; then, at 8 x 256 in bf16, LoRA, LoRA with gradient checkpointing, prompt tuning, full
fine-tuning with checkpointing, with the fused sdpa kernel (attention dropout 0) and with eager attention
where transformers builds sdpa; last, long sequences where the masks and position biases a model makes
once per forward weigh most. AdamW throughout.
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
# (label, peft, step options) at 8 x 256, bf16 autocast
VARIANTS = [("lora r=8", "lora:r=8", {}), ("lora r=8 +ckpt", "lora:r=8", {"grad_checkpointing": True}),
            ("prompt 20", "prompt:tokens=20", {}), ("full +ckpt", None, {"grad_checkpointing": True}),
            ("full sdpa", None, {"attention": "sdpa"}), ("full eager", None, {"attention": "eager"})]
SDPA = ("bert", "roberta", "gpt2", "t5")  # the families transformers builds with sdpa
# (model, task, peft, step): 512 tokens, eager causal masks kept by checkpointed layers, T5's position biases
LONG = [("t5-small", "seq2seq-lm", None, Step(batch=2, seq=512)),
        ("t5-small", "seq2seq-lm", "lora:r=8", Step(batch=2, seq=512, mixed_precision="bf16")),
        ("t5-small", "seq2seq-lm", None, Step(batch=2, seq=512, attention="eager", grad_checkpointing=True)),
        ("gpt2", "causal-lm", None, Step(batch=2, seq=512, attention="eager", grad_checkpointing=True)),
        ("bloom-560m", "causal-lm", "lora:r=8", Step(batch=1, seq=512, mixed_precision="bf16")),
        ("bloom-560m", "causal-lm", None, Step(batch=2, seq=512, grad_checkpointing=True))]


def main(quick: bool) -> None:
    errors = []
    print(f"{'model':18} {'task':11} {'method':15} {'batch x seq':>11} {'precision':>9} {'predicted':>15} "
          f"{'traced':>15} {'error':>7}")

    def row(result, model, task, label, step):
        predicted, traced = simulate(result, step).peak, trace_step(result, step).peak
        error = (predicted - traced) / traced
        errors.append(abs(error))
        precision = step.mixed_precision or step.dtype
        print(f"{model:18} {task:11} {label:15} {f'{step.batch} x {step.seq}':>11} {precision:>9} {predicted:>15,} "
              f"{traced:>15,} {error:>+7.2%}", flush=True)

    for model, task in MODELS:
        result = paramcalc.count(model, task=task, formulas=False)
        for batch, seq in SHAPES[:2] if quick else SHAPES:
            for precision in ("fp32", "bf16"):
                row(result, model, task, "full", Step(batch=batch, seq=seq,
                                                      mixed_precision=None if precision == "fp32" else "bf16"))
        for label, peft, options in VARIANTS[:2] if quick else VARIANTS:
            if options.get("attention") and result.family not in SDPA:
                continue
            tuned = paramcalc.count(model, task=task, peft=peft, formulas=False) if peft else result
            if label == "full sdpa":  # without attention dropout torch runs its fused CPU kernel
                key = {"t5": "dropout_rate", "gpt2": "attn_pdrop"}.get(result.family, "attention_probs_dropout_prob")
                tuned = paramcalc.count(model, task=task, formulas=False, overrides={key: 0.0})
            row(tuned, model, task, label, Step(batch=8, seq=256, mixed_precision="bf16", **options))
    for model, task, peft, step in [] if quick else LONG:
        label = " ".join(filter(None, [peft and peft.replace(":", " "), step.attention if step.attention != "auto"
                                       else "", "+ckpt" if step.grad_checkpointing else ""])) or "full"
        row(paramcalc.count(model, task=task, peft=peft, formulas=False), model, task, label, step)
    print(f"median |error| {statistics.median(errors):.2%}, max |error| {max(errors):.2%} over {len(errors)} steps")


if __name__ == "__main__":
    main("--quick" in sys.argv)
