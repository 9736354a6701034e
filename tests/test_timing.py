"""The per-op time model (paramcalc.timing) on a saved calibration profile: its arithmetic pinned on one small
step, monotone in batch and sequence, the optimizer variants, accumulation and all-reduce (tests/test_step.py checks it imports no torch).
No wall-clock assertion: real steps judge the model in benchmarks/throughput_accuracy.py."""

import json

import pytest
from test_step import SMALL, TASK

import paramcalc
from paramcalc.flops import step_flops
from paramcalc.meta import build_meta_model
from paramcalc.plan import Parallel, plan
from paramcalc.step import Step
from paramcalc.timing import Rates, op_seconds

MATMUL, STREAM, OVERHEAD, COPY = 1e9, 1e8, 1e-5, 1e18  # FLOP/s, B/s, s per op, B/s (matmuls never memory-bound)
PER_ELEMENT, PER_TENSOR = 2e-9, 3e-6


def _profile(path):
    """A profile in the layout paramcalc calibrate saves, every rate the same at every size."""
    classes = {name: {"shapes": [[1, 8, 8, 8], [1, 64, 64, 64]], "flops": [1024, 524288],
                      "rate": {"fp32": [MATMUL, MATMUL], "bf16": [MATMUL / 2, MATMUL / 2]}}
               for name in ("square", "linear", "lora_down", "lora_up", "attention_scores", "attention_values")}
    ops = {name: {"shapes": [[8, 8], [64, 64]], "bytes": {"fp32": [768, 49152], "bf16": [384, 24576]},
                  "rate": {"fp32": [STREAM, STREAM], "bf16": [STREAM, STREAM]}}
           for name in ("add", "mul", "softmax", "layer_norm", "gelu", "dropout")}
    optimizers = {name: {"per_element": PER_ELEMENT, "per_tensor": PER_TENSOR}
                  for name in ("adamw", "adam", "sgd", "sgd-momentum", "adafactor", "adamw-8bit")}
    profile = {"name": "pinned", "kind": "cpu", "fp32": MATMUL, "half": MATMUL / 2, "half_dtype": "bf16",
               "bf16": MATMUL / 2, "bandwidth": COPY, "when": "in a test", "gemm": {"classes": classes},
               "elementwise": {"ops": ops}, "overhead": {"seconds": OVERHEAD},
               "optimizer": {"per_byte": PER_ELEMENT / 16, "per_tensor": PER_TENSOR}, "optimizers": optimizers}
    path.mkdir(parents=True, exist_ok=True)
    (path / "pinned.json").write_text(json.dumps(profile))


@pytest.fixture
def pinned(tmp_path, monkeypatch):
    monkeypatch.setenv("PARAMCALC_CACHE_DIR", str(tmp_path))
    _profile(tmp_path / "profiles")
    return "pinned"


def test_one_small_step_on_a_pinned_profile(pinned):
    # With every matmul at MATMUL FLOP/s (never memory-bound), every elementwise op at STREAM B/s and OVERHEAD a
    # dispatch, the step is FLOPs / MATMUL + elementwise bytes / STREAM + dispatches x OVERHEAD + the optimizer:
    # per element and per tensor, over what trains (the count's own numbers)
    result = paramcalc.count(SMALL["bert"], task=TASK["bert"], formulas=False)
    step = Step(batch=2, seq=8, attention="eager")
    timed = plan(result, step, device=pinned).throughput
    ops = timed["table"]
    flops = step_flops(result, step)
    assert sum(r["flops"] for r in ops) == flops.total
    matmul_s = flops.total / MATMUL
    moved = sum(r["bytes"] for r in ops if r["kind"] not in ("matmuls", "optimizer") and r["flops"] == 0)
    optimizer = next(r for r in ops if r["phase"] == "optimizer")
    model = build_meta_model(result.config, result.hf_class, result.task)  # what torch's optimizer would get
    tensors = [p.numel() for p in model.parameters() if p.requires_grad]
    assert optimizer["seconds"] == pytest.approx(PER_ELEMENT * sum(tensors) + PER_TENSOR * len(tensors))
    dispatches = timed["step_s"] - matmul_s - optimizer["seconds"]
    # what is left is elementwise bytes / STREAM + a whole number of OVERHEADs
    attention_bytes = sum(r["bytes"] for r in ops if r["kind"] == "attention core")
    leftover = dispatches - (moved - attention_bytes) / STREAM
    assert leftover > 0
    assert timed["step_s"] == pytest.approx(sum(r["seconds"] for r in ops))
    assert timed["phases"]["forward"] == pytest.approx(sum(r["seconds"] for r in ops if r["phase"] == "forward"))
    assert timed["tokens_per_s"] == pytest.approx(2 * 8 / timed["step_s"])


def test_a_matmul_is_its_flops_at_the_rate_of_its_class(pinned):
    rates = Rates(json.loads((__import__("pathlib").Path(__import__("os").environ["PARAMCALC_CACHE_DIR"])
                              / "profiles" / "pinned.json").read_text()), MATMUL, COPY)
    from paramcalc.oplist import Op

    op = Op("forward", "matmuls", "q", "linear", 2 * 16 * 32 * 32, 0, 4, 2, (1, 16, 32, 32))
    assert op_seconds(op, rates) == (pytest.approx(2 * 16 * 32 * 32 / MATMUL + 2 * OVERHEAD), "compute")
    half = Op("forward", "matmuls", "q", "linear", 2 * 16 * 32 * 32, 0, 2, 1, (1, 16, 32, 32))
    assert op_seconds(half, rates)[0] == pytest.approx(2 * 16 * 32 * 32 / (MATMUL / 2) + OVERHEAD)
    softmax = Op("forward", "attention core", "a", "softmax_backward", 0, 3000, 4, 1)  # measured as softmax
    assert op_seconds(softmax, rates) == (pytest.approx(3000 / STREAM + OVERHEAD), "memory")


@pytest.mark.parametrize("family", sorted(SMALL))
@pytest.mark.parametrize("method", [None, "lora:r=2"])
def test_time_grows_with_batch_and_sequence(pinned, family, method):
    result = paramcalc.count(SMALL[family], task=TASK[family], peft=method, formulas=False)
    for device in (pinned, "t4"):
        times = [plan(result, Step(batch=b, seq=s, mixed_precision="fp16" if device == "t4" else None),
                      device=device).throughput["step_s"] for b, s in ((1, 8), (2, 8), (4, 8), (4, 16), (4, 32))]
        assert times == sorted(times) and len(set(times)) == len(times)


def test_optimizer_accumulation_and_all_reduce(pinned):
    result = paramcalc.count(SMALL["gpt2"], task=TASK["gpt2"], formulas=False)
    base = plan(result, Step(batch=2, seq=8), device=pinned).throughput
    twice = plan(result, Step(batch=2, seq=8, grad_accum=2), device=pinned).throughput
    # two micro-batches: forward and backward twice (+ adding the gradients), the optimizer once
    assert twice["phases"]["forward"] == pytest.approx(2 * base["phases"]["forward"])
    assert twice["phases"]["backward"] > 2 * base["phases"]["backward"]
    assert twice["phases"]["optimizer"] == pytest.approx(base["phases"]["optimizer"])
    sgd = plan(result, Step(batch=2, seq=8, optimizer="sgd"), device=pinned).throughput
    assert sgd["phases"]["optimizer"] == pytest.approx(base["phases"]["optimizer"])  # the same measured costs here
    ddp = plan(result, Step(batch=2, seq=8), device="a100-80gb", parallel=Parallel(gpus=4)).throughput
    alone = plan(result, Step(batch=2, seq=8), device="a100-80gb").throughput
    gradients = result.trainable_params * 4
    assert ddp["phases"]["all_reduce"] >= 2 * 3 / 4 * gradients / 300e9  # at least the last bucket's ring
    assert ddp["step_s"] > alone["step_s"]


def test_datasheet_optimizers_follow_their_traffic():
    result = paramcalc.count(SMALL["bert"], task=TASK["bert"], formulas=False)
    seconds = {name: plan(result, Step(batch=2, seq=8, optimizer=name), device="a100-80gb").throughput["phases"]
               ["optimizer"] for name in ("sgd", "sgd-momentum", "adamw")}
    assert seconds["sgd"] < seconds["sgd-momentum"] < seconds["adamw"]


def test_large_new_tensors_pay_their_first_touch_on_a_cpu():
    from paramcalc.oplist import Op

    saved = {"first_touch": {"threshold": 1000, "rate": 1e4}, "overhead": {"seconds": 0.0}}
    rates = Rates(saved, MATMUL, 1e18)
    small = Op("forward", "elementwise", "x", "add", 0, 3, 4, 1, (), 999)
    large = Op("forward", "elementwise", "x", "add", 0, 3, 4, 1, (), 2000)
    assert op_seconds(small, Rates(saved, MATMUL, 1e18))[0] == pytest.approx(3 / 1e18)
    assert op_seconds(large, rates)[0] == pytest.approx(3 / 1e18 + 2000 / 1e4)
    gpu = Rates({"first_touch": {"threshold": None, "rate": None}}, MATMUL, 1e18)  # CUDA's caching allocator
    assert gpu.first_touch(10**9) == 0.0
