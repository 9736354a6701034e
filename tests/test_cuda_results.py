"""Real H100 training steps, measured once and committed, judged again by today's predictor.

CI has no GPU, so ``benchmarks/results/nvidia-h100-80gb-hbm3.json`` keeps what a real H100 run of
``benchmarks/trainer_validation.py --device cuda`` measured (``torch.cuda.max_memory_allocated`` over the step);
every row is planned again here, on the H100's datasheet profile with the measured device's memory, and held
to the trainer's GPU tolerance. A change that moves the GPU memory model away from what a GPU did fails here.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "nvidia-h100-80gb-hbm3.json"
ROWS = json.loads(RESULTS.read_text())
# rows the predictor still misses on a GPU (their figures are in README's GPU section)
KNOWN_GAPS = {("bert-base-uncased", "lora r=8", "bf16"):
              "a real H100 step holds 36 MB (3.5 %) more than the replay in BERT's bf16 LoRA forward: not yet found"}


def _id(row):
    return f"{row['model']}-{row['label']}-{row['options']['batch']}x{row['options']['seq']}".replace(" ", "_")


def _params():
    for row in ROWS:
        gap = KNOWN_GAPS.get((row["case"]["model"], row["label"], row["options"]["mixed_precision"]))
        marks = [pytest.mark.xfail(strict=True, reason=gap)] if gap else []
        yield pytest.param(row, marks=marks, id=_id(row))


@pytest.fixture(scope="module")
def replan():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from trainer_validation import replan as function
    finally:
        sys.path.pop(0)
    return function


def test_the_committed_rows_were_measured_on_a_gpu():
    assert len(ROWS) >= 15
    for row in ROWS:
        assert row["device"]["kind"] == "cuda" and "H100" in row["device"]["description"]
        assert row["measured"]["memory"]["peak"] > row["measured"]["memory"]["before"] > 0
    families = {row["family"] for row in ROWS}
    assert {"llama", "qwen2", "mistral", "mixtral", "gpt2", "bert"} <= families


@pytest.mark.parametrize("row", _params())
def test_replanned_peak_within_the_gpu_tolerance(row, replan):
    again = replan(row, "h100-80gb")
    measured = row["measured"]["memory"]["peak"]
    predicted = again["predicted"]["memory"]["peak"] - again["predicted"]["memory"]["overhead"]
    assert again["predicted"]["memory"]["cublas_workspaces"] == 2 * 32 * 1024**2  # Hopper: 32 MiB a thread
    assert abs(predicted - measured) / measured <= row["tolerance"], (predicted, measured)


def test_without_the_gpu_rules_the_rows_miss(replan):
    """The cuBLAS workspaces and AdamW's foreach update are what a GPU adds: GPT-2's full fp32 step (its peak in
    the optimizer step) falls outside the tolerance if the plan is made with the CPU's rules instead."""
    row = next(r for r in ROWS if r["case"]["model"] == "gpt2" and r["case"]["method"] is None)
    again = replan(row, "h100-80gb")
    memory = again["predicted"]["memory"]
    cpu_rules = memory["peak"] - memory["overhead"] - memory["cublas_workspaces"]
    cpu_rules -= memory["transient"] - 2 * 4 * 50257 * 768  # the CPU's update: two copies of the largest tensor
    measured = row["measured"]["memory"]["peak"]
    assert abs(cpu_rules - measured) / measured > row["tolerance"]
