"""The attention core of a training step: which kernel really runs, and what it keeps for backward.

``Step.attention`` names what the model is built with (``eager``, ``sdpa``, ``flash``; ``auto`` is resolved
to transformers' default by ``paramcalc.step.resolve_attention``). What then runs depends on the device:

- **eager** (transformers' own attention in Python) keeps contiguous copies of q, k and v, the softmax
  output and, with dropout, the mask and the dropped probabilities (all ``b*heads*q*k``);
- **fused**: torch's flash and memory-efficient kernels keep q, k, v, the output and a log-sum-exp per row,
  never the ``q*k`` scores (Dao et al. 2022, arXiv:2205.14135). On CUDA they apply dropout themselves
  (from a seed: no mask is kept); on a CPU they run only without dropout;
- **math**: on a CPU, ``scaled_dot_product_attention`` with dropout (a training step of a model whose
  attention dropout is not 0) falls back to torch's math path. Measured with torch 2.13 (allocator events
  and saved-tensor hooks): it upcasts half-precision q, k, v to fp32, multiplies q and k^T by
  ``sqrt(scale)``, copies what ``bmm`` cannot view (the transposed q and k; a contiguous k or v, as GPT-2's
  key/value cache makes them, is used as it is), adds the float mask to the scores in place (a half one
  copied to fp32 first; ``is_causal`` makes a ``q x k`` one), and keeps for backward, all in fp32: the q, k
  and v operands, the softmax output, the dropout noise (a full fp32 tensor) and the dropped probabilities.
  It returns the output and the probabilities cast back to the input's dtype. A float mask that needs a
  gradient (T5's position bias when it trains) sends sdpa here without dropout too: torch's fused CPU
  kernel gives a mask no gradient.

The masks and position biases a model makes once per forward and hands to every layer (a causal mask for
eager attention, T5's position bias, BLOOM's ALiBi) are ``paramcalc.masks``'s: eager attention adds them to
the scores out of place, sdpa gets them as its float ``attn_mask``.

Eager attention and the math path are several autograd nodes (matmuls, softmax, dropout, casts), replayed
as stages of one record: backward runs them in reverse, each allocating its inputs' gradients (a
``b*heads*q*k`` one for the probabilities) while its own output's gradient and saved tensors are alive,
then freeing both. At long sequences, where these tensors dominate, the peak is there.

FLOPs follow the same decision: the math path is two ``bmm`` like eager attention; torch counts the fused
kernels' backward as five matmuls (they recompute the scores).

Torch-free: the analytic path.
"""

from __future__ import annotations

from . import expr, flops_methods, masks
from .ledger import Record, Value


def dropout_of(core: dict, config: dict) -> float:
    """The attention dropout probability the model applies in training."""
    return float(config.get(core.get("dropout", ""), 0.0) or 0.0)


def kernel(step, core: dict, config: dict, device: str, mask_grad: bool = False) -> str:
    """What runs for one attention core: eager, math (torch's sdpa fallback) or fused. ``mask_grad``: the float
    mask sdpa gets (T5's position bias) needs a gradient (``masks.mask_grad``)."""
    if step.attention == "eager":
        return "eager"
    if step.attention == "auto":
        raise ValueError("resolve --attention auto first (paramcalc.step.resolve_attention)")
    if device == "cpu" and (dropout_of(core, config) > 0 or mask_grad):
        return "math"  # torch's CPU flash kernel takes no dropout, and gives a mask no gradient
    return "fused"


def runs_note(step, result, device: str) -> str | None:
    """A line for reports when sdpa does not run fused: on a CPU with attention dropout, the math path."""
    from .families import families

    if result.generic or step.attention == "eager":
        return None
    family = families()[result.family]
    trains = {c.name for c in result.components if c.trainable}
    math = [core for core in family.attention
            if kernel(step, core, result.config, device, masks.mask_grad(core, family, step, trains.__contains__))
            == "math"]
    if not math:
        return None
    p = dropout_of(math[0], result.config)
    why = (f"with attention dropout ({math[0]['dropout']} = {p:g})" if p else
           f"as the {math[0]['bias']} trains (sdpa's float mask: its fused CPU kernel gives a mask no gradient)")
    return (f"{why} torch runs sdpa on a CPU by its math path, which keeps the b*heads*s*s probabilities"
            f"{' and dropout mask' if p else ''} (in fp32), as eager attention does")


def shapes(core: dict, values: dict) -> tuple[int, int, int, int, int]:
    """(batch, heads, head_dim, q_len, k_len) of one attention core."""
    return (values["b"], expr.evaluate(core["heads"], values), expr.evaluate(core["head_dim"], values),
            expr.evaluate(core["q_len"], values), expr.evaluate(core["k_len"], values))


def replay(core: dict, inputs, ledger, ctx, new, save, dropout, record, until_output: list[int],
           streams: dict | None = None, held: dict[str, list[int]] | None = None):
    """Allocate and save what the attention core does, in the activations ledger; return its output.

    ``new(elements, width, grad)`` allocates a value, ``save(value)`` keeps it for backward, ``dropout``
    replays ``nn.functional.dropout``; values are dropped from ``ledger`` when Python would free them,
    added to ``until_output`` when the model's output holds them (its key/value cache), or to a list of
    ``held``: ``return`` when the attention module's locals hold them until it returns, ``block`` when the
    layer's do (the attention weights eager attention returns, in a local ``_``), ``next block`` when the model
    keeps what a layer returned until the next layer returns (BLOOM). ``streams`` holds the model's masks and
    position biases (``paramcalc.masks``): the record reads them (a checkpointed layer keeps them). Eager
    attention and the math path add their ops to ``record.stages``; the fused kernel is one op, saving into
    ``record``.
    """
    b, heads, dim, q_len, k_len = shapes(core, ctx.values)
    q, k, v = inputs
    prefix = None
    if getattr(ctx, "prefix_tokens", 0) and flops_methods.prefixed(core, ctx.family):
        # peft's prefix for this layer (paramcalc.replay_methods): the cache puts it in front of k and v
        prefix = ctx.prefix_cache.pop(ctx.layer)
        k_len += ctx.prefix_tokens
    extras = masks.read_by(core, streams or {})
    record.inputs = [*record.inputs, *extras.values()]
    bias = extras.get("bias")
    grad = q.grad or k.grad or v.grad or bool(bias and bias.grad) or bool(prefix and prefix[0].grad)
    runs = kernel(ctx.step, core, ctx.config, ctx.device, bool(bias and bias.grad))
    if runs == "eager":
        cache = core.get("kv_cache") and ctx.config.get("use_cache", True) and not ctx.step.grad_checkpointing
        # BLOOM reshapes q, k, v out of its fused projection to [b*heads, s, d]: with one sequence a view
        # (the matmuls keep the whole projection), with more a copy; k and v out of the cache are contiguous
        views = [bool(core.get("fused_qkv")) and b == 1] * 3
        if prefix:  # the cache's concatenations are what the matmuls read (cast first when wider)
            cached = [_concat(record, p, value, b * k_len * heads * dim, ledger, new) for p, value in zip(prefix, (k, v))]
            until_output += [value.tid for value in cached]
            inputs = (q, *cached)
            views[1:] = [value.width == ctx.compute for value in cached]
        elif cache and (k.width != ctx.compute or core.get("fused_qkv")):
            # The key/value cache's copies of k and v are what the matmuls read. Where they already have the
            # matmuls' dtype they stand in for the copies below (BLOOM's are read as they are); cast (an fp32
            # 4-bit output under autocast) they are more, alive until the model's output dies.
            cached = [new(b * k_len * heads * dim, value.width, value.grad) for value in (k, v)]
            for value, copy in zip((k, v), cached):
                _stage(record, [value], copy, ledger)
            until_output += [value.tid for value in cached]
            inputs = (q, *cached)
            views[1:] = [bool(core.get("fused_qkv")) and value.width == ctx.compute for value in cached]
        held = held or {}
        # k and v in the matmuls' dtype: the cache's copies are the contiguous operands the matmuls read, alive
        # until the model's output dies
        kept = until_output if cache and not prefix and not core.get("fused_qkv") and k.width == ctx.compute else None
        return _eager(core, b, heads, dim, q_len, k_len, inputs, grad, ledger, ctx, new, dropout, record,
                      extras if streams is not None else None, held.get("return") if core.get("scores_held") else None,
                      held.get(core.get("weights_held", "block")), views, kept)
    mask, made = None, []
    if bias is not None:  # sdpa's float attn_mask, made from the bias
        mask, made = masks.sdpa_mask(core, bias, ledger, ctx, new, lambda *a, **k: _stage(record, *a, ledger, **k),
                                     b if prefix else 1)
    cached = []
    if prefix:
        cached = [_concat(record, p, value, b * k_len * heads * dim, ledger, new) for p, value in zip(prefix, (k, v))]
        if mask is None and core.get("mask"):
            # q and k differ in length, so the model hands sdpa a boolean causal mask, which sdpa turns into a
            # float one (the fused kernel keeps it for backward)
            mask = new(b * q_len * k_len, 4, False)
            made.append(mask)
    elif core.get("kv_cache") and ctx.config.get("use_cache", True) and not ctx.step.grad_checkpointing:
        # the model's key/value cache (on unless checkpointing turns it off) concatenates k and v into new,
        # contiguous tensors, and the kernel reads those
        cached = [new(b * k_len * heads * dim, ctx.compute, value.grad) for value in (k, v)]
    if runs == "math" and core.get("mask") and mask is None:
        # sdpa is told is_causal: the math path builds its causal bias, q x k in fp32, alive while it runs
        made.append(new(q_len * k_len, 4, False))
    if runs == "fused":
        operands = [*((q, *cached) if cached else inputs), *([mask] if mask is not None else [])]
        if record.stages:  # (a prefix's concatenations came first): the kernel is a stage of its own
            if ctx.autocast:  # sdpa is on autocast's lower-precision list: the fp32 cache is cast for it
                for index, value in enumerate(operands):
                    if value.width != ctx.compute:
                        operands[index] = new(value.elements, ctx.compute, value.grad)
                        _stage(record, [value], operands[index], ledger)
                        made.append(operands[index])
            fused = _stage(record, operands, None, ledger)
            fused.output = out = _fused(b, heads, dim, q_len, operands, grad, ledger, ctx, new,
                                        lambda value: _keep(fused, value, ledger))
        else:
            out = _fused(b, heads, dim, q_len, operands, grad, ledger, ctx, new, save)
    else:
        if cached and not prefix:  # (cat's backward hands each input its slice of the gradient)
            for value, copy in zip((k, v), cached):
                _stage(record, [value], copy, ledger)
        out = _math(core, b, heads, dim, q_len, k_len, (q, *cached) if cached else inputs, bool(cached), ledger,
                    new, record, dropout_of(core, ctx.config), mask)
    for value in made:  # the mask's copies die when sdpa_attention_forward returns (unless the kernel kept them)
        ledger.drop(value.tid)
    until_output += [value.tid for value in cached]  # the cache lives in the model's output
    if runs == "fused":  # the fused kernels write [b, q, heads, d]: merging the heads back is a view
        return out
    context = new(b * q_len * heads * dim, out.width, grad)  # heads merged back, [b, q, h*d]: a copy
    if record.stages:
        _stage(record, [out], context, ledger)
    ledger.drop(out.tid)
    return context


def _fused(b, heads, dim, q_len, operands, grad, ledger, ctx, new, save):
    out = new(b * q_len * heads * dim, ctx.compute, grad)
    if grad:
        for value in (*operands, out):
            save(value)
        lse = new(b * heads * q_len, 4, False)  # the log-sum-exp of each row, in fp32
        save(lse)
        ledger.drop(lse.tid)
    return out


def _math(core, b, heads, dim, q_len, k_len, operands, contiguous_kv, ledger, new, record, p, mask=None):
    """torch's ``_scaled_dot_product_attention_math`` on a CPU, with dropout, op by op. Each op is an autograd
    node of its own (a stage of ``record``): backward frees what one saved as soon as it has run. A float
    ``mask`` is added to the scores in place (in fp32: a half one is copied first); its gradient is the
    scores' gradient summed over what it broadcasts over."""
    q, k, v = operands  # (GPT-2's are views of one fused projection: sizes come from the core's shape)
    width = q.width
    q_size, kv_size = b * heads * q_len * dim, b * heads * k_len * dim
    half = 4 if width != 4 else 0  # its backward casts fp32 gradients back: one more fp32 copy alive
    held = []  # locals of the math function: freed when it returns
    v32 = v
    if half:  # half precision is computed in fp32 on a CPU (a copy keeps the layout: contiguous stays so)
        held += [new(size, 4, value.grad) for value, size in ((q, q_size), (k, kv_size), (v, kv_size))]
        v32 = held[-1]
    scaled_q = new(q_size, 4, q.grad)  # q * sqrt(scale), alive until the function returns
    held.append(scaled_q)
    scaled_k = new(kv_size, 4, k.grad)  # k^T * sqrt(scale)
    q_operand = new(q_size, 4, q.grad)  # bmm copies the transposed q
    k_operand = scaled_k if contiguous_kv else new(kv_size, 4, k.grad)
    _stage(record, [q], q_operand, ledger, scratch=half * q_size)
    _stage(record, [k], k_operand, ledger, scratch=half * kv_size)
    scores = b * heads * q_len * k_len
    qk_grad = q.grad or k.grad
    # scores = q @ k^T: bmm saves each operand for the other's gradient
    product = _stage(record, [q_operand, k_operand], None, ledger,
                     saves=[q_operand] * bool(k.grad) + [k_operand] * bool(q.grad))
    logits = new(scores, 4, qk_grad)
    for value in {id(x): x for x in (q_operand, k_operand, scaled_k)}.values():
        ledger.drop(value.tid)
    product.output = logits
    added = logits  # (is_causal without a mask: a q x k mask, added in place)
    if mask is not None:
        mask32 = mask if mask.width == 4 else new(mask.elements, 4, mask.grad)
        if mask32 is not mask:
            _stage(record, [mask], mask32, ledger)
        added = Value(ledger.new(0, "activations"), scores, 4, qk_grad or mask.grad)  # the same storage
        qk_grad = added.grad
        _stage(record, [logits, mask32], added, ledger, passes=logits)
        if mask32 is not mask:
            ledger.drop(mask32.tid)
    probs = new(scores, 4, qk_grad)
    ledger.drop(logits.tid)
    _stage(record, [added], probs, ledger, saves=[probs] * bool(qk_grad))  # softmax saves its output
    if added is not logits:
        ledger.drop(added.tid)
    dropped = probs
    if p > 0:  # (a mask that needs a gradient sends sdpa here without dropout too)
        noise = new(scores, 4, False)  # bernoulli_ then div_(1 - p): the mask, as a full fp32 tensor
        dropped = new(scores, 4, qk_grad)
        _stage(record, [probs], dropped, ledger, saves=[noise] * bool(qk_grad))
        ledger.drop(probs.tid)
        ledger.drop(noise.tid)
    if half:  # the probabilities it also returns, cast back (the model drops them at once)
        held.append(new(scores, width, False))
    v_operand = v32 if contiguous_kv else new(kv_size, 4, v.grad)  # bmm copies a transposed v
    if v_operand is not v:
        _stage(record, [v], v_operand, ledger, scratch=half * kv_size)
    out = new(q_size, 4, q.grad or k.grad or v.grad)
    _stage(record, [dropped, v_operand], out, ledger, saves=[dropped] * bool(v.grad) + [v_operand] * bool(qk_grad))
    if v_operand is not v32:
        ledger.drop(v_operand.tid)
    ledger.drop(dropped.tid)
    if half:
        cast = new(q_size, width, out.grad)
        _stage(record, [out], cast, ledger)
        ledger.drop(out.tid)
        out = cast
    for value in held:
        ledger.drop(value.tid)
    return out


def _concat(record, prefix: Value, value: Value, elements: int, ledger, new) -> Value:
    """The cache's torch.cat of a layer's prefix and its own keys (or values), in the wider dtype of the two. Its
    backward hands the prefix a view of the gradient, which keeps that gradient alive until the prefix encoder's
    backward (``passes``); the cache holds the concatenation instead of the prefix."""
    width = max(prefix.width, value.width)
    cast = new(elements - prefix.elements, width, value.grad) if value.width != width else None  # (cat promotes)
    out = new(elements, width, True)
    _stage(record, [prefix, value], out, ledger, passes=prefix)
    for dead in (cast, prefix):
        if dead is not None:
            ledger.drop(dead.tid)
    return out


def _stage(record, inputs, output, ledger, saves=(), scratch: int = 0, passes=None) -> Record:
    """One autograd node of an attention core, appended to its record's stages."""
    stage = Record(list(inputs), output, [], [], [], scratch=scratch, passes=passes)
    for value in saves:
        _keep(stage, value, ledger)
    record.stages.append(stage)
    return stage


def _eager(core, b, heads, dim, q_len, k_len, operands, grad, ledger, ctx, new, dropout, record, extras=None,
           held=None, returned=None, views=(False, False, False), cached=None):
    """transformers' eager attention, op by op (each op a stage of ``record``, as in ``_math``). ``extras``: the
    bias and mask it adds to the scores (None: not replayed, an fp32 mask assumed where the core says so);
    ``held``: where the scores go when the module's locals keep them until it returns; ``returned``: where the
    attention weights it returns go (a layer keeps them in a local, ``_``, until it returns or the next
    attention of the layer returns: under autocast T5's are fp32, not the half copy its matmul keeps);
    ``views``: which of q, k, v the matmuls read as they are; ``cached``: where the copies of k and v go when
    the key/value cache holds them (until the model's output dies)."""
    width = ctx.compute
    copies = [value if view else new(b * length * heads * dim, width, value.grad)
              for value, length, view in zip(operands, (q_len, k_len, k_len), views)]
    if cached is not None:
        cached += [ledger.hold(copy.tid) for copy, value in zip(copies[1:], operands[1:]) if copy is not value]
    for value, copy in zip(operands, copies):  # matmul copies the transposed q, k and v
        if copy is not value:
            _stage(record, [value], copy, ledger)
    qc, kc, vc = copies
    product = _stage(record, [qc, kc], None, ledger, saves=[qc] * bool(kc.grad) + [kc] * bool(qc.grad))
    scores = b * heads * q_len * k_len
    logits = new(scores, width, grad)  # q @ k^T (scaled): alive while the next op is computed
    product.output = logits
    for role in masks.ROLES if extras else ():  # + bias, + mask: out of place, in the wider dtype of the two
        if role in extras:
            extra = extras[role]
            added = new(scores, max(logits.width, extra.width), logits.grad or extra.grad)
            _stage(record, [logits, extra], added, ledger, passes=logits if added.width == logits.width else None)
            if held is not None:
                held.append(logits.tid)
            else:
                ledger.drop(logits.tid)
            logits = added
    # The softmax runs in fp32 when the model asks for it (BLOOM), when an fp32 mask or position bias was
    # added to half-precision scores (type promotion), and always under CUDA autocast (softmax is on its
    # fp32 list; CPU autocast leaves it in the input's dtype).
    fp32_softmax = core.get("softmax_fp32", False) or (ctx.autocast and (
        ctx.device != "cpu" or (logits.width == 4 if extras is not None else core.get("fp32_mask", False))))
    if fp32_softmax and logits.width != 4:
        logits = _cast(record, logits, 4, ledger, new)
    probs = new(scores, 4 if fp32_softmax else logits.width, grad)
    _stage(record, [logits], probs, ledger, saves=[probs] * bool(grad))
    if held is not None:
        held.append(logits.tid)
    else:
        ledger.drop(logits.tid)
    # the dtype the core casts the probabilities back to (fp32 out of a 4-bit Linear under autocast; a prefixed
    # cache's values are fp32 too): its value's (GPT-2) or its query's (BLOOM)
    back = operands[2 if core.get("softmax_cast_back") == "value" else 0].width
    if probs.width != back and core.get("softmax_cast_back"):
        probs = _cast(record, probs, back, ledger, new)
    stage = _stage(record, [probs], None, ledger)
    dropped = dropout(probs, dropout_of(core, ctx.config), lambda value: _keep(stage, value, ledger))
    if dropped is probs:  # no dropout: torch returns its input
        record.stages.remove(stage)
    stage.output = dropped
    ledger.drop(probs.tid)
    replaced = []
    if returned is not None:  # what the layer's local held before is let go once this attention returns
        replaced = returned[:]
        returned[:] = [ledger.hold(dropped.tid)]
    if dropped.width != width:  # the matmul with v casts the probabilities to half precision itself
        dropped = _cast(record, dropped, width, ledger, new)
    product = _stage(record, [dropped, vc], None, ledger, saves=[dropped] * bool(vc.grad) + [vc] * bool(dropped.grad))
    for value in (*(copy for copy, value in zip(copies, operands) if copy is not value), dropped):
        ledger.drop(value.tid)
    product.output = new(b * q_len * heads * dim, width, grad)  # heads merged back: a contiguous copy
    for tid in replaced:
        ledger.drop(tid)
    return product.output


def _cast(record, value, width, ledger, new):
    """A dtype cast, as a stage: its backward casts the gradient back."""
    cast = new(value.elements, width, value.grad)
    _stage(record, [value], cast, ledger)
    ledger.drop(value.tid)
    return cast


def _keep(stage, value, ledger) -> None:
    if value.tid not in stage.saved:
        stage.saved.append(ledger.hold(value.tid))
