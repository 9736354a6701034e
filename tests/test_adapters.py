"""Bottleneck adapters (AdapterHub's definitions), checked by injecting the same modules into the meta model."""

import pytest

import paramcalc


def test_pfeiffer_on_bert_base_by_hand():
    # one adapter after each FFN: 12 * (768*48 + 48 + 48*768 + 768), b = 768 // 16 = 48
    result = paramcalc.count("bert-base-uncased", peft="adapter:kind=pfeiffer")
    assert result.trainable_params == 12 * (2 * 768 * 48 + 48 + 768) == 894_528
    assert result.component("adapter after FFN").formula == "L*(2*H*b + H + b)"


def test_houlsby_doubles_pfeiffer():
    pfeiffer = paramcalc.count("roberta-base", peft="adapter:kind=pfeiffer").trainable_params
    houlsby = paramcalc.count("roberta-base", peft="adapter:kind=houlsby").trainable_params
    assert houlsby == 2 * pfeiffer


CASES = [
    ("bert-base-uncased", "base", "adapter"),
    ("bert-base-uncased", "seq-cls", "adapter:kind=houlsby,bottleneck=64"),
    ("roberta-base", "token-cls", "adapter:reduction=8"),
    ("distilroberta-base", "masked-lm", "adapter:kind=houlsby"),
    ("gpt2", "causal-lm", "adapter:kind=houlsby"),
    ("gpt2-medium", "seq-cls", "adapter:bottleneck=1"),
    ("bloom-560m", "seq-cls", "adapter"),
    ("t5-small", "seq2seq-lm", "adapter:kind=houlsby,cross=true"),
    ("t5-small", "token-cls", "adapter:reduction=8"),
    ("t5-v1_1-small", "base", "adapter:kind=houlsby"),
]


@pytest.mark.parametrize(("model", "task", "spec"), CASES, ids=[f"{m}:{t}:{s}" for m, t, s in CASES])
def test_adapter_rows_match_injected_modules(model, task, spec, matches_peft):
    matches_peft(paramcalc.count(model, task=task, peft=spec, formulas=False))


def test_t5_encoder_and_decoder_both_get_adapters():
    result = paramcalc.count("t5-small", task="seq2seq-lm", peft="adapter:kind=houlsby")
    names = {c.name for c in result.components if c.group == "peft"}
    assert names == {"adapter after encoder self-attention", "adapter after encoder FFN",
                     "adapter after decoder self-attention", "adapter after decoder FFN"}
