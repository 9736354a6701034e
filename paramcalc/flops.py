"""FLOPs of one training step, counted the way ``torch.utils.flop_counter`` counts them.

Only matrix multiplications count (mm, addmm, bmm, baddbmm and the fused attention kernels), each as
``2*m*n*k``: a Linear over T tokens costs ``2*T*in*out`` forward. Backward computes a weight gradient
(the same cost again) when the weight trains, and an input gradient when the input needs one, that is,
when anything before it trains. So the step follows the family file's ``[flow]``: which streams need
gradients, op by op and layer by layer. With a frozen base (PEFT), nothing before the first trainable
module pays for input gradients. Attention cores cost ``2*b*h*q*k*d`` per matmul: two forward; eager
backward one per operand that needs a gradient, and so does torch's math path (sdpa with attention
dropout on a CPU, ``paramcalc.attention``); the fused kernels five when any does, as torch counts them
(they recompute the scores). LoRA adds ``2*T*r*(in + out)`` forward (Hu et al. 2021). Gradient checkpointing
adds the checkpointed layers' second forward to backward (``Flops.recompute``, see ``_repeated``). Prompt
tuning and p-tuning lengthen the sequence, prefix tuning the keys and values of self-attention, and their
encoders have FLOPs of their own; bottleneck adapters are ops of their own on the sub-layer outputs, and DoRA
adds a forward-only pass through A and B (and, with LoRA dropout, the base matmul again): all in
``paramcalc.flops_methods``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import attention, expr, flops_methods, masks, moe
from .errors import ParamcalcError
from .families import families
from .step import Step, check_fits_model, resolve_attention

MATMUL_KINDS = ("linear", "conv1d", "tied")
# flow ops without a weight (residual add, product, dropout, activation, casts, scaling, views, rotary positions):
# they pass gradients on and count no matmul FLOPs
ELEMENTWISE = ("+", "*", "dropout", "act", "upcast", "scale", "first-token", "keep", "rotary")
# of those, the ones that save a tensor for backward (a product its factors; rotary positions their cos and sin)
SAVING = ("*", "act", "rotary")


@dataclass
class Flops:
    """One step's matmul FLOPs, split where ``FlopCounterMode`` sees them happen.

    ``forward``: the forward pass, up to the loss. ``backward``: all of ``loss.backward()``: input and weight
    gradients, and, with gradient checkpointing, the checkpointed layers' forward run a second time to remake
    what they did not keep (``recompute``, a part of ``backward``). ``total``: forward + backward, the whole
    step (the optimizer's update is elementwise: no matmul).
    """

    forward: int
    backward: int  # gradients + recompute
    rows: dict[str, list[int]]  # row or attention core -> [forward, backward]; backward without the recompute
    recompute: int = 0  # the checkpointed layers' second forward, inside backward

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def to_dict(self) -> dict:
        return {"forward": self.forward, "backward": self.backward, "recompute": self.recompute,
                "total": self.total}


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
    dora: int = 0  # DoRA on its LoRA: the forward FLOPs of rebuilding B @ A (flops_methods.dora_identity)
    dora_dropout: bool = False  # DoRA with lora_dropout > 0: the dropped input through the base weight again
    dora_leaf: str = ""  # and on a Conv1D: its weight's name, which peft may wrap in a new Parameter (see _run)
    ia3_input: bool = False  # IA3 scales its input (feed-forward modules)
    ia3_output: bool = False
    quantized: bool = False  # a bitsandbytes row (--quant)
    # peft's LoRA on a fused experts tensor (target_parameters): its name -> rank per expert (paramcalc.moe)
    lora_params: dict = field(default_factory=dict)

    @property
    def hooks_see_nothing(self) -> bool:
        """A bitsandbytes row with no method on it: its autograd Function keeps the packed weight (and the int8
        one its input) as attributes of its context, which checkpointing's saved-tensor hooks do not see, so a
        checkpointed re-run does not wait for it (torch's early stop)."""
        return self.quantized and not (self.lora_rank or self.dora or self.ia3_input or self.ia3_output)


def step_flops(result, step: Step, device: str = "cpu") -> Flops:
    """Forward and backward matmul FLOPs of one step on a ``device`` kind (cpu or cuda: which attention
    kernel runs)."""
    if result.generic:
        raise ParamcalcError("FLOPs need a model with a formula file (bert, roberta, t5, gpt2, bloom)")
    methods = {method for method, _ in result.peft_options}
    if result.quant and any(getattr(options, "dora", False) for _, options in result.peft_options):
        raise ParamcalcError("analytic FLOPs of DoRA on a quantized base are not modelled: peft's DoRA init reads "
                             "the quantized weights, which paramcalc's meta-device trace does not have, so there is "
                             "no traced count to check them against")
    check_fits_model(step, result)
    step = resolve_attention(step, result)
    family = families()[result.family]
    if not family.flow:
        raise ParamcalcError(f"the {family.title} family file does not describe the step's flow yet: its FLOPs are "
                             "the traced step's (paramcalc trace)")
    if "prefix" in methods:
        flops_methods.check_prefix(result, family, step)
    values = {**result.values, **step.symbols(result.task)}
    values["s"] += flops_methods.prepended_tokens(result)  # soft prompts lengthen the input sequence
    modules = _modules(result, family, values)
    needs_grad: dict[str, bool] = {}
    rows: dict[str, list[int]] = {}
    encoder = flops_methods.encoder_flops(result, values, family)
    if encoder:  # the prompt encoder runs first; all of it trains
        rows["prompt encoder"] = [encoder, 2 * encoder]
    recompute = 0
    where = (result.config, device, flops_methods.prefix_tokens(result))
    first = family.flow[family.tasks[result.task].parts[0]][0]
    prompted = bool(flops_methods.prepended_tokens(result))  # trainable rows in the input embeddings
    parts = family.tasks[result.task].parts
    # transformers' gradient_checkpointing_enable hooks the input embeddings (enable_input_require_grads):
    # their output needs a gradient even when they are frozen, so every layer after them pays for input
    # gradients
    lookup = family.flow[parts[0]][0].partition(":")[2].strip() if step.grad_checkpointing else None
    for part in parts:
        checkpointed = step.grad_checkpointing and _repeated(result, part)
        for _ in range(_layers(result, part)):
            written: set[str] = set()
            # the re-run goes up to the last op that saves anything, less that op's last kernel when it is a matmul
            before = rerun = sum(f for f, _ in rows.values())
            for op in flops_methods.with_adapters(result, family, part, family.flow.get(part, [])):
                if op == "|":  # a scope boundary, for the memory replay
                    continue
                saves = _run(op, modules, needs_grad, rows, family, values, step, written, where)
                if saves is not None:
                    rerun = sum(f for f, _ in rows.values()) - saves
                if lookup and op.startswith("->") and op.partition(":")[2].strip() == lookup or (
                        prompted and op is first):
                    needs_grad[_io_target(op)] = True
            if checkpointed and any(needs_grad.get(target) for target in written):
                recompute += rerun - before
    forward, backward = sum(f for f, _ in rows.values()), sum(b for _, b in rows.values())
    return Flops(forward, backward + recompute, rows, recompute)


# Gradient checkpointing (torch.utils.checkpoint, non-reentrant, as transformers runs it): a checkpointed layer
# keeps only its inputs, and backward runs its forward again when it first needs what the layer saved. The
# re-run stops early (torch's early stop, on by default) as soon as every tensor the first run saved has been
# saved again: autograd saves an op's inputs before its kernel runs, so when the layer's last op that saves
# anything is a matmul (it saves its inputs only; a LoRA'd module's last matmul is B's), that matmul's kernel is
# not run again. Ops that save nothing (residual adds, dropout with p=0, casts) do not hold the re-run back.
# A layer none of whose ops takes part in backward is not re-run at all.


def _repeated(result, part: str) -> bool:
    """A part made of repeated layers (even one): transformers checkpoints each of them (its
    GradientCheckpointingLayer blocks)."""
    return any(c.part == part and c.repeat != "1" for c in result.components)


def _io_target(op: str) -> str:
    return op.partition(":")[0].partition("->")[2].strip()


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
        module.quantized |= bool(result.quant) and c.name in result.quant.quantized
        module.any_trains |= c.trainable and (c.count > 0 or c.kind == "tied")
        module.weight_trains |= c.trainable and ("weight" in c.shapes or c.kind in ("tied", "experts"))
        by_param[c.param] = module
    lora = next((options for method, options in result.peft_options if method == "lora"), None)
    for c in result.components:
        if c.group != "peft":
            continue
        if c.kind == "adapter":  # an op of its own on a sub-layer's output (flops_methods.with_adapters)
            tokens = expr.evaluate(family.tokens[flops_methods.adapter_site(family, c).get("part")], values)
            width = result.values["b"]  # the bottleneck's "b"; in values, the step's batch took that name
            modules[c.name] = _Module("adapter", tokens, values[family.peft["token_dim"]], width, True, True)
        elif "modules_to_save" in c.name:  # peft runs the trainable copy instead of the original
            original = modules[_base_name(c.name.removesuffix(" (trainable copy, modules_to_save)"))]
            original.weight_trains = original.any_trains = True
        elif c.kind == "lora":
            # (peft nests a ParamWrapper per adapted tensor of a module: the inner one's rows sit under base_layer)
            param = c.param.replace(".base_layer", "") if c.param not in by_param else c.param
            target = by_param.get(param)
            if target is None or c.repeat_count != _count_of(result, param):
                raise ParamcalcError("analytic FLOPs need LoRA on every layer of a module (not a subset)")
            target.lora_rank = values["r"]
            if target.kind == "experts":  # A: [rank * E, in]
                a_rows = next(shape for key, shape in c.shapes.items() if "lora_A" in key)[0]
                base = next(x for x in result.components if x.param == param and x.group != "peft")
                experts = expr.evaluate(base.args["num_experts"], values)
                target.lora_params[c.name.rsplit(" ", 1)[-1]] = expr.evaluate(a_rows, values) // experts
            target.any_trains = True
            if lora.dora:
                embedding = target.kind == "embedding"
                rows = expr.evaluate(c.shapes["lora_embedding_A.default"][1], values) if embedding else target.fan_in
                target.dora = flops_methods.dora_identity(rows, values["r"], target.fan_out, embedding)
                target.dora_dropout = lora.dropout > 0 and not embedding  # peft's Embedding has no LoRA dropout
                if target.dora_dropout and target.kind == "conv1d":
                    target.dora_leaf = c.param + ".weight"
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


def _run(op: str, modules, needs_grad, rows, family, values, step: Step, written: set[str], where) -> int | None:
    """Count one op of the flow. Returns None when it saves nothing for backward, else the forward FLOPs of
    its last kernel when that kernel saves only its inputs (a matmul), 0 when it saves an output too."""
    flow, _, name = op.partition(":")
    sources, _, target = flow.partition("->")
    inputs = [s.strip() for s in sources.split(",") if s.strip()]
    name, target = name.strip(), target.strip()
    grad_in = any(needs_grad.get(s, False) for s in inputs)
    if any(s not in needs_grad for s in inputs):  # a branch this config does not have
        return None
    kind = name.split(" ")[0]
    if kind in ELEMENTWISE:  # no matmul, no weight
        needs_grad[target] = grad_in
        written.add(target)
        if kind == "dropout":  # dropout with p=0 returns its input: nothing saved
            return 0 if grad_in and float(where[0].get(name.split()[1], 0.0) or 0.0) > 0 else None
        return 0 if grad_in and kind in SAVING else None
    if moe.combines(name):  # a sum over the picks: no matmul, nothing saved
        written.add(target)
        needs_grad[target] = grad_in
        return None
    if name.startswith(moe.OP):  # the router and the experts' grouped matmuls (paramcalc.moe)
        written.add(target)
        spec = moe.spec_of(family, name)
        router, experts = modules[spec["router"]], modules[spec["experts"]]
        totals = rows.setdefault(name, [0, 0])
        for phase, _, batch, m, k, n in moe.matmuls(spec, values, grad_in, router, experts,
                                                    moe.lora_ranks(router, experts)):
            totals[phase == "backward"] += 2 * batch * m * k * n
        needs_grad[target] = grad_in or router.any_trains or experts.any_trains
        return 0 if needs_grad[target] else None  # its last save is a gather's index, after every matmul
    if name.startswith("attention core"):
        written.add(target)
        needs_grad[target] = _attention(name, inputs, needs_grad, rows, family, values, step, *where, modules)
        return 0 if needs_grad[target] else None
    tied_copy = name.endswith(" [tied]")  # the model runs a tied twin: same weight, no PEFT wrapper
    module = modules.get(name.removesuffix(" [tied]"))
    if module is None:  # a row this config does not have (e.g. the ungated FFN of a gated T5):
        if target not in written:  # a stream left over from the previous layer is not this one's
            needs_grad.pop(target, None)
        return None
    written.add(target)
    if tied_copy:
        needs_grad[target] = grad_in or module.weight_trains
        return None
    grad_out = grad_in or module.any_trains
    needs_grad[target] = grad_out
    last = 0
    if module.kind == "adapter":  # its last kernel is the up projection, which saves its inputs only
        forward, backward, last = flops_methods.adapter_flops(module.tokens, module.fan_in, module.fan_out, grad_in)
        totals = rows.setdefault(name, [0, 0])
        totals[0] += forward
        totals[1] += backward
        return last
    # A bitsandbytes row (--quant) costs what a plain one does: its matmul runs on the dequantized weight (4-bit:
    # dequantize then linear; int8 on a CPU: MatMul8bitFp), which FlopCounterMode counts as this mm. The
    # dequantization itself is elementwise, no matmul: the time model's, not a FLOP here.
    if module.kind in MATMUL_KINDS and module.fan_in:
        one = last = 2 * module.tokens * module.fan_in * module.fan_out
        forward = one
        backward = one * ((grad_in or module.ia3_input) + module.weight_trains)
        if module.lora_rank:
            a = 2 * module.tokens * module.fan_in * module.lora_rank
            b = last = 2 * module.tokens * module.lora_rank * module.fan_out
            forward += a + b
            backward += a * (1 + grad_in) + 2 * b  # A: weight (+ input); B: weight and input
        if module.dora:  # B @ A again, detached (no backward); the magnitude's products save after B
            forward += module.dora + one * module.dora_dropout
            backward += one * (module.dora_dropout and grad_in)
            # peft's transpose() wraps a Conv1D's weight in a new nn.Parameter (which requires grad) when
            # weight.to(x.dtype) hands it the Parameter itself: when the weight is in fp32, like the input peft
            # casts to its fp32 LoRA weights. That matmul then computes a gradient for the throwaway Parameter.
            if module.dora_leaf and family.loaded_dtype(module.dora_leaf, step.dtype) == "fp32":
                backward += one
            last = 0
        if module.ia3_output:  # the scaling after the matmul saves the matmul's output
            last = 0
        totals = rows.setdefault(name, [0, 0])
        totals[0] += forward
        totals[1] += backward if grad_out or module.weight_trains else 0
        if module.hooks_see_nothing:
            return None
    elif module.kind == "embedding" and module.lora_rank:
        # LoRA on an embedding: a lookup in A, then a matmul with B ([T, r] @ [r, dim])
        totals = rows.setdefault(name, [0, 0])
        totals[0] += 2 * module.tokens * module.lora_rank * module.fan_out + module.dora
        totals[1] += 4 * module.tokens * module.lora_rank * module.fan_out  # B's weight and input
    return last if grad_out else None


def _attention(name, inputs, needs_grad, rows, family, values, step: Step, config: dict, device: str,
               prefix: int, modules) -> bool:
    core = family.attention[int(name.rsplit(" ", 1)[-1]) - 1]
    b, heads, dim, q_len, k_len = attention.shapes(core, values)
    q, k, v = (needs_grad.get(s, False) for s in inputs)
    if prefix and flops_methods.prefixed(core, family):  # peft's trainable keys and values go first
        k_len, k, v = k_len + prefix, True, True
    one = 2 * b * heads * q_len * k_len * dim  # one of the two matmuls: [q, d] @ [d, k] or [q, k] @ [k, d]
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
