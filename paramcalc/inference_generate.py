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
    dtype: str = "fp32"  # the model's dtype: a CPU multiplies bf16 and fp16 through oneDNN (matmul_scratch)

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


def flash_packs(b: int, kv: int, q: int, k: int, dim: int, dtype: str, threads: int) -> list[int]:
    """What torch's fused CPU attention adds in bf16 (AMX) from 64 queries over 64 keys on: the keys and the values
    reordered for its brgemm (b x K/V heads x k x dim each) and a k-block (up to 512) x dim buffer per thread, bf16;
    measured byte for byte: 2 x 4/2 heads x 200 x 16 -> 25,600 + 25,600 + 12,800 (2 threads); 1 x 4/2 x 1000 x 16
    -> 64,000 + 64,000 + 32,768; none at 63 x 63, 32 x 200 or one query, none in fp16 or fp32."""
    if dtype != "bf16" or q < 64 or k < 64:
        return []
    return [b * kv * k * dim * 2] * 2 + [threads * min(k, 512) * dim * 2]


def matmul_scratch(m: int, k: int, n: int, dtype: str, threads: int, batch: int = 0, gemv: bool = False) -> int:
    """What one half-precision ``m x k @ k x n`` product (``batch`` of them for a bmm) allocates on a CPU while it
    runs: oneDNN's brgemm matmul scratchpad, per thread (torch 2.13, oneDNN 3.12, measured with allocator events on
    an AMX / AVX512-FP16 Xeon; fp32 goes to MKL, which allocates none). torch hands oneDNN only products over
    16 x 16 x 16 (its ``checksize``), and an fp16 ``x @ W^T`` of one row to its own gemv (``fp16_gemv_trans``):
    nothing. bf16 runs on AMX: a K x n-block strip of B packed in bf16, 32 columns wide (64 for one row or from 128
    rows on), and ~3-5 KB of tile buffers (a one-query bmm's: 10,368-63,104 B, modelled within ~10 %); m x 64 x 64 -> 13,952 B on 2 threads, 400 x 256 x 64
    75,392 B (exact); wider n or mid-sized m pick other blockings (400 x 64 x 192: 61,056 B, modelled 26,624).
    fp16 computes in fp32: a K (up to 512) x 64 block of B, the thread's rows of A (all for a bmm or up to 16 rows,
    else m / threads, at most 256) and their 64 output columns, 4 B each, and 896 B: 2 x 64 x 64 -> 36,608 B,
    400 x 64 x 64 239,360 B, 200 x 16 x 201 (bmm) 137,984 B, exact; 48 x 64 x 96 83,712 B, modelled 59,392."""
    if dtype not in ("bf16", "fp16") or max(batch, 1) * m * k * n <= 16 ** 3 or (dtype == "fp16" and gemv and m == 1):
        return 0
    if dtype == "bf16":
        columns = 64 if m == 1 or (m >= 128 and n >= 64) else 32
        used = threads if m == 1 or m > 16 or batch else min(threads, -(-n // 32))
        return used * (2 * k * columns + (4928 if m == 1 and not batch else 3072 if m <= 16 else 5120))
    depth = min(k, 512)
    rows = m if batch or m <= 16 else min(-(-m // threads), 256)
    return threads * (4 * (64 * depth + rows * depth + rows * 64) + 896)


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
