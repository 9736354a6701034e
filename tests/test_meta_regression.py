"""Every catalog model x every task of its family: analytic == torch.numel on the meta device."""

import pytest

import paramcalc
from paramcalc import catalog, families
from paramcalc.verify import verify

CASES = [
    (entry.name, task)
    for entry in catalog.entries().values()
    for task in families.family_for(entry.model_type).tasks
]


@pytest.mark.parametrize(("model", "task"), CASES, ids=[f"{m}:{t}" for m, t in CASES])
def test_catalog_model_matches_meta_device(model, task):
    result = paramcalc.count(model, task=task)
    verification = verify(result)
    assert verification.mismatches() == []
    assert result.total_params == verification.meta_total  # sum(p.numel() for p in model.parameters())
    for check in verification.checks:  # per component, not only in total
        assert check.expected == check.actual, check.name


def test_catalog_covers_the_required_models():
    required = {
        "bert-base-uncased", "bert-base-cased", "bert-large-uncased", "roberta-base", "roberta-large",
        "t5-small", "t5-base", "t5-large", "t5-v1_1-small", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl",
        "bloom-560m", "bloom-1b1", "bloom-1b7", "bloom-3b", "bloom-7b1",
    }
    assert required <= set(catalog.entries())
    for entry in catalog.entries().values():
        assert entry.source.startswith("https://huggingface.co/"), entry.name


@pytest.mark.parametrize(("alias", "name"), [
    ("google-bert/bert-base-uncased", "bert-base-uncased"),
    ("FacebookAI/roberta-base", "roberta-base"),
    ("openai-community/gpt2", "gpt2"),
    ("google-t5/t5-small", "t5-small"),
    ("google/t5-v1_1-small", "t5-v1_1-small"),
    ("bigscience/bloom-560m", "bloom-560m"),
])
def test_hub_names_resolve(alias, name):
    assert paramcalc.count(alias, formulas=False).model == name


def test_tied_rows_really_share_their_tensor():
    result = paramcalc.count("gpt2", task="causal-lm")
    tied = result.component("LM head (tied to wte)")
    assert tied.count == 0 and tied.tied_to == "token embeddings (wte)"
    assert verify(result).ok


def test_verify_reports_a_wrong_formula_by_parameter_name():
    result = paramcalc.count("bert-base-uncased", formulas=False)
    result.component("pooler").shapes["weight"] = ("H", "V")  # a deliberately wrong formula
    verification = verify(result)
    assert not verification.ok
    assert any("pooler.dense.weight" in line for line in verification.mismatches())


def test_t5_v1_1_counts_the_head_its_checkpoint_keeps():
    # transformers 5 ties T5's lm_head only when it builds the model from its config; google/t5-v1_1-small's
    # checkpoint stores a head of its own, 32,128 * 512, which from_pretrained leaves untied (the widely
    # quoted 77M). The meta model verify builds is the loaded one (runtime.as_loaded).
    result = paramcalc.count("t5-v1_1-small", task="seq2seq-lm")
    head = result.component("LM head")
    assert (head.count, head.tied_to, head.group) == (16_449_536, None, "head")
    assert result.total_params == 76_961_152 == verify(result).meta_total
    assert any("16,449,536" in note and "untied" in note for note in result.notes)
    assert not paramcalc.count("t5-v1_1-small").notes  # T5Model has no head: nothing to say
