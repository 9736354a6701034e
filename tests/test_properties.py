"""Random but valid configs for every family: analytic count == the meta-device model.

200 examples per family by default; set PARAMCALC_EXAMPLES (e.g. 2000 -> 10,000 in total
over the five families) for the long run, as `.ci/run` does not.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies import STRATEGIES, tasks

import paramcalc
from paramcalc import families
from paramcalc.verify import verify

EXAMPLES = int(os.environ.get("PARAMCALC_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("PARAMCALC_EXAMPLES"),
                    suppress_health_check=[HealthCheck.too_slow])


def check(config, task, num_labels):
    result = paramcalc.count(config, task=task, num_labels=num_labels, formulas=False)
    verification = verify(result)
    assert verification.mismatches() == []
    assert result.total_params == verification.meta_total


labels = st.integers(1, 5)


def test_every_family_has_a_strategy():
    assert set(STRATEGIES) == set(families.families())


@pytest.mark.parametrize("family", sorted(STRATEGIES))
@SETTINGS
@given(data=st.data())
def test_random_configs_match_the_meta_device(family, data):
    config = data.draw(STRATEGIES[family], label="config")
    check(config, data.draw(tasks(family), label="task"), data.draw(labels, label="num_labels"))


@pytest.mark.parametrize("family", sorted(families.families()))
def test_sympy_formulas_evaluate_to_the_counts(family):
    """The formulas users read and the counts they trust come from the same shapes."""
    import sympy

    from paramcalc.symbolic import sympy_symbols

    model = {"bert": "bert-base-uncased", "roberta": "roberta-base", "gpt2": "gpt2", "bloom": "bloom-560m",
             "t5": "t5-v1_1-small", "llama": "tinyllama-1.1b", "mistral": "mistral-7b", "qwen2": "qwen2-0.5b",
             "mixtral": "mixtral-8x7b"}[family]
    for task in families.families()[family].tasks:
        result = paramcalc.count(model, task=task)
        symbols = sympy_symbols(result.symbols)
        values = {symbols[s]: v for s, (_k, v, _d) in result.symbols.items()}
        for component in result.components:
            assert sympy.parse_expr(component.formula, local_dict=symbols).subs(values) == component.count
        closed = sympy.parse_expr(result.closed_form, local_dict=symbols).subs(values)
        assert closed == result.total_params
