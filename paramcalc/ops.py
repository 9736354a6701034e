"""What each op of a family's flow allocates and keeps for backward: the replay's ops.

``paramcalc.activations`` walks the flow and calls these; each gets the replay's context (``ctx``: dtypes,
device, the modules of the flow), allocates in ``ledger`` through ``new(elements, width, grad)`` and keeps
what backward needs through ``save(value)``, following torch's derivative formulas
(``tools/autograd/derivatives.yaml``).

Torch-free: the analytic path.
"""

from __future__ import annotations

from . import quant
from .flops import _base_name
from .ledger import Ledger, Record, Value, promoted

# What each activation function keeps for backward, in tensors the size of its input (written out in
# Python, GPT-2's tanh GELU keeps x, tanh(...), 0.5*x and 1 + tanh(...)).
ACTIVATION_SAVES = {"gelu": ("input",), "gelu_pytorch_tanh": ("input",), "relu": ("output",), "silu": ("input",),
                    "gelu_new": ("input", "new", "new", "new"), "bloom_gelu": ("input",), "tanh": ("output",)}
# Activations written out in Python hold several input-sized temporaries at once in backward: BLOOM's
# bloom_gelu_back has five alive while it builds its derivative, and autograd's walk back through GPT-2's
# tanh GELU (pow, tanh, three products) holds as many.
ACTIVATION_BACKWARD_SCRATCH = {"bloom_gelu": 5, "gelu_new": 2}
# ... and in forward, before the output exists: BLOOM's bloom_gelu_forward (x * 0.5 * (1 + tanh(0.79788456 * x *
# (1 + 0.044715 * x * x)))) holds four input-sized temporaries at its widest (x*0.5, 0.79788456*x, 0.044715*x
# and its product with x); measured with torch 2.13 on a CPU, with and without grad.
ACTIVATION_FORWARD_SCRATCH = {"bloom_gelu": 4}
# transformers' T5Config turns feed_forward_proj into the activation it runs
T5_ACTIVATION = {"relu": "relu", "gated-gelu": "gelu_new", "gelu": "gelu", "gated-silu": "silu", "silu": "silu"}


def dropout(x: Value, p: float, ledger: Ledger, ctx, save) -> Value:
    if p == 0:  # torch returns its input unchanged
        ledger.hold(x.tid)
        return x
    mask_width = x.width if ctx.device == "cpu" else 1  # CPU: a scaled noise tensor; CUDA: a bool mask
    mask = Value(ledger.new(x.elements * mask_width, "activations"), x.elements, mask_width, False)
    if x.grad:
        save(mask)
    ledger.drop(mask.tid)
    return Value(ledger.new(x.bytes, "activations"), x.elements, x.width, x.grad)


def activation_name(key: str, config: dict) -> str:
    """The activation a flow's ``act KEY`` runs: the config value of KEY (T5's feed_forward_proj as
    transformers turns it into an activation), or KEY itself when the config has no such key."""
    name = config.get(key, key)
    return T5_ACTIVATION.get(name, name) if key == "feed_forward_proj" else name


def activation(key: str, x: Value, ledger: Ledger, ctx, new, save, record: Record) -> Value:
    name = activation_name(key, ctx.config)
    record.scratch = ACTIVATION_BACKWARD_SCRATCH.get(name, 0) * x.bytes
    saves = ACTIVATION_SAVES.get(name, ("input",))
    if name in ACTIVATION_FORWARD_SCRATCH:
        ledger.drop(ledger.new(ACTIVATION_FORWARD_SCRATCH[name] * x.bytes, "transient"))
    widths = [x.width] * len(saves)
    width = x.width
    if name == "gelu_new" and ctx.autocast and ctx.device == "cuda" and x.width != 4:
        # CUDA autocast runs pow in fp32 (its fp32 list, unlike a CPU's): pow keeps an fp32 copy of x, and all
        # after it is fp32 but 0.5*x: an H100 step of GPT-2 in bf16 kept 14 bytes per element, not 8
        saves, widths, width = ("new", "new", "new", "new"), [4, 4, x.width, 4], 4
    out = new(x.elements, width, x.grad)
    if x.grad:
        for what, kept in zip(saves, widths):
            if what == "input":
                save(x)
            elif what == "output":
                save(out)
            else:
                extra = new(x.elements, kept, False)
                save(extra)
                ledger.drop(extra.tid)  # the record holds it now
    return out


def module(name, module, x: Value, ledger, ctx, new, save, cache, record) -> Value:
    tied_copy = name.endswith(" [tied]")  # the model runs a twin of the row: same weight, no PEFT wrapper
    row = _base_name(name.removesuffix(" [tied]"))
    trains = module.weight_trains
    grad_out = (x is not None and x.grad) or (module.weight_trains if tied_copy else module.any_trains)
    per_layer = ctx.grads.get(ctx.tied_to.get(row, row), [])
    if per_layer and (trains or not tied_copy):
        record.weight_grads = list(per_layer[min(ctx.layer, len(per_layer) - 1)])
    kind = module.kind
    if kind in ("embedding", "tied") and (module.fan_in == 0 or tied_copy):  # a lookup
        return new(module.tokens * module.fan_out, ctx.master, grad_out)
    if kind == "rmsnorm" and ctx.family.rmsnorm == "llama":
        return llama_rmsnorm(x, module, trains, grad_out, ledger, ctx, new, save, record)
    if kind in ("layernorm", "rmsnorm"):
        if x.grad or trains:
            save(x)
            if kind == "rmsnorm" and trains:  # the normalised tensor, for the weight's gradient
                normalised = new(x.elements, 4 if ctx.autocast else ctx.master, False)
                save(normalised)
                ledger.drop(normalised.tid)
            stats = new(module.tokens * (1 if kind == "rmsnorm" else 2), 4, False)
            save(stats)
            ledger.drop(stats.tid)
        # CUDA autocast runs norms in fp32; CPU autocast leaves layer_norm in its input's dtype (an fp32
        # residual stream under fp32 master weights); T5's RMSNorm returns its weight's dtype when half
        if kind == "rmsnorm" or not ctx.autocast:
            width = ctx.master if kind == "rmsnorm" and ctx.master != 4 else (4 if ctx.autocast else ctx.master)
        else:
            width = x.width if ctx.device == "cpu" else 4
        return new(x.elements, width, grad_out)
    if kind not in ("linear", "conv1d", "tied"):
        return new(x.elements, x.width, grad_out)
    unscaled = x
    if module.ia3_input:  # the matmul reads IA3's scaled input
        x = ia3_input(x, ledger, new, save, record)
    # a matmul: under autocast both operands are cast to half precision first
    operand = x
    quantized = row in ctx.quantized and not tied_copy
    if quantized:  # bitsandbytes' own matmul (quant.replay_matmul): its output is ready before LoRA runs
        base = quant.replay_matmul(module, x, grad_out, ctx.quantized[row], ctx.quant, ctx, ledger, new, save,
                                   record)
    elif ctx.autocast and x.width != ctx.compute:
        operand = new(x.elements, ctx.compute, x.grad)
    if trains:
        save(operand)
    if ctx.autocast and ctx.master != ctx.compute and (x.grad or module.lora_rank or module.weight_trains) \
            and not quantized:
        copy = new(module.fan_in * module.fan_out, ctx.compute, False)
        if x.grad:
            save(copy)
        if module.weight_trains:  # autocast caches casts of trainable leaves until the forward ends
            cache.append(ledger.hold(copy.tid))
            if getattr(module, "bias", 0):  # (a method's Linear: its bias too)
                cache.append(new(module.bias, ctx.compute, False).tid)
        ledger.drop(copy.tid)
    peft_in = x
    if module.lora_rank:
        # peft casts LoRA's input to its fp32 weights' dtype (a copy of a half input, alive until the layer
        # returns), applies lora_dropout to that, and lora_A (under autocast: a cast to autocast's dtype) keeps it
        if x.width != 4 and (ctx.autocast or quantized):
            peft_in = new(x.elements, 4, x.grad)
        lora_in = peft_in
        if ctx.lora_dropout > 0:
            lora_in = new(x.elements, peft_in.width, x.grad)
            mask = new(x.elements, peft_in.width if ctx.device == "cpu" else 1, False)
            if x.grad:  # (input * noise keeps the noise for the input's gradient only)
                save(mask)
            ledger.drop(mask.tid)
        lora_width = ctx.compute if ctx.autocast else peft_in.width
        if lora_in.width != lora_width:
            lora_cast = new(lora_in.elements, lora_width, lora_in.grad)
            save(lora_cast)
            ledger.drop(lora_cast.tid)
        else:
            save(lora_in)
        if lora_in is not peft_in:
            ledger.drop(lora_in.tid)
        if ctx.autocast:  # A and B are trainable leaves: autocast caches their half copies
            for elements in (module.fan_in * module.lora_rank, module.lora_rank * module.fan_out):
                cache.append(new(elements, ctx.compute, False).tid)
        hidden = new(module.tokens * module.lora_rank, ctx.compute, True)
        save(hidden)
        ledger.drop(hidden.tid)
    # a checkpointed layer's re-run stops before its last kernel (activations._recompute): no output is made
    stop = ctx.stop and not quantized
    elements = module.tokens * module.fan_out
    if stop and not module.ia3_output:
        out = Value(ledger.new(0, "activations"), elements, ctx.compute, grad_out)
    else:
        out = base if quantized else new(elements, ctx.compute, grad_out)
    if module.ia3_output:  # peft scales the output: the unscaled output is saved for the scale's gradient
        save(out)
        scaled = Value(ledger.new(0, "activations"), elements, out.width, True) if stop else new(elements, out.width, True)
        ledger.drop(out.tid)
        out = scaled
    for value in {id(v): v for v in (operand, peft_in) if v is not x}.values():
        ledger.drop(value.tid)
    if x is not unscaled:
        ledger.drop(x.tid)
    return out


def ia3_input(x: Value, ledger: Ledger, new, save, record: Record) -> Value:
    """peft's IA3 on a feed-forward row scales the row's input before its matmul: ``(x.to(float32) * scale)``, cast
    back to ``x``'s dtype. The product keeps its fp32 input for the scale's gradient; returns the scaled input.
    Backward holds the scaled input's gradient, the input's and the product ``grad * x`` the scale's gradient is
    summed from, at once (with the output's gradient too where a residual add shares it, as in Llama's MLP; where a
    dropout made it its own, GPT-2's, it has gone: this over-counts those by it, 1-2 % in a checkpointed step)."""
    record.scratch = (2 + x.grad) * x.elements * 4
    upcast = new(x.elements, 4, x.grad) if x.width != 4 else x
    save(upcast)
    scaled = new(x.elements, 4, True)
    if upcast is not x:
        ledger.drop(upcast.tid)
    if x.width != 4:
        cast = new(x.elements, x.width, True)
        ledger.drop(scaled.tid)
        scaled = cast
    return scaled


def llama_rmsnorm(x: Value, module, trains: bool, grad_out: bool, ledger: Ledger, ctx, new, save,
                  record: Record) -> Value:
    """LlamaRMSNorm (Mistral's, Qwen2's): ``h = x.to(float32)``; ``h * rsqrt(h.pow(2).mean(-1) + eps)``;
    ``weight * h.to(x.dtype)``. ``pow`` and the product keep the fp32 ``h`` (``x`` itself when it is fp32) and the
    product the reciprocal deviation per token, when ``x`` needs a gradient; ``weight *`` keeps the normalised
    tensor in ``x``'s dtype when the weight trains. The output has the wider dtype of the weight and ``x``.
    Backward walks the same ops back in fp32: at its widest (pow's, when the product's gradient for ``h`` waits to
    be summed with it) five input-sized tensors beyond what the forward kept, the output's gradient and the
    normalised tensor having gone (measured with torch 2.13)."""
    record.scratch = (4 - bool(trains)) * x.elements * 4 if x.grad else 0
    upcast = new(x.elements, 4, x.grad) if x.width != 4 else x
    square = new(x.elements, 4, False)  # h.pow(2), alive until its mean is taken
    stats = new(module.tokens, 4, False)
    ledger.drop(square.tid)
    if x.grad:
        save(upcast)
        save(stats)
    ledger.drop(stats.tid)
    normalised = new(x.elements, 4, x.grad)
    if x.width != 4:  # .to(input_dtype): a copy, and the fp32 one is let go
        cast = new(x.elements, x.width, x.grad)
        ledger.drop(normalised.tid)
        normalised = cast
    if upcast is not x:
        ledger.drop(upcast.tid)
    if trains:
        save(normalised)
    out = new(x.elements, max(x.width, ctx.master), grad_out)
    ledger.drop(normalised.tid)
    return out


def rotary(x: Value, tables: Value, ledger: Ledger, new, save) -> Value:
    """``apply_rotary_pos_emb`` on q or k (transformers' Llama): ``x * cos + rotate_half(x) * sin``, with
    ``rotate_half(x) = cat(-x2, x1)`` over the two halves of the head dimension. Each product is out of place in
    the wider dtype of ``x`` and the tables (fp32 tables promote a half ``x`` under autocast) and keeps its table
    (``cos``, ``sin``: ``tables``) for ``x``'s gradient; the negated half and the concatenation are temporaries."""
    width = max(x.width, tables.width)
    first = new(x.elements, width, x.grad)  # x * cos
    for tid in promoted([x], width, ledger):
        ledger.drop(tid)
    negated = new(x.elements // 2, x.width, x.grad)  # -x2
    rotated = new(x.elements, x.width, x.grad)  # cat((-x2, x1))
    ledger.drop(negated.tid)
    second = new(x.elements, width, x.grad)  # rotate_half(x) * sin
    for tid in promoted([rotated], width, ledger):
        ledger.drop(tid)
    ledger.drop(rotated.tid)
    out = new(x.elements, width, x.grad)
    for value in (first, second):
        ledger.drop(value.tid)
    if x.grad:
        save(tables)
    return out


def loss(result, streams, ledger, ctx, last_target: str) -> list[Record]:
    """Cross-entropy keeps the fp32 log-probabilities; a bare backbone gets the tracer's stand-in loss
    (the mean square of its outputs), which keeps those outputs."""
    if "y" in streams:
        logits, records = streams["y"], []
        if logits.width != 4:  # half logits are upcast first (by the loss or by autocast's log_softmax)
            upcast = Value(ledger.new(logits.elements * 4, "activations"), logits.elements, 4, logits.grad)
            records.append(Record([logits], upcast, [], [], []))
            logits = upcast
        logprobs = Value(ledger.new(logits.elements * 4, "activations"), logits.elements, 4, logits.grad)
        records.append(Record([logits], logprobs, [logprobs.tid], [(logprobs.bytes, "activations")], []))
        if logits is not streams["y"]:  # the fp32 copy dies once the log-probabilities exist
            ledger.drop(logits.tid)
        loss = Value(ledger.new(4, "activations"), 1, 4, True)
        return records + [Record([logprobs], loss, [], [], [])]
    outputs = [streams[n] for n in dict.fromkeys((last_target, "p")) if n in streams]
    loss = Value(ledger.new(4, "activations"), 1, 4, True)
    return [Record(outputs, loss, [ledger.hold(v.tid) for v in outputs], [(v.bytes, "activations") for v in outputs],
                    [])]
