"""What ``generate()`` does around the model's forward in one step (``paramcalc.inference_walk`` walks the layers,
``paramcalc.inference_cache`` holds the cache rules): the step itself (``Pass``), the token ids, masks and position
ids it keeps, torch's fused CPU attention's per-thread scratch, and the greedy pick that follows the forward.

The greedy pick (``GenerationMixin._sample``): the last logits copied to fp32, the logits processors that
``min_new_tokens`` adds when the model has an end-of-sequence token (``MinLengthLogitsProcessor`` and
``MinNewTokensLengthLogitsProcessor``: each clones the ``b x V`` scores, builds a ``V`` int64 range and its eos mask
and a masked copy), argmax, and the attention mask
and token ids grown by one (``torch.cat``: a new tensor each).

Torch-free: the analytic path.
"""

from __future__ import annotations

from dataclasses import dataclass

from .inference_cache import PROCESSORS
from .ledger import Ledger, Value

INT64 = 8  # token ids, attention masks, positions: int64


@dataclass(frozen=True)
class Pass:
    """One forward of generate: ``tokens`` new positions over ``past`` cached ones."""

    batch: int
    tokens: int  # q: the prompt (prefill) or 1 (decode)
    past: int  # positions already in the cache
    width: int  # bytes per activation element (the dtype the model was loaded in)
    kv_width: int  # bytes per cached key or value element
    attention: str  # eager | sdpa | flash (resolved)
    vocab: int
    prompt: int  # the prompt's length (the caller's input_ids)
    processors: int = PROCESSORS  # inference_cache.processors: none without an end-of-sequence token
    device: str = "cpu"  # cpu | cuda: softmax(..., dtype=float32) copies a half input to fp32 first on a CPU
    positions: bool = True  # the model's forward takes position_ids (inference_cache.takes_positions)
    threads: int = 1  # torch's intra-op threads on a CPU: its fused attention's scratch is per thread

    @property
    def keys(self) -> int:
        return self.past + self.tokens


def kept_inputs(ledger: Ledger, p: Pass) -> tuple[int | None, int | None, list[int]]:
    """What generate holds through the step before the forward runs; returns the grown position ids and token ids
    of the last step and the last pick's scores (none in the prefill), which the pick rebinds."""
    b, keys = p.batch, p.keys
    for _ in ("input_ids", "attention_mask"):  # the caller's (a tokenizer's, without padding), alive throughout
        ledger.new(b * p.prompt * INT64, "inputs")
    # generate drops an all-ones attention mask (model_kwargs["attention_mask"] = None); a model whose forward takes
    # position ids gets them from it (cumsum - 1), and generate's own model_kwargs keeps that first b x prompt tensor
    # to the end, while _sample's copy of model_kwargs grows by torch.cat after each step, as input_ids do (the
    # prefill reads the caller's input_ids)
    if p.positions:
        ledger.new(b * p.prompt * INT64, "inputs")
    grown, ids = ([ledger.new(b * keys * INT64, "inputs") if p.positions else None,
                   ledger.new(b * keys * INT64, "inputs")] if p.past else [None, None])
    # the last pick's fp32 logits and processed scores (one tensor without processors)
    previous = [ledger.new(b * p.vocab * 4, "activations") for _ in range(min(p.processors, 1) + 1)] if p.past else []
    return grown, ids, previous


def model_inputs(ledger: Ledger, p: Pass) -> list[int]:
    """prepare_inputs_for_generation: input_ids[:, -q:].clone(), and the position ids' last q cloned (the prefill's
    are generate's own); the prefill's die as _prefill returns, a decode step's at the next step."""
    return [ledger.new(p.batch * p.tokens * INT64, "inputs") for _ in range(1 + (p.positions and p.past > 0))]


def flash_scratch(q: int, k: int, dim: int, width: int, threads: int) -> int:
    """What torch's fused CPU attention (``_scaled_dot_product_flash_attention_cpu``, torch 2.13) allocates while it
    runs: per thread a block of q x k scores (query blocks of 32 rows, 64 from 192 queries, 256 from 768; key blocks
    of 512), its row maxima and sums and a block of output, in fp32, and a half-precision copy of the block of scores
    for a half input (measured byte for byte, fp32 and bf16)."""
    rows = min(q, 256 if q >= 768 else 64 if q >= 192 else 32)
    columns = min(k, 512)
    return threads * ((rows * columns + 2 * rows + rows * dim) * 4 + (rows * columns * width if width != 4 else 0))


def pick(ledger, p: Pass, logits: Value, grown: int | None, ids: int | None, previous: list[int]) -> None:
    """generate's greedy pick after the forward: the position ids grown by one, the last logits copied to fp32,
    the logits processors, argmax, the token ids grown by one; then the logits die (``del outputs``)."""
    b, vocab = p.batch, p.vocab
    if p.positions:
        ledger.new(b * (p.keys + 1) * INT64, "inputs")  # _update_model_kwargs_for_generation: torch.cat
    if grown is not None:
        ledger.drop(grown)
    scores = ledger.new(b * vocab * 4, "activations")  # logits[:, -1].to(copy=True, dtype=float32)
    if previous:
        ledger.drop(previous[0])  # the last step's copy, rebound
    before = scores
    for _ in range(p.processors):  # clone; arange(V) and its eos mask (isin); where(mask, -inf, scores)
        clone = ledger.new(b * vocab * 4, "transient")
        index = ledger.new(vocab * INT64, "transient")
        eos = ledger.new(vocab, "transient")
        masked = ledger.new(b * vocab * 4, "activations")
        for tid in (clone, index, eos):
            ledger.drop(tid)
        if before != scores:
            ledger.drop(before)  # the previous processor's output, once the next has run
        before = masked
    for tid in previous[1:]:
        ledger.drop(tid)  # the last step's processed scores, rebound
    ledger.drop(ledger.new(b * INT64, "transient"))  # argmax
    ledger.new(b * (p.keys + 1) * INT64, "inputs")  # torch.cat([input_ids, next_tokens])
    if ids is not None:
        ledger.drop(ids)
    ledger.drop(logits.tid)  # del outputs
