"""Prompt tuning (Lester et al. 2021, arXiv:2104.08691): trainable soft-prompt embeddings, base frozen.

peft's ``PromptEmbedding`` holds ``num_virtual_tokens * num_transformer_submodules`` rows of the hidden
size; peft sets ``num_transformer_submodules`` to 2 for the seq2seq-LM task type and to 1 otherwise. All
rows are trainable, but peft's seq2seq forward prepends only the first ``num_virtual_tokens`` rows, to the
encoder's input: the other half is never read and never receives a gradient. Many tutorials count the
prompt once; the report counts what peft allocates and gives both figures."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import ParamcalcError
from .common import PeftSummary, make_row, prompt_learning_setup


@dataclass
class Options:
    tokens: int = field(default=20, metadata={"help": "num_virtual_tokens"})
    submodules: int | None = field(default=None, metadata={
        "help": "num_transformer_submodules: 2 = peft's default for seq2seq-lm, 1 = counted once"})

    def __post_init__(self):
        if self.tokens <= 0:
            raise ParamcalcError(f"--prompt: tokens must be a positive integer, got {self.tokens}")
        if self.submodules not in (None, 1, 2):
            raise ParamcalcError(f"--prompt: submodules must be 1 or 2, got {self.submodules}")


def submodules_for(result, options) -> int:
    return options.submodules or (2 if result.task == "seq2seq-lm" else 1)


def apply(result, options: Options) -> PeftSummary:
    family, copies = prompt_learning_setup(result, "--prompt")
    dim = family.peft["token_dim"]
    result.add_symbol("n_v", "virtual tokens", options.tokens, "prompt length")
    submodules = submodules_for(result, options)
    rows = f"{submodules}*n_v" if submodules > 1 else "n_v"
    row = make_row("soft prompt (prompt_encoder)", "embedding", "1", 1, {"weight": (rows, dim)},
                   "prompt_encoder.default.embedding", result.values)
    result.components.append(row)
    summary = PeftSummary("prompt", {**asdict(options), "submodules": submodules}, added_params=row.count + sum(
        c.count for c in copies), trainable_params=sum(c.count for c in result.components if c.trainable))
    note = _note(result.task, family.name, submodules, dim, options.tokens * result.values[dim])
    if note:
        summary.notes.append(note)
    return summary


def _note(task: str, family: str, submodules: int, dim: str, once: int) -> str | None:
    """Both figures, where they differ or could: peft's rows (2*n_v on seq2seq-lm) and the n_v rows that learn."""
    twice = f"2*n_v*{dim} = {2 * once:,}"
    if submodules == 2 and task == "seq2seq-lm":
        return (f"soft prompt counted as peft builds it for seq2seq-lm: {twice}, all trainable; peft feeds only "
                f"the first n_v rows to the encoder, so only n_v*{dim} = {once:,} get a gradient (submodules=1 "
                "counts those, as most tutorials do)")
    if submodules == 2:
        return f"soft prompt counted twice, as submodules=2 asks: {twice}; counted once: n_v*{dim} = {once:,} (submodules=1)"
    if family == "t5":
        return (f"soft prompt counted once, n_v*{dim} = {once:,}, the rows that learn; peft's seq2seq-lm task type "
                f"builds {twice}, all trainable though only the first n_v rows are used (submodules=2)")
    return None


def from_peft_config(config) -> Options:
    return Options(tokens=config.num_virtual_tokens, submodules=config.num_transformer_submodules)


def to_peft_config(options: Options, task_type: str | None, result=None):
    import peft

    return peft.PromptTuningConfig(num_virtual_tokens=options.tokens, task_type=task_type,
                                   num_transformer_submodules=options.submodules)
