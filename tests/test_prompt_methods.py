"""Prompt tuning, prefix tuning, p-tuning and IA3 against peft on the meta-device model (adapters too,
in the random test, against modules injected into the meta model)."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import STRATEGIES, tasks

import paramcalc
from paramcalc import families

CASES = [
    ("bert-base-uncased", "base", "prompt:tokens=20"),
    ("bert-base-uncased", "seq-cls", "prompt:tokens=10"),
    ("roberta-base", "token-cls", "prompt:tokens=8"),
    ("t5-small", "seq2seq-lm", "prompt:tokens=20"),
    ("t5-small", "seq2seq-lm", "prompt:tokens=20,submodules=1"),
    ("t5-small", "base", "prompt:tokens=20,submodules=2"),
    ("gpt2", "causal-lm", "prompt:tokens=50"),
    ("bloom-560m", "seq-cls", "prompt:tokens=16"),
    ("gpt2", "causal-lm", "prefix:tokens=30"),
    ("gpt2", "seq-cls", "prefix:tokens=10,projection=true"),
    ("t5-small", "seq2seq-lm", "prefix:tokens=30,projection=true,hidden=100"),
    ("roberta-base", "token-cls", "prefix:tokens=5,projection=true"),
    ("bloom-560m", "causal-lm", "prefix:tokens=10"),
    ("bert-base-uncased", "masked-lm", "prefix:tokens=12"),
    ("gpt2", "causal-lm", "ptuning:tokens=10"),
    ("t5-small", "seq2seq-lm", "ptuning:tokens=10,encoder=lstm,hidden=64"),
    ("bert-base-uncased", "seq-cls", "ptuning:tokens=4,encoder=lstm,layers=3"),
    ("bloom-560m", "token-cls", "ptuning:tokens=6,hidden=32"),
    ("bert-base-uncased", "base", "ia3"),
    ("t5-small", "seq2seq-lm", "ia3"),
    ("t5-v1_1-small", "seq-cls", "ia3:targets=q,v,wi_0,wo,ff=wi_0,wo"),
    ("gpt2", "causal-lm", "ia3"),
    ("bloom-560m", "seq-cls", "ia3"),
    ("roberta-base", "seq-cls", "ia3:targets=query,value,dense,ff=dense"),
]


@pytest.mark.parametrize(("model", "task", "spec"), CASES, ids=[f"{m}:{t}:{s}" for m, t, s in CASES])
def test_method_matches_peft(model, task, spec, matches_peft):
    result = paramcalc.count(model, task=task, peft=spec, formulas=False)
    matches_peft(result)
    summary = result.peft[0]
    assert summary.trainable_params == result.trainable_params
    assert summary.added_params == sum(c.count for c in result.components if c.group == "peft")


def test_prompt_tuning_t5_both_conventions():
    # peft: seq2seq-lm allocates 2 * 20 tokens * 512, all trainable; only the encoder's 20 rows are used
    result = paramcalc.count("t5-small", task="seq2seq-lm", peft="prompt:tokens=20")
    assert result.trainable_params == 2 * 20 * 512 == 20_480
    [note] = result.to_dict()["notes"]
    assert "20,480" in note and "10,240" in note
    assert "first n_v rows to the encoder" in note and "decoder" not in note  # the decoder never reads the prompt
    once = paramcalc.count("t5-small", task="seq2seq-lm", peft="prompt:tokens=20,submodules=1")
    assert once.trainable_params == 20 * 512
    assert "10,240, the rows that learn" in once.all_notes()[0] and "20,480" in once.all_notes()[0]


def test_the_note_holds_in_peft_only_the_first_n_v_prompt_rows_learn_on_seq2seq():
    # What the note says, checked on a tiny random T5: one backward, then the gradient of each prompt row.
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    tiny = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=16, d_kv=4, num_heads=4, d_ff=32, num_layers=1, decoder_start_token_id=0,
        pad_token_id=0))
    model = peft.get_peft_model(tiny, peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    model(input_ids=torch.randint(1, 64, (2, 5)), labels=torch.randint(1, 64, (2, 4))).loss.backward()
    grad = model.prompt_encoder["default"].embedding.weight.grad
    assert grad.shape[0] == 2 * 3 and model.get_nb_trainable_parameters()[0] == 2 * 3 * 16  # all rows trainable
    assert (grad[:3].norm(dim=1) > 0).all() and (grad[3:] == 0).all()  # only the first n_v rows learn


def test_prefix_tuning_gpt2_by_hand():
    # 30 tokens * (a key and a value per layer: 2 * 12 layers * 768) = 552,960
    result = paramcalc.count("gpt2", task="causal-lm", peft="prefix:tokens=30")
    assert result.trainable_params == 30 * 2 * 12 * 768 == 552_960


def test_ia3_bert_by_hand():
    # key and value rescale their H outputs; both "output.dense" modules rescale their inputs (H and I)
    result = paramcalc.count("bert-base-uncased", peft="ia3")
    assert result.trainable_params == 12 * (768 + 768 + 768 + 3072) == 64_512


def test_api_accepts_each_peft_config_class(matches_peft):
    import peft

    configs = [
        peft.PromptTuningConfig(num_virtual_tokens=7, task_type="SEQ_2_SEQ_LM"),
        peft.PrefixTuningConfig(num_virtual_tokens=7, prefix_projection=True, encoder_hidden_size=33),
        peft.PromptEncoderConfig(num_virtual_tokens=7, encoder_reparameterization_type="LSTM"),
        peft.IA3Config(target_modules=["k", "wo"], feedforward_modules=["wo"]),
    ]
    for config in configs:
        matches_peft(paramcalc.count("t5-small", task="seq2seq-lm", peft=config))


STRATEGY_SPECS = {
    "prompt": st.builds(lambda t, s: f"prompt:tokens={t}" + (f",submodules={s}" if s else ""),
                        st.integers(1, 40), st.sampled_from([None, 1, 2])),
    "prefix": st.builds(lambda t, p, h: f"prefix:tokens={t},projection={p}" + (f",hidden={h}" if p and h else ""),
                        st.integers(1, 40), st.booleans(), st.none() | st.integers(1, 64)),
    "ptuning": st.builds(lambda t, e, h, n: f"ptuning:tokens={t},encoder={e},layers={n}" + (f",hidden={h}" if h else ""),
                         st.integers(1, 20), st.sampled_from(["mlp", "lstm"]), st.none() | st.integers(1, 32),
                         st.integers(1, 3)),
    "ia3": st.just("ia3"),
    "adapter": st.builds(lambda k, b: f"adapter:kind={k}" + (f",bottleneck={b}" if b else ""),
                         st.sampled_from(["pfeiffer", "houlsby"]), st.none() | st.integers(1, 16)),
}
EXAMPLES = int(os.environ.get("PARAMCALC_EXAMPLES", "200")) // 5


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("PARAMCALC_EXAMPLES"))
@given(family=st.sampled_from(sorted(STRATEGIES)), method=st.sampled_from(sorted(STRATEGY_SPECS)), data=st.data())
def test_random_prompt_methods_match_peft(family, method, data, matches_peft):
    config = data.draw(STRATEGIES[family], label="config")
    task = data.draw(tasks(family), label="task")
    spec = data.draw(STRATEGY_SPECS[method], label="spec")
    if method == "adapter" and not families.families()[family].adapter_sites:  # refused: see test_gqa_families
        return
    matches_peft(paramcalc.count(config, task=task, peft=spec, formulas=False))
