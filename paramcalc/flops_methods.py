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

Torch-free: the analytic path.
"""

from __future__ import annotations

from . import expr
from .errors import ParamcalcError


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


def encoder_flops(result, values: dict, family) -> int:
    """Forward FLOPs of the prompt encoder (backward: twice as many, see above)."""
    total = 0
    dim = values[family.peft["token_dim"]]
    for method, options in result.peft_options:
        if method == "ptuning":
            tokens = options.tokens * _submodules(result, options)
            hidden = options.hidden or dim
            if options.encoder == "mlp":  # H -> h -> h -> H
                total += matmul(tokens, dim, hidden) + matmul(tokens, hidden, hidden) + matmul(tokens, hidden, dim)
            else:  # the bidirectional LSTM (not counted), then 2h -> 2h -> H
                total += matmul(tokens, 2 * hidden, 2 * hidden) + matmul(tokens, 2 * hidden, dim)
        elif method == "prefix" and options.projection:
            tokens, hidden = values["b"] * options.tokens, options.hidden or dim
            kv = 2 * expr.evaluate(family.peft["num_layers"], values) * dim
            total += matmul(tokens, dim, hidden) + matmul(tokens, hidden, kv)
    return total
