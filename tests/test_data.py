"""paramcalc.data: the trainer's batches, synthetic or read from a file, checked on tiny real models."""

import json

import pytest

import paramcalc
from paramcalc.data import BYTE_OFFSET, make_batches, read_examples, synthetic_inputs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = {
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 500, "n_positions": 64},
    "bert": {"model_type": "bert", "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
             "intermediate_size": 64, "vocab_size": 300, "max_position_embeddings": 64},
    "roberta": {"model_type": "roberta", "num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2,
                "intermediate_size": 64, "vocab_size": 300, "max_position_embeddings": 66},
    "t5": {"model_type": "t5", "d_model": 32, "d_ff": 64, "d_kv": 8, "num_heads": 4, "num_layers": 1,
           "num_decoder_layers": 1, "vocab_size": 300},
    "bloom": {"model_type": "bloom", "n_layer": 1, "hidden_size": 32, "n_head": 4, "vocab_size": 300},
}
CASES = [("gpt2", "causal-lm"), ("gpt2", "seq-cls"), ("gpt2", "token-cls"), ("gpt2", "base"),
         ("bert", "seq-cls"), ("bert", "token-cls"), ("bert", "masked-lm"), ("bert", "base"),
         ("roberta", "masked-lm"), ("roberta", "seq-cls"), ("t5", "seq2seq-lm"), ("t5", "base"), ("t5", "seq-cls"),
         ("bloom", "causal-lm"), ("bloom", "seq-cls")]
B, S, T = 2, 12, 7


def tiny(family, task="base", num_labels=None, peft=None):
    return paramcalc.count(TINY[family], task=task, num_labels=num_labels, formulas=False, peft=peft)


def loss_of(result, batches, batch, model_cache={}):
    """A real forward of the tiny model on ``batch``: the task's loss, or a stand-in for a bare backbone."""
    from paramcalc.meta import hf_config
    from paramcalc.verify import apply_real_peft

    key = (result.family, result.task, repr(result.config), repr(result.peft_options))
    if key not in model_cache:
        torch.manual_seed(0)
        hf = hf_config(result.config)
        batches.fill_config(hf)
        model = getattr(transformers, result.hf_class)(hf)
        model_cache[key] = apply_real_peft(model, result) if result.peft_options else model
    output = model_cache[key](**batch)
    loss = output.loss if getattr(output, "loss", None) is not None else output.last_hidden_state.pow(2).mean()
    assert torch.isfinite(loss), (result.family, result.task)
    return loss


def expected_keys(family, task, from_file):
    keys = {"input_ids"} | ({"labels"} if task != "base" else set())
    if family == "t5" and task == "base":
        keys |= {"decoder_input_ids"}
    if from_file and task in ("seq-cls", "token-cls", "seq2seq-lm") or from_file and (family, task) == ("t5", "base"):
        keys |= {"attention_mask"}
    return keys


def check_shapes(result, batch):
    assert batch["input_ids"].shape == (B, S) and batch["input_ids"].dtype == torch.long
    assert int(batch["input_ids"].max()) < result.config["vocab_size"]
    labels = batch.get("labels")
    if result.task == "seq-cls":
        assert labels.shape == (B,) and labels.dtype == torch.long
        assert 0 <= int(labels.min()) and int(labels.max()) < result.config["num_labels"]
    elif result.task == "seq2seq-lm":
        assert labels.shape == (B, T)
    elif labels is not None:
        assert labels.shape == (B, S)
    if "decoder_input_ids" in batch:
        assert batch["decoder_input_ids"].shape == (B, T)


@pytest.mark.parametrize("family,task", CASES)
def test_synthetic_batches_fit_the_task_and_run(family, task):
    result = tiny(family, task)
    batches = make_batches(result, batch=B, seq=S, tgt_seq=T if family == "t5" else None, seed=1)
    batch = batches.next()
    assert set(batch) == expected_keys(family, task, from_file=False)
    check_shapes(result, batch)
    loss_of(result, batches, batch)
    again = batches.next()  # pool=1: the same batch every step, so a model can learn it
    assert all(torch.equal(batch[k], again[k]) for k in batch)


@pytest.mark.parametrize("family,task", CASES)
def test_file_batches_fit_the_task_and_run(family, task, tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [{"text": "a short line", "label": "pos"}, {"text": "x" * 40, "label": "neg"},
             {"text": "héllo wörld", "label": "pos"}]
    path.write_text("\n".join(json.dumps(line) for line in lines))
    result = tiny(family, task)
    batches = make_batches(result, batch=B, seq=S, tgt_seq=T if family == "t5" else None, data=path)
    for _ in range(3):  # cycles over the three examples
        batch = batches.next()
        assert set(batch) == expected_keys(family, task, from_file=True)
        check_shapes(result, batch)
        loss_of(result, batches, batch)


def test_synthetic_ids_avoid_special_ids_and_are_seeded():
    result = tiny("roberta", "masked-lm")  # RoBERTa: bos 0, pad 1, eos 2
    batch = synthetic_inputs(result, 64, 16, generator=torch.Generator().manual_seed(0))
    assert int(batch["input_ids"].min()) >= 3 and int(batch["input_ids"].max()) < 300
    same = synthetic_inputs(result, 64, 16, generator=torch.Generator().manual_seed(0))
    assert torch.equal(batch["input_ids"], same["input_ids"])
    t5 = synthetic_inputs(tiny("t5", "seq-cls"), 4, 8)  # exactly one eos (1), at the end: T5 seq-cls reads it
    assert (t5["input_ids"] == 1).sum(1).tolist() == [1] * 4 and (t5["input_ids"][:, -1] == 1).all()


def test_synthetic_inputs_run_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        batch = synthetic_inputs(tiny("t5", "seq2seq-lm"), 3, 9, 5)
    assert batch["input_ids"].shape == (3, 9) and batch["labels"].shape == (3, 5)


def test_pool_cycles_distinct_batches():
    batches = make_batches(tiny("gpt2", "causal-lm"), batch=B, seq=S, pool=2)
    first, second, third = batches.next(), batches.next(), batches.next()
    assert not torch.equal(first["input_ids"], second["input_ids"])
    assert torch.equal(first["input_ids"], third["input_ids"])


def test_loss_falls_on_a_repeated_batch():
    result = tiny("gpt2", "causal-lm")
    batches = make_batches(result, batch=B, seq=S)
    from paramcalc.meta import hf_config

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(hf_config(result.config))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**batches.next()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7


def test_prompt_tuning_labels_cover_the_virtual_tokens(tmp_path):
    # peft prepends 3 virtual tokens and leaves token-cls and masked-lm labels as given: label them -100
    for task in ("token-cls", "masked-lm"):
        result = tiny("bert", task, peft="prompt:tokens=3")
        for data in (None, _write(tmp_path / "d.txt", "one line\ntwo lines here\n")):
            batches = make_batches(result, batch=B, seq=S, data=data)
            batch = batches.next()
            assert batch["labels"].shape == (B, S + 3) and (batch["labels"][:, :3] == -100).all()
            loss_of(result, batches, batch)
    causal = make_batches(tiny("gpt2", "causal-lm", peft="prompt:tokens=3"), batch=B, seq=S).next()
    assert causal["labels"].shape == (B, S)  # peft pads causal-lm labels itself


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding)) if isinstance(text, str) else path.write_bytes(text)
    return path


def test_byte_fallback_maps_bytes_and_packs_causal_lm(tmp_path):
    path = _write(tmp_path / "d.txt", "ab\n\n  \né\n")  # blank lines are not examples
    assert [e["text"] for e in read_examples(path)] == ["ab", "é"]
    batch = make_batches(tiny("gpt2", "causal-lm"), batch=1, seq=8, data=path).next()
    nl = ord("\n") + BYTE_OFFSET  # each example ends with a newline byte; the stream wraps round
    a, b, e1, e2 = (x + BYTE_OFFSET for x in (97, 98, 0xC3, 0xA9))  # "é" is two UTF-8 bytes
    assert batch["input_ids"].tolist() == [[a, b, nl, e1, e2, nl, a, b]]
    assert torch.equal(batch["labels"], batch["input_ids"]) and "attention_mask" not in batch


def test_rows_are_truncated_or_padded_to_seq(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\nhi,1\n" + "long " * 10 + ",0\n")
    result = tiny("bert", "seq-cls")
    batch = make_batches(result, batch=2, seq=6, data=path).next()
    hi = [ord(c) + BYTE_OFFSET for c in "hi"]
    assert batch["input_ids"][0].tolist() == hi + [0] * 4  # BERT pads with 0
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0], [1] * 6]
    assert batch["labels"].tolist() == [1, 0]
    s2s = make_batches(tiny("t5", "seq2seq-lm"), batch=2, seq=6, tgt_seq=4, data=path).next()
    assert s2s["labels"][0].tolist() == hi + [-100, -100]  # no loss at padding


def test_seq2seq_target_field(tmp_path):
    path = _write(tmp_path / "d.jsonl", json.dumps({"text": "source", "target": "ab"}) + "\n")
    batch = make_batches(tiny("t5", "seq2seq-lm"), batch=1, seq=8, tgt_seq=3, data=path).next()
    assert batch["labels"].tolist() == [[97 + BYTE_OFFSET, 98 + BYTE_OFFSET, -100]]


def test_string_labels_numbered_in_order_of_first_appearance(tmp_path):
    path = _write(tmp_path / "d.csv", "text,label\na,cat\nb,dog\nc,cat\nd,bird\n")
    batches = make_batches(tiny("bert", "seq-cls", num_labels=3), batch=4, seq=4, data=path)
    assert batches.next()["labels"].tolist() == [0, 1, 0, 2]
    assert batches.label_ids == {"cat": 0, "dog": 1, "bird": 2}


def test_regression_labels_are_floats(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "a", "label": 0.5}\n{"text": "b", "label": -2}\n')
    batch = make_batches(tiny("bert", "seq-cls", num_labels=1), batch=2, seq=4, data=path).next()
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [0.5, -2.0]


def test_token_cls_list_labels(tmp_path):
    path = _write(tmp_path / "d.jsonl", '{"text": "abc", "label": [1, 0, 1]}\n')
    batch = make_batches(tiny("bert", "token-cls"), batch=1, seq=5, data=path).next()
    assert batch["labels"].tolist() == [[1, 0, 1, -100, -100]]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["the cat sat on the mat", "a dog ran home"],
                            trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    path = tmp_path_factory.mktemp("tokenizer")
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                         eos_token="[EOS]").save_pretrained(path)
    return path, tok


def test_local_tokenizer_directory(tmp_path, tokenizer_dir):
    path, tok = tokenizer_dir
    data = _write(tmp_path / "d.txt", "the cat sat\na dog\n")
    cat, eos = [tok.token_to_id(w) for w in ("the", "cat", "sat")], tok.token_to_id("[EOS]")
    batches = make_batches(tiny("gpt2", "causal-lm"), batch=1, seq=7, data=data, tokenizer=path)
    dog = [tok.token_to_id(w) for w in ("a", "dog")]
    assert batches.next()["input_ids"].tolist() == [cat + [eos] + dog + [eos]]  # packed, eos between examples
    rows = make_batches(tiny("bert", "token-cls"), batch=1, seq=5, data=data, tokenizer=path)
    assert rows.pad_token_id == 0 and rows.next()["input_ids"].tolist() == [cat + [0, 0]]
    # a bare tokenizer.json (the tokenizers library's own format) works too
    assert make_batches(tiny("gpt2", "causal-lm"), batch=1, seq=3, data=data,
                        tokenizer=path / "tokenizer.json").next()["input_ids"].tolist() == [cat]
    assert "tokenizer" in batches.source and "2 examples" in batches.source


BAD = [
    ("missing.txt", None, "no such file"),
    ("d.xml", "<a/>", "unknown file type '.xml'"),
    ("d.txt", "\n \n", "no examples"),
    ("d.txt", b"ok\n\xff\xfe\n", "not UTF-8"),
    ("d.jsonl", '{"text": "a"}\n{oops\n', "line 2: not valid JSON"),
    ("d.jsonl", '["text"]\n', "line 1: each line must be a JSON object"),
    ("d.jsonl", '{"label": 1}\n', 'line 1: no "text" field'),
    ("d.jsonl", '{"text": 3}\n', '"text" must be non-empty text'),
    ("d.csv", "body,label\na,1\n", 'no "text" column (it has: body, label)'),
    ("d.csv", "text,label\na,cat\nb,dog\nc,bird\n",
     "3 distinct labels (cat, dog, bird) but the model has num_labels = 2; use --num-labels 3"),
    ("d.csv", "text,label\na,1\nb,5\n", "line 3: label 5 is out of range for num_labels = 2"),
    ("d.csv", "text,label\na,1\nb,\n", 'line 3: seq-cls needs a "label"'),
    ("d.txt", "no labels here\n", 'seq-cls needs a "label"'),
]


@pytest.mark.parametrize("name,content,message", BAD)
def test_bad_data_is_a_clear_error(name, content, message, tmp_path):
    path = tmp_path / name
    if content is not None:
        _write(path, content)
    with pytest.raises(paramcalc.ParamcalcError) as info:
        make_batches(tiny("bert", "seq-cls"), batch=B, seq=S, data=path)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_tokenizers_and_vocab(tmp_path, tokenizer_dir):
    data = _write(tmp_path / "d.txt", "the cat\n")
    cases = [
        (dict(tokenizer=tmp_path / "nowhere"), tiny("gpt2", "causal-lm"), "no such directory or file"),
        (dict(tokenizer=tmp_path), tiny("gpt2", "causal-lm"), "cannot load a tokenizer"),
        (dict(tokenizer=_write(tmp_path / "t.json", "{}")), tiny("gpt2", "causal-lm"), "cannot load"),
        (dict(), paramcalc.count({**TINY["bert"], "vocab_size": 200}, task="masked-lm", formulas=False),
         "byte-level fallback (no --tokenizer) needs vocab_size >= 260"),
        (dict(tokenizer=tokenizer_dir[0]), paramcalc.count({**TINY["gpt2"], "vocab_size": 5}, task="causal-lm",
                                                             formulas=False), "does not match the model"),
    ]
    for extra, result, message in cases:
        with pytest.raises(paramcalc.ParamcalcError) as info:
            make_batches(result, batch=1, seq=4, data=data, **extra)
        assert message in str(info.value), str(info.value)
    with pytest.raises(paramcalc.ParamcalcError, match="give --data FILE too"):
        make_batches(tiny("gpt2", "causal-lm"), batch=1, seq=4, tokenizer=tokenizer_dir[0])
    with pytest.raises(paramcalc.ParamcalcError, match="longer than"):
        make_batches(tiny("gpt2", "causal-lm"), batch=1, seq=65)


def test_data_module_keeps_torch_out_of_the_analytic_path():
    import subprocess
    import sys

    code = "import sys, paramcalc.data; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
