"""Prefix tuning (Li & Liang 2021, arXiv:2101.00190): trainable key/value prefixes for every layer.

peft's ``PrefixEncoder`` learns, per virtual token, a key and a value vector of the hidden size for each
of the ``num_layers`` layers it reads from the config (``num_hidden_layers``: the encoder's layers on T5):
an embedding of ``[tokens, 2*L*H]``; or, with ``projection=true``, an embedding of ``[tokens, H]`` followed
by Linear(H, hidden) -> tanh -> Linear(hidden, 2*L*H), the paper's reparameterisation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import ParamcalcError
from .common import PeftSummary, make_row, prompt_learning_setup


@dataclass
class Options:
    tokens: int = field(default=20, metadata={"help": "num_virtual_tokens"})
    projection: bool = field(default=False, metadata={"help": "prefix_projection: the two-layer MLP"})
    hidden: int | None = field(default=None, metadata={"help": "encoder_hidden_size of that MLP (default: H)"})

    def __post_init__(self):
        if self.tokens <= 0:
            raise ParamcalcError(f"--prefix: tokens must be a positive integer, got {self.tokens}")
        if self.hidden is not None and self.hidden <= 0:
            raise ParamcalcError(f"--prefix: hidden must be a positive integer, got {self.hidden}")
        if self.hidden is not None and not self.projection:
            raise ParamcalcError("--prefix: hidden sizes the projection MLP; add projection=true")


def apply(result, options: Options) -> PeftSummary:
    family, copies = prompt_learning_setup(result, "--prefix")
    # peft sizes a grouped-query model's prefix by its K/V width (peft/utils/other.py,
    # _prepare_prompt_learning_config)
    dim, layers = family.prefix_token_dim, family.peft["num_layers"]
    result.add_symbol("n_v", "virtual tokens", options.tokens, "prefix length")
    kv = f"2*{layers}*{dim}"  # a key and a value per layer
    base = "prompt_encoder.default"
    if options.projection:
        hidden = dim
        if options.hidden is not None:
            result.add_symbol("h_p", "prefix hidden", options.hidden, "prefix MLP width")
            hidden = "h_p"
        rows = [
            make_row("prefix embedding", "embedding", "1", 1, {"weight": ("n_v", dim)}, f"{base}.embedding",
                     result.values),
            make_row("prefix MLP in", "linear", "1", 1, {"weight": (hidden, dim), "bias": (hidden,)},
                     f"{base}.transform.0", result.values),
            make_row("prefix MLP out (keys and values)", "linear", "1", 1, {"weight": (kv, hidden), "bias": (kv,)},
                     f"{base}.transform.2", result.values),
        ]
    else:
        rows = [make_row("prefix keys and values (prompt_encoder)", "embedding", "1", 1, {"weight": ("n_v", kv)},
                         f"{base}.embedding", result.values)]
    result.components.extend(rows)
    summary = PeftSummary("prefix", asdict(options), added_params=sum(r.count for r in rows + copies),
                          trainable_params=sum(c.count for c in result.components if c.trainable))
    if family.name == "t5":
        summary.notes.append("peft sizes T5's prefix by num_layers = the encoder's layers (num_hidden_layers)")
    return summary


def from_peft_config(config) -> Options:
    hidden = config.encoder_hidden_size if config.prefix_projection else None
    return Options(tokens=config.num_virtual_tokens, projection=bool(config.prefix_projection), hidden=hidden)


def to_peft_config(options: Options, task_type: str | None, result=None):
    import peft

    return peft.PrefixTuningConfig(num_virtual_tokens=options.tokens, task_type=task_type,
                                   prefix_projection=options.projection, encoder_hidden_size=options.hidden)
