"""LoRA: analytic added/trainable counts == peft.get_peft_model on the meta-device model."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import STRATEGIES, tasks

import paramcalc


def test_bert_base_uncased_lora_r8_published_figure(matches_peft):
    # peft default targets for BERT: query, value. 12 layers * 2 modules * 8 * (768 + 768) = 294,912
    result = paramcalc.count("bert-base-uncased", peft="lora:r=8")
    assert result.trainable_params == 294_912
    assert result.total_params == 109_482_240 + 294_912
    matches_peft(result)


def test_t5_small_lora_r8_published_figure(matches_peft):
    # peft default targets for T5: q, v. (6 encoder + 6 decoder self + 6 decoder cross) * 2 * 8 * (512 + 512)
    result = paramcalc.count("t5-small", task="seq2seq-lm", peft="lora:r=8")
    assert result.trainable_params == 294_912 == 18 * 2 * 8 * (512 + 512)
    matches_peft(result)


def test_seq_cls_trains_a_copy_of_the_head(matches_peft):
    # peft's SEQ_CLS task type keeps the classifier frozen and trains a copy (modules_to_save)
    result = paramcalc.count("bert-base-uncased", task="seq-cls", peft="lora:r=8")
    head = 768 * 2 + 2
    assert result.trainable_params == 294_912 + head
    assert result.total_params == 109_483_778 + 294_912 + head
    matches_peft(result)


TINY_MIXTRAL = {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
                "vocab_size": 1000}

CASES = [
    ("bert-base-uncased", "masked-lm", "r=4,targets=query,key,value,dense,bias=all"),
    ("bert-base-uncased", "masked-lm", "r=16,targets=all-linear,bias=lora_only"),
    ("bert-base-uncased", "token-cls", "r=16,targets=query,dense,bias=lora_only"),
    ("roberta-base", "seq-cls", "r=8,bias=all"),
    ("roberta-base", "causal-lm", "r=2,targets=word_embeddings,query,dora=true"),
    ("distilroberta-base", "seq-cls", "r=8,targets=all-linear"),
    ("gpt2", "causal-lm", "r=4,targets=c_attn,c_proj,c_fc,bias=all"),
    ("gpt2", "seq-cls", "r=8,targets=wte,c_attn,modules_to_save=ln_f"),
    ("gpt2-medium", "seq-cls", "r=32,targets=all-linear,dora=true"),
    ("t5-small", "seq2seq-lm", "r=8,targets=all-linear"),
    ("t5-v1_1-small", "seq-cls", "r=4,targets=q,k,v,o,wi_0,wi_1,wo,bias=all"),
    ("t5-small", "token-cls", "r=1,targets=shared,q"),
    ("bloom-560m", "causal-lm", "r=8"),
    ("bloom-560m", "token-cls", "r=8,bias=lora_only,dora=true"),
    ("bloom-560m", "seq-cls", "r=64,targets=query_key_value,dense_h_to_4h,dense_4h_to_h"),
    ("llama-2-7b", "causal-lm", "r=8"),
    ("llama-3-8b", "causal-lm", "r=16,targets=all-linear"),
    ("tinyllama-1.1b", "seq-cls", "r=8,targets=all-linear,dora=true"),
    ("mistral-7b", "causal-lm", "r=8,targets=q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
    ("qwen2-0.5b", "causal-lm", "r=8,bias=all"),
    ("qwen2-7b", "seq-cls", "r=4,targets=all-linear,bias=lora_only"),
    ("mixtral-8x7b", "causal-lm", "r=8,targets=q_proj,k_proj,v_proj,o_proj"),
    ("mixtral-8x7b", "causal-lm", "r=8,targets=all-linear"),
    ("mixtral-8x7b", "seq-cls", "r=4,targets=all-linear,bias=all"),
    ("mixtral-8x7b", "causal-lm", "r=16,targets=w1,w3,w2,bias=lora_only"),
    ("mixtral-8x7b", "base", "r=2,targets=q_proj,gate,parameters=down_proj"),
    ("mixtral-8x7b", "seq-cls", "r=4,targets=q_proj,v_proj,dora=true"),
]


@pytest.mark.parametrize(("model", "task", "spec"), CASES, ids=[f"{m}:{t}:{s}" for m, t, s in CASES])
def test_lora_matches_peft(model, task, spec, matches_peft):
    result = paramcalc.count(model, task=task, peft=f"lora:{spec}", formulas=False)
    matches_peft(result)
    summary = result.peft[0]
    assert summary.trainable_params == result.trainable_params
    assert summary.added_params == sum(c.count for c in result.components if c.group == "peft")


def test_token_cls_cannot_adapt_the_classifier_it_saves():
    # peft's TOKEN_CLS model saves the classifier after adapting: all-linear then raises TypeError in peft
    import peft
    import torch
    import transformers

    with pytest.raises(paramcalc.ParamcalcError, match="peft cannot adapt classifier"):
        paramcalc.count("bert-base-uncased", task="token-cls", peft="lora:targets=all-linear")
    with torch.device("meta"):
        model = transformers.BertForTokenClassification(transformers.BertConfig(num_hidden_layers=1))
    with pytest.raises(TypeError):
        peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear", task_type="TOKEN_CLS"))


def test_api_takes_peft_config_objects(matches_peft):
    import peft

    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["c_attn", "c_proj"], bias="lora_only")
    from_object = paramcalc.count("gpt2", task="causal-lm", peft=config)
    from_spec = paramcalc.count("gpt2", task="causal-lm", peft="lora:r=4,alpha=16,targets=c_attn,c_proj,bias=lora_only")
    assert (from_object.trainable_params, from_object.total_params) == (from_spec.trainable_params,
                                                                        from_spec.total_params)
    matches_peft(from_object)


def test_lora_formula_is_r_times_in_plus_out():
    result = paramcalc.count("bert-base-uncased", peft="lora:r=8")
    assert result.component("LoRA attention query").formula == "2*H*L*r"  # L * r * (H + H)
    assert result.to_dict()["peft"] == [{
        "method": "lora", "added_params": 294_912, "trainable_params": 294_912,
        "config": {"r": 8, "alpha": 8, "dropout": 0.0, "targets": ["query", "value"], "bias": "none",
                   "modules_to_save": None, "dora": False, "task_modules_to_save": None},
    }]


EXAMPLES = int(os.environ.get("PARAMCALC_EXAMPLES", "200")) // 5  # 40 by default: each builds a peft model


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("PARAMCALC_EXAMPLES"))
@given(
    family=st.sampled_from(sorted(STRATEGIES)),
    data=st.data(),
    r=st.integers(1, 64),
    bias=st.sampled_from(["none", "all", "lora_only"]),
    dora=st.booleans(),
)
def test_random_lora_matches_peft(family, data, r, bias, dora, matches_peft):
    config = data.draw(STRATEGIES[family], label="config")
    task = data.draw(tasks(family), label="task")
    names = {"bert": ["query", "key", "value", "dense", "word_embeddings"], "gpt2": ["c_attn", "c_proj", "c_fc", "wte"],
             "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
             "t5": ["q", "k", "v", "o", "wo", "shared"],
             "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"],
             # peft's v4 names for Mixtral's router (gate) and fused experts (w1 + w3: gate_up_proj, w2: down_proj),
             # and the experts module itself, which peft refuses
             "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens", "gate", "w1", "w3", "w2", "experts"],
             }[{"roberta": "bert", "mistral": "llama", "qwen2": "llama"}.get(family, family)]
    targets = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True) | st.just(["all-linear"]))
    spec = f"r={r},bias={bias},dora={dora},targets={','.join(targets)}"
    try:
        result = paramcalc.count(config, task=task, peft=f"lora:{spec}", formulas=False)
    except paramcalc.ParamcalcError:  # paramcalc refuses only what peft itself cannot do
        assert_peft_refuses(config, task, spec)
        return
    matches_peft(result)


def assert_peft_refuses(model, task, spec):
    import peft

    from paramcalc.meta import build_meta_model
    from paramcalc.tuners import lora, parse
    from paramcalc.tuners.common import PEFT_TASK_TYPES

    base = paramcalc.count(model, task=task, formulas=False)
    meta_model = build_meta_model(base.config, class_name=base.hf_class)
    config = lora.to_peft_config(parse("lora", spec), PEFT_TASK_TYPES.get(task))
    with pytest.raises(Exception):
        peft.get_peft_model(meta_model, config)


def test_mixtral_8x7b_all_linear_adapts_the_router_and_the_fused_experts(matches_peft):
    """peft 0.21 on transformers 5 turns all-linear's v4 names (gate, w1, w3, w2) into target_parameters: a
    lora.ParamWrapper on the router's weight and on each of the experts' 3-D weights, rank r per expert, and 2r on
    gate_up_proj, where w1 and w3 are fused."""
    result = paramcalc.count("mixtral-8x7b", task="causal-lm", peft="lora:r=8,targets=all-linear")
    L, H, AD, KVD, E, I, r = 32, 4096, 32 * 128, 8 * 128, 8, 14336, 8
    rows = {c.name: c for c in result.components if c.group == "peft"}
    assert rows["LoRA attention K (k_proj)"].count == L * r * (H + KVD) == 1_310_720
    assert rows["LoRA MoE router (mlp.gate)"].count == L * r * (H + E) == 1_050_624  # A [r, H], B [E, r]
    # A [2r*E, H], B [2I, 2r*E]
    assert rows["LoRA MoE experts (mlp.experts) gate_up_proj"].count == L * 2 * r * E * (H + 2 * I) == 134_217_728
    # A [r*E, I], B [H, r*E]
    assert rows["LoRA MoE experts (mlp.experts) down_proj"].count == L * r * E * (I + H) == 37_748_736
    assert rows["LoRA MoE experts (mlp.experts) gate_up_proj"].formula == "L*(2*E*H*r + 4*E*I*r)"
    attention = L * r * 2 * ((H + AD) + (H + KVD))
    assert result.trainable_params == attention + 1_050_624 + 134_217_728 + 37_748_736 == 179_832_832
    assert result.peft[0].config["target_parameters"] == ["gate.weight", "gate_up_proj", "down_proj"]
    assert any("rank 2r = 16 per expert" in note for note in result.peft[0].notes)
    matches_peft(result)


@pytest.mark.parametrize("spec", [
    "r=4,targets=all-linear,bias=lora_only",
    "r=3,targets=w2,modules_to_save=embed_tokens",
    "r=2,targets=mlp.gate,w1,w3",
    "r=4,parameters=gate_up_proj,down_proj",  # rank r on gate_up_proj: nothing is fused when named directly
    "r=4,targets=q_proj,w1,w3,parameters=experts.gate_up_proj",  # w1 and w3 still double its rank
    "r=8,targets=q_proj,down_proj",  # no module is named down_proj: peft adapts q_proj alone
])
@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_tiny_mixtral_lora_on_experts_matches_peft(spec, task, matches_peft):
    matches_peft(paramcalc.count(TINY_MIXTRAL, task=task, peft=f"lora:{spec}", formulas=False))


def test_api_takes_target_parameters(matches_peft):
    import peft

    config = peft.LoraConfig(r=4, target_parameters=["mlp.experts.down_proj", "gate_up_proj"])
    from_object = paramcalc.count(TINY_MIXTRAL, task="causal-lm", peft=config, formulas=False)
    from_spec = paramcalc.count(TINY_MIXTRAL, task="causal-lm", peft="lora:r=4,parameters=gate_up_proj,down_proj",
                                formulas=False)
    # 2 layers * 4 experts * 4 * ((64 + 192) + (96 + 64)) = 13,312
    assert from_object.trainable_params == from_spec.trainable_params == 2 * 4 * 4 * (256 + 160) == 13_312
    matches_peft(from_object)


@pytest.mark.parametrize(("spec", "reason"), [
    ("r=8", "NoMatchingPeftModuleError"),  # peft's conversion empties its default targets
    ("r=8,targets=experts", "experts module 'experts' itself"),  # MixtralExperts is not a Linear
    ("r=8,targets=q_proj,w1", "without also targeting w3"),  # w1 and w3 are fused into gate_up_proj
    ("r=8,targets=all-linear,dora=true", "does not work with use_dora=True"),  # lora.ParamWrapper
    ("r=8,targets=gate,dropout=0.1", "does not work with lora_dropout != 0"),
    ("r=8,targets=gate,modules_to_save=gate", "cannot save 'gate' whole"),
    ("r=8,targets=gate_up_proj", "match no module of Mixtral"),  # a parameter, not a module: parameters=...
])
def test_mixtral_lora_refuses_in_one_line_what_peft_refuses(spec, reason):
    with pytest.raises(paramcalc.ParamcalcError, match=reason):
        paramcalc.count(TINY_MIXTRAL, task="causal-lm", peft=f"lora:{spec}", formulas=False)
    assert_peft_refuses(TINY_MIXTRAL, "causal-lm", spec)


def test_parameters_reach_only_mixture_of_experts_weights():
    with pytest.raises(paramcalc.ParamcalcError, match="mixture-of-experts weights"):
        paramcalc.count("tinyllama-1.1b", task="causal-lm", peft="lora:parameters=q_proj.weight")
