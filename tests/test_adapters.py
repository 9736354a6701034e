"""Bottleneck adapters (AdapterHub's definitions): counted, checked by injecting the same modules into the meta
model, and run for real (paramcalc train) where AdapterHub's models run them."""

import pytest

import paramcalc
from tiny import TINY
from paramcalc.families import concrete_parameters


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


# --- real adapters: paramcalc train runs them -------------------------------------------------------------

SPECS = ["adapter:kind=pfeiffer", "adapter:kind=houlsby"]
REAL = [(family, spec) for family in TINY for spec in SPECS] + [("t5", "adapter:kind=pfeiffer,cross=true")]


def _build(family, spec, adapters=True):
    """The seeded tiny model of ``family`` (eval mode: no dropout), with the adapters of ``spec`` or bare,
    and one batch for it."""
    from paramcalc.data import make_batches
    from paramcalc.runtime import build_model
    from paramcalc.step import Step, resolve_attention

    config, task = TINY[family]
    result = paramcalc.count(config, task=task, peft=spec if adapters else None, formulas=False)
    model = build_model(result, resolve_attention(Step(batch=2, seq=16), result), seed=0).eval()
    return result, model, make_batches(result, batch=2, seq=16).next()


def _logits(model, batch):
    import torch

    with torch.no_grad():
        return model(**batch).logits


def _adapter_names(model) -> list[str]:
    return [name for name, _ in model.named_parameters() if ".adapters.default." in name]


@pytest.mark.parametrize(("family", "spec"), REAL, ids=[f"{f}:{s}" for f, s in REAL])
def test_real_adapters_start_as_the_base_model_and_all_of_them_learn(family, spec):
    import torch

    from paramcalc.trace import _loss

    result, model, batch = _build(family, spec)
    _, base, _ = _build(family, spec, adapters=False)  # the same seed: the same base weights
    # adapter_up starts at zero (init=mam_adapter), so h + A(z) = h: the base model's output, bit for bit
    assert torch.equal(_logits(model, batch), _logits(base, batch))
    # every row the count calls trainable is trainable here, and nothing else
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for c in result.components if c.trainable for n in concrete_parameters(c, result.values)}
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == result.trainable_params
    assert _adapter_names(model) and set(_adapter_names(model)) <= trainable
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    _loss(model(**batch)).backward()
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:  # took part in the forward: a gradient, even where it is zero
            assert parameter.grad is not None, name
        else:
            assert parameter.grad is None, name
    # the up projection sees A's input, so its gradient is not zero: every adapter is in the graph
    for name, parameter in model.named_parameters():
        if name.endswith("adapter_up.weight"):
            assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("family", "spec"), REAL, ids=[f"{f}:{s}" for f, s in REAL])
def test_a_nonzero_adapter_changes_the_output(family, spec):
    import torch

    result, model, batch = _build(family, spec + ",init=bert")  # AdapterHub's default: adapter_up ~ N(0, 0.02)
    _, base, _ = _build(family, spec, adapters=False)
    assert not torch.allclose(_logits(model, batch), _logits(base, batch))
    for name in _adapter_names(model):  # and every adapter alone moves it
        parameter = model.get_parameter(name)
        if not name.endswith("adapter_up.bias"):
            continue
        before = _logits(model, batch)
        with torch.no_grad():  # random, not constant: a LayerNorm after the adapter takes the mean out
            nudge = torch.randn_like(parameter)
            parameter.add_(nudge)
        assert not torch.allclose(_logits(model, batch), before), f"{name} does not take part"
        with torch.no_grad():
            parameter.sub_(nudge)


def _bottleneck(adapter, z):
    return adapter.adapter_up(adapter.adapter_down(z))


@pytest.mark.parametrize("kind", ["pfeiffer", "houlsby"])
def test_bert_sublayers_compute_adapterhubs_formula(kind):
    # AdapterHub's BertOutputWithAdapters: LayerNorm(h + A(z) + x), h = dropout(dense(.)),
    # z = LayerNorm(h + x) for Pfeiffer (original_ln_before), z = h for Houlsby
    import torch

    _, model, _ = _build("bert", f"adapter:kind={kind},init=bert")
    torch.manual_seed(1)
    for owner, attribute, width in [(model.bert.encoder.layer[1].output, "output_adapters", 128),
                                    (model.bert.encoder.layer[0].attention.output, "attention_adapters", 64)]:
        if kind == "pfeiffer" and attribute == "attention_adapters":
            assert not hasattr(owner, attribute)
            continue
        adapter = getattr(owner, attribute).adapters["default"]
        assert isinstance(adapter.adapter_down[1], torch.nn.ReLU if kind == "pfeiffer" else torch.nn.SiLU)
        inputs, x = torch.randn(2, 5, width), torch.randn(2, 5, 64)
        with torch.no_grad():
            h = owner.dense(inputs)
            z = owner.LayerNorm(h + x) if kind == "pfeiffer" else h
            expected = owner.LayerNorm(h + _bottleneck(adapter, z) + x)
            assert torch.allclose(owner(inputs, x), expected, atol=1e-6)


def test_t5_and_gpt2_sublayers_compute_adapterhubs_formula():
    # layer_norm=None (pre-LN models): Pfeiffer's z = h + x, and the model adds x after: x + h + A(h + x)
    import torch

    _, t5, _ = _build("t5", "adapter:kind=pfeiffer,init=bert")
    layer = t5.encoder.block[0].layer[1]  # T5LayerFF
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        h = layer.DenseReluDense(layer.layer_norm(x))
        expected = x + h + _bottleneck(layer.output_adapters.adapters["default"], h + x)
        assert torch.allclose(layer(x), expected, atol=1e-6)

    _, gpt2, _ = _build("gpt2", "adapter:kind=houlsby,init=bert")
    _, bare, _ = _build("gpt2", None, adapters=False)  # the same base weights, attn and mlp unhooked
    block, plain = gpt2.transformer.h[0], bare.transformer.h[0]  # GPT2BlockWithAdapters: attention, then FFN
    hidden = torch.randn(2, 5, 64)
    with torch.no_grad():
        h = plain.attn(plain.ln_1(hidden))[0]
        x = hidden + h + _bottleneck(block.attention_adapters.adapters["default"], h)  # Houlsby: z = h
        h = plain.mlp(plain.ln_2(x))
        expected = x + h + _bottleneck(block.output_adapters.adapters["default"], h)
        got = block(hidden)
    assert torch.allclose(got[0] if isinstance(got, tuple) else got, expected, atol=1e-5)


def test_paramcalc_train_fine_tunes_bert_with_adapters():
    from paramcalc.step import Step
    from paramcalc.train import TrainOptions, train

    config, task = TINY["bert"]
    result = paramcalc.count(config, task=task, peft="adapter:kind=houlsby", formulas=False)
    trained = []
    report = train(result, Step(batch=2, seq=32), TrainOptions(steps=3, lr=5e-3),
                   on_model=lambda model: trained.append(dict(model.named_parameters())))
    loss = report.measured["loss"]
    assert loss[-1] < loss[0], loss  # the same batch every step: the adapters and the head memorise it
    assert report.measured["trainable_params"] == result.trainable_params
    if report.predicted is None:  # the plan does not model adapters yet: then a note says why
        assert any("adapters" in note for note in report.notes), report.notes
    _, start, _ = _build("bert", "adapter:kind=houlsby")  # the same seeded build, before training
    after = trained[0]
    changed = {name for name, p in start.named_parameters() if not p.detach().equal(after[name].detach())}
    assert changed == {name for name, p in start.named_parameters() if p.requires_grad}


def test_cli_train_runs_adapters(cli, tmp_path):
    import json

    config, _ = TINY["gpt2"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    result = cli("train", str(path), "--task", "causal-lm", "--adapter", "kind=pfeiffer", "--seq", "16",
                 "--steps", "2", "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["options"]["peft"][0]["method"] == "adapter"
    assert document["measured"]["trainable_params"] == 2 * (2 * 64 * 4 + 4 + 64)  # L * (2*H*b + b + H), b = 64 // 16


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_checkpointing_recomputes_the_same_adapter_gradients(family):
    # Pfeiffer keeps each sub-layer's residual input for its hook; the recompute must see the same one
    import torch

    from paramcalc.runtime import build_model
    from paramcalc.step import Step, resolve_attention
    from paramcalc.trace import _loss

    grads = []
    for checkpointing in (False, True):
        result, _, batch = _build(family, "adapter:kind=pfeiffer,init=bert")
        step = resolve_attention(Step(batch=2, seq=16, grad_checkpointing=checkpointing), result)
        model = build_model(result, step, seed=0)
        for module in model.modules():  # same forward both times: no dropout
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        _loss(model(**batch)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_adapters_take_the_models_dtype():
    import torch

    from paramcalc.runtime import build_model
    from paramcalc.step import Step, resolve_attention

    config, task = TINY["gpt2"]
    result = paramcalc.count(config, task=task, peft="adapter:kind=houlsby", formulas=False)
    model = build_model(result, resolve_attention(Step(batch=2, seq=16, dtype="bf16"), result), seed=0)
    assert {p.dtype for n, p in model.named_parameters() if ".adapters." in n} == {torch.bfloat16}


def test_meta_injection_stays_on_meta_and_real_injection_is_seeded():
    import torch

    from paramcalc.meta import build_meta_model
    from paramcalc.verify import apply_real_peft

    result = paramcalc.count(TINY["t5"][0], task="seq2seq-lm", peft="adapter:kind=houlsby,cross=true", formulas=False)
    meta = apply_real_peft(build_meta_model(result.config, class_name=result.hf_class, task=result.task), result)
    assert {p.device.type for n, p in meta.named_parameters() if ".adapters." in n} == {"meta"}
    first, second = (_build("bert", "adapter:kind=houlsby,init=bert")[1] for _ in range(2))
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name


def test_refusals_are_one_line():
    from paramcalc.errors import ParamcalcError
    from paramcalc.runtime import build_model
    from paramcalc.step import Step, resolve_attention

    with pytest.raises(ParamcalcError, match="init must be one of mam_adapter, bert, houlsby, got 'lora'"):
        paramcalc.count("gpt2", peft="adapter:init=lora")
    # BLOOM's slow_but_exact forward never calls the output projection the adapter hangs on: refused, not skipped
    config = {**TINY["bloom"][0], "pretraining_tp": 2, "slow_but_exact": True}
    result = paramcalc.count(config, task="causal-lm", peft="adapter", formulas=False)
    with pytest.raises(ParamcalcError, match="slow_but_exact"):
        build_model(result, resolve_attention(Step(batch=2, seq=16), result))
