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
from .attention_paths import concat_prefix, dropout_of, eager_path, fused_kernel, keep, math_path, stage
from .ledger import Value


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


def kv_heads(core: dict, values: dict) -> int:
    """The key/value heads of a core: ``kv_heads`` (grouped-query attention) or, absent, its query heads."""
    return expr.evaluate(core.get("kv_heads", core["heads"]), values)


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
    ``record`` (a stage of its own after the copies made for it).

    Grouped-query attention (``kv_heads`` below ``heads``): k and v (and the cache's copies of them) have the
    K/V heads; transformers' ``repeat_kv`` copies them to every query head (a contiguous ``b*heads*k*d`` each,
    locals of the attention function) for eager attention, and for sdpa when it hands torch a mask (or a head
    dimension over 256); without one sdpa asks torch for ``enable_gqa``, whose fused CPU kernel reads the K/V
    heads as they are and whose math path repeats them itself.
    """
    b, heads, dim, q_len, k_len = shapes(core, ctx.values)
    kv = kv_heads(core, ctx.values)
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
    cache = core.get("kv_cache") and ctx.config.get("use_cache", True) and not ctx.step.grad_checkpointing
    kv_size = b * k_len * kv * dim
    if runs == "eager":
        # BLOOM reshapes q, k, v out of its fused projection to [b*heads, s, d]: with one sequence a view
        # (the matmuls keep the whole projection), with more a copy; k and v out of the cache are contiguous
        views = [bool(core.get("fused_qkv")) and b == 1] * 3
        whole = [False] * 3  # which operands are contiguous (a cast of one is what the matmul reads)
        copied = False
        if prefix:  # the cache's concatenations are what the matmuls read (cast first when wider)
            cached = [concat_prefix(record, p, value, kv_size, ledger, new) for p, value in zip(prefix, (k, v))]
            until_output += [value.tid for value in cached]
            inputs, copied = (q, *cached), True
            views[1:] = [value.width == ctx.compute and kv == heads for value in cached]
        elif cache and (k.width != ctx.compute or core.get("fused_qkv") or kv != heads):
            # The key/value cache's copies of k and v are what the matmuls read. Where they already have the
            # matmuls' dtype they stand in for the copies below (BLOOM's are read as they are); cast (an fp32
            # 4-bit output under autocast, Llama's keys after fp32 rotary tables) they are more, alive until the
            # model's output dies; so are a grouped-query model's, which repeat_kv copies again.
            cached = [new(kv_size, value.width, value.grad) for value in (k, v)]
            for value, copy in zip((k, v), cached):
                stage(record, [value], copy, ledger)
            until_output += [value.tid for value in cached]
            inputs, copied = (q, *cached), True
            views[1:] = [bool(core.get("fused_qkv")) and value.width == ctx.compute for value in cached]
        whole[1:] = [copied] * 2
        repeats = _repeat_kv(record, inputs[1:], b * k_len * heads * dim, ledger, new) if kv != heads else []
        if repeats:
            inputs, whole[1:] = (q, *repeats), [True, True]
            views[1:] = [value.width == ctx.compute for value in repeats]
        held = held or {}
        # k and v in the matmuls' dtype: the cache's copies are the contiguous operands the matmuls read, alive
        # until the model's output dies
        kept = until_output if cache and not copied else None
        out = eager_path(core, b, heads, dim, q_len, k_len, inputs, grad, ledger, ctx, new, dropout, record,
                         extras if streams is not None else None,
                         held.get("return") if core.get("scores_held") else None,
                         held.get(core.get("weights_held", "block")), views, kept, whole)
        for value in repeats:  # eager_attention_forward's locals
            ledger.drop(value.tid)
        return out
    return _sdpa(core, runs, (b, heads, kv, dim, q_len, k_len), (q, k, v), extras, prefix, cache, grad, ledger, ctx,
                 new, save, record, until_output)


def _repeat_kv(record, values, elements: int, ledger, new) -> list[Value]:
    """transformers' repeat_kv on k and v: expand to every query head, then reshape: a contiguous copy each."""
    repeats = [new(elements, value.width, value.grad) for value in values]
    for value, copy in zip(values, repeats):
        stage(record, [value], copy, ledger)
    return repeats


def _sdpa(core, runs, sizes, qkv, extras, prefix, cache, grad, ledger, ctx, new, save, record, until_output):
    """sdpa_attention_forward: the fused kernel or torch's math path, with the float mask made for it and the
    cache's (and repeat_kv's) copies of k and v."""
    b, heads, kv, dim, q_len, k_len = sizes
    q, k, v = qkv
    bias = extras.get("bias")
    kv_size = b * k_len * kv * dim
    mask, made = None, []
    if bias is not None:  # sdpa's float attn_mask, made from the bias
        mask, made = masks.sdpa_mask(core, bias, ledger, ctx, new, lambda *a, **kw: stage(record, *a, ledger, **kw),
                                     b if prefix else 1)
    cached = []
    # the model hands sdpa a boolean mask: its own (Mistral's sliding window, once the keys reach it), or a causal
    # one where q and k differ in length (a prefix in front of the keys)
    boolean = mask is None and ("mask" in extras or (bool(prefix) and bool(core.get("mask"))))
    if prefix:
        cached = [concat_prefix(record, p, value, kv_size, ledger, new) for p, value in zip(prefix, (k, v))]
    elif cache:
        # the model's key/value cache (on unless checkpointing turns it off) concatenates k and v into new,
        # contiguous tensors, and the kernel reads those
        cached = [new(kv_size, value.width, value.grad) for value in (k, v)]
    operands = [q, *(cached or (k, v))]
    repeats = []
    if kv != heads and (mask is not None or boolean or dim > 256):  # no enable_gqa with a mask: repeat_kv copies
        if cached and not prefix:
            for value, copy in zip((k, v), cached):
                stage(record, [value], copy, ledger)
        repeats = _repeat_kv(record, operands[1:], b * k_len * heads * dim, ledger, new)
        operands[1:] = repeats
    if runs == "fused" and ctx.device == "cuda" and kv != heads and not repeats and ctx.compute == 4:
        # enable_gqa on a GPU: torch's flash kernel alone takes fewer K/V heads than query heads, and it runs half
        # precision only (the memory-efficient kernel refuses unequal heads: pytorch/pytorch#139586), so an fp32
        # step runs the math path. A real H100 Qwen2-0.5B fp32 step measured it (benchmarks/results).
        runs = "math"
    if runs == "math" and core.get("mask") and mask is None:
        # sdpa is told is_causal: the math path builds its causal bias, q x k in fp32, alive while it runs
        made.append(new(q_len * k_len, 4, False))
    # sdpa is on autocast's lower-precision list: what is wider (Llama's q and k after fp32 rotary tables, a 4-bit
    # output) is cast for it; the casts are what the kernel reads
    casts = [i for i, value in enumerate(operands) if ctx.autocast and value.width != ctx.compute]
    if cached and not prefix and not repeats and (casts or runs != "fused"):
        for value, copy in zip((k, v), cached):  # (cat's backward hands each input its slice of the gradient)
            stage(record, [value], copy, ledger)
    for index in casts:
        value = operands[index]
        operands[index] = new(value.elements, ctx.compute, value.grad)
        stage(record, [value], operands[index], ledger)
        made.append(operands[index])
    if boolean:  # sdpa turns it into a float one, b x 1 x q x k in the query's dtype (the fused kernel keeps it)
        mask = new(b * q_len * k_len, operands[0].width, False)
        made.append(mask)
    if runs == "fused":
        if mask is not None:
            operands.append(mask)
        if record.stages:  # copies came first: the kernel is a stage of its own
            node = stage(record, operands, None, ledger)
            node.output = out = fused_kernel(b, heads, dim, q_len, operands, grad, ledger, ctx, new,
                                             lambda value: keep(node, value, ledger))
        else:
            out = fused_kernel(b, heads, dim, q_len, operands, grad, ledger, ctx, new, save)
    else:
        out = math_path(core, b, heads, dim, q_len, k_len, operands, bool(cached) or bool(repeats), ledger,
                        new, record, dropout_of(core, ctx.config), mask, kv if not repeats else heads)
    for value in made + repeats:  # copies made for sdpa die when it returns (unless the kernel kept them)
        ledger.drop(value.tid)
    until_output += [value.tid for value in cached]  # the cache lives in the model's output
    if runs == "fused":  # the fused kernels write [b, q, heads, d]: merging the heads back is a view
        return out
    context = new(b * q_len * heads * dim, out.width, grad)  # heads merged back, [b, q, h*d]: a copy
    if record.stages:
        stage(record, [out], context, ledger)
    ledger.drop(out.tid)
    return context
