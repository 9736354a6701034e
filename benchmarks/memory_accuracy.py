"""Predicted (replayed) vs traced peak memory of a training step on real catalog sizes.

    python benchmarks/memory_accuracy.py [--quick] [--out benchmarks/results/memory_accuracy_cpu.md]

Each row runs one fake-tensor training step (``paramcalc trace``) and the analytic replay
(``paramcalc.activations.simulate``) for the same step, and prints both peaks and the relative error;
the last lines give the median and the largest error. Full fine-tuning in fp32 and bf16 autocast over
three shapes; then, at 8 x 256 in bf16, LoRA, LoRA with gradient checkpointing, prompt tuning, full
fine-tuning with checkpointing, with the fused sdpa kernel (attention dropout 0) and with eager attention
where transformers builds sdpa; last, long sequences where the masks and position biases a model makes
once per forward weigh most. AdamW throughout.

The grouped-query decoders (Llama, Mistral, Qwen2: small configs, 4 layers x 256, 8 query heads sharing 2 K/V
heads) are judged by real CPU steps instead (``paramcalc train``: allocator-level memory), as the fake-tensor
trace over-counts a checkpointed step whose sdpa reads the K/V heads as they are (enable_gqa) by about 3 %.
"""

import gc
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


# Small grouped-query configs (a 32,000-token vocabulary, as Llama's and Mistral's), judged by real CPU steps
GQA = {family: {"model_type": family, "num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 8,
                "num_key_value_heads": 2, "intermediate_size": 688, "vocab_size": 32000,
                "max_position_embeddings": 512}
       for family in ("llama", "mistral", "qwen2")}
# Mixtral: the same decoder with 8 experts of width 688, 2 per token (peft has no default LoRA targets for it)
GQA["mixtral"] = {**GQA["mistral"], "model_type": "mixtral", "num_local_experts": 8, "num_experts_per_tok": 2}
# (label, family, peft, quant, config overrides, step options) at 4 x 128
GQA_ROWS = [("full", "llama", None, None, {}, {}), ("full", "llama", None, None, {}, {"mixed_precision": "bf16"}),
            ("full eager", "llama", None, None, {}, {"attention": "eager"}),
            ("lora r=8", "llama", "lora:r=8", None, {}, {"mixed_precision": "bf16"}),
            ("lora r=8 +ckpt", "llama", "lora:r=8", None, {}, {"mixed_precision": "bf16", "grad_checkpointing": True}),
            ("full +ckpt", "llama", None, None, {}, {"grad_checkpointing": True}),
            ("Qnf4 lora r=8", "llama", "lora:r=8", "nf4", {}, {"mixed_precision": "bf16"}),
            ("prefix 16", "llama", "prefix:tokens=16", None, {}, {}),
            ("full", "mistral", None, None, {}, {"mixed_precision": "bf16"}),
            ("window 64", "mistral", None, None, {"sliding_window": 64}, {}),
            ("lora r=8 +ckpt", "mistral", "lora:r=8", None, {}, {"attention": "eager", "grad_checkpointing": True}),
            ("full", "qwen2", None, None, {}, {}),
            ("attn dropout", "qwen2", None, None, {"attention_dropout": 0.1}, {"mixed_precision": "bf16"}),
            ("lora r=8", "qwen2", "lora:r=8", None, {}, {"attention": "eager"}),
            ("full", "mixtral", None, None, {}, {}),
            ("full", "mixtral", None, None, {}, {"mixed_precision": "bf16"}),
            ("lora q,v +ckpt", "mixtral", "lora:r=8,targets=q_proj,v_proj", None, {}, {"grad_checkpointing": True}),
            ("lora all-linear", "mixtral", "lora:r=8,targets=all-linear", None, {}, {"mixed_precision": "bf16"}),
            ("Qnf4 lora q,v", "mixtral", "lora:r=8,targets=q_proj,v_proj", "nf4", {}, {"mixed_precision": "bf16"})]


def main(quick: bool, out: str | None = None, only: str | None = None) -> None:
    """``only``: the grouped-query rows of one family (``--only mixtral``), to re-judge them alone."""
    errors, lines = [], []

    def show(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    show(f"{'model':18} {'task':11} {'method':15} {'batch x seq':>11} {'precision':>9} {'predicted':>15} "
         f"{'traced / real':>15} {'error':>7}")

    def row(result, model, task, label, step, real=False):
        predicted = simulate(result, step).peak
        if real:
            from paramcalc.train import TrainOptions, train

            gc.collect()
            judged = train(result, step, TrainOptions(steps=2)).measured["memory"]["peak"]
        else:
            judged = trace_step(result, step).peak
        error = (predicted - judged) / judged
        errors.append(abs(error))
        precision = step.mixed_precision or step.dtype
        show(f"{model:18} {task:11} {label:15} {f'{step.batch} x {step.seq}':>11} {precision:>9} {predicted:>15,} "
             f"{judged:>13,} {'R' if real else 'T'} {error:>+7.2%}")

    for model, task in [] if only else MODELS:
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
    for model, task, peft, step in [] if quick or only else LONG:
        label = " ".join(filter(None, [peft and peft.replace(":", " "), step.attention if step.attention != "auto"
                                       else "", "+ckpt" if step.grad_checkpointing else ""])) or "full"
        row(paramcalc.count(model, task=task, peft=peft, formulas=False), model, task, label, step)
    for label, family, peft, quant, overrides, options in GQA_ROWS[::3] if quick else GQA_ROWS:
        if only and family != only:
            continue
        result = paramcalc.count({**GQA[family], **overrides}, task="causal-lm", peft=peft, quant=quant,
                                 formulas=False)
        row(result, f"{family}-4x256", "causal-lm", label, Step(batch=4, seq=128, **options), real=True)
    show(f"median |error| {statistics.median(errors):.2%}, max |error| {max(errors):.2%} over {len(errors)} steps "
         "(T: against a traced step, R: against a real CPU step)")
    if out:
        with open(out, "w") as handle:
            handle.write(f"`python benchmarks/memory_accuracy.py{' --quick' if quick else ''}`\n\n```\n"
                         + "\n".join(lines) + "\n```\n")


if __name__ == "__main__":
    main("--quick" in sys.argv, sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None,
         sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None)
