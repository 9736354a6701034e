"""What torch runs for one module or attention core of a step, forward and backward: the kernels
``paramcalc.oplist`` lists (``ops.mm`` a matmul, ``ops.ew`` an elementwise op, both in ``ops.phase``), with
the shapes, FLOPs and bytes each takes. ``where`` says what the step is (``oplist._Where``).

Torch-free: the analytic path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import attention, flops_methods

if TYPE_CHECKING:  # the builder and the step's description, from the module that calls these
    from .oplist import _Ops, _Where

# Activations, as (forward, backward) tensor passes and dispatched ops, for those written out in Python (one
# pass reads or writes one input-sized tensor). GPT-2's tanh GELU is eight ops forward (pow, mul, add, mul,
# tanh, add, mul, mul: 18 passes) and autograd's walk back through them about 28 passes; BLOOM's runs as an
# autograd Function whose backward recomputes tanh (bloom_gelu_back); T5's RMSNorm is pow, mean, rsqrt and two
# products (Llama's the same ops, in fp32 throughout). Llama's rotary positions on q or k (apply_rotary_pos_emb):
# x * cos, -x2, cat, * sin, + (10 passes); backward the two products' gradients, the negated half's, the two
# halves' slices put back in place and three gradients summed (about 14). The fused kernels (GELU, ReLU, SiLU,
# LayerNorm) are one op each way, at their own calibrated rate.
WRITTEN_OUT = {"gelu_new": (18, 28, 8, 14), "bloom_gelu": (20, 28, 9, 12), "rmsnorm": (9, 15, 5, 9),
               "rotary": (10, 14, 5, 8)}
FUSED_ACTIVATION = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "gelu", "silu": "gelu", "tanh": "gelu"}


def module_ops(name, module, record, x, out, ops: _Ops, where: _Where, backward: bool) -> None:
    tied_copy = name.endswith(" [tied]")
    grad_in = bool(x is not None and x.grad)
    grad_out = bool(out is not None and out.grad)
    ops.phase = "forward"
    width = out.width if out is not None else where.compute
    if module.kind in ("embedding", "tied") and (module.fan_in == 0 or tied_copy):  # a lookup
        ops.ew("copy", 2 * out.bytes, out.width, "embeddings and loss")
        if module.lora_rank:  # LoRA on an embedding: a lookup in A, then [T, r] @ [r, dim]
            ops.mm("lora_up", 1, module.tokens, module.lora_rank, module.fan_out, width)
        if module.dora:  # DoRA's A @ B, detached
            ops.mm("lora_up", 1, module.dora // (2 * module.lora_rank * module.fan_out), module.lora_rank,
                   module.fan_out, width)
        if backward and (record.weight_grads or module.lora_rank):
            ops.phase = "backward"
            if record.weight_grads:
                grads = sum(b for _, b in record.weight_grads)
                # calibrated as it runs, into a fresh zero-filled gradient: its first touch is in the rate
                ops.ew("embedding_backward", grads + 2 * out.bytes, out.width, "embeddings and loss", written=0)
            if module.lora_rank:
                ops.mm("lora_down", 1, module.tokens, module.fan_out, module.lora_rank, width)
                ops.mm("lora_down", 1, module.lora_rank, module.tokens, module.fan_out, width)
        return
    if module.kind in ("layernorm", "rmsnorm"):
        if module.kind == "rmsnorm":
            forward, back, calls, back_calls = WRITTEN_OUT["rmsnorm"]
            ops.ew("mul", forward * x.bytes, x.width, dispatches=calls)
            if backward and (grad_in or module.weight_trains):
                ops.phase = "backward"
                ops.ew("mul", back * x.bytes, x.width, dispatches=back_calls)
            return
        ops.ew("layer_norm", x.bytes + out.bytes, x.width)
        if backward and (grad_in or module.weight_trains):
            ops.phase = "backward"
            ops.ew("layer_norm_backward", 2 * x.bytes + out.bytes, x.width)
        return
    if module.kind not in ("linear", "conv1d", "tied") or not module.fan_in:
        return
    tokens, fan_in, fan_out, rank = module.tokens, module.fan_in, module.fan_out, module.lora_rank
    compute = where.compute
    quantized = name in where.quantized and not tied_copy
    if where.autocast and x.width != compute and not quantized:
        ops.ew("copy", x.elements * (x.width + compute), compute)  # autocast casts the input
    if where.autocast and where.master != compute and (grad_in or rank) and not quantized:
        ops.ew("copy", fan_in * fan_out * (where.master + compute), compute)  # ... and the weight
    if quantized:  # bitsandbytes dequantizes the whole weight for its matmul
        ops.ew("copy", fan_in * fan_out * (compute + 1), compute)
    ops.mm("linear", 1, tokens, fan_in, fan_out, compute, dispatches=2)
    if rank:
        if where.lora_dropout > 0:
            ops.ew("dropout", 2 * x.bytes + x.elements * (x.width if where.device == "cpu" else 1), x.width,
                   dispatches=3)
        ops.mm("lora_down", 1, tokens, fan_in, rank, compute)
        ops.mm("lora_up", 1, tokens, rank, fan_out, compute)
        ops.ew("mul", 2 * tokens * fan_out * compute, compute)  # scaling
        ops.ew("add", 3 * tokens * fan_out * width, width)  # base + LoRA
    if module.dora:  # peft rebuilds B @ A for the weight's norm (detached), B(A(eye(in))) ...
        ops.mm("lora_down", 1, fan_in, fan_in, rank, compute)
        ops.mm("lora_up", 1, fan_in, rank, fan_out, compute)
        ops.ew("mul", 6 * tokens * fan_out * compute, compute, dispatches=4)  # the magnitude's products
        if module.dora_dropout:  # ... and runs the dropped input through the base weight again
            ops.mm("linear", 1, tokens, fan_in, fan_out, compute)
    if module.ia3_output or module.ia3_input:
        ops.ew("mul", 3 * tokens * (fan_out if module.ia3_output else fan_in) * width, width)
    if not backward or not (grad_out or module.weight_trains):
        return
    ops.phase = "backward"
    if grad_in or module.ia3_input:  # the input's gradient: [T, out] @ [out, in]
        if quantized:
            ops.ew("copy", fan_in * fan_out * (compute + 1), compute)
        ops.mm("linear", 1, tokens, fan_out, fan_in, compute)
    if module.weight_trains and not tied_copy:  # the weight's: [out, T] @ [T, in], and the bias's: a sum
        ops.mm("linear", 1, fan_out, tokens, fan_in, compute)
        ops.ew("add", tokens * fan_out * compute, compute)
    if module.dora_dropout and grad_in:
        ops.mm("linear", 1, tokens, fan_out, fan_in, compute)
    if module.dora_leaf and where.family.loaded_dtype(module.dora_leaf, where.step.dtype) == "fp32":
        ops.mm("linear", 1, fan_out, tokens, fan_in, compute)  # peft's throwaway Parameter gets a gradient
    if rank:
        ops.mm("lora_down", 1, tokens, fan_out, rank, compute)  # B's input gradient
        ops.mm("lora_down", 1, rank, tokens, fan_out, compute)  # B's weight gradient
        ops.mm("lora_down", 1, rank, tokens, fan_in, compute)  # A's weight gradient
        if grad_in:
            ops.mm("lora_up", 1, tokens, rank, fan_in, compute)  # A's input gradient
            ops.ew("add", 3 * tokens * fan_in * compute, compute)  # summed with the base's


def attention_ops(record, name, ops: _Ops, where: _Where, backward: bool) -> None:
    """The attention core by the kernel that runs (``paramcalc.attention``): eager and torch's math path as their
    matmuls, softmax, dropout and copies; the fused kernels as one op each way."""
    core = where.family.attention[int(name.rsplit(" ", 1)[-1]) - 1]
    b, heads, dim, q_len, k_len = attention.shapes(core, where.values)
    q, k, v = (value.grad for value in record.inputs[:3])
    if where.prefix and flops_methods.prefixed(core, where.family):
        k_len, k, v = k_len + where.prefix, True, True
    grad = bool(record.output is not None and record.output.grad) or q or k or v
    extras = [value for value in record.inputs[3:]]
    mask_grad = any(value.grad for value in extras)
    runs = attention.kernel(where.step, core, where.result.config, where.device, mask_grad)
    bh, scores = b * heads, b * heads * q_len * k_len
    q_size, kv_size = bh * q_len * dim, bh * k_len * dim
    ops.phase = "forward"
    if runs == "fused":
        ops.mm("sdpa", bh, q_len, dim, 2 * k_len, where.compute, "attention core", dispatches=4)
        if backward and grad:
            ops.phase = "backward"
            ops.mm("sdpa_backward", bh, q_len, dim, 5 * k_len, where.compute, "attention core", dispatches=4)
        return
    width = 4 if runs == "math" else where.compute
    soft = 4 if (runs == "math" or core.get("softmax_fp32")) else width
    p = attention.dropout_of(core, where.result.config)
    kc = "attention core"
    ops.ew("copy", 2 * (q_size + 2 * kv_size) * width, width, kc, dispatches=3)  # the transposed operands
    if runs == "math":
        ops.ew("mul", 2 * (q_size + kv_size) * 4, 4, kc, dispatches=2)  # q and k^T times sqrt(scale)
    ops.mm("attention_scores", bh, q_len, dim, k_len, width, kc)
    for _ in extras:  # the mask and position bias, added to the scores
        ops.ew("add", 3 * scores * width, width, kc)
    if not extras and runs == "eager" and core.get("fp32_mask"):
        ops.ew("add", 3 * scores * width, width, kc)
    ops.ew("softmax", 2 * scores * soft, soft, kc)
    if runs == "math":  # torch's _safe_softmax: rows that are all -inf give 0 (isneginf, all, where)
        ops.ew("mul", scores * (soft + 1 + 1 + 2 * soft), soft, kc, dispatches=3, written=scores * soft)
    if p > 0:
        ops.ew("dropout", (2 * soft + (soft if where.device == "cpu" else 1)) * scores, soft, kc, dispatches=3)
    ops.mm("attention_values", bh, q_len, k_len, dim, width, kc)
    ops.ew("copy", 2 * q_size * width, width, kc)  # the heads merged back
    if not (backward and grad):
        return
    ops.phase = "backward"
    ops.ew("copy", 2 * q_size * width, width, kc)
    if q or k:  # the probabilities' gradient: dO @ v^T
        ops.mm("attention_scores", bh, q_len, dim, k_len, width, kc)
    if v:  # v's: p^T @ dO
        ops.mm("attention_values", bh, k_len, q_len, dim, width, kc)
    if q or k:
        if p > 0:
            ops.ew("mul", 3 * scores * soft, soft, kc)
        ops.ew("softmax_backward", 3 * scores * soft, soft, kc)
        if runs == "math":
            ops.ew("mul", 2 * (q_size + kv_size) * 4, 4, kc, dispatches=2)
        if q:
            ops.mm("attention_values", bh, q_len, k_len, dim, width, kc)
        if k:
            ops.mm("attention_values", bh, k_len, q_len, dim, width, kc)
