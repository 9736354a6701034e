"""The meters the trainer judges by: allocator events on a CPU, max_memory_allocated on CUDA."""

import contextlib

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


def test_cpu_meter_phases_outside_recording_cost_nothing():
    meter = CpuMeter()
    assert isinstance(meter.phase("forward"), contextlib.nullcontext)
    with pytest.raises(RuntimeError):
        meter.summary()


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


@pytest.mark.parametrize(("error", "expected"), [
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"), True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (MemoryError(), True),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    (ValueError("out of memory"), False),
])
def test_out_of_memory_is_recognised(error, expected):
    assert is_out_of_memory(error) is expected
