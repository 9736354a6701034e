"""One training step as the user plans it: batch, sequence lengths, precision, optimizer, attention.

Torch-free: the analytic FLOP and memory predictions read it, and so does the tracer.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ParamcalcError

DTYPES = ("fp32", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adam", "sgd", "sgd-momentum", "adamw-8bit", "adafactor")
ATTENTION = ("eager", "sdpa", "flash")
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
    attention: str = "eager"

    def __post_init__(self):
        for name in ("batch", "seq") + (("tgt_seq",) if self.tgt_seq is not None else ()):
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
        if step.attention not in kernels:
            raise ParamcalcError(f"--attention {step.attention}: transformers runs {result.family} with "
                                 f"{' or '.join(kernels)} attention only")
    symbol = POSITIONS_KEY.get(result.family)
    if symbol and symbol in result.values:
        limit = result.values[symbol]
        # RoBERTa's positions start after the padding index: 514 rows hold 512 tokens
        usable = limit - 2 if result.family == "roberta" else limit
        if step.seq > usable:
            key = result.symbols[symbol][0]
            raise ParamcalcError(f"--seq {step.seq} is longer than {result.model} can read: {key} = {limit} "
                                 f"allows at most {usable} tokens")
    if step.tgt_seq is not None and result.family != "t5":
        raise ParamcalcError("--tgt-seq is for encoder-decoder models (T5); this model reads --seq only")
