"""Random but valid configs for every family: analytic count == the meta-device model.

200 examples per family by default; set PARAMCALC_EXAMPLES (e.g. 2000 -> 10,000 in total
over the five families) for the long run, as `.ci/run` does not.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import paramcalc
from paramcalc import families
from paramcalc.verify import verify

EXAMPLES = int(os.environ.get("PARAMCALC_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("PARAMCALC_EXAMPLES"),
                    suppress_health_check=[HealthCheck.too_slow])

sizes = st.integers(min_value=1, max_value=48)
small = st.integers(min_value=1, max_value=3)


def _tasks(family):
    return st.sampled_from(sorted(families.families()[family].tasks))


@st.composite
def bert_like(draw, model_type):
    heads, head_dim = draw(small), draw(st.integers(1, 8))
    return {
        "model_type": model_type, "vocab_size": draw(sizes), "hidden_size": heads * head_dim,
        "num_attention_heads": heads, "num_hidden_layers": draw(small), "intermediate_size": draw(sizes),
        "max_position_embeddings": draw(st.integers(8, 64)), "type_vocab_size": draw(st.integers(1, 4)),
        "tie_word_embeddings": draw(st.booleans()), "pad_token_id": 0,
    }


@st.composite
def gpt2_configs(draw):
    heads, head_dim = draw(small), draw(st.integers(1, 8))
    return {
        "model_type": "gpt2", "vocab_size": draw(sizes), "n_embd": heads * head_dim, "n_head": heads,
        "n_layer": draw(small), "n_positions": draw(sizes), "n_inner": draw(st.none() | sizes),
        "tie_word_embeddings": draw(st.booleans()), "bos_token_id": 0, "eos_token_id": 0,
    }


@st.composite
def bloom_configs(draw):
    heads, head_dim = draw(small), draw(st.integers(1, 8))
    return {
        "model_type": "bloom", "vocab_size": draw(sizes), "hidden_size": heads * head_dim, "n_head": heads,
        "n_layer": draw(small), "tie_word_embeddings": draw(st.booleans()), "bos_token_id": 0,
        "eos_token_id": 0,
    }


@st.composite
def t5_configs(draw):
    return {
        "model_type": "t5", "vocab_size": draw(sizes), "d_model": draw(sizes), "d_kv": draw(st.integers(1, 8)),
        "num_heads": draw(small), "d_ff": draw(sizes), "num_layers": draw(small),
        "num_decoder_layers": draw(st.none() | small), "relative_attention_num_buckets": draw(st.integers(1, 40)),
        "feed_forward_proj": draw(st.sampled_from(["relu", "gelu", "gated-gelu", "gated-silu"])),
        "tie_word_embeddings": draw(st.booleans()), "eos_token_id": 0, "pad_token_id": 0,
    }


def check(config, task, num_labels):
    result = paramcalc.count(config, task=task, num_labels=num_labels, formulas=False)
    verification = verify(result)
    assert verification.mismatches() == []
    assert result.total_params == verification.meta_total


labels = st.integers(1, 5)


STRATEGIES = {
    "bert": bert_like("bert"),
    "roberta": bert_like("roberta"),
    "gpt2": gpt2_configs(),
    "bloom": bloom_configs(),
    "t5": t5_configs(),
}


def test_every_family_has_a_strategy():
    assert set(STRATEGIES) == set(families.families())


@pytest.mark.parametrize("family", sorted(STRATEGIES))
@SETTINGS
@given(data=st.data())
def test_random_configs_match_the_meta_device(family, data):
    config = data.draw(STRATEGIES[family], label="config")
    check(config, data.draw(_tasks(family), label="task"), data.draw(labels, label="num_labels"))


@pytest.mark.parametrize("family", sorted(families.families()))
def test_sympy_formulas_evaluate_to_the_counts(family):
    """The formulas users read and the counts they trust come from the same shapes."""
    import sympy

    from paramcalc.symbolic import sympy_symbols

    model = {"bert": "bert-base-uncased", "roberta": "roberta-base", "gpt2": "gpt2", "bloom": "bloom-560m",
             "t5": "t5-v1_1-small"}[family]
    for task in families.families()[family].tasks:
        result = paramcalc.count(model, task=task)
        symbols = sympy_symbols(result.symbols)
        values = {symbols[s]: v for s, (_k, v, _d) in result.symbols.items()}
        for component in result.components:
            assert sympy.parse_expr(component.formula, local_dict=symbols).subs(values) == component.count
        closed = sympy.parse_expr(result.closed_form, local_dict=symbols).subs(values)
        assert closed == result.total_params
