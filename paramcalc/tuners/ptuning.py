"""P-tuning (Liu et al. 2021, arXiv:2103.10385): virtual-token embeddings reparameterised by a small encoder.

peft's ``PromptEncoder``: an embedding of ``tokens * submodules`` rows of the hidden size H, then either an
MLP H -> hidden -> hidden -> H (ReLU between, with biases), or a bidirectional LSTM of ``layers`` layers
followed by Linear(2*hidden, 2*hidden) -> ReLU -> Linear(2*hidden, H). ``hidden`` defaults to H.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import ParamcalcError
from ..primitives import PRIMITIVES
from .common import PeftSummary, make_row, prompt_learning_setup
from .prompt import submodules_for

ENCODERS = ("mlp", "lstm")


@dataclass
class Options:
    tokens: int = field(default=20, metadata={"help": "num_virtual_tokens"})
    encoder: str = field(default="mlp", metadata={"help": "encoder_reparameterization_type: mlp | lstm"})
    hidden: int | None = field(default=None, metadata={"help": "encoder_hidden_size (default: H)"})
    layers: int = field(default=2, metadata={"help": "encoder_num_layers of the LSTM (the MLP has 3 layers)"})
    submodules: int | None = field(default=None, metadata={
        "help": "num_transformer_submodules: 2 = peft's default for seq2seq-lm, 1 = counted once"})

    def __post_init__(self):
        self.encoder = self.encoder.lower()
        if self.tokens <= 0:
            raise ParamcalcError(f"--ptuning: tokens must be a positive integer, got {self.tokens}")
        if self.encoder not in ENCODERS:
            raise ParamcalcError(f"--ptuning: encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.hidden is not None and self.hidden <= 0:
            raise ParamcalcError(f"--ptuning: hidden must be a positive integer, got {self.hidden}")
        if self.layers <= 0:
            raise ParamcalcError(f"--ptuning: layers must be a positive integer, got {self.layers}")
        if self.submodules not in (None, 1, 2):
            raise ParamcalcError(f"--ptuning: submodules must be 1 or 2, got {self.submodules}")


def apply(result, options: Options) -> PeftSummary:
    family, copies = prompt_learning_setup(result, "--ptuning")
    dim = family.peft["token_dim"]
    result.add_symbol("n_v", "virtual tokens", options.tokens, "prompt length")
    hidden = dim
    if options.hidden is not None:
        result.add_symbol("h_p", "prompt encoder hidden", options.hidden, "encoder_hidden_size")
        hidden = "h_p"
    submodules = submodules_for(result, options)
    tokens = f"{submodules}*n_v" if submodules > 1 else "n_v"
    base, values = "prompt_encoder.default", result.values
    rows = [make_row("virtual token embedding", "embedding", "1", 1, {"weight": (tokens, dim)}, f"{base}.embedding",
                     values)]
    if options.encoder == "mlp":
        layers = [(dim, hidden), (hidden, hidden), (hidden, dim)]
        for n, (fan_in, fan_out) in enumerate(layers):
            rows.append(make_row(f"prompt encoder MLP {n + 1}", "linear", "1", 1, PRIMITIVES["linear"](fan_in, fan_out),
                                 f"{base}.mlp_head.{2 * n}", values))
    else:
        rows.append(make_row("prompt encoder LSTM", "lstm", "1", 1,
                             PRIMITIVES["lstm"](dim, hidden, options.layers, bidirectional=True),
                             f"{base}.lstm_head", values))
        two_hidden = f"2*{hidden}"
        rows.append(make_row("prompt encoder MLP 1", "linear", "1", 1, PRIMITIVES["linear"](two_hidden, two_hidden),
                             f"{base}.mlp_head.0", values))
        rows.append(make_row("prompt encoder MLP 2", "linear", "1", 1, PRIMITIVES["linear"](two_hidden, dim),
                             f"{base}.mlp_head.2", values))
    result.components.extend(rows)
    return PeftSummary("ptuning", {**asdict(options), "submodules": submodules},
                       added_params=sum(r.count for r in rows + copies),
                       trainable_params=sum(c.count for c in result.components if c.trainable))


def from_peft_config(config) -> Options:
    encoder = getattr(config.encoder_reparameterization_type, "value", config.encoder_reparameterization_type)
    return Options(tokens=config.num_virtual_tokens, encoder=str(encoder).lower(), hidden=config.encoder_hidden_size,
                   layers=config.encoder_num_layers, submodules=config.num_transformer_submodules)


def to_peft_config(options: Options, task_type: str | None, result=None):
    import peft

    return peft.PromptEncoderConfig(num_virtual_tokens=options.tokens, task_type=task_type,
                                    encoder_reparameterization_type=peft.PromptEncoderReparameterizationType(
                                        options.encoder.upper()),
                                    encoder_hidden_size=options.hidden, encoder_num_layers=options.layers,
                                    num_transformer_submodules=options.submodules)
