"""Inference memory (``paramcalc MODEL --infer``) against real ``model.generate()`` runs on a CPU.

The judge: tiny GPT-2, BLOOM, Llama, Qwen2 and Mistral with random weights generate greedily (cache on, min_new_tokens = max_new_tokens),
measured by torch's allocator events (``paramcalc.measure_inference``). The KV cache must equal the cache's tensors
byte for byte; the prefill and decode peaks, and what they hold beyond the weights, must be within 5 %.
"""

import dataclasses
import json

import pytest
from click.testing import CliRunner

import paramcalc
from paramcalc import families as families_module
from paramcalc.cli import main
from paramcalc.errors import ParamcalcError
from paramcalc.inference import Inference, fit_batch, fit_context, infer

TOLERANCE = 0.05
GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 300, "n_positions": 128}
BLOOM = {"model_type": "bloom", "n_layer": 2, "hidden_size": 64, "n_head": 4, "vocab_size": 300}
LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 300, "max_position_embeddings": 128}

# (config, inference, --quant): the default kernels (sdpa for GPT-2, eager for BLOOM), GPT-2's eager attention
# (b x heads x q x k scores), one sequence (BLOOM's q is then a view of the fused projection), an int8 base
CASES = [
    (GPT2, Inference(batch=2, context=48, new_tokens=3), None),
    (GPT2, Inference(batch=1, context=40, new_tokens=4, attention="eager"), None),
    (BLOOM, Inference(batch=2, context=48, new_tokens=3), None),
    (BLOOM, Inference(batch=1, context=64, new_tokens=2), None),
    (GPT2, Inference(batch=2, context=32, new_tokens=3), "int8"),
    # grouped-query decoders (4 query heads on 2 K/V heads), sdpa and eager (repeat_kv's copies): the cache update
    # rebinds k and v, so the projected ones die before the kernel runs
    (LLAMA, Inference(batch=2, context=48, new_tokens=3), None),
    (LLAMA, Inference(batch=1, context=40, new_tokens=4, attention="eager"), None),
    (LLAMA, Inference(batch=3, context=24, new_tokens=6, attention="eager"), None),
    # Qwen2Config has no end-of-sequence token: generate runs no logits processor
    ({**LLAMA, "model_type": "qwen2"}, Inference(batch=2, context=48, new_tokens=3), None),
    ({**LLAMA, "model_type": "qwen2"}, Inference(batch=1, context=40, new_tokens=4, attention="eager"), None),
    # Mistral's 4,096-position window (MistralConfig's default) makes every cache layer a sliding one: a decode
    # step frees the old keys and values only once both new ones exist
    ({**LLAMA, "model_type": "mistral"}, Inference(batch=2, context=48, new_tokens=3), None),
    ({**LLAMA, "model_type": "mistral"}, Inference(batch=2, context=48, new_tokens=2, attention="eager"), None),
    # past a 32-position window the layers keep a window's worth (decode crosses it in the second)
    ({**LLAMA, "model_type": "mistral", "sliding_window": 32}, Inference(batch=2, context=20, new_tokens=16), None),
    ({**LLAMA, "model_type": "mistral", "sliding_window": 32},
     Inference(batch=2, context=48, new_tokens=4, attention="eager"), None),
    # half precision on a CPU: oneDNN's matmul scratchpad (bf16 on AMX, fp16 through fp32 buffers) and, in bf16,
    # the fused attention's packed keys and values, alive while each call runs
    (GPT2, Inference(batch=2, context=100, new_tokens=3, dtype="fp16"), None),
    (GPT2, Inference(batch=1, context=40, new_tokens=4, attention="eager", dtype="fp16"), None),
    (GPT2, Inference(batch=2, context=100, new_tokens=3, dtype="bf16"), None),
    (BLOOM, Inference(batch=2, context=100, new_tokens=3, dtype="bf16"), None),
    (BLOOM, Inference(batch=2, context=48, new_tokens=3, dtype="fp16"), None),
    (LLAMA, Inference(batch=2, context=100, new_tokens=3, dtype="bf16"), None),
    (LLAMA, Inference(batch=1, context=40, new_tokens=4, attention="eager", dtype="bf16"), None),
    (LLAMA, Inference(batch=2, context=100, new_tokens=3, dtype="fp16"), None),
    ({**LLAMA, "model_type": "mistral"}, Inference(batch=2, context=48, new_tokens=3, dtype="bf16"), None),
    ({**LLAMA, "model_type": "mistral"}, Inference(batch=2, context=48, new_tokens=3, attention="eager",
                                                  dtype="bf16"), None),
]


def _relative(predicted: int, measured: int) -> float:
    return (predicted - measured) / measured


@pytest.mark.parametrize("config, run, quant", CASES,
                         ids=[f"{c['model_type']}-{r.batch}x{r.context}+{r.new_tokens}-{r.attention}-{q or r.dtype}"
                              for c, r, q in CASES])
def test_generate_matches_the_prediction(config, run, quant):
    if quant:
        pytest.importorskip("bitsandbytes")
    from paramcalc.measure_inference import measure_generate

    result = paramcalc.count(config, task="causal-lm", formulas=False, quant=quant)
    planned, measured = infer(result, run), measure_generate(result, run)
    assert planned.weights == measured.weights
    # the cache holds the prompt and every new token but the last, keys and values per layer, exactly (a sliding
    # layer shows the last window - 1 of them)
    window = config.get("sliding_window", 4096 if config["model_type"] == "mistral" else None)
    shown = run.context + run.new_tokens - 1
    assert [shape[2] for shape in measured.kv_shapes] == [min(shown, window - 1) if window else shown] * 2
    assert planned.kv_cache == measured.kv_cache
    for phase, real in (("prefill", measured.peak_prefill), ("decode", measured.peak_last_decode)):
        predicted = getattr(planned, phase)["peak"]
        assert abs(_relative(predicted, real)) <= TOLERANCE, (phase, predicted, real)
        # what the peak holds beyond the weights (cache, activations, token ids) on its own, so that the weights
        # cannot hide an error in the rest
        beyond = _relative(predicted - planned.weights, real - measured.weights)
        assert abs(beyond) <= TOLERANCE, (phase, predicted, real)


def test_generate_keeps_logits_of_the_last_position_only():
    """The prefill's logits are b x 1 x V (the walk assumes it): generate passes logits_to_keep=1 to models whose
    forward takes it, as GPT-2's and BLOOM's do in the installed transformers."""
    from paramcalc.meta import build_meta_model

    for config in (GPT2, BLOOM):
        assert build_meta_model(config, task="causal-lm")._supports_logits_to_keep()


def test_kv_cache_formula_shows_the_numbers():
    result = paramcalc.count("gpt2", task="causal-lm", formulas=False)
    planned = infer(result, Inference(batch=1, context=1000, new_tokens=16))
    # 2 (keys, values) x 12 layers x 1 sequence x (1000 + 16 - 1) positions x 12 heads x 64 x 4 B = 74,833,920
    assert planned.kv_cache == 74_833_920
    assert planned.kv_formula.endswith("= 2 x 12 x 1 x 1,015 x 12 x 64 x 4")
    assert planned.inference.attention == "sdpa"
    bloom = paramcalc.count("bloom-560m", task="causal-lm", formulas=False)
    half = infer(bloom, Inference(batch=4, context=2048, new_tokens=64, dtype="bf16"))
    # 2 x 24 layers x 4 x 2,111 x 16 heads x 64 x 2 B = 830,078,976; an fp8 cache holds half
    assert half.kv_cache == 830_078_976
    assert infer(bloom, Inference(batch=4, context=2048, new_tokens=64, dtype="bf16", kv_dtype="fp8")).kv_cache \
        == 830_078_976 // 2


def test_peaks_add_up_their_terms():
    result = paramcalc.count("gpt2", task="causal-lm", formulas=False)
    planned = infer(result, Inference(batch=4, context=512, new_tokens=8, dtype="fp16"), device="t4")
    for at in (planned.prefill, planned.decode):
        assert at["peak"] == at["weights"] + at["kv_cache"] + at["activations"] + at["overhead"]
    assert planned.prefill["kv_cache"] == 2 * 12 * 4 * 512 * 12 * 64 * 2  # the prompt's cache
    assert planned.decode["kv_cache"] == planned.kv_cache  # the full cache
    assert planned.prefill["overhead"] == 2**29  # CUDA's context, as the training plan assumes
    assert planned.fits() is True
    one = infer(result, Inference(batch=1, context=64))
    assert one.decode is None and one.kv_cache == 2 * 12 * 64 * 12 * 64 * 4  # one new token: no decode step


def test_grouped_query_attention_reads_kv_heads_and_head_dim(monkeypatch):
    """A family whose [[attention]] says kv_heads (Llama's, when its file describes its attention): the cache has
    the K/V heads' width, and without a [flow] the peaks are weights + cache, said to be a lower bound."""
    found = dict(families_module.families())
    core = {"part": "decoder", "repeat": "L", "heads": "A", "kv_heads": "KV", "head_dim": "D", "q_len": "s",
            "k_len": "s", "kv_cache": True}
    found["llama"] = dataclasses.replace(found["llama"], attention=(core,), flow={})
    monkeypatch.setattr(families_module, "families", lambda: found)
    result = paramcalc.count("tinyllama-1.1b", task="causal-lm", formulas=False)
    planned = infer(result, Inference(batch=1, context=2048, dtype="fp16"))
    # 2 x 22 layers x 1 x 2,048 x 4 K/V heads x 64 x 2 B = 46,137,344 (32 query heads would be 8 times more)
    assert planned.kv_cache == 46_137_344
    assert planned.prefill["peak"] == planned.weights + planned.kv_cache and planned.prefill["activations"] is None
    assert any("lower bound" in note for note in planned.notes)


def test_fit_context_and_fit_batch_find_the_edge():
    result = paramcalc.count("gpt2", task="causal-lm", formulas=False)
    run = Inference(batch=32, context=1, new_tokens=16, dtype="fp16")
    longest = fit_context(result, run, device_mem="1GiB")
    best = longest.fit["best"]
    assert longest.peak <= 2**30 < infer(result, dataclasses.replace(run, context=best + 1), device_mem="1GiB").peak
    widest = fit_batch(result, dataclasses.replace(run, context=256), device_mem="1GiB")
    batch = widest.fit["best"]
    assert widest.peak <= 2**30 < infer(result, dataclasses.replace(run, batch=batch + 1, context=256),
                                        device_mem="1GiB").peak
    # GPT-2's 1,024 learned positions bound the search: 1,024 + 1 - 16 new tokens
    assert fit_context(result, run, device="h100-80gb").fit["best"] == 1009
    with pytest.raises(ParamcalcError, match="device's memory"):
        fit_context(result, run)  # this CPU: no memory to fit


def test_cli_table_and_json():
    runner = CliRunner()
    shown = runner.invoke(main, ["gpt2", "--infer", "--batch", "2", "--context", "64", "--new-tokens", "4"],
                          env={"COLUMNS": "200"})
    assert shown.exit_code == 0, shown.output
    assert "2 x 12 x 2 x 67 x 12 x 64 x 4" in shown.output and "decode peak" in shown.output
    document = json.loads(runner.invoke(main, ["gpt2", "--infer", "--context", "64", "--json"]).output)
    assert document["task"] == "causal-lm"  # generate() runs the LM head
    inference = document["inference"]
    assert {"weights", "kv_cache", "activations", "peak_prefill", "peak_decode"} <= set(inference)
    assert inference["kv_cache"] == 2 * 12 * 64 * 12 * 64 * 4 and inference["peak_decode"] is None


@pytest.mark.parametrize("args, says", [
    (["bert-base-uncased", "--infer", "--context", "8"], "encoder-only"),
    (["t5-small", "--infer", "--context", "8"], "encoder-decoder"),
    (["gpt2", "--infer", "--context", "1020", "--new-tokens", "10"], "use --context 1015 or less"),
    (["gpt2", "--infer", "--context", "64", "--fit-context"], "device's memory"),
    (["gpt2", "--infer"], "--context N"),
    (["gpt2", "--context", "64"], "add --infer"),
    (["gpt2", "--infer", "--context", "64", "--seq", "64"], "--seq describes a training step"),
    (["gpt2", "--infer", "--context", "64", "--task", "seq-cls"], "causal LM head"),
    (["gpt2", "--infer", "--context", "64", "--lora", "r=8"], "base model"),
    (["gpt2", "--infer", "--context", "0"], "positive integer"),
    (["bloom-560m", "--infer", "--context", "64", "--attention", "sdpa"], "eager attention only"),
])
def test_bad_input_is_one_line_and_exit_2(args, says):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert says in result.output and len(result.output.strip().splitlines()) == 1


def test_mixtral_kv_cache_is_exact_and_its_peaks_replayed_or_a_lower_bound():
    """Mixtral's KV cache is exact; where its family file describes the mixture of experts' flow the walk replays
    it (paramcalc.moe over b x q tokens, nothing kept for backward) and is held to 5 %, else the peaks are weights +
    cache, said to be a lower bound, and a real generate() stays above them."""
    from paramcalc.measure_inference import measure_generate

    config = {**LLAMA, "model_type": "mixtral", "num_local_experts": 4, "num_experts_per_tok": 2}
    result = paramcalc.count(config, task="causal-lm", formulas=False)
    run = Inference(batch=2, context=48, new_tokens=3)
    planned, measured = infer(result, run), measure_generate(result, run)
    assert planned.kv_cache == measured.kv_cache
    for phase, real in (("prefill", measured.peak_prefill), ("decode", measured.peak_last_decode)):
        predicted = getattr(planned, phase)["peak"]
        if any("lower bound" in note for note in planned.notes):
            assert predicted <= real
        else:
            assert abs(_relative(predicted - planned.weights, real - measured.weights)) <= TOLERANCE, (phase, real)


def test_sliding_window_layers_keep_a_window():
    """DynamicSlidingWindowLayer keeps a view of the last window - 1 positions of a tensor one position longer
    (after the prefill: of the whole prompt); generate asks the config which layers slide."""
    mistral = paramcalc.count({**LLAMA, "model_type": "mistral", "sliding_window": 32}, task="causal-lm",
                              formulas=False)
    # 2 x 2 layers x 1 x min(20 + 16 - 1, 32) x 2 K/V heads x 16 x 4 B = 16,384
    planned = infer(mistral, Inference(batch=1, context=20, new_tokens=16))
    assert planned.kv_cache == 16_384 and planned.kv_formula.endswith("= 2 x 2 x 1 x 32 x 2 x 16 x 4")
    # one new token: only the prefill ran, and it keeps the whole 48-position prompt: 2 x 2 x 1 x 48 x 2 x 16 x 4
    assert infer(mistral, Inference(batch=1, context=48, new_tokens=1)).kv_cache == 24_576
    qwen2 = paramcalc.count({**LLAMA, "model_type": "qwen2", "use_sliding_window": True, "sliding_window": 32,
                             "max_window_layers": 1}, task="causal-lm", formulas=False)
    # layer 0 full (35 positions), layer 1 from max_window_layers on slides (32): 2 x 1 x 1 x (35 + 32) x 2 x 16 x 4
    assert infer(qwen2, Inference(batch=1, context=20, new_tokens=16)).kv_cache == 17_152
    # Qwen2's released configs say use_sliding_window false: every layer full
    plain = paramcalc.count({**LLAMA, "model_type": "qwen2", "sliding_window": 32}, task="causal-lm", formulas=False)
    assert infer(plain, Inference(batch=1, context=20, new_tokens=16)).kv_cache == 2 * 2 * 35 * 2 * 16 * 4


def test_half_precision_scratch_rules_match_measured_bytes():
    """oneDNN's matmul scratchpad and the fused attention's bf16 packs, as measured with allocator events (torch
    2.13, 2 threads, an AMX / AVX512-FP16 Xeon): exact where the rule is, nothing for fp32 or tiny products."""
    from paramcalc.inference_generate import flash_packs, matmul_scratch

    assert matmul_scratch(2, 64, 64, "bf16", 2) == 14_336  # measured 13,952 (the 2nd thread's buffer shares 384 B)
    assert matmul_scratch(400, 256, 64, "bf16", 2) == 75_776  # measured 75,392
    assert matmul_scratch(2, 64, 64, "fp16", 2) == 36_608
    assert matmul_scratch(400, 64, 64, "fp16", 2) == 239_360
    assert matmul_scratch(200, 16, 201, "fp16", 2, batch=8) == 137_984
    assert matmul_scratch(1, 768, 768, "fp16", 2, gemv=True) == 0  # torch's own fp16 gemv
    assert matmul_scratch(2, 64, 32, "bf16", 2) == 0  # 2 x 64 x 32 = 16^3: not handed to oneDNN
    assert matmul_scratch(400, 64, 64, "fp32", 2) == 0
    assert flash_packs(2, 2, 200, 200, 16, "bf16", 2) == [25_600, 25_600, 12_800]
    assert flash_packs(1, 2, 1000, 1000, 16, "bf16", 2) == [64_000, 64_000, 32_768]
    assert flash_packs(2, 2, 63, 63, 16, "bf16", 2) == [] and flash_packs(2, 2, 200, 200, 16, "fp16", 2) == []
