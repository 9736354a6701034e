"""``paramcalc calibrate``: measured rates are saved as a profile that throughput estimates then read.

Wall-clock figures depend on the machine and its load, so they are only checked to be positive and finite
(and one ordering no load can flip: a 1-element add against a large matmul). ``quick=True`` / ``--quick``
(small shapes, two samples) keeps each calibration to a few seconds.
"""

import importlib.util
import json
import math
import subprocess
import sys

from types import SimpleNamespace

import pytest

import paramcalc.calibrate
import paramcalc.calibrate_ops
import paramcalc.calibrate_step
import paramcalc.calibrate_reference
from paramcalc.calibrate import calibrate, save_profile

FORWARD_OPS_ORDER = ["add", "mul", "softmax", "layer_norm", "gelu", "dropout"]
STEP_OPS_ORDER = ["softmax_backward", "layer_norm_backward", "gelu_backward", "log_softmax", "log_softmax_backward",
                  "embedding_backward", "copy"]
OPTIMIZERS = {"adamw", "adam", "sgd", "sgd-momentum", "adafactor", "adamw-8bit"}

STEP = ["gpt2", "--task", "causal-lm", "--batch", "2", "--seq", "64", "--json"]


@pytest.fixture
def profiles(tmp_path, monkeypatch):
    """An empty profile folder of this test's own, and a copy small enough to time quickly."""
    monkeypatch.setenv("PARAMCALC_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(paramcalc.calibrate.COPY_BYTES, "cpu", 4 * 1024**2)
    return tmp_path / "profiles"


def positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_calibrate_saves_positive_finite_rates(profiles):
    measured = calibrate(size=64, quick=True)
    assert measured["name"] == "cpu" and measured["kind"] == "cpu" and measured["half_dtype"] == "bf16"
    for key in ("fp32", "half", "bf16", "bandwidth", "memory", "threads"):
        assert positive(measured[key]), key
    assert measured["half"] == measured["bf16"]  # the CPU's half precision is bf16, as CPU autocast runs it
    path = save_profile(measured)
    assert path == profiles / "cpu.json"
    assert json.loads(path.read_text()) == measured
    assert [p.name for p in profiles.iterdir()] == ["cpu.json"]  # no temporary file left behind


def test_saving_is_atomic(profiles, monkeypatch):
    first = calibrate(size=64, repeats=1, quick=True)
    path = save_profile(first)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(paramcalc.calibrate.json, "dump", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_profile({**first, "fp32": 1.0})
    assert json.loads(path.read_text()) == first  # the old profile is whole, and nothing else was left
    assert [p.name for p in profiles.iterdir()] == ["cpu.json"]


def test_the_default_device_uses_the_calibrated_cpu(cli, profiles):
    before = json.loads(cli(*STEP).stdout)["throughput"]
    assert before["tokens_per_s"] is None and "paramcalc calibrate" in before["why"]

    result = cli("calibrate", "--size", "64", "--quick", "--json")
    assert result.exit_code == 0, result.output
    saved = json.loads(result.stdout)
    assert saved["path"] == str(profiles / "cpu.json") and (profiles / "cpu.json").exists()
    assert all(positive(saved[key]) for key in ("fp32", "half", "bandwidth"))

    for extra in ([], ["--device", "cpu"]):
        doc = json.loads(cli(*STEP, *extra).stdout)
        throughput = doc["throughput"]
        assert doc["device"]["profile"] == "cpu" == throughput["profile"]
        assert positive(throughput["tokens_per_s"]) and positive(throughput["step_s"])
        assert throughput["source"] == f"calibrated {saved['when']}"
        assert throughput["tokens_per_s"] == pytest.approx(2 * 64 / throughput["step_s"])


def test_a_named_profile_is_a_device(cli, profiles):
    assert cli("calibrate", "--size", "64", "--quick", "--name", "mybox").exit_code == 0
    assert (profiles / "mybox.json").exists() and not (profiles / "cpu.json").exists()
    doc = json.loads(cli(*STEP, "--device", "mybox").stdout)
    saved = json.loads((profiles / "mybox.json").read_text())
    assert doc["throughput"]["profile"] == "mybox" and positive(doc["throughput"]["tokens_per_s"])
    assert doc["device"]["memory"] == saved["memory"]  # a named profile carries its memory: fits is answered
    assert doc["device"]["fits"] is (doc["memory"]["peak"] <= saved["memory"])


def test_table_says_what_was_measured_and_where_it_went(profiles):
    from click.testing import CliRunner

    from paramcalc.cli import main

    result = CliRunner(env={"COLUMNS": "120"}).invoke(main, ["calibrate", "--size", "64", "--quick"])  # README's width
    assert result.exit_code == 0, result.output
    for text in ("fp32 matmul", "bf16 matmul", "memory bandwidth", "FLOP/s", "saved to", "matmul: linear",
                 "matmul: lora down", "matmul: attention scores", "softmax", "layer_norm", "gelu", "dropout",
                 "per-op overhead", "AdamW step", "each time: seconds per call", "--quick: small shapes",
                 "softmax_backward", "layer_norm_backward", "gelu_backward", "log_softmax_backward",
                 "embedding_backward", "into 4096x256", "copy", "attention forward (sdpa)", "attention backward (sdpa)",
                 "GFLOP/s", "backend: fp32", "optimizer steps", "optimizer: adamw", "optimizer: sgd-momentum",
                 "optimizer: adafactor", "s/element", "s/tensor", "tensors x shape: 4 x 128x128, 32 x 16x16"):
        assert text in result.stdout, text


def check_per_op_keys(measured, dtypes):
    """Every per-op figure is there, positive and finite, beside its how; each class's shapes line up with
    its rates and work."""
    assert measured["dtypes"] == dtypes and measured["quick"] is True
    for key in ("method", "fp32", "half", "bandwidth", "memory", "load"):
        assert measured["how"][key], key
    gemm, elementwise = measured["gemm"], measured["elementwise"]
    assert gemm["how"] and elementwise["how"]
    assert set(gemm["classes"]) == {"square", "linear", "lora_down", "lora_up", "attention_scores",
                                    "attention_values"}
    assert list(elementwise["ops"]) == [*FORWARD_OPS_ORDER, *STEP_OPS_ORDER]  # the forward ops first, as before
    for entry in gemm["classes"].values():
        assert entry["how"] and len(entry["shapes"]) >= 2 and all(len(shape) == 4 for shape in entry["shapes"])
        assert entry["flops"] == [2 * b * m * k * n for b, m, k, n in entry["shapes"]]
        assert list(entry["rate"]) == dtypes
        assert all(len(rates) == len(entry["shapes"]) and all(map(positive, rates)) for rates in entry["rate"].values())
    for entry in elementwise["ops"].values():
        assert entry["how"] and len(entry["shapes"]) >= 2 and all(len(shape) == 2 for shape in entry["shapes"])
        assert list(entry["rate"]) == list(entry["bytes"]) == dtypes
        for dtype in dtypes:
            assert len(entry["rate"][dtype]) == len(entry["bytes"][dtype]) == len(entry["shapes"])
            assert all(map(positive, entry["rate"][dtype] + entry["bytes"][dtype]))
    assert measured["overhead"]["how"] and positive(measured["overhead"]["seconds"])
    adamw = measured["optimizer"]
    assert adamw["how"] and adamw["implementation"]
    assert positive(adamw["per_byte"]) and positive(adamw["per_tensor"])
    assert len(adamw["runs"]) == 2 and all(positive(run[key]) for run in adamw["runs"]
                                           for key in ("tensors", "elements", "state_bytes", "seconds"))
    assert all(run["state_bytes"] == 16 * run["tensors"] * run["elements"] for run in adamw["runs"])
    check_step_keys(measured, dtypes)
    # the headline figures are the largest square matmul's: one measurement, not two
    square = gemm["classes"]["square"]
    assert square["shapes"][-1] == [1, measured["size"]] + [measured["size"]] * 2
    assert measured["fp32"] == square["rate"]["fp32"][-1]
    assert measured["half"] == square["rate"][measured["half_dtype"]][-1] == max(
        square["rate"][d][-1] for d in dtypes if d != "fp32")


def check_step_keys(measured, dtypes):
    """The training step's figures: backward elementwise entries with their byte counts, fused attention
    forward and backward, and every optimizer (or why one is missing)."""
    ops = measured["elementwise"]["ops"]
    widths = {"fp32": 4, "fp16": 2, "bf16": 2}
    for dtype in dtypes:
        width = widths[dtype]
        for name in ("softmax_backward", "layer_norm_backward", "gelu_backward"):  # x, grad_out, grad_in
            assert ops[name]["bytes"][dtype] == [3 * r * c * width for r, c in ops[name]["shapes"]], name
        copy = ops["copy"]  # from fp32: a plain copy in fp32, a cast into a half dtype
        assert copy["bytes"][dtype] == [r * c * (4 + width) for r, c in copy["shapes"]]
        embedding = ops["embedding_backward"]
        assert embedding["bytes"][dtype] == [(v * h + 2 * t * h) * width
                                             for (t, h), v in zip(embedding["shapes"], embedding["vocab"])]
        for name, tensors in (("log_softmax", 2), ("log_softmax_backward", 3)):  # the loss runs in fp32 only
            assert ops[name]["bytes"][dtype] == [tensors * r * c * 4 for r, c in ops[name]["shapes"]]
            assert ops[name]["rate"][dtype] == ops[name]["rate"]["fp32"]
    assert len(ops["embedding_backward"]["vocab"]) == len(ops["embedding_backward"]["shapes"])

    attention = measured["attention"]
    assert attention["how"] and len(attention["shapes"]) >= 2 and all(len(s) == 4 for s in attention["shapes"])
    assert attention["flops_forward"] == [4 * h * q * k * d for h, q, k, d in attention["shapes"]]
    assert attention["flops_backward"] == [10 * h * q * k * d for h, q, k, d in attention["shapes"]]
    for phase in ("forward", "backward"):
        assert list(attention[phase]) == dtypes
        assert all(len(times) == len(attention["shapes"]) and all(map(positive, times))
                   for times in attention[phase].values())
    assert list(attention["backend"]) == dtypes and all(attention["backend"].values())

    optimizers, missing = measured["optimizers"], measured["optimizers_missing"]
    assert set(optimizers) | set(missing) == OPTIMIZERS and not set(optimizers) & set(missing)
    assert set(missing) <= {"adamw-8bit"}  # only the optional bitsandbytes one may be missing, saying why
    assert all(isinstance(why, str) and why for why in missing.values())
    for name, entry in optimizers.items():
        assert entry["how"] and entry["implementation"], name
        assert positive(entry["per_element"]) and positive(entry["per_tensor"]), name
        assert len(entry["runs"]) == 2
        for run in entry["runs"]:
            assert len(run["shape"]) == 2 and run["elements"] == run["shape"][0] * run["shape"][1]
            assert all(positive(run[key]) for key in ("tensors", "elements", "seconds"))
        (big, many) = entry["runs"]  # one bytes-bound run, one tensor-count-bound run
        assert big["elements"] > many["elements"] and many["tensors"] > big["tensors"]
    if "adamw-8bit" in optimizers:  # bitsandbytes quantizes tensors of 4096 elements and more
        assert all(run["elements"] >= 4096 for run in optimizers["adamw-8bit"]["runs"])
    assert "adafactor" in optimizers["adafactor"]["how"].lower() and "factored" in optimizers["adafactor"]["how"]


def test_the_profile_holds_every_per_op_figure_with_its_how(profiles):
    measured = calibrate(quick=True)
    check_per_op_keys(measured, ["fp32", "bf16"])
    assert measured["optimizer"]["implementation"].startswith("for-loop")  # torch's default on a CPU
    assert measured["optimizers"]["adamw"]["implementation"].startswith("for-loop")
    assert json.loads(save_profile(measured).read_text()) == measured


def test_an_optimizer_that_cannot_run_is_missing_with_the_reason(monkeypatch):
    """Without bitsandbytes the 8-bit AdamW is left out, saying why (and the table says so); the others stay."""
    import torch

    from paramcalc.calibrate_ops import PLANS, Timer

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes raises ImportError
    timer = Timer(torch, "cpu", 1, paramcalc.calibrate_ops.QUICK_TIMED_S)
    found, missing = paramcalc.calibrate_step.optimizer_steps(timer, PLANS["quick"])
    assert set(found) == OPTIMIZERS - {"adamw-8bit"} and list(missing) == ["adamw-8bit"]
    assert missing["adamw-8bit"].startswith(("ImportError", "ModuleNotFoundError"))
    from rich.console import Console

    from paramcalc.report import calibration_table

    console = Console(width=120, record=True)
    console.print(calibration_table({"name": "cpu", "device": "a CPU", "kind": "cpu", "threads": 2, "torch": "2",
                                     "size": 64, "fp32": 1e9, "half_dtype": "bf16", "bf16": 1e9, "bandwidth": 1e9,
                                     "copy_bytes": 1024, "optimizers": found, "optimizers_missing": missing}, "x"))
    text = console.export_text()
    assert "optimizer: adamw-8bit" in text and "not measured: ImportError" in text.replace("ModuleNotFound", "Import")
    assert "optimizer: adafactor" in text


def test_the_shapes_recorded_are_the_shapes_timed(profiles, monkeypatch):
    """Every timed call is recorded (op, input shapes, dtype) on its way to torch; the profile's shapes must be
    exactly those, in each dtype."""
    import torch

    calls = set()

    def spy(owner, attribute, label, *which):
        original = getattr(owner, attribute)

        def recorded(*args, **kwargs):
            tensors = [args[i] for i in which if i < len(args) and isinstance(args[i], torch.Tensor)]
            if tensors[0].numel() > 1:  # not the per-op overhead's 1-element adds
                dtype = kwargs.get("dtype", tensors[0].dtype)  # a cast's: the dtype it casts to
                calls.add((label, tuple(tuple(t.shape) for t in tensors), str(dtype)))
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, attribute, recorded)

    functional = torch.nn.functional
    spy(torch, "mm", "mm", 0, 1)
    spy(torch, "matmul", "matmul", 0, 1)
    spy(functional, "linear", "linear", 0, 1)
    for name in ("add", "mul"):
        spy(torch, name, name, 0)
    for name in ("softmax", "layer_norm", "gelu", "dropout", "log_softmax"):
        spy(functional, name, name, 0)
    spy(functional, "scaled_dot_product_attention", "attention", 0, 1)
    aten = torch.ops.aten  # the backward kernels, called as autograd calls them
    for name, op in (("softmax_backward", "_softmax_backward_data"), ("log_softmax_backward",
                     "_log_softmax_backward_data"), ("layer_norm_backward", "native_layer_norm_backward"),
                     ("gelu_backward", "gelu_backward"), ("embedding_backward", "embedding_dense_backward"),
                     ("copy", "_to_copy")):
        spy(aten, op, name, 0)
    # the optimizers' own torch calls (Adafactor's torch.mul) are theirs, not a timed shape: left out here
    monkeypatch.setattr(paramcalc.calibrate_step, "optimizer_steps", lambda timer, plan: ({}, {}))
    # so are the reference steps' (a real model's forward and backward)
    monkeypatch.setattr(paramcalc.calibrate_reference, "in_step", lambda timer, profile, quick: {})
    measured = calibrate(quick=True)

    expected = set()
    for dtype in ("torch.float32", "torch.bfloat16"):
        for name, entry in measured["gemm"]["classes"].items():
            for b, m, k, n in entry["shapes"]:
                expected.add({"square": ("mm", ((m, k), (k, n)), dtype),
                              "linear": ("linear", ((m, k), (n, k)), dtype),  # weight out x in, as nn.Linear
                              "lora_down": ("linear", ((m, k), (n, k)), dtype),
                              "lora_up": ("linear", ((m, k), (n, k)), dtype),
                              "attention_scores": ("matmul", ((b, m, k), (b, k, n)), dtype),
                              "attention_values": ("matmul", ((b, m, k), (b, k, n)), dtype)}[name])
        for name, entry in measured["elementwise"]["ops"].items():
            timed = "torch.float32" if name in paramcalc.calibrate_step.FP32_ONLY else dtype  # the loss: fp32
            expected |= {(name, ((rows, cols),), timed) for rows, cols in entry["shapes"]}
        for heads, q, k, d in measured["attention"]["shapes"]:
            expected.add(("attention", ((1, heads, q, d), (1, heads, k, d)), dtype))
    assert calls == expected


def test_the_per_op_overhead_is_smaller_than_a_large_matmul(profiles):
    measured = calibrate(quick=True)
    square = measured["gemm"]["classes"]["square"]
    largest_matmul_s = square["flops"][-1] / square["rate"]["fp32"][-1]  # 256**3 multiply-adds
    assert measured["overhead"]["seconds"] < largest_matmul_s


def test_an_old_profile_without_per_op_figures_still_loads_and_plans(cli, profiles):
    """Profiles saved before per-op calibration have only the headline keys: they keep working."""
    old = {"name": "oldbox", "kind": "cpu", "device": "Intel(R) Xeon(R) Processor", "fp32": 4.4e11, "half": 2.8e12,
           "half_dtype": "bf16", "bf16": 2.8e12, "bandwidth": 2.9e10, "memory": 25276502016, "threads": 2,
           "torch": "2.13.0+cpu", "size": 2048, "copy_bytes": 268435456, "when": "2026-11-24T11:37:40+00:00"}
    profiles.mkdir(parents=True)
    for name in ("cpu", "oldbox"):
        (profiles / f"{name}.json").write_text(json.dumps({**old, "name": name}))
    for extra in ([], ["--device", "oldbox"]):
        throughput = json.loads(cli(*STEP, *extra).stdout)["throughput"]
        assert positive(throughput["tokens_per_s"]) and throughput["source"] == f"calibrated {old['when']}"
    from rich.console import Console

    from paramcalc.report import calibration_table

    console = Console(width=120, record=True)
    console.print(calibration_table(old, profiles / "oldbox.json"))  # the table of an old profile still renders
    text = console.export_text()
    assert "fp32 matmul" in text and "saved to" in text and "per-op overhead" not in text


def test_a_failed_measurement_says_what_was_being_timed(cli, refused, profiles, monkeypatch):
    import torch

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory\nmore detail")

    monkeypatch.setattr(torch.nn.functional, "gelu", out_of_memory)
    refused(cli("calibrate", "--quick"), "calibration failed timing fp32 gelu 64x512: DefaultCPUAllocator: not "
                                         "enough memory; try a smaller --size or --quick")
    assert not profiles.exists() or not any(profiles.iterdir())


@pytest.fixture
def mocked_gpu(monkeypatch):
    """torch.cuda as a 16 GB GPU would answer it, with the GPU's tensors made on the CPU: the CUDA branch
    (its dtypes, names, synchronisation, mask bytes, memory) runs on a machine without a GPU."""
    import torch

    synchronized = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA Mock GPU 16GB")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *args: SimpleNamespace(total_memory=16 * 10**9, major=8, minor=6))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: synchronized.append(1))
    monkeypatch.setitem(paramcalc.calibrate_ops.TENSOR_DEVICE, "cuda", "cpu")
    return synchronized


def test_the_cuda_branch_with_a_mocked_gpu(cli, profiles, mocked_gpu):
    result = cli("calibrate", "--device", "cuda", "--quick", "--json")
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)
    assert measured["name"] == "nvidia-mock-gpu-16gb" and measured["kind"] == "cuda"
    assert measured["device"] == "NVIDIA Mock GPU 16GB" and measured["memory"] == 16 * 10**9
    assert measured["capability"] == "8.6"  # sizes cuBLAS's workspaces in the plan
    check_per_op_keys(measured, ["fp32", "fp16", "bf16"])
    assert measured["half_dtype"] in ("fp16", "bf16") and positive(measured["fp16"]) and positive(measured["bf16"])
    assert "torch.cuda.synchronize" in measured["how"]["method"] and len(mocked_gpu) > 100  # around every sample
    if importlib.util.find_spec("bitsandbytes"):  # it runs on this CPU, standing in for the GPU
        assert set(measured["optimizers"]) == OPTIMIZERS
    dropout = measured["elementwise"]["ops"]["dropout"]
    for dtype, width in (("fp32", 4), ("fp16", 2), ("bf16", 2)):  # CUDA's dropout mask: one byte an element
        assert dropout["bytes"][dtype] == [rows * cols * (2 * width + 1) for rows, cols in dropout["shapes"]]
    assert json.loads((profiles / "nvidia-mock-gpu-16gb.json").read_text())["gemm"] == measured["gemm"]
    doc = json.loads(cli(*STEP, "--device", "nvidia-mock-gpu-16gb").stdout)
    assert doc["device"]["memory"] == 16 * 10**9 and positive(doc["throughput"]["tokens_per_s"])
    assert doc["memory"]["cublas_workspaces"] == 2 * (2 * 4096 + 8 * 16) * 1024  # torch's default below Hopper
    table = cli("calibrate", "--device", "cuda", "--quick", "--name", "lab-gpu")
    assert table.exit_code == 0 and "fp16 matmul" in table.stdout and "bf16 matmul" in table.stdout


def test_a_gpu_profile_is_named_after_the_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "NVIDIA A100-SXM4-40GB")
    assert paramcalc.calibrate.default_name("cuda") == "nvidia-a100-sxm4-40gb"
    assert paramcalc.calibrate.default_name("cpu") == "cpu"


@pytest.mark.parametrize(("args", "cuda", "message"), [
    (["--device", "cuda"], False, "--device cuda: torch"),
    (["--device", "cuda", "--name", "cpu"], True, "--name cpu is the CPU's own profile"),
    (["--name", "../evil"], False, "--name must be 1-64 letters, digits"),
    (["--name", ".hidden"], False, "--name must be 1-64 letters, digits"),
    (["--name", ""], False, "--name must be 1-64 letters, digits"),
    (["--name", "t4"], False, "--name 't4' is a datasheet device"),
    (["--name", "A100-80GB"], False, "--name 'A100-80GB' is a datasheet device"),
    (["--size", "63"], False, "--size must be an integer of at least 64"),
    (["--size", "-1"], False, "--size must be an integer of at least 64"),
])
def test_bad_input_is_refused_before_anything_is_measured(cli, refused, profiles, monkeypatch, args, cuda, message):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    refused(cli("calibrate", *args), message)
    assert not profiles.exists() or not any(profiles.iterdir())


def test_importing_calibrate_imports_no_torch():
    probe = "import sys, paramcalc.cli, paramcalc.calibrate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("text", ["{half", '{"fp32": 1e9}', '{"half": 1e9, "fp32": 1e9, "bandwidth": 0}', "[]"])
def test_a_damaged_profile_is_refused_by_name(cli, refused, profiles, text):
    profiles.mkdir(parents=True)
    (profiles / "cpu.json").write_text(text)
    (profiles / "mybox.json").write_text(text)
    refused(cli(*STEP), "cpu.json is not a calibrated profile")
    refused(cli(*STEP, "--device", "mybox"), "run 'paramcalc calibrate --name mybox' again")


def test_first_touch_finds_where_new_tensors_fault_in(profiles, monkeypatch):
    # sizes up to 64 MiB: glibc maps allocations of 32 MiB and more afresh, so a threshold shows by 64 MiB
    monkeypatch.setitem(paramcalc.calibrate_ops.PLANS["quick"], "first_touch", [1, 64])
    touch = calibrate(size=64, quick=True)["first_touch"]
    assert [r["mib"] for r in touch["runs"]] == [1, 64] and all(positive(r["fresh_s"]) for r in touch["runs"])
    if touch["threshold"] is not None:  # another C library may never hand memory back
        assert touch["threshold"] in (1024**2, 64 * 1024**2) and positive(touch["rate"])


def test_the_reference_steps_give_each_phase_a_scale_and_a_per_op_cost(profiles):
    measured = calibrate(size=64, quick=True)["in_step"]
    assert [(r["batch"], r["seq"]) for r in measured["runs"]] == [(1, 16), (2, 64)]
    for phase in ("forward", "backward"):
        assert positive(measured[phase]["scale"]) and measured[phase]["per_op"] >= 0
        for run in measured["runs"]:  # what was solved reproduces what was measured, or the larger step alone
            assert positive(run["measured_s"][phase]) and positive(run["kernels_s"][phase])
        large = measured["runs"][1]
        fitted = measured[phase]["scale"] * large["kernels_s"][phase] + measured[phase]["per_op"] * large[
            "dispatches"][phase]
        assert fitted == pytest.approx(large["measured_s"][phase], rel=1e-6)
