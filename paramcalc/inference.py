"""Inference memory: what ``model.generate()`` holds, for decoder-only families (``paramcalc MODEL --infer``).

Three terms, each from the family file:

- **weights**: the model as loaded, quantized bases included (``memory.model_states``, the training path's own);
- **KV cache**: per cached attention core, ``2 x layers x b x tokens x KV heads x head dim x bytes``, exact.
  generate feeds the prompt (``--context N``) and then each new token but the last, so after ``M`` new tokens
  the cache holds ``N + M - 1`` positions (transformers' ``DynamicCache``: one ``[b, KV heads, tokens, head dim]``
  tensor of keys and one of values per layer; a sliding-window layer at most its window: ``inference_cache``);
- **activations**: one step of generate replayed op by op (``paramcalc.inference_walk``): the prompt's forward
  with its logits for the last position and the greedy pick (prefill), and the last new token's forward over the
  full cache (decode).

The prefill peak is weights + the prompt's cache as it fills + the prompt's activations; the decode peak weights +
the full cache + one token's activations (and the copy ``torch.cat`` makes as it grows a layer's cache). On a GPU
CUDA's context and allocator take ``plan.CUDA_OVERHEAD`` more. ``fit_context`` and ``fit_batch`` search the
longest prompt and the largest batch whose higher peak fits a device.

Torch-free: the analytic path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from . import expr
from .errors import ParamcalcError
from .attention import kv_heads
from .inference_cache import kept, processors, takes_positions, windows
from .inference_walk import Pass, cached_cores, run

KV_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}
DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class Inference:
    """One call of ``generate``: ``batch`` prompts of ``context`` tokens, ``new_tokens`` generated greedily."""

    batch: int = 1
    context: int = 128
    new_tokens: int = 1
    dtype: str = "fp32"  # the dtype the model is loaded in (--quant: its other weights' dtype)
    kv_dtype: str | None = None  # the cache's: the model's own unless asked (fp8: what serving engines store)
    attention: str = "auto"

    def __post_init__(self):
        for name in ("batch", "context", "new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ParamcalcError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.dtype not in DTYPES:
            raise ParamcalcError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_dtype is not None and self.kv_dtype not in KV_BYTES:
            raise ParamcalcError(f"--kv-dtype must be one of {', '.join(KV_BYTES)}, got {self.kv_dtype!r}")

    @property
    def cached_tokens(self) -> int:
        """Positions the cache holds when generate returns: the last new token is never fed back."""
        return self.context + self.new_tokens - 1


@dataclass
class InferencePlan:
    inference: Inference  # its attention resolved
    weights: int
    kv_cache: int  # when generate returns (cached_tokens positions)
    kv_formula: str
    prefill: dict  # {peak, weights, kv_cache, activations, overhead}: what is alive at the prefill peak
    decode: dict | None  # the same at the last decode step's peak; None with one new token (no decode step)
    profile: object
    formulas: dict[str, str]
    notes: list[str] = field(default_factory=list)
    fit: dict | None = None  # --fit-context / --fit-batch: what was searched, and the curve

    @property
    def peak(self) -> int:
        return max(self.prefill["peak"], self.decode["peak"] if self.decode else 0)

    def fits(self) -> bool | None:
        return None if self.profile.memory is None else self.peak <= self.profile.memory

    def to_dict(self) -> dict:
        run = self.inference
        document = {"weights": self.weights, "kv_cache": self.kv_cache, "kv_cache_tokens": run.cached_tokens,
                    "activations": self.prefill["activations"],
                    "activations_decode": self.decode["activations"] if self.decode else None,
                    "peak_prefill": self.prefill["peak"], "peak_decode": self.decode["peak"] if self.decode else None,
                    "peak": self.peak, "at_peak_prefill": self.prefill, "at_peak_decode": self.decode,
                    **asdict(run), "kv_dtype": self.kv_dtype, "formulas": self.formulas,
                    "device": {"profile": self.profile.name, "memory": self.profile.memory, "fits": self.fits()},
                    "notes": self.notes}
        if self.fit is not None:
            document["fit"] = self.fit
        return document

    @property
    def kv_dtype(self) -> str:
        return self.inference.kv_dtype or self.inference.dtype


def supported(result):
    """The family of a model ``--infer`` can plan, or a one-line refusal saying why not."""
    from .families import families

    if result.generic:
        raise ParamcalcError(f"--infer needs a family file: {result.model} has none ({result.hf_class} is counted on "
                             "the meta device, with no flow to replay)")
    family = families()[result.family]
    decoders = ", ".join(name for name, f in families().items() if _decoder_only(f))
    if "seq2seq-lm" in family.tasks:
        raise ParamcalcError(f"--infer covers decoder-only models ({decoders}); {result.family} is an encoder-decoder, "
                             "whose encoder pass and cross-attention cache it does not model")
    if not family.attention:
        raise ParamcalcError(f"--infer: the {result.family} family file does not describe its attention yet (no "
                             "[[attention]] with heads, kv_heads and head_dim), so its KV cache cannot be sized")
    if not _decoder_only(family):
        raise ParamcalcError(f"--infer: {result.family} is an encoder-only model, which keeps no key/value cache to "
                             f"generate with; --infer covers decoder-only models ({decoders})")
    if result.task != "causal-lm":
        raise ParamcalcError(f"--infer generates with the causal LM head: use --task causal-lm (or leave --task out), "
                             f"not --task {result.task}")
    if result.peft_options:
        raise ParamcalcError("--infer plans the base model: drop the PEFT options (merge a LoRA into its base first; "
                             "the merged model is the base model)")
    return family


def _decoder_only(family) -> bool:
    return "causal-lm" in family.tasks and "seq2seq-lm" not in family.tasks and any(
        core.get("kv_cache") for core in family.attention)


def check_positions(result, inference: Inference) -> None:
    """Learned position tables bound the positions generate feeds (the prompt, then each new token but the last)."""
    from .step import POSITIONS_KEY

    symbol = POSITIONS_KEY.get(result.family)
    if symbol and symbol in result.values and inference.cached_tokens > result.values[symbol]:
        limit, key = result.values[symbol], result.symbols[symbol][0]
        raise ParamcalcError(f"--context {inference.context} + --new-tokens {inference.new_tokens} feeds "
                             f"{inference.cached_tokens} positions, more than {result.model} has ({key} = {limit}); "
                             f"use --context {limit + 1 - inference.new_tokens} or less")


def kv_cache(result, family, inference: Inference, tokens: int | None = None) -> tuple[int, str]:
    """Bytes of the cache holding ``tokens`` positions (default: when generate returns), and its formula with the
    model's numbers."""
    tokens = inference.cached_tokens if tokens is None else tokens
    width = KV_BYTES[inference.kv_dtype or _dtype(result, inference)]
    values = {**result.values, "b": inference.batch}
    total, symbolic, numbers = 0, [], []
    for _, core in cached_cores(result, family):
        layers = expr.evaluate(core.get("repeat", "1"), values)
        heads, dim = kv_heads(core, values), expr.evaluate(core["head_dim"], values)
        # a sliding-window layer keeps at most its window (inference_cache.kept): layers grouped by what they keep
        positions = [kept(window, inference.context, tokens) for window in windows(result, layers)]
        for held in sorted(set(positions), reverse=True):
            count = positions.count(held)
            total += 2 * count * inference.batch * held * heads * dim * width
            symbolic.append(f"2 x {core.get('repeat', '1') if count == layers else count} x b x "
                            f"{'tokens' if held == tokens else 'window'} x {core.get('kv_heads', core['heads'])} x "
                            f"{core['head_dim']} x bytes")
            numbers.append(f"2 x {count} x {inference.batch} x {held:,} x {heads} x {dim} x {width}")
    return total, f"{' + '.join(symbolic)} = {' + '.join(numbers)}"


def _dtype(result, inference: Inference) -> str:
    from .memory import weights_dtype
    from .step import Step

    return weights_dtype(result, Step(dtype=inference.dtype))


def infer(result, inference: Inference, device: str | None = None, device_mem: str | None = None) -> InferencePlan:
    """Weights, KV cache and the prefill / decode peaks of ``generate`` for ``result``'s model on a device."""
    from .memory import DTYPE_BYTES, buffer_bytes, model_states
    from .devices import CUDA_OVERHEAD, profile
    from .step import Step, check_fits_model, resolve_attention

    family = supported(result)
    step = Step(batch=inference.batch, seq=1, dtype=inference.dtype, attention=inference.attention)
    chosen = profile(device, step, device_mem)
    check_fits_model(step, result)  # (the kernels this family runs)
    check_positions(result, inference)
    dtype = _dtype(result, inference)  # (--quant: the dtype its other weights were loaded in)
    inference = replace(inference, attention=resolve_attention(step, result).attention, dtype=dtype)
    weights = model_states(result, step).weights
    width = DTYPE_BYTES[dtype]
    kv_width = KV_BYTES[inference.kv_dtype or dtype]
    overhead = CUDA_OVERHEAD if chosen.kind == "cuda" else 0
    vocab = result.values["V"]
    first = Pass(inference.batch, inference.context, 0, width, kv_width, inference.attention, vocab, inference.context,
                 processors(result), chosen.kind, takes_positions(result), _threads(chosen), dtype)
    last = replace(first, tokens=1, past=inference.cached_tokens - 1)  # the last decode step, over the full cache
    replayed = all(family.flow.get(part) for part in family.tasks[result.task].parts)
    if replayed:
        prefill = _at_peak(run(result, family, first, weights, result.quant), overhead)
        decode = _at_peak(run(result, family, last, weights, result.quant), overhead) if inference.new_tokens > 1 \
            else None
    else:  # no flow to replay: weights and cache only, a lower bound
        prefill = _states(weights, kv_cache(result, family, inference, inference.context)[0], overhead)
        decode = _states(weights, kv_cache(result, family, inference)[0], overhead) if inference.new_tokens > 1 \
            else None
    total, formula = kv_cache(result, family, inference)
    buffers = buffer_bytes(result)
    formulas = {
        "weights": ("quantized weights as stored + other params x bytes(dtype) + buffers" if result.quant else
                    f"{result.total_params:,} params x {width} B" + (f" + buffers {buffers:,} B" if buffers else "")),
        "kv_cache": formula,
        "kv_cache_tokens": f"context + new tokens - 1 = {inference.context:,} + {inference.new_tokens:,} - 1 = "
                           f"{inference.cached_tokens:,} (the last new token is never fed back)",
        "activations": f"one forward over the {inference.context:,}-token prompt, its last position's logits, the "
                       "greedy pick (token ids and masks included)",
        "activations_decode": "one token's forward over the cache, torch.cat's copy of a layer's cache as it grows, "
                              "the greedy pick",
        "overhead": "CUDA context + allocator (assumed 0.5 GiB on a GPU, none on the CPU)",
    }
    notes = [f"attention: {inference.attention}; greedy generate(max_new_tokens={inference.new_tokens}, "
             f"min_new_tokens={inference.new_tokens}), DynamicCache, logits_to_keep=1"]
    if inference.kv_dtype and KV_BYTES[inference.kv_dtype] != width:
        notes.append(f"--kv-dtype {inference.kv_dtype}: the cache at {kv_width} B per value, as a serving engine "
                     f"stores it; transformers' DynamicCache keeps the model's dtype ({dtype})")
    window = next((w for w in windows(result, result.values.get("L", 0)) if w), None)
    if window is not None and inference.cached_tokens > window:
        notes.append(f"sliding window ({window:,} positions): generate's DynamicCache keeps at most {window:,} positions "
                     "in a sliding layer (a view of the last window - 1 of a tensor one longer); past the window sdpa "
                     "gets a mask, and repeat_kv copies the keys and values for it")
    if result.quant and result.quant.options.type != "int8" and chosen.kind == "cpu":
        notes.append("on a CPU bitsandbytes repacks 4-bit weights at their first forward, their absmax in bf16: 2 B "
                     "less per 64 values than as loaded (shown)")
    if not replayed:
        notes.append(f"no [flow] in the {result.family} family file yet: activations are not replayed, so each peak is "
                     "weights + KV cache only (a lower bound)")
    elif chosen.kind == "cuda":
        notes.append("on a GPU: activations as measured on a CPU (sdpa fused there too; eager's fp32 softmax "
                     "without a copy of its input); not yet checked against a GPU run")
    return InferencePlan(inference, weights, total, formula, prefill, decode, chosen, formulas, notes)


def _threads(chosen) -> int:
    """torch's intra-op threads on a CPU (its fused attention allocates scratch per thread): a calibrated profile's,
    else OMP_NUM_THREADS, else the CPUs this process may use (torch's default where a core runs one thread)."""
    import os

    saved = (chosen.calibrated or {}).get("threads")
    if isinstance(saved, int) and saved > 0:
        return saved
    told = os.environ.get("OMP_NUM_THREADS", "")
    if told.isdigit() and int(told) > 0:
        return int(told)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _at_peak(ledger, overhead: int) -> dict:
    totals = ledger.timeline.at_peak
    activations = sum(totals[key] for key in ("activations", "transient", "inputs", "gradients", "optimizer"))
    return {"peak": ledger.timeline.peak + overhead, "weights": totals["weights"], "kv_cache": totals["kv_cache"],
            "activations": activations, "overhead": overhead}


def _states(weights: int, kv: int, overhead: int) -> dict:
    return {"peak": weights + kv + overhead, "weights": weights, "kv_cache": kv, "activations": None,
            "overhead": overhead}


def _search(fits, limit: int) -> tuple[int, list[int]]:
    """The largest n in [1, limit] with fits(n) true (fits is monotone), by doubling then bisection; 0 when none."""
    tried = []

    def check(n: int) -> bool:
        tried.append(n)
        return fits(n)

    if not check(1):
        return 0, tried
    low, high = 1, 2
    while high <= limit and check(high):
        low, high = high, high * 2
    high = min(high, limit + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if check(middle) else (low, middle)
    return low, tried


def _fit(result, inference: Inference, device, device_mem, what: str, limit: int) -> InferencePlan:
    from .devices import profile
    from .step import Step

    memory = profile(device, Step(dtype=inference.dtype), device_mem).memory
    if memory is None:
        raise ParamcalcError(f"--fit-{what} needs the device's memory: give a GPU --device (e.g. h100-80gb) or "
                             "--device-mem (e.g. 16GiB)")
    curve = {}

    def fits(n: int) -> bool:
        planned = infer(result, replace(inference, **{"context" if what == "context" else "batch": n}), device,
                        device_mem)
        curve[n] = planned.peak
        return planned.peak <= memory

    best, _ = _search(fits, limit)
    if best == 0:
        raise ParamcalcError(f"even --{what} 1 does not fit: it needs {curve[1]:,} bytes of {memory:,}")
    chosen = infer(result, replace(inference, **{"context" if what == "context" else "batch": best}), device,
                   device_mem)
    chosen.fit = {"what": what, "best": best, "limit": limit, "memory": memory,
                  "curve": [{what: n, "peak": peak} for n, peak in sorted(curve.items())]}
    if best == limit:
        why = "the model's positions" if what == "context" and limit < CONTEXT_LIMIT else "more may fit"
        chosen.notes.append(f"--fit-{what} stopped at its limit ({limit:,}): {why}")
    return chosen


CONTEXT_LIMIT = 1 << 24  # positions searched when the model's positions do not bound the prompt (ALiBi, rotary)
BATCH_LIMIT = 1 << 16


def fit_context(result, inference: Inference, device=None, device_mem=None) -> InferencePlan:
    """The plan of the longest prompt whose higher peak (prefill or decode) fits the device."""
    from .step import POSITIONS_KEY

    supported(result)
    symbol = POSITIONS_KEY.get(result.family)
    limit = CONTEXT_LIMIT
    if symbol and symbol in result.values:
        limit = result.values[symbol] + 1 - inference.new_tokens
        if limit < 1:
            raise ParamcalcError(f"--new-tokens {inference.new_tokens} alone feeds more positions than "
                                 f"{result.model} has ({result.symbols[symbol][0]} = {result.values[symbol]})")
    return _fit(result, inference, device, device_mem, "context", limit)


def fit_batch(result, inference: Inference, device=None, device_mem=None) -> InferencePlan:
    """The plan of the largest batch whose higher peak (prefill or decode) fits the device."""
    supported(result)
    return _fit(result, inference, device, device_mem, "batch", BATCH_LIMIT)
