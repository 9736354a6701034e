"""What kernels cost inside a real training step, beside calibrate's loops: measured once, on two reference
steps.

calibrate times each kind of op alone, over and over on the same tensors. Inside a step the same kernels find
their inputs out of cache and share the cores with the allocator, and every op pays Python's module calls and
autograd's bookkeeping besides torch's dispatch: on a 2-core CPU the per-op roofline came out 10-30 % short of
real steps, most on small models. So calibrate also trains a reference model (a 2-layer GPT-2 of width 256,
vocabulary 8192, fp32 AdamW, random weights, built as ``paramcalc train`` builds it) at a small and a large
batch, and solves, phase by phase (forward, backward), measured = scale x kernels + per_op x dispatches: how
much slower the kernels run in a step, and what one op costs on top (``in_step``). The optimizer step is timed
for real already. The reference is none of the models the accuracy benchmark checks
(``benchmarks/throughput_accuracy.py``), which judges whether the two numbers carry over. torch is imported by
the caller.
"""

from __future__ import annotations

import statistics
import time

REFERENCE = {"model_type": "gpt2", "n_embd": 256, "n_layer": 2, "n_head": 4, "vocab_size": 8192,
             "n_positions": 256}
TASK, SHAPES, STEPS = "causal-lm", ((2, 64), (8, 256)), 5
QUICK_SHAPES = ((1, 16), (2, 64))  # --quick: a first look in well under a second
HOW = (f"a real fp32 AdamW step of a reference model ({REFERENCE['n_layer']}-layer GPT-2, width "
       f"{REFERENCE['n_embd']}, vocabulary {REFERENCE['vocab_size']}) at batch x seq "
       f"{' and '.join(f'{b} x {s}' for b, s in SHAPES)} (the median of {STEPS - 2} steps after 2 warm-up "
       "steps), forward and backward timed apart; per phase, measured = scale x (the roofline of its kernels) "
       "+ per_op x (its dispatched ops), solved from the two")


def in_step(timer, profile: dict, quick: bool = False) -> dict:
    """Time the reference steps for real and solve each phase's scale and per-op cost against ``profile``'s
    rates (the ones just measured)."""
    import paramcalc

    result = paramcalc.count(REFERENCE, task=TASK, formulas=False)
    runs = [_run(timer, profile, result, batch, seq) for batch, seq in (QUICK_SHAPES if quick else SHAPES)]
    solved = {"how": HOW, "runs": runs}
    for phase in ("forward", "backward"):
        (k1, n1, t1), (k2, n2, t2) = [(r["kernels_s"][phase], r["dispatches"][phase], r["measured_s"][phase])
                                      for r in runs]
        det = k1 * n2 - k2 * n1
        scale, per_op = ((t1 * n2 - t2 * n1) / det, (k1 * t2 - k2 * t1) / det) if det else (0.0, 0.0)
        if scale <= 0 or per_op < 0:  # noise: the larger step alone, as a scale
            scale, per_op = t2 / k2, 0.0
        solved[phase] = {"scale": scale, "per_op": per_op}
    return solved


def _run(timer, profile: dict, result, batch: int, seq: int) -> dict:
    from . import activations
    from .data import make_batches
    from .oplist import step_ops
    from .runtime import build_model, make_optimizer
    from .step import Step, resolve_attention
    from .timing import Rates, op_seconds
    from .trace import _loss

    step = resolve_attention(Step(batch=batch, seq=seq), result)
    rates = Rates({**profile, "overhead": {"seconds": 0.0}}, profile["fp32"], profile["bandwidth"])
    ops = step_ops(result, step, timer.kind, activations.simulate(result, step, device=timer.kind).records)
    kernels = {phase: sum(op_seconds(op, rates)[0] for op in ops if op.phase == phase)
               for phase in ("forward", "backward")}
    dispatches = {phase: sum(op.dispatches for op in ops if op.phase == phase) for phase in ("forward", "backward")}
    timer.doing = f"a real step of the reference model at {batch} x {seq}"
    batches = make_batches(result, batch=batch, seq=seq, tgt_seq=None, data=None, tokenizer=None, seed=0)
    device = timer.device()
    model = build_model(result, step, seed=0, device=device, batches=batches).train()
    optimizer = make_optimizer("adamw", model.parameters(), 1e-4)
    sync = timer.torch.cuda.synchronize if timer.kind == "cuda" else (lambda: None)
    seconds = []
    for _ in range(STEPS):
        batch_ = {k: v.to(device) for k, v in batches.next().items()}
        sync()
        start = time.perf_counter()
        loss = _loss(model(**batch_))
        sync()
        middle = time.perf_counter()
        loss.backward()
        sync()
        seconds.append((middle - start, time.perf_counter() - middle))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = {phase: statistics.median(s[i] for s in seconds[2:]) for i, phase in enumerate(("forward", "backward"))}
    return {"batch": batch, "seq": seq, "kernels_s": kernels, "dispatches": dispatches, "measured_s": measured}
