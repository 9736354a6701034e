"""FLOPs of what PEFT methods add to a training step, beside the base model's flow (``paramcalc.flops``).

Small functions over shapes, counted as ``torch.utils.flop_counter`` counts them: a matmul
``[m, k] @ [k, n]`` is ``2*m*k*n`` FLOPs, and nothing else counts.

- **Prompt tuning, p-tuning** (peft ``get_prompt``): the encoder runs once, on ``1 x n_v*submodules`` virtual
  tokens, and its output is repeated over the batch; the model then reads ``s + n_v`` tokens (peft prepends
  the first ``n_v`` rows to the input embeddings). P-tuning's MLP is three Linears; its LSTM variant is an
  ``aten.lstm`` FlopCounterMode has no formula for (it counts 0 for it, so do we: its real cost,
  ``8*T*h*(in + h)`` per direction and layer, is left to the time model) and then two Linears.
- **Prefix tuning** (peft ``PrefixEncoder``): the encoder runs on ``b x n_v`` tokens (an embedding, with
  ``projection=true`` then Linear(H, h) -> tanh -> Linear(h, 2*L*H)); every self-attention that reads peft's
  ``past_key_values`` sees ``n_v`` more keys and values, which need gradients.

Every Linear of an encoder has a trainable weight and an input that needs a gradient (the first one's input is
a trainable embedding's output): backward costs twice the forward.

- **Bottleneck adapters** (``paramcalc.tuners.adapter``): each adapter site of a part is one of its residual
  adds, in order (the n-th site, the n-th ``+`` of the part's flow); the adapter runs on the sub-layer's output
  just before that add (BLOOM's before its dropout, see ``with_adapters``) and reads it (Houlsby) or it and the
  residual (Pfeiffer). Down and up projection: ``4*T*H*b`` forward; backward both weights (``4*T*H*b``), the up
  projection's input and, when the adapter's input needs one, the down projection's (``2*T*H*b`` each). The up
  projection is the adapter's last kernel and saves only its inputs: a checkpointed re-run can stop before it.
- **DoRA** (peft ``DoraLinearLayer``): besides LoRA's ``x @ A @ B``, every forward rebuilds ``B @ A`` for the
  weight norm by running A and B on an identity matrix (``2*in*in*r + 2*in*r*out``; on an embedding
  ``A @ B``, ``2*V*r*D``). Its result is detached before use, so it has no backward. With ``lora_dropout > 0``
  the dropped input also goes through the frozen base weight again (``2*T*in*out`` forward, and its input
  gradient in backward when the input needs one; on GPT-2's Conv1D in fp32 a weight gradient too, see
  ``flops._run``). The magnitude's products come after every matmul and save: a checkpointed re-run runs all
  of a DoRA module. DoRA on a quantized base is refused (``flops.step_flops``): it cannot be traced to check.
"""

from __future__ import annotations

from . import expr
from .errors import ParamcalcError
from .tuners.adapter import ORIGINAL_LN_BEFORE

# AdapterHub's hook sits after the sub-layer's dropout everywhere but BLOOM, whose attention and MLP fold
# dropout and residual add into one dropout_add: paramcalc hooks the projection there, before the dropout
# (tuners.adapter.WIRING)
ADAPTER_BEFORE_DROPOUT = ("bloom",)


def matmul(tokens: int, fan_in: int, fan_out: int) -> int:
    """A Linear over ``tokens`` rows: ``[T, in] @ [in, out]``."""
    return 2 * tokens * fan_in * fan_out


def prepended_tokens(result) -> int:
    """Virtual tokens prompt tuning and p-tuning put in front of the input sequence: peft's seq2seq model the
    first ``n_v`` rows of the encoder's output, its other models all ``n_v*submodules``."""
    return sum(options.tokens * (1 if result.task == "seq2seq-lm" else _submodules(result, options))
               for method, options in result.peft_options if method in ("prompt", "ptuning"))


def _submodules(result, options) -> int:
    return options.submodules or (2 if result.task == "seq2seq-lm" else 1)


def prefix_tokens(result) -> int:
    """Keys and values prefix tuning puts in front of each prefixed self-attention's own."""
    return sum(options.tokens for method, options in result.peft_options if method == "prefix")


def prefixed(core: dict, family) -> bool:
    """Whether an attention core reads peft's prefix (``past_key_values``): every self-attention, but in an
    encoder-decoder (a family with cross-attention) only the decoder's: T5's encoder takes no cache."""
    cross = any(c["q_len"] != c["k_len"] for c in family.attention)
    return core["q_len"] == core["k_len"] and not (cross and core["part"] == "encoder")


def check_prefix(result, family, step) -> None:
    """Refuse the prefix tuning steps transformers does not run as peft meant them."""
    if step.grad_checkpointing:
        raise ParamcalcError("prefix tuning with gradient checkpointing: transformers drops the cache peft hands "
                             "over inside checkpointed layers (GPT-2, BLOOM and T5 fail on the mask's length; "
                             "BERT and RoBERTa run without the prefix), so there is no step to count")
    if family.name == "t5" and result.task == "base":
        raise ParamcalcError("prefix tuning on a bare T5Model is not modelled: peft (no task type) hands it the "
                             "prefix as a plain cache, which its decoder reads differently from the seq2seq "
                             "model's; 'paramcalc trace' measures it")
    if family.name == "t5" and result.values.get("L_d", 0) > result.values["L"]:
        raise ParamcalcError("prefix tuning on a T5 with more decoder than encoder layers: peft sizes the prefix "
                             "by num_layers, and the decoder's later layers find no cache (IndexError)")


def prefix_dim(family, values: dict) -> int:
    """The width of one layer's prefix keys (or values), evaluated (``Family.prefix_token_dim``)."""
    return expr.evaluate(family.prefix_token_dim, values)


def encoder_flops(result, values: dict, family, methods=("ptuning", "prefix")) -> int:
    """Forward FLOPs of the prompt encoder of ``methods`` (backward: twice as many, see above)."""
    total = 0
    dim = values[family.peft["token_dim"]]
    for method, options in result.peft_options:
        if method not in methods:
            continue
        if method == "ptuning":
            tokens = options.tokens * _submodules(result, options)
            hidden = options.hidden or dim
            if options.encoder == "mlp":  # H -> h -> h -> H
                total += matmul(tokens, dim, hidden) + matmul(tokens, hidden, hidden) + matmul(tokens, hidden, dim)
            else:  # the bidirectional LSTM (not counted), then 2h -> 2h -> H
                total += matmul(tokens, 2 * hidden, 2 * hidden) + matmul(tokens, 2 * hidden, dim)
        elif method == "prefix" and options.projection:
            width = prefix_dim(family, values)
            tokens, hidden = values["b"] * options.tokens, options.hidden or width
            kv = 2 * expr.evaluate(family.peft["num_layers"], values) * width
            total += matmul(tokens, width, hidden) + matmul(tokens, hidden, kv)
    return total


def _parts(op: str) -> tuple[list[str], str, str]:
    flow, _, name = op.partition(":")
    sources, _, target = flow.partition("->")
    return [x.strip() for x in sources.split(",") if x.strip()], target.strip(), name.strip()


def with_adapters(result, family, part: str, ops: list[str]) -> list[str]:
    """``part``'s flow with an op ``sub-layer[,residual] -> sub-layer : <adapter row>`` before each residual add
    that has an adapter: the part's n-th adapter site is its n-th ``+``."""
    adapters = [options for method, options in result.peft_options if method == "adapter"]
    sites = [s for s in family.adapter_sites if s["part"] == part]
    if not adapters or not sites:
        return ops
    adds = [i for i, op in enumerate(ops) if _parts(op)[2] == "+"]
    if len(adds) != len(sites):
        raise ParamcalcError(f"analytic FLOPs cannot place {family.title}'s {part} adapters: {len(sites)} sites, "
                             f"{len(adds)} residual adds in its flow ('paramcalc trace' measures them)")
    rows = {c.param: c.name for c in result.components if c.kind == "adapter"}
    pfeiffer = ORIGINAL_LN_BEFORE[adapters[0].kind]  # the adapter reads LN(h + x), not h
    placed = list(ops)
    for site, at in reversed(list(zip(sites, adds))):
        name = next((n for p, n in rows.items() if p.endswith(_site_module(site))), None)
        if name is None:  # a site this kind of adapter leaves out
            continue
        (sub_layer, residual), _, _ = _parts(ops[at])
        before = placed[at - 1]
        if family.name in ADAPTER_BEFORE_DROPOUT and _parts(before)[2].startswith("dropout") and (
                _parts(before)[1] == sub_layer):
            at -= 1
        sources = f"{sub_layer},{residual}" if pfeiffer else sub_layer
        placed.insert(at, f"{sources} -> {sub_layer} : {name}")
    return placed


def _site_module(site: dict) -> str:
    return f"{site['module']}.{site['attribute']}.adapters.default"  # as tuners.adapter.apply names the row


def adapter_site(family, row) -> dict:
    """The adapter site an adapter row stands for."""
    return next(s for s in family.adapter_sites if row.param.endswith(_site_module(s)))


def adapter_flops(tokens: int, hidden: int, width: int, grad_in: bool) -> tuple[int, int, int]:
    """(forward, backward, the up projection's forward) of one adapter, ``up(act(down(z)))`` over ``tokens``
    rows: ``[T, H] @ [H, b]`` then ``[T, b] @ [b, H]``. Both weights train, so the up projection's input needs
    a gradient; the down projection's input when ``z`` does."""
    down = up = matmul(tokens, hidden, width)
    return down + up, down * (1 + grad_in) + 2 * up, up


def dora_identity(fan_in: int, rank: int, fan_out: int, embedding: bool = False) -> int:
    """Forward FLOPs of DoRA's rebuilding of ``B @ A`` (peft ``get_lora_weight``): a Linear runs
    ``B(A(eye(in)))``, ``[in, in] @ [in, r]`` then ``[in, r] @ [r, out]``; an embedding ``A @ B``,
    ``[V, r] @ [r, D]`` (``fan_in`` = V). Detached: no backward."""
    if embedding:
        return matmul(fan_in, rank, fan_out)
    return matmul(fan_in, fan_in, rank) + matmul(fan_in, rank, fan_out)
