"""Predicted (``paramcalc MODEL --infer``) vs measured inference memory of real ``model.generate()`` runs on this CPU.

    python benchmarks/inference_accuracy.py [--quick]

Each row builds the model with random weights, generates greedily (cache on, min_new_tokens = max_new_tokens, after
one warm-up call) and measures it with torch's allocator events (``paramcalc.measure_inference``): the weights, the
KV cache's tensors when generate returns, the peak of the prefill (up to the first new token) and of the last
decode step. Rows: tiny GPT-2 and BLOOM in fp32 (both kernels GPT-2 has), bf16 and fp16, int8 and nf4 bases; tiny
Llama, Qwen2 and Mistral (grouped-query, sdpa and eager, Mistral's sliding window crossed by the prompt and during
decode, Llama in bf16), then gpt2 and bloom-560m. Error is (predicted - measured) / measured; "beyond weights" is the same error of the peak less
the weights (the cache, activations and token ids alone). Writes ``benchmarks/results/inference_cpu.json`` (every
row, whole) and ``benchmarks/results/inference_cpu.md`` (the table), and prints the table.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
from pathlib import Path

import paramcalc
from paramcalc.inference import Inference, infer
from paramcalc.measure_inference import measure_generate

RESULTS = Path(__file__).parent / "results"
GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 300, "n_positions": 512}
BLOOM = {"model_type": "bloom", "n_layer": 2, "hidden_size": 64, "n_head": 4, "vocab_size": 300}
# bitsandbytes' CPU kernels repack 4-bit weights in blocks of 64 per row: a width of 128
GPT2_Q = {**GPT2, "n_embd": 128, "vocab_size": 1000}
BLOOM_Q = {**BLOOM, "hidden_size": 128, "vocab_size": 1000}
# grouped-query decoders: 4 query heads on 2 K/V heads; Mistral's default 4,096-position window makes its cache layers
# sliding ones, and a 32-position window is crossed by the prompt (sdpa then gets a mask) or during decode
LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300, "max_position_embeddings": 512}
QWEN2 = {**LLAMA, "model_type": "qwen2"}
MISTRAL = {**LLAMA, "model_type": "mistral"}
MISTRAL_W = {**MISTRAL, "sliding_window": 32}
# (label, model, quant, inference)
ROWS = [
    ("gpt2-tiny", GPT2, None, Inference(batch=2, context=48, new_tokens=3)),
    ("gpt2-tiny", GPT2, None, Inference(batch=1, context=40, new_tokens=4, attention="eager")),
    ("gpt2-tiny", GPT2, None, Inference(batch=4, context=256, new_tokens=8)),
    ("bloom-tiny", BLOOM, None, Inference(batch=2, context=48, new_tokens=3)),
    ("bloom-tiny", BLOOM, None, Inference(batch=1, context=64, new_tokens=2)),
    ("bloom-tiny", BLOOM, None, Inference(batch=4, context=256, new_tokens=8)),
    ("gpt2-tiny", GPT2, None, Inference(batch=2, context=200, new_tokens=3, dtype="bf16")),
    ("bloom-tiny", BLOOM, None, Inference(batch=2, context=200, new_tokens=3, dtype="bf16")),
    ("gpt2-tiny", GPT2, None, Inference(batch=2, context=200, new_tokens=3, dtype="fp16")),
    ("gpt2-tiny", GPT2, None, Inference(batch=1, context=40, new_tokens=4, attention="eager", dtype="fp16")),
    ("bloom-tiny", BLOOM, None, Inference(batch=2, context=48, new_tokens=3, dtype="fp16")),
    ("gpt2-tiny-128", GPT2_Q, "int8", Inference(batch=2, context=64, new_tokens=3)),
    ("bloom-tiny-128", BLOOM_Q, "int8", Inference(batch=2, context=64, new_tokens=3)),
    ("gpt2-tiny-128", GPT2_Q, "nf4", Inference(batch=2, context=64, new_tokens=3)),
    ("bloom-tiny-128", BLOOM_Q, "nf4", Inference(batch=2, context=64, new_tokens=3)),
    ("llama-tiny", LLAMA, None, Inference(batch=2, context=48, new_tokens=3)),
    ("llama-tiny", LLAMA, None, Inference(batch=1, context=40, new_tokens=4, attention="eager")),
    ("llama-tiny", LLAMA, None, Inference(batch=4, context=256, new_tokens=8)),
    ("llama-tiny", LLAMA, None, Inference(batch=2, context=200, new_tokens=3, dtype="bf16")),
    ("llama-tiny", LLAMA, None, Inference(batch=1, context=40, new_tokens=4, attention="eager", dtype="bf16")),
    ("llama-tiny", LLAMA, None, Inference(batch=2, context=200, new_tokens=3, dtype="fp16")),
    ("qwen2-tiny", QWEN2, None, Inference(batch=2, context=48, new_tokens=3)),
    ("qwen2-tiny", QWEN2, None, Inference(batch=3, context=24, new_tokens=6, attention="eager")),
    ("mistral-tiny", MISTRAL, None, Inference(batch=2, context=48, new_tokens=3)),
    ("mistral-tiny", MISTRAL, None, Inference(batch=2, context=48, new_tokens=3, attention="eager")),
    ("mistral-tiny", MISTRAL, None, Inference(batch=2, context=48, new_tokens=3, dtype="bf16")),
    ("mistral-tiny", MISTRAL, None, Inference(batch=2, context=48, new_tokens=3, attention="eager", dtype="bf16")),
    ("mistral-tiny-w32", MISTRAL_W, None, Inference(batch=2, context=200, new_tokens=3)),
    ("mistral-tiny-w32", MISTRAL_W, None, Inference(batch=2, context=20, new_tokens=16, attention="eager")),
    ("gpt2", "gpt2", None, Inference(batch=4, context=256, new_tokens=8)),
    ("gpt2", "gpt2", None, Inference(batch=4, context=256, new_tokens=8, dtype="bf16")),
    ("bloom-560m", "bloom-560m", None, Inference(batch=1, context=256, new_tokens=4)),
    ("bloom-560m", "bloom-560m", None, Inference(batch=2, context=512, new_tokens=4, dtype="bf16")),
]
QUICK = (0, 3, 15, 16, 23, 27)


def _error(predicted: int, measured: int) -> float:
    return (predicted - measured) / measured


def main(quick: bool, only: list[int] | None = None) -> None:
    import torch
    import transformers

    header = ("| model | weights | attention | batch x context + new | KV cache (B) | prefill peak: predicted / measured "
              "(B) | error | beyond weights | decode peak: predicted / measured (B) | error | beyond weights |")
    lines = [header, "|" + "---|" * 11]
    print(header, flush=True)
    reports, errors = [], []
    for index in only or (QUICK if quick else range(len(ROWS))):
        label, model, quant, run = ROWS[index]
        result = paramcalc.count(model, task="causal-lm", formulas=False, quant=quant)
        if quant:
            run = Inference(run.batch, run.context, run.new_tokens, result.quant.options.dtype, attention=run.attention)
        planned, measured = infer(result, run), measure_generate(result, run)
        kv = f"{planned.kv_cache:,}" + (" (exact)" if planned.kv_cache == measured.kv_cache else
                                        f" / {measured.kv_cache:,} measured")
        cells = [label, f"{quant} ({run.dtype})" if quant else run.dtype, planned.inference.attention,
                 f"{run.batch} x {run.context} + {run.new_tokens}", kv]
        for phase, real in (("prefill", measured.peak_prefill), ("decode", measured.peak_last_decode)):
            predicted = getattr(planned, phase)["peak"]
            error = _error(predicted, real)
            errors.append(abs(error))
            cells += [f"{predicted:,} / {real:,}", f"{error:+.2%}",
                      f"{_error(predicted - planned.weights, real - measured.weights):+.2%}"]
        line = "| " + " | ".join(cells) + " |"
        lines.append(line)
        print(line, flush=True)
        reports.append({"label": label, "quant": quant, "inference": planned.to_dict(), "measured": measured.to_dict(),
                        "weights_exact": planned.weights == measured.weights})
    summary = (f"peaks: median |error| {statistics.median(errors):.2%}, largest {max(errors):.2%} over {len(errors)} "
               f"peaks ({len(reports)} runs); KV cache exact in {sum(r['inference']['kv_cache'] == r['measured']['kv_cache'] for r in reports)} "
               f"of {len(reports)}")
    print(summary)
    if only:  # a check of some rows: the committed results stay whole
        return
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
               f"transformers {transformers.__version__}")
    RESULTS.mkdir(exist_ok=True)
    command = "python benchmarks/inference_accuracy.py" + (" --quick" if quick else "")
    (RESULTS / "inference_cpu.md").write_text(f"`{command}` ({machine})\n\n" + "\n".join(lines) + f"\n\n{summary}\n")
    (RESULTS / "inference_cpu.json").write_text(json.dumps({"machine": machine, "rows": reports}, indent=1) + "\n")


if __name__ == "__main__":
    main("--quick" in sys.argv, [int(a) for a in sys.argv[1:] if a.isdigit()])
