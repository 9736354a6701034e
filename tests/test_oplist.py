"""The op list the time model folds over (paramcalc.oplist) has the FLOPs paramcalc.flops counts, which
FlopCounterMode judges (tests/test_step.py, tests/test_flops_methods.py): both walk the same step, so every
matmul the list holds is one torch runs, in the phase it runs in."""

import pytest
from test_step import SMALL, TASK

import paramcalc
from paramcalc import activations
from paramcalc.errors import ParamcalcError
from paramcalc.flops import step_flops
from paramcalc.oplist import KINDS, PHASES, step_ops
from paramcalc.step import Step, resolve_attention

METHODS = [None, "lora:r=2", "lora:r=3,targets=all-linear,dropout=0.1", "ia3", "prompt:tokens=3",
           "ptuning:tokens=2", "lora:r=2,bias=all", "lora:r=2,dora=true", "lora:r=3,dora=true,dropout=0.1",
           "adapter:kind=pfeiffer", "adapter:kind=houlsby,bottleneck=3", "prefix:tokens=3",
           "prefix:tokens=2,projection=true,hidden=6"]
CASES = [(family, method, checkpointing, precision, attention)
         for family in SMALL for method in METHODS for checkpointing in (False, True)
         for precision in (None, "bf16") for attention in ("eager", "sdpa")]


def ops_of(result, step, device="cpu"):
    step = resolve_attention(step, result)
    return step_ops(result, step, device, activations.simulate(result, step, device=device).records)


@pytest.mark.parametrize(("family", "method", "checkpointing", "precision", "attention"), CASES)
def test_op_list_flops_equal_step_flops(family, method, checkpointing, precision, attention):
    step = Step(batch=2, seq=8, tgt_seq=5 if family == "t5" else None, grad_checkpointing=checkpointing,
                mixed_precision=precision, attention=attention)
    try:
        result = paramcalc.count(SMALL[family], task=TASK[family], peft=method, formulas=False)
        step_flops(result, step)
        activations.simulate(result, step)
    except ParamcalcError as exc:  # what peft or the model refuses (step_flops and the replay say why)
        pytest.skip(str(exc))
    for device in ("cpu", "cuda"):
        counted = step_flops(result, step, device=device)
        ops = ops_of(result, step, device)
        by_phase = {phase: sum(op.flops for op in ops if op.phase == phase) for phase in PHASES}
        assert (by_phase["forward"], by_phase["backward"] + by_phase["recompute"], by_phase["recompute"]) == (
            counted.forward, counted.backward, counted.recompute)
        assert all(op.kind in KINDS and op.bytes >= 0 and op.dispatches >= 1 for op in ops)
