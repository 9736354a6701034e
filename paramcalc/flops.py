"""FLOPs of one training step, counted the way ``torch.utils.flop_counter`` counts them.

Only matrix multiplications count (mm, addmm, bmm, baddbmm and the fused attention kernels), each as
``2*m*n*k``: a Linear over T tokens costs ``2*T*in*out`` forward. Backward computes the input gradient
(the same cost again) and, for a trainable weight, the weight gradient (again). Attention cores cost
``2*b*h*q*k*d`` per matmul: two forward; eager backward four (both operands of both matmuls); the fused
kernels' backward five, as torch counts them (they recompute the scores).

Here every hidden state needs its gradient (full fine-tuning: the embeddings train). PEFT, with a
frozen base, skips input gradients until the first trainable module; that is not modelled yet.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import expr
from .errors import ParamcalcError
from .families import families
from .step import Step, check_fits_model

MATMUL_KINDS = ("linear", "conv1d", "tied")


@dataclass
class Flops:
    forward: int
    backward: int
    rows: dict[str, tuple[int, int]]  # component or attention core -> (forward, backward)

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def to_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward, "total": self.total}


def step_flops(result, step: Step) -> Flops:
    if result.generic:
        raise ParamcalcError("FLOPs need a model with a formula file (bert, roberta, t5, gpt2, bloom)")
    if result.peft:
        raise ParamcalcError("analytic FLOPs with PEFT methods are not modelled yet (a frozen base skips input "
                             "gradients up to the first trainable module); 'paramcalc trace' measures them")
    check_fits_model(step, result)
    family = families()[result.family]
    values = {**result.values, **step.symbols(result.task)}
    parts = family.tasks[result.task].parts
    rows = {}
    for component in result.components:
        if component.kind not in MATMUL_KINDS or "in_features" not in component.args:
            continue
        tokens = expr.evaluate(component.tokens or family.tokens[component.part], values)
        fan_in = expr.evaluate(component.args["in_features"], values)
        fan_out = expr.evaluate(component.args["out_features"], values)
        forward = component.repeat_count * 2 * tokens * fan_in * fan_out
        rows[component.name] = (forward, 2 * forward)  # input gradient + weight gradient
    for n, core in enumerate(family.attention):
        if core["part"] not in parts:
            continue
        b = values["b"]
        heads, dim = expr.evaluate(core["heads"], values), expr.evaluate(core["head_dim"], values)
        q_len, k_len = expr.evaluate(core["q_len"], values), expr.evaluate(core["k_len"], values)
        one = 2 * b * heads * q_len * k_len * dim  # one of the s x s matmuls
        repeat = expr.evaluate(core["repeat"], values)
        backward = 4 * one if step.attention == "eager" else 5 * one
        rows[f"attention core {n + 1} ({core['part']}, {core['q_len']}x{core['k_len']})"] = (
            repeat * 2 * one, repeat * backward)
    return Flops(sum(f for f, _ in rows.values()), sum(b for _, b in rows.values()), rows)
