"""The kernels an attention core runs by, op by op, for the memory replay (``paramcalc.attention`` decides which
runs and prepares its operands): transformers' eager attention (``eager``), torch's math path (``math``) and its
fused kernels (``fused``), and the prefix's concatenation onto a layer's keys and values (``concat``). Each op
that is an autograd node of its own is a stage of the core's record (``stage``): backward walks the stages in
reverse, and each frees what it saved as soon as it has run.

Torch-free: the analytic path.
"""

from __future__ import annotations

from . import masks
from .ledger import Record, Value, promoted


def dropout_of(core: dict, config: dict) -> float:
    """The attention dropout probability the model applies in training."""
    return float(config.get(core.get("dropout", ""), 0.0) or 0.0)


def fused_kernel(b, heads, dim, q_len, operands, grad, ledger, ctx, new, save):
    out = new(b * q_len * heads * dim, ctx.compute, grad)
    if grad:
        for value in (*operands, out):
            save(value)
        lse = new(b * heads * q_len, 4, False)  # the log-sum-exp of each row, in fp32
        save(lse)
        ledger.drop(lse.tid)
    return out


def math_path(core, b, heads, dim, q_len, k_len, operands, contiguous_kv, ledger, new, record, p, mask=None,
              kv=None):
    """torch's ``_scaled_dot_product_attention_math`` on a CPU, with dropout, op by op. Each op is an autograd
    node of its own (a stage of ``record``): backward frees what one saved as soon as it has run. A float
    ``mask`` is added to the scores in place (in fp32: a half one is copied first); its gradient is the
    scores' gradient summed over what it broadcasts over. ``kv``: the K/V heads of k and v when fewer than the
    query heads (``enable_gqa``): after the fp32 copies it repeats them to every query head (contiguous copies)."""
    q, k, v = operands  # (GPT-2's are views of one fused projection: sizes come from the core's shape)
    width = q.width
    q_size, kv_size = b * heads * q_len * dim, b * heads * k_len * dim
    own = b * (kv or heads) * k_len * dim  # k's and v's elements as they come
    half = 4 if width != 4 else 0  # its backward casts fp32 gradients back: one more fp32 copy alive
    held = []  # locals of the math function: freed when it returns
    v32 = v
    if half:  # half precision is computed in fp32 on a CPU (a copy keeps the layout: contiguous stays so)
        held += [new(size, 4, value.grad) for value, size in ((q, q_size), (k, own), (v, own))]
        v32 = held[-1]
    scaled_q = new(q_size, 4, q.grad)  # q * sqrt(scale), alive until the function returns
    held.append(scaled_q)
    repeated = bool(kv) and kv != heads
    if repeated:  # enable_gqa: k and v repeated to every query head, contiguous
        held += [new(kv_size, 4 if half else width, value.grad) for value in (k, v)]
        v32, contiguous_kv = held[-1], True
    scaled_k = new(kv_size, 4, k.grad)  # k^T * sqrt(scale)
    q_operand = new(q_size, 4, q.grad)  # bmm copies the transposed q
    k_operand = scaled_k if contiguous_kv else new(kv_size, 4, k.grad)
    stage(record, [q], q_operand, ledger, scratch=half * q_size)
    # (a repeated k's gradient is summed back over the repeats: one more query-heads-wide fp32 tensor alive)
    stage(record, [k], k_operand, ledger, scratch=half * own + 4 * kv_size * repeated)
    scores = b * heads * q_len * k_len
    qk_grad = q.grad or k.grad
    # scores = q @ k^T: bmm saves each operand for the other's gradient
    product = stage(record, [q_operand, k_operand], None, ledger,
                     saves=[q_operand] * bool(k.grad) + [k_operand] * bool(q.grad))
    logits = new(scores, 4, qk_grad)
    for value in {id(x): x for x in (q_operand, k_operand, scaled_k)}.values():
        ledger.drop(value.tid)
    product.output = logits
    added = logits  # (is_causal without a mask: a q x k mask, added in place)
    if mask is not None:
        mask32 = mask if mask.width == 4 else new(mask.elements, 4, mask.grad)
        if mask32 is not mask:
            stage(record, [mask], mask32, ledger)
        added = Value(ledger.new(0, "activations"), scores, 4, qk_grad or mask.grad)  # the same storage
        qk_grad = added.grad
        stage(record, [logits, mask32], added, ledger, passes=logits)
        if mask32 is not mask:
            ledger.drop(mask32.tid)
    probs = new(scores, 4, qk_grad)
    ledger.drop(logits.tid)
    stage(record, [added], probs, ledger, saves=[probs] * bool(qk_grad))  # softmax saves its output
    if added is not logits:
        ledger.drop(added.tid)
    dropped = probs
    if p > 0:  # (a mask that needs a gradient sends sdpa here without dropout too)
        noise = new(scores, 4, False)  # bernoulli_ then div_(1 - p): the mask, as a full fp32 tensor
        dropped = new(scores, 4, qk_grad)
        stage(record, [probs], dropped, ledger, saves=[noise] * bool(qk_grad))
        ledger.drop(probs.tid)
        ledger.drop(noise.tid)
    if half:  # the probabilities it also returns, cast back (the model drops them at once)
        held.append(new(scores, width, False))
    v_operand = v32 if contiguous_kv else new(kv_size, 4, v.grad)  # bmm copies a transposed v
    if v_operand is not v:
        stage(record, [v], v_operand, ledger, scratch=half * own + 4 * kv_size * repeated)
    out = new(q_size, 4, q.grad or k.grad or v.grad)
    stage(record, [dropped, v_operand], out, ledger, saves=[dropped] * bool(v.grad) + [v_operand] * bool(qk_grad))
    if v_operand is not v32:
        ledger.drop(v_operand.tid)
    ledger.drop(dropped.tid)
    if half:
        cast = new(q_size, width, out.grad)
        stage(record, [out], cast, ledger)
        ledger.drop(out.tid)
        out = cast
    for value in held:
        ledger.drop(value.tid)
    return out


def concat_prefix(record, prefix: Value, value: Value, elements: int, ledger, new) -> Value:
    """The cache's torch.cat of a layer's prefix and its own keys (or values), in the wider dtype of the two. Its
    backward hands the prefix a view of the gradient, which keeps that gradient alive until the prefix encoder's
    backward (``passes``); the cache holds the concatenation instead of the prefix."""
    width = max(prefix.width, value.width)
    cast = new(elements - prefix.elements, width, value.grad) if value.width != width else None  # (cat promotes)
    out = new(elements, width, True)
    stage(record, [prefix, value], out, ledger, passes=prefix)
    for dead in (cast, prefix):
        if dead is not None:
            ledger.drop(dead.tid)
    return out


def stage(record, inputs, output, ledger, saves=(), scratch: int = 0, passes=None) -> Record:
    """One autograd node of an attention core, appended to its record's stages."""
    stage = Record(list(inputs), output, [], [], [], scratch=scratch, passes=passes)
    for value in saves:
        keep(stage, value, ledger)
    record.stages.append(stage)
    return stage


def eager_path(core, b, heads, dim, q_len, k_len, operands, grad, ledger, ctx, new, dropout, record, extras=None,
           held=None, returned=None, views=(False, False, False), cached=None, whole=(False, False, False)):
    """transformers' eager attention, op by op (each op a stage of ``record``, as in ``math_path``). ``extras``: the
    bias and mask it adds to the scores (None: not replayed, an fp32 mask assumed where the core says so);
    ``held``: where the scores go when the module's locals keep them until it returns; ``returned``: where the
    attention weights it returns go (a layer keeps them in a local, ``_``, until it returns or the next
    attention of the layer returns: under autocast T5's are fp32, not the half copy its matmul keeps);
    ``views``: which of q, k, v the matmuls read as they are; ``cached``: where the copies of k and v go when
    the key/value cache holds them (until the model's output dies); ``whole``: which are contiguous (a cast of
    one, autocast's, is what its matmul reads; another is cast, then copied, and the cast let go)."""
    width = ctx.compute

    def operand(index):  # what a matmul reads of q, k or v: as it is, or a (cast) contiguous copy
        value, length = operands[index], (q_len, k_len, k_len)[index]
        if views[index]:
            return value
        elements = b * length * heads * dim
        autocast = new(elements, width, value.grad) if not whole[index] and value.width != width else None
        copy = new(elements, width, value.grad)
        if autocast is not None:
            ledger.drop(autocast.tid)
        return copy

    # q and k are copied for the first matmul, v for the second (all three first where the cache's copies of k
    # and v are what the matmuls read)
    copies = [operand(index) for index in range(3 if cached is not None else 2)]
    if cached is not None:
        cached += [ledger.hold(copy.tid) for copy, value in zip(copies[1:], operands[1:]) if copy is not value]
    for value, copy in zip(operands, copies):  # matmul copies the transposed q, k and v
        if copy is not value:
            stage(record, [value], copy, ledger)
    qc, kc = copies[:2]
    product = stage(record, [qc, kc], None, ledger, saves=[qc] * bool(kc.grad) + [kc] * bool(qc.grad))
    scores = b * heads * q_len * k_len
    logits = new(scores, width, grad)  # q @ k^T (scaled): alive while the next op is computed
    product.output = logits
    for role in masks.ROLES if extras else ():  # + bias, + mask: out of place, in the wider dtype of the two
        if role in extras:
            extra = extras[role]
            added = new(scores, max(logits.width, extra.width), logits.grad or extra.grad)
            for tid in promoted([logits, extra], added.width, ledger):
                ledger.drop(tid)
            stage(record, [logits, extra], added, ledger, passes=logits if added.width == logits.width else None)
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
        logits = cast(record, logits, 4, ledger, new)
    probs = new(scores, 4 if fp32_softmax else logits.width, grad)
    stage(record, [logits], probs, ledger, saves=[probs] * bool(grad))
    if held is not None:
        held.append(logits.tid)
    else:
        ledger.drop(logits.tid)
    # the dtype the core casts the probabilities back to (fp32 out of a 4-bit Linear under autocast; a prefixed
    # cache's values are fp32 too): its value's (GPT-2) or its query's (BLOOM)
    back = operands[2 if core.get("softmax_cast_back") == "value" else 0].width
    if probs.width != back and core.get("softmax_cast_back"):
        probs = cast(record, probs, back, ledger, new)
    node = stage(record, [probs], None, ledger)
    dropped = dropout(probs, dropout_of(core, ctx.config), lambda value: keep(node, value, ledger))
    if dropped is probs:  # no dropout: torch returns its input
        record.stages.remove(node)
    node.output = dropped
    ledger.drop(probs.tid)
    replaced = []
    if returned is not None:  # what the layer's local held before is let go once this attention returns
        replaced = returned[:]
        returned[:] = [ledger.hold(dropped.tid)]
    if len(copies) == 2:
        copies.append(operand(2))
        if copies[2] is not operands[2]:
            stage(record, [operands[2]], copies[2], ledger)
    vc = copies[2]
    if dropped.width != width:  # the matmul with v casts the probabilities to half precision itself
        dropped = cast(record, dropped, width, ledger, new)
    product = stage(record, [dropped, vc], None, ledger, saves=[dropped] * bool(vc.grad) + [vc] * bool(dropped.grad))
    for value in (*(copy for copy, value in zip(copies, operands) if copy is not value), dropped):
        ledger.drop(value.tid)
    product.output = new(b * q_len * heads * dim, width, grad)  # heads merged back: a contiguous copy
    for tid in replaced:
        ledger.drop(tid)
    return product.output


def cast(record, value, width, ledger, new):
    """A dtype cast, as a stage: its backward casts the gradient back."""
    cast = new(value.elements, width, value.grad)
    stage(record, [value], cast, ledger)
    ledger.drop(value.tid)
    return cast


def keep(stage, value, ledger) -> None:
    if value.tid not in stage.saved:
        stage.saved.append(ledger.hold(value.tid))
