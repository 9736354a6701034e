"""The Python API around ``paramcalc.count``: the closed form as sympy, totals per group, custom modules."""

import pytest

import paramcalc
from paramcalc.errors import ParamcalcError

# BERT's I (FFN width) and T5's N (heads) are names sympy gives another meaning when it reads plain text.
CLOSED_FORM_CASES = [("bert-base-uncased", "base", "I"), ("t5-small", "seq2seq-lm", "N"),
                     ("t5-small", "seq2seq-lm", "n_v")]


@pytest.mark.parametrize(("model", "task", "symbol"), CLOSED_FORM_CASES)
def test_closed_form_expr_gives_the_total_back(model, task, symbol):
    import sympy

    peft = "prompt:tokens=20" if symbol == "n_v" else None
    result = paramcalc.count(model, task=task, peft=peft)
    expr = result.closed_form_expr()
    assert all(type(s) is sympy.Symbol and s.name in result.symbols for s in expr.free_symbols)
    assert sympy.Symbol(symbol) in expr.free_symbols  # a symbol, not sympy's constant or function
    assert expr.subs(result.sympy_values()) == result.total_params
    assert expr.subs({sympy.Symbol(s): v for s, v in result.values.items()}) == result.total_params
    assert sympy.sstr(expr) == result.closed_form


def test_closed_form_expr_matches_plain_symbols_built_by_hand():
    import sympy

    H, L, P, V = sympy.symbols("H L P V")
    by_hand = V * H + P * H + 2 * H + L * (12 * H**2 + 13 * H)  # GPT-2 with its tied head
    assert sympy.expand(paramcalc.count("gpt2", task="causal-lm").closed_form_expr() - by_hand) == 0


def test_closed_form_expr_without_formulas_is_a_one_line_error():
    with pytest.raises(ParamcalcError, match="formulas=False") as error:
        paramcalc.count("gpt2", formulas=False).closed_form_expr()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(("model", "task", "peft"), [("bert-base-uncased", "base", None),
                                                     ("t5-small", "seq2seq-lm", "lora:r=8"),
                                                     ("gpt2", "causal-lm", "prefix:tokens=5")])
def test_group_totals_sum_the_rows_of_each_group(model, task, peft):
    from collections import Counter

    result = paramcalc.count(model, task=task, peft=peft, formulas=False)
    totals = result.group_totals()
    by_hand, trainable = Counter(), Counter()
    for c in result.components:
        by_hand[c.group] += c.count
        trainable[c.group] += c.count if c.trainable else 0
    assert totals == dict(by_hand) and sum(totals.values()) == result.total_params
    assert list(totals) == list(dict.fromkeys(c.group for c in result.components))  # first-use order
    trainable_totals = result.group_totals(trainable=True)
    assert list(trainable_totals) == list(totals) and trainable_totals == {g: trainable[g] for g in totals}
    assert sum(trainable_totals.values()) == result.trainable_params


def test_group_totals_of_bert_base():
    assert paramcalc.count("bert-base-uncased", formulas=False).group_totals() == {
        "embedding": 23_835_648, "layernorm": 38_400, "attention": 28_348_416, "ffn": 56_669_184, "pooler": 590_592}
