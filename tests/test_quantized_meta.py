"""A quantized model on the meta device, packed as loading packs it, and the bytes a model really stores.

``build_quantized_meta_model`` must give, without values and in about a second, the model
``build_quantized_model`` gives after a real random-weight build and bitsandbytes' quantization: the same
parameter names, types, shapes, dtypes and quantization state. ``stored_bytes`` must then read
``result.quant.weight_bytes`` off either one.
"""

import warnings

import pytest

import paramcalc

bnb = pytest.importorskip("bitsandbytes")

# Small sizes, odd on purpose: odd-sized 4-bit weights pack into ceil(n/2) bytes, absmax blocks are partial,
# and with hidden_size 45 no weight is a multiple of 64.
BLOOM = {"n_layer": 2, "hidden_size": 45, "n_head": 3, "vocab_size": 1000}
SMALL = {
    "bloom-560m": ("causal-lm", BLOOM),
    "gpt2": ("causal-lm", {"n_layer": 2, "n_embd": 21, "n_head": 3, "vocab_size": 97, "n_positions": 32}),
    "bert-base-uncased": ("seq-cls", {"num_hidden_layers": 2, "hidden_size": 15, "num_attention_heads": 3,
                                      "intermediate_size": 33, "vocab_size": 101}),
    "t5-small": ("seq2seq-lm", {"num_layers": 2, "d_model": 15, "num_heads": 3, "d_kv": 5, "d_ff": 33,
                                "vocab_size": 99}),
    # tie_word_embeddings: false: an lm_head of its own, left unquantized as the output embedding
    "t5-v1_1-small": ("seq2seq-lm", {"num_layers": 2, "num_decoder_layers": 2, "d_model": 15, "num_heads": 3,
                                     "d_kv": 5, "d_ff": 33, "vocab_size": 99}),
}
SPECS = ["nf4", "nf4,double_quant=true", "int8", "fp4,dtype=bf16", "nf4,double_quant=true,dtype=fp16"]


def count(model, spec, **kwargs):
    task, overrides = SMALL[model]
    return paramcalc.count(model, task=task, overrides=overrides, quant=spec, formulas=False, **kwargs)


def real_model(result):
    from paramcalc.quantized import build_quantized_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_quantized_model(result)


def layout(model) -> dict:
    """Everything but values: per parameter its type, shape, dtype, whether it trains, and the shapes and
    dtypes of the quantization state bitsandbytes keeps beside it."""
    from paramcalc.quantized import quantization_tensors

    return {name: (type(p).__name__, tuple(p.shape), p.dtype, p.requires_grad,
                   [(tuple(t.shape), t.dtype) for t in quantization_tensors(p)])
            for name, p in model.named_parameters()}


def test_packed_bloom_560m_counts_prints_and_stores_as_a_loaded_one():
    from paramcalc.quantized import build_quantized_meta_model, stored_bytes

    result = paramcalc.count("bloom-560m", task="causal-lm", quant="nf4")
    model = build_quantized_meta_model(result)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == result.quant.numel_sum == 408_219_648
    assert result.total_params == 559_214_592
    assert stored_bytes(model) == result.quant.weight_bytes
    assert model.num_parameters() == result.quant.peft_print[1]  # transformers doubles packed 4-bit tensors
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == result.trainable_params
    qkv = model.transformer.h[0].self_attention.query_key_value
    assert isinstance(qkv.weight, bnb.nn.Params4bit) and qkv.weight.dtype.is_floating_point is False
    assert qkv.quant_state is qkv.weight.quant_state  # Linear4bit.forward reads the module's copy


def test_without_packing_the_swapped_modules_keep_full_size_weights():
    # paramcalc trace packs on fake tensors itself, so pack=False must leave the weights as declared
    import torch
    import transformers

    from paramcalc.meta import hf_config
    from paramcalc.quantized import pack_on_meta, quantize_on_meta

    result = count("bloom-560m", "nf4")
    with torch.device("meta"):
        model = transformers.BloomForCausalLM(hf_config(result.config))
    quantize_on_meta(model, result.quant.options)
    assert sum(p.numel() for p in model.parameters()) == result.total_params
    pack_on_meta(model)
    pack_on_meta(model)  # a packed weight is left as it is
    assert sum(p.numel() for p in model.parameters()) == result.quant.numel_sum


@pytest.mark.parametrize("model", list(SMALL))
@pytest.mark.parametrize("spec", SPECS)
def test_packed_meta_model_stores_what_paramcalc_predicts(model, spec):
    from paramcalc.quantized import build_quantized_meta_model, stored_bytes

    result = count(model, spec)
    meta = build_quantized_meta_model(result)
    assert sum(p.numel() for p in meta.parameters()) == result.quant.numel_sum
    assert stored_bytes(meta) == result.quant.weight_bytes
    assert meta.num_parameters() == result.quant.peft_print[1]
    assert sum(p.numel() for p in meta.parameters() if p.requires_grad) == result.trainable_params


@pytest.mark.parametrize("model", list(SMALL))
@pytest.mark.parametrize("spec", SPECS)
def test_packed_meta_model_is_laid_out_as_a_real_quantized_build(model, spec):
    from paramcalc.quantized import build_quantized_meta_model, stored_bytes

    result = count(model, spec)
    meta, real = build_quantized_meta_model(result), real_model(result)
    assert layout(meta) == layout(real)
    assert stored_bytes(meta) == stored_bytes(real)
    assert stored_bytes(meta, buffers=True) == stored_bytes(real, buffers=True)
    assert [n for n, _ in meta.named_modules()] == [n for n, _ in real.named_modules()]


@pytest.mark.parametrize("spec", ["nf4,double_quant=true", "int8"])
def test_packed_meta_model_takes_lora_as_a_real_one_does(spec):
    # peft picks its bitsandbytes LoRA layers by the marks loading leaves (is_loaded_in_4bit / _8bit)
    from paramcalc.quantized import build_quantized_meta_model, stored_bytes
    from paramcalc.verify import apply_real_peft

    result = count("bloom-560m", spec, peft="lora:r=4")
    meta = apply_real_peft(build_quantized_meta_model(result), result)
    real = apply_real_peft(real_model(result), result)
    assert [(n, type(m)) for n, m in meta.named_modules()] == [(n, type(m)) for n, m in real.named_modules()]
    assert "bnb" in type(meta.base_model.model.transformer.h[0].self_attention.query_key_value).__module__
    assert layout(meta) == layout(real)
    assert sum(p.numel() for p in meta.parameters()) == result.quant.numel_sum
    assert meta.get_nb_trainable_parameters() == result.quant.peft_print
    assert stored_bytes(meta) == stored_bytes(real) == result.quant.weight_bytes


@pytest.mark.parametrize(("spec", "wo_bytes"), [("nf4,dtype=fp16", 4), ("int8,dtype=fp16", 4),
                                               ("nf4,dtype=bf16", 2)])
def test_t5_wo_kept_in_fp32_under_fp16(spec, wo_bytes):
    # T5PreTrainedModel._keep_in_fp32_modules = ["wo"]: never quantized, and loaded in fp32 when the model is
    # loaded in fp16 (not bf16). At t5-small's full size the fp16 figure was 25,165,824 bytes low before
    # paramcalc counted it (12 wo of 2048 x 512 at 4 bytes, not 2).
    from paramcalc.quantized import build_quantized_meta_model, stored_bytes

    result = paramcalc.count("t5-small", task="seq2seq-lm", quant=spec)
    meta = build_quantized_meta_model(result)
    wo = meta.encoder.block[0].layer[1].DenseReluDense.wo.weight
    assert wo.dtype.itemsize == wo_bytes  # as loading leaves it (the layout test compares with a real build)
    assert stored_bytes(meta) == result.quant.weight_bytes
    wo_rows = [c for c in result.components if c.name.endswith("FFN out (wo)")]
    assert [c.weight_bytes for c in wo_rows] == [6 * 2048 * 512 * wo_bytes] * 2


def test_stored_bytes_counts_each_storage_once():
    import torch

    from paramcalc.quantized import build_quantized_meta_model, stored_bytes

    result = count("bloom-560m", "int8")
    model = build_quantized_meta_model(result)
    weight = model.transformer.h[0].self_attention.query_key_value.weight
    assert weight.CB is not None  # the int8 values are the weight's own data: counted once, with the row scales
    assert stored_bytes(weight) == 135 * 45 + 4 * 135
    # the tied LM head is the embedding's tensor: the model holds it once
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    embedding = model.transformer.word_embeddings.weight
    assert stored_bytes(model) == sum(stored_bytes(p) for p in model.parameters())
    assert stored_bytes(model) < sum(stored_bytes(m.weight) for m in model.modules()
                                     if isinstance(getattr(m, "weight", None), torch.Tensor))
    assert stored_bytes(embedding) == 1000 * 45 * 4


def test_stored_bytes_of_int8_after_a_forward():
    # Linear8bitLt's first forward moves CB and SCB from the weight to the module's state
    import torch

    from paramcalc.quantized import stored_bytes

    result = count("bloom-560m", "int8")
    model = real_model(result)
    before = stored_bytes(model)
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        model(input_ids=ids)
    layer = model.transformer.h[0].self_attention.query_key_value
    assert layer.weight.SCB is None and layer.state.SCB is not None
    assert stored_bytes(model) == before == result.quant.weight_bytes


def test_stored_bytes_with_buffers():
    from paramcalc.quantized import build_quantized_meta_model, stored_bytes

    result = count("bert-base-uncased", "nf4")
    model = build_quantized_meta_model(result)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert buffers > 0  # position_ids, token_type_ids
    assert stored_bytes(model, buffers=True) == stored_bytes(model) + buffers


def test_double_quantization_on_meta_leaves_the_cached_code_on_the_cpu():
    # bitsandbytes caches its 8-bit dynamic code on the device of the first tensor it quantizes blockwise
    import torch

    from paramcalc.quantized import build_quantized_meta_model

    cache = bnb.functional.name2qmap
    saved = cache.pop("dynamic", None)
    try:
        build_quantized_meta_model(count("gpt2", "nf4,double_quant=true"))
        assert cache["dynamic"].device.type == "cpu"
        packed, state = bnb.functional.quantize_4bit(torch.randn(64, 64), compress_statistics=True, quant_type="nf4")
        assert state.nested and state.state2.code.device.type == "cpu"
    finally:
        if saved is not None:
            cache["dynamic"] = saved


def test_meta_builder_refuses_a_count_without_quant():
    from paramcalc.quantized import build_quantized_meta_model

    with pytest.raises(paramcalc.ParamcalcError, match="needs a count with --quant"):
        build_quantized_meta_model(paramcalc.count("gpt2", formulas=False))
