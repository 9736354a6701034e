"""T5 v1.1's LM head: V*D parameters of its own, as ``from_pretrained`` of a released checkpoint gives them.

transformers 5 ties T5's ``lm_head`` to ``shared`` when it builds the model from its config (T5Config forces
tie_word_embeddings=True); a v1.1 checkpoint stores both weights with different values, and loading leaves
them untied. The judge is a real load: a tiny v1.1 saved with a head of its own, reloaded with
``from_pretrained``. paramcalc's own builders (``runtime.as_loaded``) must give that model too.
"""

import warnings

import pytest

import paramcalc
from paramcalc.families import concrete_parameters
from paramcalc.verify import verify

V, D = 300, 64
TINY_V1_1 = {"model_type": "t5", "num_layers": 2, "d_model": D, "num_heads": 4, "d_kv": 16, "d_ff": 128,
             "vocab_size": V, "feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}
CLASSES = {"base": "T5Model", "seq2seq-lm": "T5ForConditionalGeneration", "seq-cls": "T5ForSequenceClassification",
           "token-cls": "T5ForTokenClassification"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A released-style v1.1 checkpoint, made with transformers alone: the class ties the head, so it gets
    a weight of its own (as google/t5-v1_1-* store one) before saving. transformers 5 writes its config.json
    with tie_word_embeddings=true and scale_decoder_outputs=false."""
    import torch
    import transformers

    folder = tmp_path_factory.mktemp("t5-v1_1-tiny")
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY_V1_1))
    model.lm_head.weight = torch.nn.Parameter(torch.randn(V, D))
    model.save_pretrained(folder)
    return folder


def load(folder, class_name):
    import transformers

    transformers.logging.set_verbosity_error()  # the warning that it will NOT tie lm_head: what we test
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, class_name).from_pretrained(folder)


def shapes(model) -> dict:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def counted(result) -> dict:
    names = {}
    for component in result.components:
        names.update(concrete_parameters(component, result.values))
    return names


@pytest.mark.parametrize("task", list(CLASSES))
def test_a_loaded_v1_1_checkpoint_has_exactly_the_counted_parameters(checkpoint, task):
    loaded = load(checkpoint, CLASSES[task])
    for config in (TINY_V1_1, str(checkpoint)):  # the released config, and the one transformers 5 saves
        result = paramcalc.count(config, task=task, formulas=False)
        assert result.total_params == sum(p.numel() for p in loaded.parameters())
        assert counted(result) == shapes(loaded)
        assert verify(result, model=loaded).mismatches() == []
    has_head = task == "seq2seq-lm"  # T5Model and the classifiers have no lm_head: nothing to untie
    assert any(c.name == "LM head" for c in result.components) == has_head
    if has_head:
        assert loaded.lm_head.weight is not loaded.shared.weight
        assert result.component("LM head").count == V * D and result.component("LM head").group == "head"
        assert shapes(paramcalc.meta.build_meta_model(result.config, result.hf_class)) == shapes(loaded)


def test_a_v1_0_config_keeps_its_head_tied():
    # t5-small's checkpoint stores `shared` only: loading ties lm_head, and the count adds nothing for it
    result = paramcalc.count({**TINY_V1_1, "tie_word_embeddings": True}, task="seq2seq-lm", formulas=False)
    head = result.component("LM head (tied to shared embeddings)")
    assert head.count == 0 and head.tied_to == "shared embeddings"
    model = paramcalc.meta.build_meta_model(result.config, result.hf_class)
    assert model.lm_head.weight is model.shared.weight
    assert not result.notes


@pytest.mark.parametrize("peft", ["lora:r=4", "lora:r=4,targets=all-linear", "lora:r=2,targets=q,v,lm_head",
                                  "lora:r=2,targets=shared,q", "ia3", "prompt:tokens=4"])
def test_peft_on_the_loaded_model_matches_the_count(checkpoint, peft):
    result = paramcalc.count(TINY_V1_1, task="seq2seq-lm", peft=peft, formulas=False)
    verification = verify(result, model=load(checkpoint, "T5ForConditionalGeneration"))
    assert verification.mismatches() == []
    assert verification.peft_counts == (result.trainable_params, result.total_params)
    assert verify(result).peft_counts == verification.peft_counts  # the meta model paramcalc builds


def test_the_seeded_training_model_keeps_its_own_head_through_peft_and_checkpointing():
    from paramcalc.runtime import build_model
    from paramcalc.step import Step, resolve_attention

    result = paramcalc.count(TINY_V1_1, task="seq2seq-lm", peft="lora:r=4", formulas=False)
    step = resolve_attention(Step(batch=2, seq=16, grad_checkpointing=True), result)
    model = build_model(result, step).get_base_model()
    assert model.lm_head.weight is not model.shared.weight
    assert not model.lm_head.weight.equal(model.shared.weight)  # as a checkpoint's: other values
    assert "lm_head.weight" not in model.all_tied_weights_keys  # as from_pretrained leaves the mapping
    model.init_weights()  # what loading runs (tie_weights(recompute_mapping=False)) does not tie it back
    assert model.lm_head.weight is not model.shared.weight
    assert model.encoder.embed_tokens.weight is model.shared.weight  # the stacks still read `shared`


def test_paramcalc_train_trains_the_head_it_counts():
    from paramcalc.runtime import build_model
    from paramcalc.step import Step, resolve_attention
    from paramcalc.train import TrainOptions, train

    result = paramcalc.count(TINY_V1_1, task="seq2seq-lm", formulas=False)
    step = Step(batch=2, seq=32)
    before = {n: p.detach().clone() for n, p in build_model(result, resolve_attention(step, result)).named_parameters()}
    after = []
    report = train(result, step, TrainOptions(steps=2, lr=5e-3),
                   on_model=lambda model: after.append(dict(model.named_parameters())))
    assert abs(report.errors()["peak"]) <= 0.05, (report.predicted["memory"]["peak"], report.measured["memory"])
    changed = {name for name, p in after[0].items() if not p.detach().equal(before[name])}
    assert "lm_head.weight" in changed and changed == set(counted(result))
    assert report.measured["trainable_params"] == report.measured["changed_params"] == result.trainable_params
    assert result.trainable_params == sum(p.numel() for p in after[0].values())


def test_the_traced_step_holds_the_head_and_its_optimizer_state():
    from paramcalc.activations import simulate
    from paramcalc.step import Step
    from paramcalc.trace import trace_step

    result = paramcalc.count(TINY_V1_1, task="seq2seq-lm", formulas=False)
    step = Step(batch=2, seq=16)
    traced, replayed = trace_step(result, step), simulate(result, step)
    assert traced.after_step["parameters"] >= 4 * result.total_params  # the head's V*D fp32 values included
    assert replayed.at_peak["weights"] == traced.at_peak["parameters"]
    assert replayed.at_peak["optimizer"] == traced.at_peak["optimizer"]
    assert abs(replayed.peak - traced.peak) <= 0.05 * traced.peak
