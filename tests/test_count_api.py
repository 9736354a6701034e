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


def tiny_mlp():
    """A factory defined here, passed to count as a function rather than named by a string."""
    import torch

    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))


TINY_MLP = (4 * 3 + 3) + (3 * 2 + 2)  # 23


def test_count_takes_a_factory_callable_and_builds_it_on_meta(monkeypatch):
    import torch

    built = []
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", lambda self: built.append(self.weight.device.type))
    result = paramcalc.count(tiny_mlp)
    assert built == ["meta", "meta"]
    assert (result.total_params, result.trainable_params, result.generic) == (TINY_MLP, TINY_MLP, True)
    assert result.model == result.config_source == f"{__name__}:tiny_mlp"  # importable: verify can rebuild it
    assert [c.name for c in result.components] == ["0", "2"] and result.hf_class == "Sequential"
    from paramcalc.verify import verify

    assert verify(result).meta_total == TINY_MLP


def test_count_takes_a_lambda_a_partial_and_a_module_class():
    import functools

    import torch

    lam = paramcalc.count(lambda: torch.nn.Linear(5, 2))
    assert lam.total_params == 12 and lam.model.endswith("<lambda>") and "not importable" in lam.config_source
    assert paramcalc.count(functools.partial(torch.nn.Linear, 5, 2, bias=False)).total_params == 10
    assert paramcalc.count(torch.nn.Identity).total_params == 0  # the class is a factory too


def test_count_takes_a_module_instance_as_it_is():
    import torch

    model = tiny_mlp()
    model[0].requires_grad_(False)
    result = paramcalc.count(model)
    assert (result.total_params, result.trainable_params) == (TINY_MLP, 3 * 2 + 2)  # the frozen layer stays frozen
    assert model[0].weight.device.type == "cpu" and not model[0].weight.requires_grad  # not moved, not copied
    assert result.model == "Sequential instance" and "counted as it is" in result.notes[0]
    shared = torch.nn.Linear(4, 4)
    assert paramcalc.count(torch.nn.Sequential(shared, shared)).total_params == 20  # a shared module once


BAD_CUSTOM = [
    ({"model": lambda: 42}, "returned int, not a torch.nn.Module"),
    ({"model": lambda: 1 / 0}, "failed: ZeroDivisionError: division by zero"),
    ({"model": lambda: (_ for _ in ()).throw(ValueError("first line\nsecond line"))}, "ValueError: first line"),
    ({"model": tiny_mlp, "task": "seq-cls"}, "do not apply to a custom module"),
    ({"model": tiny_mlp, "overrides": {"hidden_size": 8}}, "do not apply to a custom module"),
    ({"model": tiny_mlp, "peft": "lora:r=8"}, "need a formula file"),
    ({"model": "custom_module_nowhere:factory", "quant": "nf4"}, "need a formula file"),
    ({"model": "custom_module_nowhere:factory"}, "cannot import 'custom_module_nowhere:factory'"),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_CUSTOM, ids=[m for _, m in BAD_CUSTOM])
def test_bad_custom_modules_are_one_line_errors(kwargs, message):
    with pytest.raises(ParamcalcError) as error:
        paramcalc.count(**kwargs)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_family_path_finds_every_formula_file():
    """Notebooks and users read a family's file next to its rows: the path must hold that family, installed or not."""
    import tomllib

    from paramcalc import families
    from paramcalc.errors import ParamcalcError

    for name in families.families():
        raw = tomllib.loads(families.family_path(name).read_text())
        assert raw["family"] == name
    with pytest.raises(ParamcalcError, match="no formula file for family 'gemma'"):
        families.family_path("gemma")
