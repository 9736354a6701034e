"""The meters the trainer judges by: allocator events on a CPU, max_memory_allocated on CUDA."""

import contextlib
import os

import pytest
import torch

from paramcalc.measure import CpuMeter, CudaMeter, is_out_of_memory

MIB = 2**20


def test_cpu_meter_counts_every_allocation_byte_for_byte():
    meter = CpuMeter()
    with meter.recording():
        kept = torch.empty(MIB, dtype=torch.uint8)  # alive before the step: 1 MiB
        meter.mark("loaded")
        with meter.phase("step"):
            with meter.phase("forward"):
                saved = torch.empty(3 * MIB, dtype=torch.uint8)  # kept for "backward"
                scratch = torch.empty(2 * MIB, dtype=torch.uint8)
                del scratch  # forward peak: 1 + 3 + 2 MiB
            with meter.phase("backward"):
                gradient = torch.empty(MIB, dtype=torch.uint8)  # 1 + 3 + 1
                del saved
            with meter.phase("optimizer"):
                state = torch.empty(4 * MIB, dtype=torch.uint8)  # 1 + 1 + 4
                del state
    summary = meter.summary()
    assert summary["before"] == summary["loaded"] == MIB
    assert summary["forward"] == 6 * MIB
    assert summary["backward"] == 5 * MIB
    assert summary["optimizer"] == 6 * MIB
    assert summary["peak"] == 6 * MIB
    del kept, gradient


def test_cpu_meter_timeline_is_the_curve_the_summary_reads():
    """Every allocation and free of the step, in order: the same bytes the summary's figures come from."""
    meter = CpuMeter()
    with meter.recording():
        kept = torch.empty(MIB, dtype=torch.uint8)
        with meter.phase("step"):
            with meter.phase("forward"):
                saved = torch.empty(3 * MIB, dtype=torch.uint8)
                scratch = torch.empty(2 * MIB, dtype=torch.uint8)
                del scratch
            with meter.phase("backward"):
                gradient = torch.empty(MIB, dtype=torch.uint8)
                del saved
            with meter.phase("optimizer"):
                state = torch.empty(4 * MIB, dtype=torch.uint8)
                del state
        after = torch.empty(8 * MIB, dtype=torch.uint8)  # recorded, but after the step: not on its curve
    summary, timeline = meter.summary(), meter.timeline()
    alive = [b for _, b in timeline.points]
    assert alive == [MIB * n for n in (1, 4, 6, 4, 5, 2, 6, 2)]
    assert timeline.peak == max(alive) == summary["peak"]
    assert timeline.before == summary["before"] == MIB
    assert timeline.after == 2 * MIB  # kept + gradient: what the step leaves alive
    times = [t for t, _ in timeline.points]
    assert times[0] == 0 and times == sorted(times) and times[-1] <= timeline.duration_ns
    assert [name for name, _, _ in timeline.phases] == ["forward", "backward", "optimizer"]
    spans = [t for _, start, end in timeline.phases for t in (start, end)]
    assert spans == sorted(spans) and 0 <= spans[0] and spans[-1] <= timeline.duration_ns
    for name, start, end in timeline.phases:  # each phase's peak is the curve's highest point inside it
        assert max(b for t, b in timeline.points if start <= t <= end) == summary[name]
    del kept, gradient, after


def test_cpu_meter_timeline_sits_on_top_of_the_offset():
    """Data-parallel processes record the step alone, on top of what the model holds (``offset``)."""
    meter = CpuMeter()
    meter.offset = 10 * MIB
    with meter.recording():
        with meter.phase("step"):
            with meter.phase("forward"):
                scratch = torch.empty(MIB, dtype=torch.uint8)
                del scratch
    timeline = meter.timeline()
    assert [b for _, b in timeline.points] == [10 * MIB, 11 * MIB, 10 * MIB]
    assert timeline.peak == meter.summary()["peak"] == 11 * MIB


def test_cpu_meter_phases_outside_recording_cost_nothing():
    meter = CpuMeter()
    assert isinstance(meter.phase("forward"), contextlib.nullcontext)
    with pytest.raises(RuntimeError):
        meter.summary()
    with pytest.raises(RuntimeError):
        meter.timeline()


def test_cuda_meter_resets_the_peak_per_phase(monkeypatch):
    """No GPU here: torch.cuda's counters are replaced by a fake allocator with the same semantics."""

    class FakeAllocator:
        allocated = peak = 0

        def allocate(self, n):
            self.allocated += n
            self.peak = max(self.peak, self.allocated)

    fake = FakeAllocator()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: fake.allocated)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: fake.peak)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 2 * fake.peak)

    def reset(device=None):
        fake.peak = fake.allocated

    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    meter = CudaMeter("cuda:0")
    fake.allocate(100)  # model states
    meter.mark("loaded")
    with meter.recording():
        with meter.phase("step"):
            with meter.phase("forward"):
                fake.allocate(50)
            with meter.phase("backward"):
                fake.allocate(30)
                fake.allocate(-60)
            with meter.phase("optimizer"):
                fake.allocate(10)
                fake.allocate(-10)
    summary = meter.summary()
    assert summary["before"] == summary["loaded"] == 100
    assert (summary["forward"], summary["backward"], summary["optimizer"]) == (150, 180, 130)
    assert summary["peak"] == 180
    assert meter.timeline() is None  # counters, not an event stream: no curve on CUDA


@pytest.mark.parametrize(("error", "expected"), [
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("out of memory"), False),
])
def test_out_of_memory_is_recognised(error, expected):
    assert is_out_of_memory(error) is expected


def test_a_training_run_carries_its_measured_step_timeline_outside_the_json():
    """The trainer's report holds the curve of its measured step; the JSON document stays as it was."""
    import json

    import paramcalc
    from paramcalc.activations import simulate
    from paramcalc.step import Step
    from paramcalc.train import TrainOptions, train
    from tiny import TINY

    config, task = TINY["gpt2"]
    result = paramcalc.count(config, task=task, formulas=False)
    step = Step(batch=2, seq=32)
    report = train(result, step, TrainOptions(steps=2, lr=5e-3))
    memory, timeline = report.measured["memory"], report.timeline
    assert timeline.peak == memory["peak"] and timeline.before == memory["before"]
    # a steady step (optimizer state made in warm-up, gradients set to None) leaves what it found
    assert timeline.after == memory["before"]
    assert {name for name, _, _ in timeline.phases} == {"forward", "backward", "optimizer"}
    for name, start, end in timeline.phases:
        assert max(b for t, b in timeline.points if start <= t <= end) == memory[name]
    document = report.to_dict()
    assert "timeline" not in document and "timeline" not in json.dumps(document)
    # the replay's curve, op by op: its highest point is the predicted peak (one CPU process: no overhead)
    predicted = simulate(result, step, device="cpu", curve=True)
    assert max(b for _, b in predicted.curve) == predicted.peak == report.predicted["memory"]["peak"]
    assert [phase for phase, _ in predicted.curve][-1] == "optimizer"
    assert simulate(result, step, device="cpu").curve is None  # not kept unless asked for


def test_recording_prints_nothing_to_stderr():
    """kineto's 'USDT: ... profiler_start' lines would land in every `paramcalc train` terminal and notebook."""
    import subprocess
    import sys

    probe = ("import torch; from paramcalc.measure import CpuMeter\n"
             "meter = CpuMeter()\n"
             "with meter.recording():\n"
             "    with meter.phase('step'):\n"
             "        torch.ones(1000).sum()\n"
             "print(meter.summary()['peak'] > 0)")
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "True"
    assert "USDT" not in out.stderr and "profiler_start" not in out.stderr, out.stderr
