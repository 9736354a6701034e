"""The CLI end to end, in-process (click's CliRunner): reports, JSON, LaTeX, --verify, errors."""

import json
from pathlib import Path

import pytest


def test_table_shows_components_formulas_and_totals(cli):
    result = cli("bert-base-uncased")
    assert result.exit_code == 0
    out = result.stdout
    for text in ("word embeddings", "attention query", "FFN in", "pooler", "H*V", "L*(H**2 + H)",
                 "109,482,240", "closed form"):
        assert text in out, text


def test_headline_lora_command(cli):
    result = cli("bert-base-uncased", "--lora", "r=8")
    assert result.exit_code == 0
    assert "trainable params: 294,912 || all params: 109,777,152 || trainable%: 0.2686" in result.stdout
    assert "LoRA attention query" in result.stdout and "2*H*L*r" in result.stdout


def test_peft_json_document(cli):
    doc = json.loads(cli("t5-small", "--task", "seq2seq-lm", "--quant", "nf4", "--lora", "r=8", "--json").stdout)
    assert doc["trainable_params"] == 294_912
    assert doc["peft"][0]["method"] == "lora" and doc["peft"][0]["added_params"] == 294_912
    assert doc["peft_print"] == {"trainable": 294_912, "all": doc["total_params"]}  # t5-small: no odd weights
    assert sum(c["count"] for c in doc["components"]) == doc["total_params"]
    assert all("bytes" in c for c in doc["components"])
    assert {c["group"] for c in doc["components"] if c["name"].startswith("LoRA")} == {"peft"}


def test_json_schema_and_components_sum_to_total(cli):
    result = cli("google-bert/bert-base-uncased", "--task", "seq-cls", "--num-labels", "3", "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["schema"] == "paramcalc/1"
    assert doc["model"] == "bert-base-uncased" and doc["family"] == "bert" and doc["task"] == "seq-cls"
    assert sum(c["count"] for c in doc["components"]) == doc["total_params"]
    # 109,482,240 + classifier 768 * 3 + 3
    assert doc["total_params"] == 109_482_240 + 768 * 3 + 3 == doc["trainable_params"]
    groups = {c["group"] for c in doc["components"]}
    assert groups <= {"embedding", "attention", "ffn", "layernorm", "pooler", "head", "peft", "other"}
    assert {"name", "group", "formula", "count", "trainable"} <= set(doc["components"][0])


def test_latex_table(cli):
    result = cli("gpt2", "--latex")
    assert result.exit_code == 0
    assert r"\begin{tabular}" in result.stdout and r"\bottomrule" in result.stdout
    assert "124{,}439{,}808" in result.stdout  # GPT2Model


def test_verify_passes_with_a_check_per_component(cli):
    result = cli("t5-small", "--task", "seq2seq-lm", "--verify")
    assert result.exit_code == 0
    assert "✓ shared embeddings" in result.stdout
    assert "verified: all 60,506,624 parameters of T5ForConditionalGeneration" in result.stdout


def test_verify_mismatch_exits_1_and_names_the_parameter(cli, monkeypatch):
    import torch

    import paramcalc.verify
    from paramcalc.meta import build_meta_model

    def with_an_extra_parameter(*args, **kwargs):
        model = build_meta_model(*args, **kwargs)
        model.register_parameter("surprise", torch.nn.Parameter(torch.empty(3, device="meta")))
        return model

    monkeypatch.setattr(paramcalc.verify, "build_meta_model", with_an_extra_parameter)
    result = cli("bert-base-uncased", "--verify")
    assert result.exit_code == 1
    assert "surprise" in result.stderr


def test_set_overrides_change_the_count(cli):
    result = cli("bert-base-uncased", "--set", "num_hidden_layers=6", "--json")
    doc = json.loads(result.stdout)
    assert doc["total_params"] == 109_482_240 - 6 * 7_087_872


def test_config_file_and_directory(cli, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    by_dir = json.loads(cli(str(tmp_path), "--json").stdout)
    by_file = json.loads(cli(str(tmp_path / "config.json"), "--json").stdout)
    assert by_dir["total_params"] == by_file["total_params"]
    # GPT2Config defaults elsewhere: V*H + P*H + 2*H + 2 layers * (12*H**2 + 13*H), H = 768
    assert by_dir["total_params"] == 50257 * 768 + 1024 * 768 + 2 * 768 + 2 * (12 * 768**2 + 13 * 768)


def test_generic_path_for_a_model_type_without_a_family_file(cli, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "distilbert", "n_layers": 2}))
    result = cli(str(tmp_path), "--json")
    doc = json.loads(result.stdout)
    assert doc["family"] == "generic"
    assert "no formula file" in doc["notes"][0]
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.DistilBertModel(transformers.DistilBertConfig(n_layers=2))
    assert doc["total_params"] == sum(p.numel() for p in model.parameters())


def test_unmodelled_setting_falls_back_to_the_meta_device(cli):
    result = cli("gpt2", "--set", "add_cross_attention=true", "--json")
    doc = json.loads(result.stdout)
    assert doc["family"] == "generic" and "add_cross_attention" in doc["notes"][0]
    assert doc["total_params"] > 124_439_808  # the cross-attention layers are counted, not ignored


def test_list_shows_the_catalog(cli):
    result = cli("list")
    assert result.exit_code == 0
    for name in ("bert-base-uncased", "t5-v1_1-small", "bloom-7b1", "google-bert/bert-base-uncased"):
        assert name in result.stdout


def test_every_command_is_documented_with_an_example(cli):
    from paramcalc.cli import main

    for name in main.commands:
        help_text = cli(name, "--help").stdout
        assert "Example:" in help_text, name
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for name in set(main.commands) - {"count"}:
        assert f"paramcalc {name}" in readme, name


def help_examples():
    """Every command line under 'Example:' in the help of paramcalc and of each command."""
    from click.testing import CliRunner

    from paramcalc.cli import main

    found = []
    for name in (None, *main.commands):
        text = CliRunner().invoke(main, [name, "--help"] if name else ["--help"]).stdout
        block = text.split("Example:", 1)[1].split("\n\n", 1)[0]
        for line in block.strip().splitlines():
            found += [part.strip() for part in line.split("&&")]
    return found


@pytest.mark.parametrize("example", help_examples())
def test_every_help_example_parses(example):
    """The examples a user copies from --help are valid command lines: options exist, choices are allowed."""
    import shlex

    from paramcalc.cli import main

    words = shlex.split(example)
    assert words[0] == "paramcalc"
    name = words[1] if words[1] in main.commands else "count"
    rest = words[2:] if name == words[1] else words[1:]
    main.commands[name].make_context(name, rest)  # parses, validates choices and types; runs nothing


BAD_INPUTS = [
    (["bert-base-uncassed"], "did you mean bert-base-uncased"),
    (["bigscience/bloom-560"], "did you mean bloom-560m"),
    (["{tmp}/empty"], "holds no config.json"),
    (["{tmp}/invalid.json"], "is not valid JSON"),
    (["{tmp}/binary.json"], "cannot read"),
    (["{tmp}/list.json"], "must hold a JSON object"),
    (["{tmp}/no_type.json"], "has no 'model_type'"),
    (["{tmp}/unknown_type.json"], "unknown model_type 'foo'"),
    (["{tmp}/heads.json"], "hidden_size (770) must be divisible by num_attention_heads (12)"),
    (["gpt2", "--set", "n_layers=3"], "no such config key; did you mean n_layer"),
    (["gpt2", "--set", "n_layer=abc"], "expected an integer"),
    (["gpt2", "--set", "n_layer=2.5"], "expected an integer"),
    (["gpt2", "--set", "tie_word_embeddings=1"], "expected true or false"),
    (["gpt2", "--set", "n_layer=-1"], "n_layer must be a positive integer, got -1"),
    (["gpt2", "--set", "n_embd=0"], "n_embd must be a positive integer, got 0"),
    (["gpt2", "--set", "n_inner=abc"], "n_inner must be a positive integer"),
    (["gpt2", "--set", "n_head=7"], "n_embd (768) must be divisible by n_head (7)"),
    (["gpt2", "--set", "n_layer"], "expects KEY=VALUE"),
    (["t5-small", "--task", "causal-lm"], "choose one of: base, seq2seq-lm, seq-cls, token-cls"),
    (["bert-base-uncased", "--task", "seq-cls", "--num-labels", "0"], "num_labels must be a positive integer"),
    (["bert-base-uncased", "--task", "nope"], "is not one of"),
    (["{tmp}/type_list.json"], "model_type must be a string"),
    (["{tmp}/labels.json"], "id2label must map label ids to names"),
    (["{tmp}/tie_string.json", "--task", "causal-lm"], "tie_word_embeddings must be true or false"),
    (["gpt2", "--set", "model_type=bert"], "--set model_type"),
    (["roberta-base", "--set", "vocab_size=1", "--verify"], "transformers cannot build this model"),
    (["bert-base-uncased", "--set", "vocab_size=99999999999999999999999", "--verify"], "cannot build"),
    (["torch.nn:Linear"], "torch.nn:Linear() failed: TypeError"),
    (["{tmp}/ckpt[/best]", "--task", "masked-lm"], "choose one of: base, causal-lm, seq-cls, token-cls"),
    (["gpt2", "--lora", "r=0"], "r must be a positive integer, got 0"),
    (["gpt2", "--lora", "r=-3"], "r must be a positive integer, got -3"),
    (["gpt2", "--lora", "r=eight"], "r='eight' is not an integer"),
    (["gpt2", "--lora", "rank=8"], "unknown key 'rank'; keys are: r, alpha"),
    (["gpt2", "--lora", "r=8,targets=query"], "match no module of GPT-2; adaptable modules are: c_attn"),
    (["gpt2", "--lora", "targets=ln_1"], "'ln_1' is a layernorm module, which LoRA cannot adapt"),
    (["gpt2", "--lora", "bias=some"], "bias must be one of none, all, lora_only"),
    (["gpt2", "--lora", "modules_to_save=nothing"], "modules_to_save nothing match no module"),
    (["bert-base-uncased", "--task", "token-cls", "--lora", "targets=all-linear"], "peft cannot adapt classifier"),
    (["{tmp}/distil", "--lora", "r=8"], "PEFT deltas need a formula file"),
    (["gpt2", "--prompt", "tokens=0"], "--prompt: tokens must be a positive integer, got 0"),
    (["t5-small", "--prompt", "tokens=5,submodules=3"], "submodules must be 1 or 2"),
    (["gpt2", "--prefix", "tokens=-1"], "--prefix: tokens must be a positive integer"),
    (["gpt2", "--prefix", "hidden=10"], "add projection=true"),
    (["gpt2", "--ptuning", "encoder=gru"], "encoder must be one of mlp, lstm"),
    (["gpt2", "--ia3", "targets=c_attn,ff=c_fc"], "must also be in targets"),
    (["gpt2", "--ia3", "targets=wte"], "IA3 adapts Linear and Conv1D modules"),
    (["gpt2", "--ia3", "targets=nothing"], "match no module of GPT-2"),
    (["gpt2", "--ia3", "--lora", "r=2"], "one method to a model at a time"),
    (["gpt2", "--adapter", "kind=compacter"], "kind must be one of pfeiffer, houlsby"),
    (["gpt2", "--adapter", "bottleneck=0"], "bottleneck must be a positive integer"),
    (["gpt2", "--adapter", "bottleneck=8,reduction=4"], "not both"),
    (["gpt2", "--adapter", "cross=true"], "cross=true needs cross-attention"),
    (["gpt2", "--quant", "int4"], "type must be one of nf4, fp4, int8, got 'int4'"),
    (["gpt2", "--quant", "int8,double_quant=true"], "double_quant applies to nf4/fp4"),
    (["gpt2", "--quant", "nf4,dtype=fp8"], "dtype must be one of fp32, fp16, bf16"),
    (["{tmp}/distil", "--quant", "nf4"], "--quant needs a formula file"),
]


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "invalid.json").write_text("{not json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00\x81")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "no_type.json").write_text('{"hidden_size": 8}')
    (tmp_path / "unknown_type.json").write_text('{"model_type": "foo"}')
    (tmp_path / "heads.json").write_text('{"model_type": "bert", "hidden_size": 770}')
    (tmp_path / "type_list.json").write_text('{"model_type": ["gpt2"]}')
    (tmp_path / "labels.json").write_text('{"model_type": "bert", "id2label": 5}')
    (tmp_path / "tie_string.json").write_text('{"model_type": "gpt2", "tie_word_embeddings": "false"}')
    (tmp_path / "distil").mkdir()
    (tmp_path / "distil" / "config.json").write_text('{"model_type": "distilbert", "n_layers": 1}')
    (tmp_path / "ckpt[" / "best]").mkdir(parents=True)  # rich markup in a path must not break anything
    (tmp_path / "ckpt[" / "best]" / "config.json").write_text('{"model_type": "gpt2", "n_layer": 1}')
    return tmp_path


@pytest.mark.parametrize(("args", "message"), BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(cli, bad_files, refused, args, message):
    refused(cli(*[a.format(tmp=bad_files) for a in args]), message)


def test_custom_module_factory(cli, tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def tiny():\n"
        "    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = json.loads(cli("my_models:tiny", "--json").stdout)
    assert doc["family"] == "generic"
    assert doc["total_params"] == (4 * 3 + 3) + (3 * 2 + 2)  # 23
    assert cli("my_models:tiny", "--verify").exit_code == 0
    missing = cli("my_models:nope")
    assert missing.exit_code == 2 and "cannot import 'my_models:nope'" in missing.stderr


def test_markup_like_paths_are_shown_verbatim(cli, bad_files):
    result = cli(str(bad_files / "ckpt[" / "best]"))
    assert result.exit_code == 0 and "ckpt[/best]" in result.stdout


def test_alias_keys_win_as_in_transformers(cli, tmp_path):
    # GPT2Config.attribute_map: hidden_size sets n_embd, whatever the key order
    config = {"model_type": "gpt2", "n_embd": 768, "hidden_size": 64, "n_head": 4, "n_layer": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert cli(str(tmp_path), "--verify").exit_code == 0
    assert cli("gpt2", "--set", "hidden_size=64", "--set", "n_head=4", "--verify").exit_code == 0
    assert cli("bloom-560m", "--set", "n_embed=64", "--verify").exit_code == 0


def test_generic_path_accepts_the_config_class_keys(cli, tmp_path):
    config = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(config))
    result = cli(str(tmp_path), "--task", "seq-cls", "--num-labels", "3", "--set", "tie_word_embeddings=true",
                 "--verify")
    assert result.exit_code == 0, result.output


def test_a_damaged_formula_cache_is_rebuilt(tmp_path, monkeypatch):
    import paramcalc

    monkeypatch.setenv("PARAMCALC_CACHE_DIR", str(tmp_path))
    expected = paramcalc.count("gpt2").closed_form
    for damage in ("{}", "[1]", '{"rows": [], "closed": "0", "closed_latex": "0"}'):
        for cached in tmp_path.glob("formulas-*.json"):
            cached.write_text(damage)
        result = paramcalc.count("gpt2")
        assert result.closed_form == expected
        assert all(c.formula for c in result.components)


def test_latex_escapes_special_characters_once():
    from paramcalc.report import _latex_escape

    assert _latex_escape(r"C:\m_1 $x^2~ 50% #1 {a}") == (
        r"C:\textbackslash{}m\_1 \$x\textasciicircum{}2\textasciitilde{} 50\% \#1 \{a\}"
    )


def test_checkpointing_shows_the_recomputed_flops(cli):
    """Backward re-runs the checkpointed layers: the table names those FLOPs, the JSON keeps them inside backward."""
    plain = json.loads(cli("gpt2", "--task", "causal-lm", "--batch", "2", "--json").stdout)["flops"]
    ckpt = json.loads(cli("gpt2", "--task", "causal-lm", "--batch", "2", "--grad-checkpointing", "--json").stdout)["flops"]
    assert ckpt["recompute"] > 0 and "recompute" not in plain
    assert ckpt["forward"] == plain["forward"] and ckpt["total"] == ckpt["forward"] + ckpt["backward"]
    table = cli("gpt2", "--task", "causal-lm", "--batch", "2", "--grad-checkpointing").stdout
    assert f"re-running checkpointed layers: {ckpt['recompute']:,}" in " ".join(table.split())
