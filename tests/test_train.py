"""``paramcalc train``: real fine-tuning steps on this CPU are the judge of the memory prediction."""

import json

import pytest

import paramcalc
from paramcalc.families import concrete_parameters
from paramcalc.step import Step
from paramcalc.train import TrainOptions, train
from paramcalc.verify import peft_free_name
from tiny import TINY

TOLERANCE = 0.05  # the replay's promise against a real CPU step


def _snapshot(model) -> dict:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _trained_rows(result) -> set[str]:
    """The parameter names of every row the count calls trainable."""
    names = set()
    for component in result.components:
        if component.trainable:
            names.update(concrete_parameters(component, result.values))
    return names


def check_phases(report):
    """The timed phases exist, are positive, and fill the measured step: what lies outside them (fetching the
    batch, loss.item()) is a few % of even a tiny step. Never held against the prediction: wall-clock
    times on a shared machine are context, not a test."""
    measured = report.measured
    phases = measured["phases_s"]
    assert set(phases) == {"forward", "backward", "optimizer"}, phases
    assert all(seconds > 0 for seconds in phases.values()), phases
    # each phase is timed inside its step, so with two timed steps (median = mean) the sum cannot exceed it
    assert 0.85 * measured["step_s"] <= sum(phases.values()) <= 1.02 * measured["step_s"], (phases, measured["step_s"])


def run(result, step, **options):
    """Train, keeping the parameters before (the same seeded build) and after."""
    from paramcalc.runtime import build_model
    from paramcalc.step import resolve_attention

    trained = []
    report = train(result, step, TrainOptions(**{"steps": 4, "lr": 5e-3, **options}),
                   on_model=lambda model: trained.append(_snapshot(model)))
    return report, _snapshot(build_model(result, resolve_attention(step, result), seed=0)), trained[0]


@pytest.mark.parametrize("family", TINY)
@pytest.mark.parametrize("method", [None, "lora:r=4"])
def test_real_steps_match_the_prediction_and_train_exactly_the_trainable_rows(family, method):
    config, task = TINY[family]
    result = paramcalc.count(config, task=task, peft=method, formulas=False)
    report, before, after = run(result, Step(batch=2, seq=32))
    measured, loss = report.measured, report.measured["loss"]
    assert loss[-1] < loss[0], loss  # the same batch every step: the model memorises it
    error = report.errors()["peak"]
    assert abs(error) <= TOLERANCE, f"predicted {report.predicted['memory']['peak']:,} vs measured " \
                                    f"{measured['memory']['peak']:,} ({error:+.2%})"
    changed = {peft_free_name(name) for name in before if not before[name].equal(after[name])}
    frozen = {peft_free_name(name) for name in before} - changed
    assert changed == _trained_rows(result), "trained parameters differ from the count's trainable rows"
    assert frozen.isdisjoint(_trained_rows(result))
    assert sum(after[n].numel() for n in after if peft_free_name(n) in changed) == result.trainable_params
    assert measured["trainable_params"] == measured["changed_params"] == result.trainable_params
    assert measured["frozen_changed"] == []
    assert report.verdict() == "within tolerance"
    check_phases(report)


@pytest.mark.parametrize("method", [None, "lora:r=4"])
def test_gradient_accumulation_holds_the_gradients_through_later_micro_batches(method):
    """A later micro-batch runs its forward with every gradient summed so far alive."""
    config, task = TINY["gpt2"]
    result = paramcalc.count(config, task=task, peft=method, formulas=False)
    single, _, _ = run(result, Step(batch=2, seq=32))
    accumulated, _, _ = run(result, Step(batch=2, seq=32, grad_accum=2))
    assert abs(accumulated.errors()["peak"]) <= TOLERANCE, accumulated.errors()
    check_phases(accumulated)  # summed over both micro-batches
    if method is None:  # full fine-tuning: the gradients are as large as the weights, and the peak shows it
        grown = accumulated.measured["memory"]["peak"] - single.measured["memory"]["peak"]
        assert grown > 0.5 * 4 * result.trainable_params


def test_mixed_precision_checkpointing_and_accumulation_run_and_are_judged():
    config, task = TINY["gpt2"]
    result = paramcalc.count(config, task=task, peft="lora:r=4", formulas=False)
    report, _, _ = run(result, Step(batch=2, seq=32, mixed_precision="bf16", grad_checkpointing=True, grad_accum=2))
    assert abs(report.errors()["peak"]) <= TOLERANCE
    assert report.measured["loss"][-1] < report.measured["loss"][0]
    document = report.to_dict()
    assert document["schema"] == "paramcalc-train/1"
    assert document["options"]["grad_accum"] == 2 and document["options"]["mixed_precision"] == "bf16"
    assert document["measured"]["tokens_per_s"] > 0 and document["measured"]["steps"] == 4
    check_phases(report)  # the checkpointed re-run runs inside backward, on its clock
    assert set(document["measured"]["phases_s"]) == {"forward", "backward", "optimizer"}


def _report_with(phases):
    """A finished run's report, by hand: the comparison's arithmetic needs no training."""
    from paramcalc.train import TrainReport

    options = {"batch": 2, "seq": 32, "dtype": "fp32", "mixed_precision": None, "optimizer": "adamw",
               "attention": "sdpa", "grad_checkpointing": True, "peft": [], "quant": None}
    predicted = {"memory": {"peak": 100, "weights": 40, "gradients": 10, "optimizer": 20, "activations": 30},
                 "throughput": {"tokens_per_s": 640.0, "step_s": 0.1, "phases": phases}, "notes": []}
    measured = {"memory": {"peak": 100}, "step_s": 0.2, "tokens_per_s": 320.0,
                "phases_s": {"forward": 0.05, "backward": 0.1, "optimizer": 0.04}}
    return TrainReport("tiny", "gpt2", "causal-lm", options, {"name": "cpu", "kind": "cpu"}, predicted, measured)


def test_phase_errors_fold_the_rerun_and_all_reduce_into_backward():
    report = _report_with({"forward": 0.04, "backward": 0.06, "recompute": 0.03, "all_reduce": 0.01,
                           "optimizer": 0.05})
    errors = report.errors()
    # backward's clock holds the re-run and the all-reduce: 0.06 + 0.03 + 0.01 = 0.10 s, measured 0.10 s
    assert errors["backward_s"] == pytest.approx(0.0)
    assert errors["forward_s"] == pytest.approx(-0.2)  # (0.04 - 0.05) / 0.05
    assert errors["optimizer_s"] == pytest.approx(0.25)  # (0.05 - 0.04) / 0.04
    assert report.to_dict()["error"]["backward_s"] == pytest.approx(0.0)


@pytest.mark.parametrize("phases", [None, {}])
def test_a_prediction_without_phases_shows_dashes(phases):
    from rich.console import Console

    from paramcalc.train_report import comparison_table

    report = _report_with(phases)
    assert not {"forward_s", "backward_s", "optimizer_s"} & set(report.errors())
    console = Console(width=200, record=True)
    console.print(comparison_table(report))
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:5]]
            for line in console.export_text().splitlines() if line.count("│") == 5}
    assert rows["forward time"] == ["—", "0.050 s", "—"]
    assert rows["backward time (incl. re-run)"] == ["—", "0.100 s", "—"]
    assert rows["optimizer step time"] == ["—", "0.040 s", "—"]


def test_phase_rows_show_the_prediction_and_its_error():
    from rich.console import Console

    from paramcalc.train_report import comparison_table

    console = Console(width=200, record=True)
    console.print(comparison_table(_report_with({"forward": 0.04, "backward": 0.06, "recompute": 0.03,
                                                 "optimizer": 0.05})))
    text = console.export_text()
    assert "backward time (incl. re-run)" in text and "0.090 s" in text and "-10.00 %" in text


@pytest.fixture
def tiny_gpt2(tmp_path):
    config, _ = TINY["gpt2"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_cli_json_and_out_line(cli, tiny_gpt2, tmp_path):
    out = tmp_path / "runs.jsonl"
    args = ["train", tiny_gpt2, "--task", "causal-lm", "--batch", "2", "--seq", "32", "--steps", "3", "--json",
            "--out", str(out)]
    first, second = cli(*args), cli(*args)
    assert first.exit_code == 0, first.output
    document = json.loads(first.stdout)
    assert document["predicted"]["memory"]["peak"] > 0 and document["measured"]["memory"]["peak"] > 0
    assert document["device"]["kind"] == "cpu" and document["verdict"] == "within tolerance"
    assert all(document["measured"]["phases_s"][p] > 0 for p in ("forward", "backward", "optimizer"))
    assert "phases" in document["predicted"]["throughput"]  # the plan's phase seconds, or None without them
    lines = out.read_text().splitlines()
    assert len(lines) == 2 and [json.loads(line)["schema"] for line in lines] == ["paramcalc-train/1"] * 2
    assert second.exit_code == 0


def test_cli_table(cli, tiny_gpt2):
    result = cli("train", tiny_gpt2, "--task", "causal-lm", "--batch", "2", "--seq", "16", "--steps", "3")
    assert result.exit_code == 0, result.output
    assert "predicted" in result.stderr  # the prediction, printed before training starts
    for text in ("peak", "measured", "tokens/s", "verdict: within tolerance", "loss", "forward time",
                 "backward time", "optimizer step time"):
        assert text in result.stdout


def test_local_checkpoint_weights(cli, tmp_path):
    import transformers

    config, _ = TINY["gpt2"]
    folder = tmp_path / "checkpoint"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).save_pretrained(folder)
    result = cli("train", str(folder), "--task", "causal-lm", "--weights", str(folder), "--batch", "2", "--seq", "16",
                 "--steps", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["options"]["weights"] == str(folder)


@pytest.mark.parametrize(("extra", "message"), [
    (["--device", "cuda"], "no CUDA device"),
    (["--device", "tpu"], "--device must be cpu, cuda or cuda:N"),
    (["--weights", "/nonexistent/folder"], "no such folder"),
    (["--weights", "."], "holds no weights"),
    (["--data", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--steps", "2", "--warmup", "2"], "leaves no step to measure"),
    (["--grad-accum", "0"], "--grad-accum must be a positive integer"),
    (["--lr", "0"], "--lr must be positive"),
])
def test_bad_input_is_one_line_and_exit_2(cli, refused, tiny_gpt2, tmp_path, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    refused(cli("train", tiny_gpt2, "--task", "causal-lm", "--seq", "16", "--steps", "3", *extra), message)


@pytest.mark.parametrize(("content", "message"), [("", "no examples"), (b"\xff\xfe\x00bad", "")])
def test_bad_data_files_are_refused(cli, refused, tiny_gpt2, tmp_path, content, message):
    path = tmp_path / "data.txt"
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    result = cli("train", tiny_gpt2, "--task", "causal-lm", "--seq", "16", "--data", str(path))
    refused(result, message or str(path))


def test_a_prediction_above_the_device_memory_is_not_started(cli, tiny_gpt2, tmp_path):
    out = tmp_path / "runs.jsonl"
    result = cli("train", tiny_gpt2, "--task", "causal-lm", "--seq", "16", "--device-mem", "1MiB", "--json", "--out", str(out))
    assert result.exit_code == 3, result.output
    assert "not starting" in result.stderr and "--force" in result.stderr
    document = json.loads(result.stdout)
    assert document["predicted"]["fits"] is False and document["measured"] == {}
    assert json.loads(out.read_text())["failed"].startswith("the predicted peak")


def test_out_of_memory_during_the_run_is_reported_with_exit_3(cli, tiny_gpt2, monkeypatch):
    import paramcalc.train as trainer

    real_step, calls = trainer._step, []

    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes.")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "_step", failing_step)
    result = cli("train", tiny_gpt2, "--task", "causal-lm", "--seq", "16", "--steps", "3", "--json")
    assert result.exit_code == 3, result.output
    assert "out of memory at step 2" in result.stderr and "Traceback" not in result.output
    document = json.loads(result.stdout)
    assert document["measured"]["failed"] == "out of memory" and len(document["measured"]["loss"]) == 1
    assert document["predicted"]["memory"]["peak"] > 0  # reported beside the prediction



def test_a_step_transformers_refuses_is_one_line_and_exit_2(cli, tiny_gpt2, monkeypatch):
    """transformers / peft refuse some combinations only when the step runs (transformers 5.24 BERT with prefix
    tuning: 'Model does not support past key values'): said in one line, not a traceback."""
    import paramcalc.train as trainer

    def refusing_step(*args, **kwargs):
        raise ValueError("Model does not support past key values which are required for prefix tuning.")

    monkeypatch.setattr(trainer, "_step", refusing_step)
    result = cli("train", tiny_gpt2, "--task", "causal-lm", "--seq", "16", "--steps", "2")
    assert result.exit_code == 2, result.output
    assert "transformers cannot run this GPT2LMHeadModel step: ValueError: Model does not support" in result.stderr
    assert "Traceback" not in result.output

def test_two_process_data_parallel_run_predicts_each_process_with_ddp_buckets(tiny_gpt2, tmp_path):
    """accelerate launch, two CPU processes talking over gloo: each process measures its own peak, which
    holds DDP's gradient buckets (one more gradient-sized buffer) on top of a single process's step."""
    import os
    import subprocess
    import sys

    out = tmp_path / "runs.jsonl"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29517", "-m", "paramcalc", "train", tiny_gpt2, "--task", "causal-lm", "--batch", "2", "--seq", "16",
               "--steps", "3", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    reports = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["device"]["rank"])
    assert [r["device"]["rank"] for r in reports] == [0, 1]
    for report in reports:
        assert report["device"]["processes"] == 2
        memory = report["predicted"]["memory"]
        # full fine-tuning in fp32: a bucket slot of 4 bytes for every trainable parameter
        assert memory["ddp_buckets"] == 4 * report["measured"]["trainable_params"] > 0
        assert abs(report["error"]["peak"]) <= TOLERANCE, report["error"]
        measured = report["measured"]  # every weight trained, in step on both processes
        assert measured["changed_params"] == measured["trainable_params"] > 0 and measured["frozen_changed"] == []


@pytest.mark.parametrize("family", ["gpt2", "bloom"])
def test_qlora_trains_only_the_adapters_on_a_4bit_base_and_matches_the_prediction(family):
    """bitsandbytes runs 4-bit matmuls on this CPU: a real QLoRA step (nf4 base, LoRA, bf16 autocast)."""
    config, task = TINY[family]
    result = paramcalc.count(config, task=task, peft="lora:r=8", quant="nf4", formulas=False)
    trained = []
    report = train(result, Step(batch=2, seq=32, mixed_precision="bf16"), TrainOptions(steps=4, lr=5e-3),
                   on_model=lambda model: trained.append({n: p for n, p in model.named_parameters()}))
    assert abs(report.errors()["peak"]) <= TOLERANCE, report.errors()
    assert report.measured["loss"][-1] < report.measured["loss"][0]
    # the trainer's own bit-for-bit check: every LoRA weight changed, no 4-bit weight or frozen norm did
    assert report.measured["changed_params"] == result.trainable_params and report.measured["frozen_changed"] == []
    # only the LoRA matrices train; the 4-bit weights are frozen uint8 storages
    trainable = {n for n, p in trained[0].items() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert report.measured["trainable_params"] == result.trainable_params
