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
             "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"],
             }[{"roberta": "bert", "mistral": "llama", "qwen2": "llama"}.get(family, family)]
    # Mixtral's all-linear reaches its fused experts (peft's target_parameters): refused, see test below
    every_linear = st.nothing() if family == "mixtral" else st.just(["all-linear"])
    targets = data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True) | every_linear)
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


@pytest.mark.parametrize("spec", ["r=8", "r=8,targets=all-linear", "r=8,targets=experts"])
def test_mixtral_lora_refuses_what_it_does_not_model_in_one_line(spec):
    """peft cannot apply its default targets to Mixtral in transformers 5, and reaches the fused experts
    through target_parameters with all-linear: refused with the reason, never a wrong count."""
    with pytest.raises(paramcalc.ParamcalcError, match="Mixtral"):
        paramcalc.count("mixtral-8x7b", task="causal-lm", peft=f"lora:{spec}")


def test_peft_itself_refuses_its_default_lora_targets_on_mixtral():
    import peft

    from paramcalc.meta import build_meta_model

    base = paramcalc.count(TINY_MIXTRAL, task="causal-lm", formulas=False)
    model = build_meta_model(base.config, class_name=base.hf_class)
    with pytest.raises(Exception, match="target_modules"):
        peft.get_peft_model(model, peft.LoraConfig(r=8, task_type="CAUSAL_LM"))
