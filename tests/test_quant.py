"""--quant against bitsandbytes itself: small random models really quantized on the CPU.

Checks which weights transformers quantizes, the bytes each component is stored in, the
sum(p.numel()) people see, and what peft's get_nb_trainable_parameters reports (with LoRA on top).
"""

import warnings

import pytest

import paramcalc

bnb = pytest.importorskip("bitsandbytes")


def quantized_model(result):
    """The real model, as paramcalc.quantized builds it (seeded random weights, quantized on load)."""
    from paramcalc.quantized import build_quantized_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_quantized_model(result)


SHRINK = {  # small sizes, odd on purpose: a 4-bit weight with an odd count is printed one larger
    "bert-base-uncased": {"num_hidden_layers": 2, "hidden_size": 15, "num_attention_heads": 3,
                          "intermediate_size": 33, "vocab_size": 101},
    "roberta-base": {"num_hidden_layers": 1, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 40,
                     "vocab_size": 120},
    "gpt2": {"n_layer": 2, "n_embd": 21, "n_head": 3, "vocab_size": 97, "n_positions": 32},
    "bloom-560m": {"n_layer": 2, "hidden_size": 15, "n_head": 3, "vocab_size": 111},
    "t5-small": {"num_layers": 2, "d_model": 15, "num_heads": 3, "d_kv": 5, "d_ff": 33, "vocab_size": 99},
    "t5-v1_1-small": {"num_layers": 1, "num_decoder_layers": 2, "d_model": 16, "num_heads": 2, "d_kv": 8,
                      "d_ff": 24, "vocab_size": 64},
}
CASES = [
    ("bert-base-uncased", "seq-cls", "nf4"),
    ("bert-base-uncased", "masked-lm", "fp4,double_quant=true"),
    ("roberta-base", "seq-cls", "int8"),
    ("gpt2", "seq-cls", "nf4,double_quant=true"),
    ("gpt2", "causal-lm", "int8"),
    ("bloom-560m", "token-cls", "fp4"),
    ("t5-small", "seq2seq-lm", "nf4"),
    ("t5-v1_1-small", "seq-cls", "nf4,double_quant=true"),
    # T5's wo stays an unquantized Linear, fp32 when the rest loads in fp16 (_keep_in_fp32_modules), bf16 in bf16
    ("t5-small", "seq2seq-lm", "nf4,dtype=fp16"),
    ("t5-v1_1-small", "seq2seq-lm", "int8,dtype=fp16"),
    ("t5-v1_1-small", "seq-cls", "fp4,dtype=bf16"),
    ("bloom-560m", "causal-lm", "nf4,dtype=fp16"),
]


@pytest.mark.parametrize(("model", "task", "spec"), CASES, ids=[f"{m}:{t}:{s}" for m, t, s in CASES])
def test_quantization_matches_bitsandbytes(model, task, spec):
    from paramcalc.quantized import stored_bytes  # a parameter's bytes with its quantization state

    result = paramcalc.count(model, task=task, overrides=SHRINK[model], quant=spec, formulas=False)
    real = quantized_model(result)
    parameters = dict(real.named_parameters())
    quantized_names = {n for n, p in parameters.items() if type(p).__name__ in ("Params4bit", "Int8Params")}

    from paramcalc.families import concrete_parameters

    expected = set()
    for component in result.components:
        names = concrete_parameters(component, result.values)
        if component.name in result.quant.quantized:
            expected |= {n for n in names if n.endswith(".weight")}
        assert sum(stored_bytes(parameters[n]) for n in names) == component.weight_bytes, component.name
        # quantized weights never train; everything else transformers loads trainable (biases included)
        assert all(parameters[n].requires_grad == component.trainable for n in names), component.name
    assert quantized_names == expected
    assert sum(p.numel() for p in real.parameters() if p.requires_grad) == result.trainable_params
    assert sum(p.numel() for p in real.parameters()) == result.quant.numel_sum
    assert stored_bytes(real) == result.quant.weight_bytes
    # transformers' num_parameters() doubles packed 4-bit tensors as peft does (one more per odd-sized weight)
    assert real.num_parameters() == result.quant.peft_print[1]


def test_peft_print_on_a_quantized_model_with_lora():
    import peft

    result = paramcalc.count("t5-small", task="seq2seq-lm", overrides=SHRINK["t5-small"], quant="nf4",
                             peft="lora:r=4", formulas=False)
    real = quantized_model(result)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(real, peft.LoraConfig(r=4, task_type="SEQ_2_SEQ_LM"))
    assert peft_model.get_nb_trainable_parameters() == result.quant.peft_print
    odd_weights = sum(1 for n, p in real.named_parameters()
                      if type(p).__name__ == "Params4bit" and (2 * p.numel()) != p.quant_state.shape.numel())
    assert result.quant.peft_print[1] == result.total_params + odd_weights  # one more per odd-sized weight


@pytest.mark.parametrize(("model", "task", "spec", "peft"), [
    ("t5-small", "seq2seq-lm", "nf4,dtype=fp16", "lora:r=4"), ("t5-small", "seq2seq-lm", "int8,dtype=fp16", "ia3"),
    ("bloom-560m", "causal-lm", "nf4,dtype=bf16", "lora:r=4"), ("gpt2", "causal-lm", "fp4,dtype=fp16", "lora:r=4")])
def test_weight_bytes_of_a_half_precision_quantized_model_with_peft(model, task, spec, peft):
    # peft's adapters stay fp32 on a half-precision base (autocast_adapter_dtype); T5's wo fp32 in fp16 (IA3
    # scales wo's input: its base layer keeps the dtype loading gave it)
    from paramcalc.quantized import stored_bytes
    from paramcalc.verify import apply_real_peft

    result = paramcalc.count(model, task=task, overrides=SHRINK[model], quant=spec, peft=peft, formulas=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = apply_real_peft(quantized_model(result), result)
    assert stored_bytes(real) == result.quant.weight_bytes


def test_real_count_is_unchanged_and_bytes_shrink():
    plain = paramcalc.count("bloom-560m", task="causal-lm")
    nf4 = paramcalc.count("bloom-560m", task="causal-lm", quant="nf4,dtype=bf16")
    assert nf4.total_params == plain.total_params
    # the 4-bit blocks: half a byte per weight plus a 4-byte absmax per 64 weights -> 0.5625 bytes per weight
    # without PEFT the quantized weight is frozen and its bias trains: two rows
    qkv = nf4.component("attention Q/K/V (query_key_value) weight")
    n = 1024 * 3 * 1024
    assert qkv.weight_bytes == 24 * ((n // 2) + 4 * (n // 64) + 64)
    assert nf4.component("attention Q/K/V (query_key_value) bias").weight_bytes == 24 * 3 * 1024 * 2


def test_a_model_without_quantizable_weights_is_refused():
    from paramcalc import families, quant

    result = paramcalc.count("gpt2", formulas=False)
    result.components = [c for c in result.components if c.kind not in ("linear", "conv1d")]
    with pytest.raises(paramcalc.ParamcalcError, match="no Linear or Conv1D weights"):
        quant.apply(result, quant.parse("nf4"), families.families()["gpt2"])


def test_lora_on_a_quantized_base_trains_only_the_adapters():
    from paramcalc.verify import apply_real_peft

    result = paramcalc.count("bloom-560m", task="causal-lm", overrides=SHRINK["bloom-560m"], quant="nf4",
                             peft="lora:r=4", formulas=False)
    real = apply_real_peft(quantized_model(result), result)
    trainable = sum(p.numel() for p in real.parameters() if p.requires_grad)
    # 2 layers * r * (15 + 45) for query_key_value's A and B = 480
    assert trainable == result.trainable_params == 2 * 4 * (15 + 3 * 15)


def test_a_quantized_head_cannot_be_a_trainable_copy():
    # BERT's classifier is quantized (its last parameter is a bias); peft's modules_to_save would copy it
    with pytest.raises(paramcalc.ParamcalcError, match="modules_to_save"):
        paramcalc.count("bert-base-uncased", task="seq-cls", quant="nf4", peft="lora:r=4", formulas=False)


def test_builder_loads_a_local_checkpoint(tmp_path):
    import torch

    from paramcalc.quantized import build_quantized_model

    result = paramcalc.count("gpt2", task="causal-lm", overrides=SHRINK["gpt2"], quant="int8", formulas=False)
    seeded = quantized_model(result)
    dense = paramcalc.count("gpt2", task="causal-lm", overrides=SHRINK["gpt2"], formulas=False)
    from paramcalc.meta import hf_config
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(hf_config(dense.config)).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = build_quantized_model(result, weights_dir=tmp_path)
    first = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(dict(loaded.named_parameters())[first], dict(seeded.named_parameters())[first])
    assert loaded.training and type(dict(loaded.named_parameters())[first]).__name__ == "Int8Params"
    with pytest.raises(paramcalc.ParamcalcError, match="no config.json"):
        build_quantized_model(result, weights_dir=tmp_path / "missing")
    with pytest.raises(paramcalc.ParamcalcError, match="needs a count with --quant"):
        build_quantized_model(dense)


@pytest.mark.parametrize("model,task", [("gpt2", "causal-lm"), ("bert-base-uncased", "seq-cls"),
                                        ("t5-small", "seq2seq-lm")])
def test_meta_model_frozen_as_loading_freezes_it_verifies(model, task):
    # --verify of a quantized count needs the meta model's quantized weights frozen, as from_pretrained does
    from paramcalc.meta import build_meta_model
    from paramcalc.quantized import freeze_quantized
    from paramcalc.verify import verify

    result = paramcalc.count(model, task=task, overrides=SHRINK[model], quant="nf4", formulas=False)
    meta = build_meta_model(result.config, class_name=result.hf_class)
    frozen = freeze_quantized(meta, result.quant.options)
    assert len(frozen) == sum(c.repeat_count for c in result.components if c.name in result.quant.quantized)
    assert verify(result, meta).ok


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_verify_a_quantized_count_without_peft(quant):
    """--verify freezes the weights from_pretrained would quantize, as the real loader does."""
    from paramcalc.verify import verify

    result = paramcalc.count("gpt2", task="causal-lm", quant=quant, formulas=False)
    verification = verify(result)
    assert verification.ok, verification.mismatches()
    assert result.trainable_params < result.total_params
