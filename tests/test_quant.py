"""--quant against bitsandbytes itself: small random models really quantized on the CPU.

Checks which weights transformers quantizes, the bytes each component is stored in, the
sum(p.numel()) people see, and what peft's get_nb_trainable_parameters reports (with LoRA on top).
"""

import warnings

import pytest

import paramcalc

bnb = pytest.importorskip("bitsandbytes")


def quantized_model(result, options, tmp_path):
    import torch
    import transformers

    from paramcalc.meta import hf_config

    torch.manual_seed(0)
    config = hf_config(result.config)
    model = getattr(transformers, result.hf_class)(config)
    model.save_pretrained(tmp_path)
    if options.type == "int8":
        bnb_config = transformers.BitsAndBytesConfig(load_in_8bit=True)
    else:
        bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=options.type,
                                                     bnb_4bit_use_double_quant=options.double_quant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, result.hf_class).from_pretrained(tmp_path, quantization_config=bnb_config,
                                                                      device_map="cpu", dtype=torch.float32)


def stored_bytes(parameter) -> int:
    """Every tensor bitsandbytes keeps for one parameter."""
    total = parameter.numel() * parameter.element_size()
    state = getattr(parameter, "quant_state", None)
    if state is not None:
        total += sum(t.numel() * t.element_size() for t in (state.absmax, state.code))
        if state.nested:
            total += sum(t.numel() * t.element_size() for t in (state.state2.absmax, state.state2.code, state.offset))
    scale = getattr(parameter, "SCB", None)
    if scale is not None:
        total += scale.numel() * scale.element_size()
    return total


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
]


@pytest.mark.parametrize(("model", "task", "spec"), CASES, ids=[f"{m}:{t}:{s}" for m, t, s in CASES])
def test_quantization_matches_bitsandbytes(model, task, spec, tmp_path):
    result = paramcalc.count(model, task=task, overrides=SHRINK[model], quant=spec, formulas=False)
    real = quantized_model(result, result.quant.options, tmp_path)
    parameters = dict(real.named_parameters())
    quantized_names = {n for n, p in parameters.items() if type(p).__name__ in ("Params4bit", "Int8Params")}

    from paramcalc.families import concrete_parameters

    expected = set()
    for component in result.components:
        names = concrete_parameters(component, result.values)
        if component.name in result.quant.quantized:
            expected |= {n for n in names if n.endswith(".weight")}
        assert sum(stored_bytes(parameters[n]) for n in names) == component.weight_bytes, component.name
    assert quantized_names == expected
    assert sum(p.numel() for p in real.parameters()) == result.quant.numel_sum
    # transformers' num_parameters() doubles packed 4-bit tensors as peft does (one more per odd-sized weight)
    assert real.num_parameters() == result.quant.peft_print[1]


def test_peft_print_on_a_quantized_model_with_lora(tmp_path):
    import peft

    result = paramcalc.count("t5-small", task="seq2seq-lm", overrides=SHRINK["t5-small"], quant="nf4",
                             peft="lora:r=4", formulas=False)
    real = quantized_model(result, result.quant.options, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = peft.get_peft_model(real, peft.LoraConfig(r=4, task_type="SEQ_2_SEQ_LM"))
    assert peft_model.get_nb_trainable_parameters() == result.quant.peft_print
    odd_weights = sum(1 for n, p in real.named_parameters()
                      if type(p).__name__ == "Params4bit" and (2 * p.numel()) != p.quant_state.shape.numel())
    assert result.quant.peft_print[1] == result.total_params + odd_weights  # one more per odd-sized weight


def test_real_count_is_unchanged_and_bytes_shrink():
    plain = paramcalc.count("bloom-560m", task="causal-lm")
    nf4 = paramcalc.count("bloom-560m", task="causal-lm", quant="nf4,dtype=bf16")
    assert nf4.total_params == plain.total_params
    # the 4-bit blocks: half a byte per weight plus a 4-byte absmax per 64 weights -> 0.5625 bytes per weight
    qkv = nf4.component("attention Q/K/V (query_key_value)")
    n = 1024 * 3 * 1024
    assert qkv.weight_bytes == 24 * ((n // 2) + 4 * (n // 64) + 64 + 3 * 1024 * 2)


def test_a_model_without_quantizable_weights_is_refused():
    from paramcalc import families, quant

    result = paramcalc.count("gpt2", formulas=False)
    result.components = [c for c in result.components if c.kind not in ("linear", "conv1d")]
    with pytest.raises(paramcalc.ParamcalcError, match="no Linear or Conv1D weights"):
        quant.apply(result, quant.parse("nf4"), families.families()["gpt2"])
