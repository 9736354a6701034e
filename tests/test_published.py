"""Published figures, each with its source, against the analytic counts."""

import pytest

import paramcalc
from paramcalc import catalog


def test_bert_base_uncased_matches_published_breakdown():
    # Devlin et al. (2019) BERT-base, as built by transformers' BertModel (DESIGN.md's check values)
    result = paramcalc.count("bert-base-uncased")
    assert result.total_params == 109_482_240
    assert result.component("word embeddings").count == 23_440_896  # 30,522 * 768
    assert result.component("position embeddings").count == 393_216  # 512 * 768
    assert result.component("token type embeddings").count == 1_536  # 2 * 768
    assert result.component("embedding LayerNorm").count == 1_536  # 2 * 768
    assert result.component("pooler").count == 590_592  # 768 * 768 + 768
    per_layer = sum(c.count for c in result.components if c.repeat == "L") // 12
    # 4 * (768*768 + 768) + (768*3072 + 3072) + (3072*768 + 768) + 2 * (2 * 768) = 7,087,872
    assert per_layer == 7_087_872


def test_t5_small_matches_published_count():
    # t5-small, T5Model / T5ForConditionalGeneration (shared embedding counted once): 60,506,624
    assert paramcalc.count("t5-small").total_params == 60_506_624
    assert paramcalc.count("t5-small", task="seq2seq-lm").total_params == 60_506_624


@pytest.mark.parametrize(("model", "base", "with_head"), [
    ("t5-v1_1-small", 60_511_616, 76_961_152),  # the "77M" quoted for google/t5-v1_1-small
    ("t5-v1_1-base", 222_903_552, 247_577_856),  # the "248M" quoted for google/t5-v1_1-base
])
def test_t5_v1_1_seq2seq_lm_counts_the_checkpoints_own_head(model, base, with_head):
    # the released v1.1 checkpoints store lm_head.weight beside shared.weight (tie_word_embeddings: false), and
    # from_pretrained keeps both: the shared embedding once, plus a V*D head
    assert paramcalc.count(model).total_params == base
    result = paramcalc.count(model, task="seq2seq-lm")
    assert result.total_params == with_head == base + result.values["V"] * result.values["D"]


@pytest.mark.parametrize("entry", [e for e in catalog.entries().values() if e.published_params],
                         ids=lambda e: e.name)
def test_catalog_published_counts(entry):
    # e.g. bigscience/bloom-560m model card: 559,214,592 parameters (source kept in the catalog file)
    assert entry.published_params_source
    task = "causal-lm" if entry.model_type in ("bloom", "gpt2") else "base"
    assert paramcalc.count(entry.name, task=task).total_params == entry.published_params


def test_at_least_the_bloom_model_card_figures_are_pinned():
    published = {e.name for e in catalog.entries().values() if e.published_params}
    assert {"bloom-560m", "bloom-7b1"} <= published


def test_api_accepts_transformers_configs_and_their_defaults_are_the_base_models():
    # transformers' default BertConfig/GPT2Config/T5Config are bert-base-uncased, gpt2 and t5-small
    import transformers

    for config, name in ((transformers.BertConfig(), "bert-base-uncased"), (transformers.GPT2Config(), "gpt2"),
                         (transformers.T5Config(), "t5-small")):
        assert paramcalc.count(config).total_params == paramcalc.count(name).total_params
    labelled = transformers.BertConfig(num_labels=5)
    assert paramcalc.count(labelled, task="seq-cls").component("classifier").count == 768 * 5 + 5
