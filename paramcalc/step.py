"""One training step as the user plans it: batch, sequence lengths, precision, optimizer, attention.

``attention="auto"`` (the default) means what transformers 5 builds when it is not told: sdpa where the
model class supports it (``_supports_sdpa``), eager otherwise (``PreTrainedModel.get_correct_attn_implementation``).
``resolve_attention`` turns it into the concrete kernel, from the family file's ``attention_kernels``
(tests/test_step.py checks that against transformers on the meta device).

Torch-free: the analytic FLOP and memory predictions read it, and so does the tracer.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ParamcalcError

DTYPES = ("fp32", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum", "adamw-8bit", "adafactor")
ATTENTION = ("auto", "eager", "sdpa", "flash")
KERNELS = ATTENTION[1:]
POSITIONS_KEY = {"bert": "P", "roberta": "P", "gpt2": "P"}  # families with learned, bounded positions


@dataclass(frozen=True)
class Step:
    batch: int = 1
    seq: int = 128
    tgt_seq: int | None = None  # encoder-decoder target length (default: seq)
    dtype: str = "fp32"
    mixed_precision: str | None = None  # fp16 | bf16 autocast with fp32 master weights
    optimizer: str = "adamw"
    grad_checkpointing: bool = False
    attention: str = "auto"  # resolve_attention: what transformers builds for the model
    grad_accum: int = 1  # micro-batches per optimizer step: gradients stay alive through the later forwards

    def __post_init__(self):
        for name in ("batch", "seq", "grad_accum") + (("tgt_seq",) if self.tgt_seq is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ParamcalcError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise ParamcalcError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.mixed_precision not in (None, "fp16", "bf16"):
            raise ParamcalcError(f"--mixed-precision must be fp16 or bf16, got {self.mixed_precision!r}")
        if self.mixed_precision and self.dtype != "fp32":
            raise ParamcalcError("--mixed-precision keeps fp32 master weights; drop --dtype or use --dtype fp32")
        if self.optimizer not in OPTIMIZERS:
            raise ParamcalcError(f"unknown optimizer {self.optimizer!r}; choose one of: {', '.join(OPTIMIZERS)}")
        if self.attention not in ATTENTION:
            raise ParamcalcError(f"--attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")

    def target_length(self) -> int:
        return self.tgt_seq or self.seq

    def symbols(self, task: str) -> dict[str, int]:
        """b, s, t as the family files' token expressions use them."""
        # T5ForSequenceClassification feeds the input, shifted, to the decoder: t = s
        return {"b": self.batch, "s": self.seq, "t": self.seq if task == "seq-cls" else self.target_length()}


def check_fits_model(step: Step, result) -> None:
    """Learned position tables bound the sequence length; say so instead of crashing later."""
    from .families import families

    if not result.generic:
        kernels = families()[result.family].attention_kernels
        if step.attention not in kernels + ("auto",):
            raise ParamcalcError(f"--attention {step.attention}: transformers runs {result.family} with "
                                 f"{' or '.join(kernels)} attention only")
    symbol = POSITIONS_KEY.get(result.family)
    if symbol and symbol in result.values:
        limit = result.values[symbol]
        # RoBERTa's positions start after the padding index: 514 rows hold 512 tokens
        usable = limit - 2 if result.family == "roberta" else limit
        from .flops_methods import prefix_tokens, prepended_tokens

        # soft prompts are prepended to the tokens; a prefix's keys and values take positions before them
        virtual = prepended_tokens(result) + prefix_tokens(result)
        if step.seq + virtual > usable:
            key = result.symbols[symbol][0]
            extra = f" + {virtual} virtual tokens" if virtual else ""
            raise ParamcalcError(f"--seq {step.seq}{extra} is longer than {result.model} can read: {key} = {limit} "
                                 f"allows at most {usable} tokens; use --seq {usable - virtual} or less")
    if step.tgt_seq is not None and result.family != "t5":
        raise ParamcalcError("--tgt-seq is for encoder-decoder models (T5); this model reads --seq only")


def default_attention(result) -> str:
    """The kernel transformers builds for ``result``'s model when no ``attn_implementation`` is given.

    From the family file (torch-free): sdpa when it lists sdpa, else eager. A model without a family file
    asks transformers (already imported to count it) whether its class supports sdpa.
    """
    if not result.generic:
        from .families import families

        return "sdpa" if "sdpa" in families()[result.family].attention_kernels else "eager"
    import transformers

    cls = getattr(transformers, result.hf_class, None)
    if cls is None:  # a custom module: no attention implementation to choose
        return "auto"
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


def resolve_attention(step: Step, result) -> Step:
    """``step`` with ``attention="auto"`` replaced by the kernel transformers builds for ``result``'s model.

    A concrete choice (eager, sdpa, flash) is returned as it is. Build the model with
    ``attn_implementation(step, device)`` to run what was predicted.
    """
    if step.attention != "auto":
        return step
    from dataclasses import replace

    return replace(step, attention=default_attention(result))


def attn_implementation(step: Step, device: str = "cpu") -> str:
    """transformers' ``attn_implementation`` for a resolved step: flash is flash_attention_2 on CUDA and
    torch's sdpa (its flash kernel) on a CPU, as ``paramcalc trace`` builds it."""
    if step.attention not in KERNELS:
        raise ParamcalcError(f"resolve --attention {step.attention} first (paramcalc.step.resolve_attention)")
    if step.attention == "flash":
        return "flash_attention_2" if device == "cuda" else "sdpa"
    return step.attention


def attention_note(asked: Step, result) -> str:
    """One line saying which attention kernel a prediction assumed, and why."""
    resolved = resolve_attention(asked, result)
    name = result.family if not result.generic else result.hf_class
    why = f"transformers' default for {name}" if asked.attention == "auto" else "as asked"
    return f"attention: {resolved.attention} ({why})"

