"""``paramcalc calibrate``: measured rates are saved as a profile that throughput estimates then read.

Wall-clock figures depend on the machine and its load, so they are only checked to be positive and finite.
Small matrices and a small copy keep each calibration well under a second.
"""

import json
import math
import subprocess
import sys

import pytest

import paramcalc.calibrate
from paramcalc.calibrate import calibrate, save_profile

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
    measured = calibrate(size=64, repeats=2)
    assert measured["name"] == "cpu" and measured["kind"] == "cpu" and measured["half_dtype"] == "bf16"
    for key in ("fp32", "half", "bf16", "bandwidth", "memory", "threads"):
        assert positive(measured[key]), key
    assert measured["half"] == measured["bf16"]  # the CPU's half precision is bf16, as CPU autocast runs it
    path = save_profile(measured)
    assert path == profiles / "cpu.json"
    assert json.loads(path.read_text()) == measured
    assert [p.name for p in profiles.iterdir()] == ["cpu.json"]  # no temporary file left behind


def test_saving_is_atomic(profiles, monkeypatch):
    first = calibrate(size=64, repeats=1)
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

    result = cli("calibrate", "--size", "64", "--json")
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
    assert cli("calibrate", "--size", "64", "--name", "mybox").exit_code == 0
    assert (profiles / "mybox.json").exists() and not (profiles / "cpu.json").exists()
    doc = json.loads(cli(*STEP, "--device", "mybox").stdout)
    saved = json.loads((profiles / "mybox.json").read_text())
    assert doc["throughput"]["profile"] == "mybox" and positive(doc["throughput"]["tokens_per_s"])
    assert doc["device"]["memory"] == saved["memory"]  # a named profile carries its memory: fits is answered
    assert doc["device"]["fits"] is (doc["memory"]["peak"] <= saved["memory"])


def test_table_says_what_was_measured_and_where_it_went(cli, profiles):
    result = cli("calibrate", "--size", "64")
    assert result.exit_code == 0, result.output
    for text in ("fp32 matmul", "bf16 matmul", "memory bandwidth", "FLOP/s", "saved to"):
        assert text in result.stdout, text


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
