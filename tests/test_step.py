"""One training step: analytic FLOPs and model states against a traced fake-tensor step."""

import os
import subprocess
import sys

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from strategies import REPLAYED, tasks

import paramcalc
from paramcalc import families
from paramcalc.flops import step_flops
from paramcalc.memory import model_states
from paramcalc.step import Step, attention_note, attn_implementation, resolve_attention
from paramcalc.trace import trace_step

EXAMPLES = int(os.environ.get("PARAMCALC_EXAMPLES", "200")) // 10  # 20 traced steps per family by default


TARGETS = {"bert": ["query", "key", "value", "dense", "word_embeddings"], "roberta": ["query", "value", "dense"],
           "gpt2": ["c_attn", "c_proj", "c_fc", "wte"], "bloom": ["query_key_value", "dense", "dense_4h_to_h"],
           "t5": ["q", "k", "v", "o", "wo", "wi", "wi_0", "shared"],
           **dict.fromkeys(("llama", "mistral", "qwen2"), ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                           "up_proj", "down_proj", "embed_tokens"]),
           "mixtral": ["q_proj", "k_proj", "v_proj", "o_proj", "embed_tokens"]}


@st.composite
def methods(draw, family):
    """Full fine-tuning, LoRA (random rank, targets and bias mode) or IA3."""
    kind = draw(st.sampled_from(["full", "lora", "ia3"]))
    if kind == "full":
        return None
    if kind == "ia3":
        return "ia3"
    targets = draw(st.lists(st.sampled_from(TARGETS[family]), min_size=1, max_size=3, unique=True))
    bias = draw(st.sampled_from(["none", "all", "lora_only"]))
    return f"lora:r={draw(st.integers(1, 8))},bias={bias},targets={','.join(targets)}"


@pytest.mark.parametrize("family", sorted(REPLAYED))
@settings(max_examples=EXAMPLES, deadline=None, derandomize=not os.environ.get("PARAMCALC_EXAMPLES"))
@given(data=st.data(), batch=st.integers(1, 3), seq=st.integers(1, 24), tgt=st.integers(1, 12),
       checkpointing=st.booleans())
def test_flops_equal_flop_counter(family, data, batch, seq, tgt, checkpointing):
    """Full fine-tuning, LoRA and IA3, with and without gradient checkpointing: forward and backward matmul
    FLOPs (backward with the checkpointed layers' second forward) exactly as torch counts them."""
    config = data.draw(REPLAYED[family], label="config")
    task = data.draw(tasks(family), label="task")
    method = data.draw(methods(family), label="method")
    assume(not (family == "t5" and task == "seq-cls"))  # reads eos positions from the data: not traceable
    if family == "t5":
        assume(config["relative_attention_num_buckets"] >= 4)  # transformers divides by a quarter of them
    attention = data.draw(st.sampled_from(families.families()[family].attention_kernels), label="attention")
    try:
        result = paramcalc.count(config, task=task, peft=method, formulas=False)
    except paramcalc.ParamcalcError:  # e.g. targets that match nothing in this config
        assume(False)
    positions = {"bert": "P", "roberta": "P", "gpt2": "P"}.get(family)
    limit = result.values[positions] - (2 if family == "roberta" else 0) if positions else seq
    step = Step(batch=batch, seq=max(1, min(seq, limit)), tgt_seq=tgt if family == "t5" else None,
                attention=attention, grad_checkpointing=checkpointing)
    try:
        traced = trace_step(result, step, steady=False)
    except paramcalc.ParamcalcError as exc:  # LoRA on T5's shared embedding alone: nothing trains
        assert "no trainable parameter takes part" in str(exc)
        return
    analytic = step_flops(result, step)
    assert (analytic.forward, analytic.backward) == (traced.flops["forward"], traced.flops["backward"])


def test_lora_skips_input_gradients_before_the_first_adapted_module():
    # LoRA on the last layer's FFN only: nothing before it needs an input gradient
    result = paramcalc.count("bert-base-uncased", task="seq-cls", formulas=False, peft="lora:r=8,targets=all-linear")
    late = paramcalc.count("bert-base-uncased", task="seq-cls", formulas=False,
                           peft="lora:r=8,targets=pooler.dense")
    step = Step(batch=2, seq=32)
    assert step_flops(late, step).backward < step_flops(result, step).backward / 10


def test_bert_base_flops_by_hand():
    # forward: 2 * tokens * (12 layers * (4*H*H + 2*H*I) + pooler/classifier on 8 [CLS] vectors)
    #          + 12 layers * 2 attention matmuls * 2 * b * heads * s * s * head_dim
    result = paramcalc.count("bert-base-uncased", task="seq-cls", formulas=False)
    b, s, h, i = 8, 128, 768, 3072
    linear = 2 * b * s * 12 * (4 * h * h + 2 * h * i) + 2 * b * (h * h + h * 2)
    attention = 12 * 2 * (2 * b * 12 * s * s * 64)
    flops = step_flops(result, Step(batch=b, seq=s))
    assert flops.forward == linear + attention
    assert flops.backward == 2 * flops.forward  # eager: input and weight gradients everywhere


CASES = [(family, method, dtype, optimizer)
         for family in ("bert", "roberta", "gpt2", "bloom", "t5")
         for method in (None, "lora:r=4", "prompt:tokens=3")
         for dtype in ("fp32", "bf16")
         for optimizer in ("adamw", "sgd-momentum", "sgd")]
SMALL = {
    "bert": {"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
             "intermediate_size": 48, "vocab_size": 90, "max_position_embeddings": 40},
    "roberta": {"model_type": "roberta", "num_hidden_layers": 1, "hidden_size": 24, "num_attention_heads": 3,
                "intermediate_size": 40, "vocab_size": 70, "max_position_embeddings": 40, "pad_token_id": 1},
    "gpt2": {"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 80, "n_positions": 40},
    "bloom": {"model_type": "bloom", "n_layer": 2, "hidden_size": 32, "n_head": 4, "vocab_size": 80},
    "t5": {"model_type": "t5", "num_layers": 2, "d_model": 32, "num_heads": 4, "d_kv": 8, "d_ff": 40,
           "vocab_size": 80, "decoder_start_token_id": 0},
    # grouped-query decoders: 2 K/V heads for 4 query heads; Mistral's sliding window below the 8 positions these
    # tests run (its mask then reaches sdpa); Qwen2 with a head_dim that is not H/A, and attention dropout (sdpa's
    # math path, which repeats the K/V heads itself)
    "llama": {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 40, "vocab_size": 80, "max_position_embeddings": 40},
    "mistral": {"model_type": "mistral", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 40, "vocab_size": 80, "sliding_window": 6},
    "qwen2": {"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 12, "intermediate_size": 40, "vocab_size": 80,
              "attention_dropout": 0.1},
}
TASK = {"bert": "seq-cls", "roberta": "token-cls", "gpt2": "causal-lm", "bloom": "seq-cls", "t5": "seq2seq-lm",
        "llama": "causal-lm", "mistral": "seq-cls", "qwen2": "causal-lm"}


@pytest.mark.parametrize(("family", "method", "dtype", "optimizer"), CASES,
                         ids=[f"{f}:{m}:{d}:{o}" for f, m, d, o in CASES])
def test_model_states_equal_the_traced_step(family, method, dtype, optimizer):
    result = paramcalc.count(SMALL[family], task=TASK[family], peft=method, formulas=False)
    step = Step(batch=2, seq=16, dtype=dtype, optimizer=optimizer)
    traced = trace_step(result, step, steady=False).after_step
    states = model_states(result, step)
    assert (states.weights, states.gradients, states.optimizer) == (
        traced["parameters"], traced["gradients"], traced["optimizer"])


def test_adamw_update_transient_is_two_copies_of_the_largest_tensor():
    result = paramcalc.count(SMALL["gpt2"], task="causal-lm", formulas=False)
    step = Step(batch=1, seq=4)
    traced = trace_step(result, step)
    largest = 32 * (4 * 32) * 4  # the FFN's Conv1D weights (H x 4H) are the largest tensors, fp32
    assert model_states(result, step).optimizer_transient == 2 * largest
    assert traced.phase_of_peak == "optimizer"
    # plus the odd small temporary still alive at that moment (here a bias-sized buffer: 1.6 %)
    assert 0 <= traced.at_peak["transient"] - 2 * largest <= 0.02 * 2 * largest


def test_analytic_step_path_imports_no_torch():  # count, memory, FLOPs and the time table
    probe = ("import sys, paramcalc; from paramcalc.step import Step; from paramcalc.flops import step_flops; "
             "from paramcalc.memory import model_states; r = paramcalc.count('gpt2', task='causal-lm'); "
             "s = Step(batch=4, seq=256, mixed_precision='bf16'); step_flops(r, s); model_states(r, s); "
             "from paramcalc.plan import plan; assert plan(r, s, device='a100-80gb').throughput['table']; "
             "print(any(m in sys.modules for m in ('torch', 'transformers', 'peft')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_trace_command(cli):
    result = cli("trace", "gpt2", "--task", "causal-lm", "--set", "n_layer=1", "--batch", "2", "--seq", "32",
                 "--json")
    assert result.exit_code == 0, result.output
    import json

    doc = json.loads(result.stdout)
    assert doc["relative_error"]["flops_total"] == 0.0
    assert doc["relative_error"]["weights"] == 0.0
    assert doc["traced"]["peak"] > doc["traced"]["after_step"]["parameters"]


@pytest.mark.parametrize(("args", "message"), [
    (["gpt2", "--batch", "0"], "--batch must be a positive integer"),
    (["gpt2", "--seq", "-4"], "--seq must be a positive integer"),
    (["gpt2", "--seq", "2000"], "n_positions = 1024 allows at most 1024 tokens"),
    (["roberta-base", "--seq", "513"], "allows at most 512 tokens"),
    (["gpt2", "--optimizer", "lion"], "unknown optimizer 'lion'"),
    (["bloom-560m", "--attention", "sdpa"], "eager attention only"),
    (["gpt2", "--tgt-seq", "8"], "--tgt-seq is for encoder-decoder models"),
    (["gpt2", "--dtype", "bf16", "--mixed-precision", "bf16"], "keeps fp32 master weights"),
    (["t5-small", "--task", "seq-cls", "--set", "num_layers=1"], "fake tensors do not have"),
])
def test_trace_bad_input(cli, refused, args, message):
    refused(cli("trace", *args), message)


@pytest.mark.parametrize("family", ["roberta", "t5"])
def test_trace_runs_bottleneck_adapters(family):
    """Adapters injected as AdapterHub places them take part in the forward: their matmuls are counted, only
    they (and heads) train, and the traced model states are the analytic ones."""
    method = "adapter:kind=pfeiffer,bottleneck=4"
    plain = paramcalc.count(SMALL[family], task=TASK[family], formulas=False)
    result = paramcalc.count(SMALL[family], task=TASK[family], peft=method, formulas=False)
    step = Step(batch=2, seq=8)
    traced, base = trace_step(result, step, steady=False), trace_step(plain, step, steady=False)
    # Pfeiffer: one adapter after each FFN, down (H -> 4) and up (4 -> H), 2 FLOPs per multiply-add per token:
    # RoBERTa 1 layer * 2 * 2*16 tokens*24*4 = 6,144; T5 (2 encoder + 2 decoder layers) 4 * 2 * 2*16*32*4 = 32,768
    assert traced.flops["forward"] - base.flops["forward"] == {"roberta": 6144, "t5": 32768}[family]
    states = model_states(result, step)
    assert (states.gradients, states.optimizer) == (traced.after_step["gradients"], traced.after_step["optimizer"])


def _family_results():
    return {family: paramcalc.count(SMALL[family], task="base", formulas=False) for family in SMALL}


def test_auto_attention_is_what_transformers_builds():
    """The family files' default kernel (torch-free) against transformers' own choice, on the meta device:
    sdpa for BERT, RoBERTa, GPT-2, T5, Llama, Mistral and Qwen2, eager for BLOOM."""
    import torch
    import transformers

    from paramcalc.meta import hf_config
    from paramcalc.step import default_attention

    built = {}
    for family, result in _family_results().items():
        with torch.device("meta"):
            model = getattr(transformers, result.hf_class)(hf_config(result.config))
        built[family] = model.config._attn_implementation
        assert built[family] == default_attention(result), family
        assert attention_note(Step(), result) == f"attention: {built[family]} (transformers' default for {family})"
    assert built == {"bert": "sdpa", "roberta": "sdpa", "gpt2": "sdpa", "bloom": "eager", "t5": "sdpa", "llama": "sdpa",
                     "mistral": "sdpa", "qwen2": "sdpa"}


def test_resolve_attention_and_the_kernel_to_build():
    results = _family_results()
    assert resolve_attention(Step(), results["bert"]).attention == "sdpa"
    assert resolve_attention(Step(), results["bloom"]).attention == "eager"
    assert resolve_attention(Step(attention="eager"), results["gpt2"]).attention == "eager"  # as asked
    assert attention_note(Step(), results["bert"]) == "attention: sdpa (transformers' default for bert)"
    assert attention_note(Step(attention="eager"), results["bert"]) == "attention: eager (as asked)"
    assert attn_implementation(Step(attention="flash"), "cuda") == "flash_attention_2"
    assert attn_implementation(Step(attention="flash"), "cpu") == "sdpa"
    with pytest.raises(paramcalc.ParamcalcError, match="resolve --attention auto first"):
        attn_implementation(Step())


def test_sdpa_with_attention_dropout_counts_the_math_path_on_a_cpu():
    # with dropout, a CPU runs sdpa as two bmm (eager's FLOPs); CUDA's fused kernel recomputes the scores
    # in backward: 5 matmuls of 2*b*h*s*s*d, against eager's 4 when q, k and v all need gradients
    result = paramcalc.count(SMALL["bert"], task="seq-cls", formulas=False)
    step = Step(batch=2, seq=16, attention="sdpa")
    eager = step_flops(result, Step(batch=2, seq=16, attention="eager"))
    cpu, cuda = step_flops(result, step), step_flops(result, step, device="cuda")
    one = 2 * 2 * 4 * 16 * 16 * 8  # b=2, 4 heads, s=16, head dim 32/4
    assert (cpu.forward, cpu.backward) == (eager.forward, eager.backward)
    assert cuda.backward - cpu.backward == 2 * (5 - 4) * one  # two layers
    traced = trace_step(result, step, steady=False)
    assert (traced.flops["forward"], traced.flops["backward"]) == (cpu.forward, cpu.backward)
    assert traced.attention == "sdpa" and "math path" in " ".join(traced.notes)


def test_trace_keeps_the_models_attention_dropout():
    """trace never changes the user's model: in fp32, sdpa with attention dropout costs what eager attention
    costs (the math path keeps the probabilities and the dropout mask too), more than sdpa without dropout."""
    config = {**SMALL["bert"], "num_hidden_layers": 1}
    result = paramcalc.count(config, task="seq-cls", formulas=False)
    no_dropout = paramcalc.count({**config, "attention_probs_dropout_prob": 0.0}, task="seq-cls", formulas=False)
    step = Step(batch=2, seq=16, attention="sdpa")
    sdpa, eager = trace_step(result, step), trace_step(result, Step(batch=2, seq=16, attention="eager"))
    assert sdpa.peak == eager.peak > trace_step(no_dropout, step).peak


@pytest.mark.parametrize("method", ["prompt:tokens=10", "prefix:tokens=10"])
def test_virtual_tokens_count_against_learned_positions(method):
    # GPT-2 reads 1,024 positions: soft prompts sit in front of the tokens, a prefix's keys and values before them
    result = paramcalc.count("gpt2", task="causal-lm", peft=method, formulas=False)
    step_flops(result, Step(batch=1, seq=1014))
    with pytest.raises(paramcalc.ParamcalcError, match="1015 \\+ 10 virtual tokens"):
        step_flops(result, Step(batch=1, seq=1015))
