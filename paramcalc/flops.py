"""FLOPs of one training step, counted the way ``torch.utils.flop_counter`` counts them.

Only matrix multiplications count (mm, addmm, bmm, baddbmm and the fused attention kernels), each as
``2*m*n*k``: a Linear over T tokens costs ``2*T*in*out`` forward. Backward computes a weight gradient
(the same cost again) when the weight trains, and an input gradient when the input needs one, that is,
when anything before it trains. So the step follows the family file's ``[flow]``: which streams need
gradients, op by op and layer by layer. With a frozen base (PEFT), nothing before the first trainable
module pays for input gradients. Attention cores cost ``2*b*h*q*k*d`` per matmul: two forward; eager
backward one per operand that needs a gradient, and so does torch's math path (sdpa with attention
dropout on a CPU, ``paramcalc.attention``); the fused kernels five when any does, as torch counts them
(they recompute the scores). LoRA adds ``2*T*r*(in + out)`` forward (Hu et al. 2021).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import attention, expr, masks
from .errors import ParamcalcError
from .families import families
from .step import Step, check_fits_model, resolve_attention

MATMUL_KINDS = ("linear", "conv1d", "tied")
# flow ops without a weight (residual add, product, dropout, activation, casts, scaling, views): they pass
# gradients on and count no matmul FLOPs
ELEMENTWISE = ("+", "*", "dropout", "act", "upcast", "scale", "first-token", "keep")
UNMODELLED = ("prompt", "prefix", "ptuning", "adapter")  # change sequence lengths or add modules to the flow


@dataclass
class Flops:
    forward: int
    backward: int
    rows: dict[str, list[int]]  # row or attention core -> [forward, backward]

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def to_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward, "total": self.total}


@dataclass
class _Module:
    """What the flow needs to know of one named row (and the PEFT rows attached to it)."""

    kind: str
    tokens: int
    fan_in: int
    fan_out: int
    weight_trains: bool  # its weight (or the trainable copy peft swaps in) gets a gradient
    any_trains: bool  # some parameter of it trains, so its output needs a gradient
    lora_rank: int = 0  # LoRA on it (frozen base)
    ia3_input: bool = False  # IA3 scales its input (feed-forward modules)
    ia3_output: bool = False


def step_flops(result, step: Step, device: str = "cpu") -> Flops:
    """Forward and backward matmul FLOPs of one step on a ``device`` kind (cpu or cuda: which attention
    kernel runs)."""
    if result.generic:
        raise ParamcalcError("FLOPs need a model with a formula file (bert, roberta, t5, gpt2, bloom)")
    methods = {method for method, _ in result.peft_options}
    if methods & set(UNMODELLED) or any(getattr(o, "dora", False) for _, o in result.peft_options):
        raise ParamcalcError("analytic FLOPs model full fine-tuning, LoRA and IA3; prompt, prefix, p-tuning, "
                             "adapters and DoRA are not modelled yet ('paramcalc trace' measures them)")
    check_fits_model(step, result)
    step = resolve_attention(step, result)
    family = families()[result.family]
    values = {**result.values, **step.symbols(result.task)}
    modules = _modules(result, family, values)
    needs_grad: dict[str, bool] = {}
    rows: dict[str, list[int]] = {}
    for part in family.tasks[result.task].parts:
        layers = _layers(result, part)
        for _ in range(layers):
            written: set[str] = set()
            for op in family.flow.get(part, []):
                if op == "|":  # a scope boundary, for the memory replay
                    continue
                _run(op, modules, needs_grad, rows, family, values, step, written, (result.config, device))
    return Flops(sum(f for f, _ in rows.values()), sum(b for _, b in rows.values()), rows)


def _layers(result, part: str) -> int:
    counts = {c.repeat_count for c in result.components if c.part == part and c.repeat != "1"}
    return max(counts) if counts else 1


def _modules(result, family, values) -> dict[str, _Module]:
    modules: dict[str, _Module] = {}
    by_param = {}
    for c in result.components:
        if c.group == "peft":
            continue
        base = _base_name(c.name)
        module = modules.get(base)
        if module is None:
            tokens = expr.evaluate(c.tokens or family.tokens.get(c.part, "b*s"), values)
            fan_in = expr.evaluate(c.args["in_features"], values) if "in_features" in c.args else 0
            fan_out = expr.evaluate(c.args.get("out_features", c.args.get("embedding_dim", "0")), values)
            module = modules[base] = _Module(c.kind, tokens, fan_in, fan_out, False, False)
        module.any_trains |= c.trainable and (c.count > 0 or c.kind == "tied")
        module.weight_trains |= c.trainable and ("weight" in c.shapes or c.kind == "tied")
        by_param[c.param] = module
    for c in result.components:
        if c.group != "peft":
            continue
        if "modules_to_save" in c.name:  # peft runs the trainable copy instead of the original
            original = modules[_base_name(c.name.removesuffix(" (trainable copy, modules_to_save)"))]
            original.weight_trains = original.any_trains = True
        elif c.kind == "lora":
            target = by_param.get(c.param)
            if target is None or c.repeat_count != _count_of(result, c.param):
                raise ParamcalcError("analytic FLOPs need LoRA on every layer of a module (not a subset)")
            target.lora_rank = values["r"]
            target.any_trains = True
        elif c.kind == "ia3":
            target = by_param[c.param]
            if "input scale" in c.name:
                target.ia3_input = True
            else:
                target.ia3_output = True
            target.any_trains = True
    return modules


def _base_name(name: str) -> str:
    return name.removesuffix(" weight").removesuffix(" bias")  # rows that bias=all split in two


def _count_of(result, param: str) -> int:
    return next(c.repeat_count for c in result.components if c.param == param and c.group != "peft")


def _run(op: str, modules, needs_grad, rows, family, values, step: Step, written: set[str], where) -> None:
    flow, _, name = op.partition(":")
    sources, _, target = flow.partition("->")
    inputs = [s.strip() for s in sources.split(",") if s.strip()]
    name, target = name.strip(), target.strip()
    grad_in = any(needs_grad.get(s, False) for s in inputs)
    if any(s not in needs_grad for s in inputs):  # a branch this config does not have
        return
    if name.split(" ")[0] in ELEMENTWISE:  # no matmul, no weight
        needs_grad[target] = grad_in
        written.add(target)
        return
    if name.startswith("attention core"):
        written.add(target)
        needs_grad[target] = _attention(name, inputs, needs_grad, rows, family, values, step, *where, modules)
        return
    tied_copy = name.endswith(" [tied]")  # the model runs a tied twin: same weight, no PEFT wrapper
    module = modules.get(name.removesuffix(" [tied]"))
    if module is None:  # a row this config does not have (e.g. the ungated FFN of a gated T5):
        if target not in written:  # a stream left over from the previous layer is not this one's
            needs_grad.pop(target, None)
        return
    written.add(target)
    if tied_copy:
        needs_grad[target] = grad_in or module.weight_trains
        return
    grad_out = grad_in or module.any_trains
    if module.kind in MATMUL_KINDS and module.fan_in:
        one = 2 * module.tokens * module.fan_in * module.fan_out
        forward = one
        backward = one * ((grad_in or module.ia3_input) + module.weight_trains)
        if module.lora_rank:
            a = 2 * module.tokens * module.fan_in * module.lora_rank
            b = 2 * module.tokens * module.lora_rank * module.fan_out
            forward += a + b
            backward += a * (1 + grad_in) + 2 * b  # A: weight (+ input); B: weight and input
        totals = rows.setdefault(name, [0, 0])
        totals[0] += forward
        totals[1] += backward if grad_out or module.weight_trains else 0
    elif module.kind == "embedding" and module.lora_rank:
        # LoRA on an embedding: a lookup in A, then a matmul with B ([T, r] @ [r, dim])
        totals = rows.setdefault(name, [0, 0])
        totals[0] += 2 * module.tokens * module.lora_rank * module.fan_out
        totals[1] += 4 * module.tokens * module.lora_rank * module.fan_out  # B's weight and input
    needs_grad[target] = grad_out


def _attention(name, inputs, needs_grad, rows, family, values, step: Step, config: dict, device: str,
               modules) -> bool:
    core = family.attention[int(name.rsplit(" ", 1)[-1]) - 1]
    b, heads, dim, q_len, k_len = attention.shapes(core, values)
    one = 2 * b * heads * q_len * k_len * dim  # one of the two matmuls
    q, k, v = (needs_grad.get(s, False) for s in inputs)
    mask_grad = masks.mask_grad(core, family, step,
                                lambda row: getattr(modules.get(_base_name(row)), "weight_trains", False))
    if attention.kernel(step, core, config, device, mask_grad) != "fused":
        # eager, or torch's math path (sdpa with dropout on a CPU): scores = q @ k^T, out = probs @ v,
        # a gradient per operand that needs one
        backward = one * (q + k + (q or k) + v)
    else:
        backward = 5 * one if (q or k or v) else 0
    totals = rows.setdefault(name, [0, 0])
    totals[0] += 2 * one
    totals[1] += backward
    return q or k or v
