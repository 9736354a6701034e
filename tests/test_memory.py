"""The memory replay (paramcalc.activations) and the step plan against traced fake-tensor steps."""

import gc
import itertools
import json
import subprocess
import sys

import pytest

import paramcalc
from paramcalc.activations import simulate
from paramcalc.devices import DEVICES
from paramcalc.plan import Parallel, fit_batch, plan
from paramcalc.step import Step
from paramcalc.trace import trace_step

SMALL = {
    "bert": ({"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
              "intermediate_size": 128, "vocab_size": 200, "max_position_embeddings": 64}, "seq-cls"),
    "roberta": ({"model_type": "roberta", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                 "intermediate_size": 128, "vocab_size": 200, "max_position_embeddings": 66, "pad_token_id": 1},
                "token-cls"),
    "gpt2": ({"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 200, "n_positions": 64},
             "causal-lm"),
    "bloom": ({"model_type": "bloom", "n_layer": 2, "hidden_size": 64, "n_head": 4, "vocab_size": 200}, "causal-lm"),
    "t5": ({"model_type": "t5", "num_layers": 2, "d_model": 64, "num_heads": 4, "d_kv": 16, "d_ff": 128,
            "vocab_size": 200, "decoder_start_token_id": 0}, "seq2seq-lm"),
    # grouped-query decoders (2 K/V heads for 4 query heads): Llama with attention dropout (sdpa's math path, which
    # repeats the K/V heads itself), Mistral with a sliding window the 32 positions reach (sdpa gets its mask),
    # Qwen2 with a head_dim that is not H/A
    "llama": ({"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
               "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 200, "attention_dropout": 0.1},
              "causal-lm"),
    "mistral": ({"model_type": "mistral", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                 "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 200, "sliding_window": 16},
                "causal-lm"),
    "qwen2": ({"model_type": "qwen2", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
               "num_key_value_heads": 2, "head_dim": 24, "intermediate_size": 96, "vocab_size": 200}, "seq-cls"),
}
CATEGORY_NAMES = {"weights": "parameters", "gradients": "gradients", "optimizer": "optimizer",
                  "activations": "activations", "transient": "transient"}
# sdpa runs as it would in a real step: with the model's own attention dropout (0.1 in these configs) torch
# takes its math path on a CPU; "sdpa-fused" sets the attention dropout to 0, so its fused CPU kernel runs.
ATTENTION_DROPOUT = {"bert": "attention_probs_dropout_prob", "roberta": "attention_probs_dropout_prob",
                     "gpt2": "attn_pdrop", "t5": "dropout_rate", **dict.fromkeys(("llama", "mistral", "qwen2"),
                                                                                "attention_dropout")}
# The fake-tensor trace over-counts a checkpointed step whose sdpa hands torch the K/V heads as they are (enable_gqa:
# no mask, no dropout): 2.6-3.5 % high in backward on these configs, while real CPU steps agree with the replay within
# 0.1 %. Those cells are judged by real steps (tests/test_gqa_families.py) instead.
TRACE_OFF = {("llama", "sdpa-fused"), ("qwen2", "sdpa"), ("qwen2", "sdpa-fused")}
GRID = [(family, method, precision, attention, checkpointing)
        for family in SMALL
        for method, precision, attention, checkpointing in itertools.product(
            (None, "lora:r=4", "prompt:tokens=4"), ("fp32", "bf16"), ("eager", "sdpa", "sdpa-fused"), (False, True))
        if family in ATTENTION_DROPOUT or attention == "eager"
        if attention != "sdpa-fused" or method != "prompt:tokens=4"
        if not (checkpointing and (family, attention) in TRACE_OFF)]


def _error(family, method, precision, attention, checkpointing):
    config, task = SMALL[family]
    if attention == "sdpa-fused":
        config, attention = {**config, ATTENTION_DROPOUT[family]: 0.0}, "sdpa"
    result = paramcalc.count(config, task=task, peft=method, formulas=False)
    step = Step(batch=2, seq=32, mixed_precision=None if precision == "fp32" else "bf16", attention=attention,
                grad_checkpointing=checkpointing)
    traced, replayed = trace_step(result, step), simulate(result, step)
    return (replayed.peak - traced.peak) / traced.peak, traced, replayed


@pytest.mark.parametrize(("family", "method", "precision", "attention", "checkpointing"), GRID,
                         ids=["-".join(str(x) for x in cell) for cell in GRID])
def test_replayed_peak_within_5_percent_of_the_traced_peak(family, method, precision, attention, checkpointing):
    error, traced, replayed = _error(family, method, precision, attention, checkpointing)
    assert abs(error) <= 0.05, f"peak {replayed.peak:,} vs traced {traced.peak:,} ({error:+.1%})"
    # What the peak is made of: each category within 10 %, or within 3 % of the peak for the small ones
    # (what the replay leaves out, the token ids, labels and position ids, weighs most in these tiny configs).
    # When the forward and backward high-water marks are that close the peak may fall in either phase, and
    # the two instants hold different things: the comparison needs the same instant. So may two moments of
    # backward, told apart by the gradients computed so far (T5 bf16 eager checkpointed: re-running the last
    # decoder layer and the first encoder layer come within 384 bytes of each other in the replay).
    if replayed.phase_of_peak != traced.phase_of_peak:
        return
    done, total = (replayed.at_peak["gradients"], traced.at_peak["gradients"]), traced.after_step["gradients"]
    if replayed.phase_of_peak == "backward" and abs(done[0] - done[1]) > 0.25 * total:
        return
    for category, traced_name in CATEGORY_NAMES.items():
        ours, theirs = replayed.at_peak[category], traced.at_peak[traced_name]
        assert abs(ours - theirs) <= max(0.10 * theirs, 0.03 * traced.peak), (category, ours, theirs)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_long_sequences_attention_backward_frees_op_by_op(attention, precision):
    """At 512 tokens the b*h*s*s tensors dominate, and the peak falls in attention's backward: each of its
    ops (two matmuls, dropout, softmax) frees what it saved once it has run, while the next holds a
    b*h*s*s gradient. (Replayed as one op, eager attention was 5 % low here, sdpa's math path 10 % high.)"""
    config = {**SMALL["bert"][0], "hidden_size": 128, "intermediate_size": 256, "max_position_embeddings": 512}
    result = paramcalc.count(config, task="seq-cls", formulas=False)
    step = Step(batch=2, seq=512, attention=attention, mixed_precision=None if precision == "fp32" else "bf16")
    traced, replayed = trace_step(result, step), simulate(result, step)
    assert abs(replayed.peak - traced.peak) <= 0.002 * traced.peak, (replayed.peak, traced.peak)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("family", "method"), [("bert", None), ("gpt2", None), ("t5", None), ("t5", "lora:r=8")])
def test_sdpa_with_attention_dropout_matches_a_real_cpu_step(family, method, precision):
    """The judge: a real step on this CPU, memory from the allocator's events (paramcalc train). With attention
    dropout sdpa runs torch's math path; modelled as the fused kernel, these were 9-37 % low. T5 passes its
    position bias as sdpa's float mask (replayed as eager attention, the kernel that does not run: 1-15 % low)."""
    from paramcalc.train import TrainOptions, train

    config, task = SMALL[family]
    result = paramcalc.count(config, task=task, peft=method, formulas=False)
    step = Step(batch=4, seq=64, attention="sdpa", mixed_precision=None if precision == "fp32" else "bf16")
    gc.collect()  # tensors earlier tests left in reference cycles, freed mid-step, would read as negative bytes
    report = train(result, step, TrainOptions(steps=2))
    assert abs(report.errors()["peak"]) <= 0.01, (report.predicted["memory"]["peak"], report.measured["memory"])


@pytest.mark.parametrize(("family", "attention", "precision", "checkpointing"), [
    ("t5", "sdpa", "fp32", False), ("t5", "sdpa", "bf16", False), ("t5", "eager", "bf16", False),
    ("t5", "sdpa", "fp32", True), ("t5", "eager", "fp32", True), ("bloom", "eager", "fp32", False),
    ("bloom", "eager", "bf16", False), ("bloom", "eager", "fp32", True), ("gpt2", "eager", "fp32", True)])
def test_masks_and_position_biases_at_long_sequences(family, attention, precision, checkpointing):
    """At 512 tokens the tensors a model makes once per forward weigh: T5's position biases (heads x s x s,
    fp32, with their gradient and int64 bucket indices), its cross-attention zeros and causal mask, BLOOM's
    causal mask and the scores its attention keeps in locals, GPT-2's causal mask, kept by checkpointed
    layers as an argument. Left out, the replay was 5-30 % low here; against the traced step (which a real
    step matches byte for byte on these configs)."""
    config, task = SMALL[family]
    config = {**config, "n_positions": 512} if family == "gpt2" else config
    result = paramcalc.count(config, task=task, formulas=False)
    step = Step(batch=2, seq=512, attention=attention, grad_checkpointing=checkpointing,
                mixed_precision=None if precision == "fp32" else "bf16")
    traced, replayed = trace_step(result, step), simulate(result, step)
    assert abs(replayed.peak - traced.peak) <= 0.015 * traced.peak, (replayed.peak, traced.peak)


@pytest.mark.parametrize(("model", "task", "batch", "seq"), [
    ("bert-base-uncased", "seq-cls", 8, 128), ("roberta-base", "seq-cls", 8, 128), ("gpt2", "causal-lm", 4, 128),
    ("t5-small", "seq2seq-lm", 4, 128), ("t5-v1_1-small", "seq2seq-lm", 4, 128), ("bloom-560m", "causal-lm", 2, 128)])
def test_catalog_models_full_fine_tuning(model, task, batch, seq):
    """Real sizes, fp32 full fine-tuning with AdamW: the replay is within 1 % of the traced peak."""
    result = paramcalc.count(model, task=task, formulas=False)
    step = Step(batch=batch, seq=seq)
    traced, replayed = trace_step(result, step), simulate(result, step)
    assert abs(replayed.peak - traced.peak) <= 0.01 * traced.peak
    for category, traced_bytes in (("weights", traced.at_peak["parameters"]),
                                   ("optimizer", traced.at_peak["optimizer"])):
        assert replayed.at_peak[category] == traced_bytes


def test_zero_partitioning_matches_the_zero_paper():
    # Rajbhandari et al. 2020 (arXiv:1910.02054), figure 1: 7.5B parameters, 64 GPUs, mixed-precision Adam
    # (2 + 2 + 12 bytes per parameter): 120 GB baseline, 31.4 GB (P_os), 16.6 GB (P_os+g), 1.9 GB (P_os+g+p)
    psi, n = 7.5e9, 64
    weights, gradients, optimizer = int(2 * psi), int(2 * psi), int(12 * psi)
    expected = {0: 120, 1: 31.4, 2: 16.6, 3: 1.9}
    for stage, gigabytes in expected.items():
        total = sum(Parallel(gpus=n, zero=stage).shard(weights, gradients, optimizer))
        assert round(total / 1e9, 1) == gigabytes


def test_fsdp_names_the_zero_stages():
    assert Parallel.from_options(4, fsdp="full").zero == 3
    assert Parallel.from_options(4, fsdp="grad-op").zero == 2


def test_ddp_adds_one_gradient_sized_bucket_buffer_per_process():
    # DDP (ZeRO-0) all-reduces through flat buckets: one more copy of every trainable gradient, on a GPU or in
    # CPU processes (real two-process runs: tests/test_train.py)
    result = paramcalc.count("gpt2", task="causal-lm", formulas=False)
    step = Step(batch=2, seq=128, attention="eager")
    one, two = plan(result, step), plan(result, step, parallel=Parallel(gpus=2))
    assert two.memory["ddp_buckets"] == 4 * result.trainable_params  # fp32 gradients
    assert two.memory["peak"] - one.memory["peak"] == two.memory["ddp_buckets"]
    assert plan(result, step, parallel=Parallel(gpus=2, zero=1)).memory["ddp_buckets"] == 0


def test_sharding_lowers_the_peak_by_the_states_it_splits():
    result = paramcalc.count("gpt2", task="causal-lm", formulas=False)
    step = Step(batch=2, seq=128)
    one = plan(result, step, device="a100-80gb")
    eight = plan(result, step, device="a100-80gb", parallel=Parallel(gpus=8, zero=1))
    # ZeRO-1 splits the AdamW moments: 7/8 of them leave each GPU
    assert one.memory["peak"] - eight.memory["peak"] == one.memory["optimizer"] - eight.memory["optimizer"] > 0
    assert eight.memory["optimizer"] == -(-one.memory["optimizer"] // 8)


def test_zero3_gathers_the_largest_unit_whole():
    # GPT-2 small: a block holds 12*H^2 + 13*H weights, the token embedding V*H; ZeRO-3 keeps 1/n of the
    # weights and gathers the largest unit (here wte) in full while it runs
    result = paramcalc.count("gpt2", task="causal-lm", formulas=False)
    step = Step(batch=1, seq=128)
    one = plan(result, step, device="a100-80gb")
    eight = plan(result, step, device="a100-80gb", parallel=Parallel(gpus=8, zero=3))
    hidden, vocab = 768, 50257
    assert 12 * hidden**2 + 13 * hidden < vocab * hidden
    assert eight.memory["weights"] == -(-one.memory["weights"] // 8) + 4 * vocab * hidden
    deep = paramcalc.count("gpt2", task="causal-lm", overrides={"n_embd": 2048, "n_head": 16, "vocab_size": 1000},
                           formulas=False)
    sharded = plan(deep, step, device="a100-80gb", parallel=Parallel(gpus=8, zero=3))
    whole = plan(deep, step, device="a100-80gb")
    assert sharded.memory["weights"] == -(-whole.memory["weights"] // 8) + 4 * (12 * 2048**2 + 13 * 2048)


def test_fit_batch_returns_the_largest_batch_that_fits():
    result = paramcalc.count("gpt2", task="causal-lm", formulas=False)
    step = Step(seq=256, mixed_precision="bf16")
    best, curve = fit_batch(result, step, "t4", None)
    memory = DEVICES["t4"]["memory"]  # what CUDA reports on a T4 (16 GB less ECC), not 16GB
    peaks = dict(curve)
    assert peaks[best] <= memory < peaks[best + 1]
    assert [p for _, p in sorted(curve)] == sorted(p for _, p in curve)  # more batch, more memory


def test_plan_json_has_every_term(cli):
    result = cli("bert-base-uncased", "--task", "seq-cls", "--batch", "8", "--seq", "128", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    memory = doc["memory"]
    assert set(memory) == {"weights", "gradients", "optimizer", "ddp_buckets", "activations", "transient",
                           "cublas_workspaces", "overhead", "peak", "band"}
    assert memory["band"][0] < memory["peak"] < memory["band"][1]
    assert set(doc["flops"]) == {"forward", "backward", "optimizer", "total"}
    assert set(doc["throughput"]) >= {"tokens_per_s", "step_s", "profile"}
    assert sum(v for k, v in memory.items() if k not in ("peak", "band")) == memory["peak"]



def test_a_t4_has_no_bf16_rate():
    """The T4 datasheet lists fp16 tensor cores and no bf16: a bf16 step gets no invented time, fp16 one does."""
    from paramcalc.plan import plan
    from paramcalc.step import Step

    result = paramcalc.count("gpt2", task="causal-lm")
    bf16 = plan(result, Step(batch=4, seq=128, mixed_precision="bf16"), device="t4").throughput
    fp16 = plan(result, Step(batch=4, seq=128, mixed_precision="fp16"), device="t4").throughput
    assert bf16["tokens_per_s"] is None and "no bf16" in bf16["why"]
    assert fp16["tokens_per_s"] > 0
    a100 = plan(result, Step(batch=4, seq=128, mixed_precision="bf16"), device="a100-80gb").throughput
    assert a100["tokens_per_s"] > 0

def test_plan_path_imports_no_torch():
    probe = ("import sys, paramcalc; from paramcalc.plan import plan; from paramcalc.step import Step; "
             "r = paramcalc.count('gpt2', task='causal-lm'); plan(r, Step(batch=4, seq=256), device='t4'); "
             "print(any(m in sys.modules for m in ('torch', 'transformers', 'peft')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize(("args", "message"), [
    (["gpt2", "--batch", "0"], "--batch must be a positive integer"),
    (["gpt2", "--device", "tpu-v9"], "unknown device 'tpu-v9'"),
    (["gpt2", "--batch", "2", "--gpus", "0", "--device", "t4"], "--gpus must be a positive integer"),
    (["gpt2", "--zero", "5", "--device", "t4"], "--zero must be 0, 1, 2 or 3"),
    (["gpt2", "--zero", "1", "--fsdp", "full", "--device", "t4"], "give one of them"),
    (["gpt2", "--fsdp", "half", "--device", "t4"], "--fsdp must be full or grad-op"),
    (["gpt2", "--device-mem", "lots"], "--device-mem must be a size"),
    (["gpt2", "--fit-batch"], "--fit-batch needs the device's memory"),
    (["gpt2", "--seq", "4096", "--batch", "1"], "allows at most 1024 tokens"),
    (["gpt2", "--optimizer", "lion", "--batch", "1"], "unknown optimizer 'lion'"),
])
def test_plan_bad_input(cli, refused, args, message):
    refused(cli(*args), message)


def test_a_model_without_a_family_file_is_planned_by_tracing_its_step(cli, tmp_path):
    # DistilBERT has no family file: its step is traced on fake tensors, and the report says so
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "distilbert", "n_layers": 2, "dim": 64, "n_heads": 4,
                                "hidden_dim": 128, "vocab_size": 200}))
    result = cli(str(path), "--batch", "2", "--seq", "16", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["family"] == "generic" and doc["source"] == "trace"
    assert doc["step"]["attention"] == "sdpa"
    assert "attention: sdpa (transformers' default for DistilBertModel)" in doc["notes"]
    assert any("traced on fake tensors" in note for note in doc["notes"])
    traced = trace_step(paramcalc.count(str(path), formulas=False), Step(batch=2, seq=16))
    assert doc["memory"]["peak"] == traced.peak
    assert doc["flops"]["total"] == traced.flops["total"] > 0
    table = cli(str(path), "--batch", "2", "--seq", "16")
    assert table.exit_code == 0 and "traced" in table.output


def test_plan_json_names_the_attention_kernel_it_assumed(cli):
    doc = json.loads(cli("bert-base-uncased", "--batch", "1", "--seq", "16", "--json").stdout)
    assert doc["step"]["attention"] == "sdpa"
    assert doc["notes"][0] == "attention: sdpa (transformers' default for bert)"
    assert any("math path" in note for note in doc["notes"])  # on this CPU, with attention dropout 0.1
    gpu = json.loads(cli("bert-base-uncased", "--batch", "1", "--seq", "16", "--device", "t4", "--json").stdout)
    assert not any("math path" in note for note in gpu["notes"])  # CUDA's fused kernel applies the dropout
    bloom = json.loads(cli("bloom-560m", "--batch", "1", "--seq", "16", "--json").stdout)
    assert bloom["step"]["attention"] == "eager"


def test_a_custom_module_step_is_refused_in_one_line(cli, refused, tmp_path, monkeypatch):
    (tmp_path / "my_step_models.py").write_text("import torch\ndef tiny():\n    return torch.nn.Linear(4, 3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    refused(cli("my_step_models:tiny", "--batch", "2"), "cannot run a training step of it")
