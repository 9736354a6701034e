"""Measuring a real ``model.generate()`` on a CPU: the judge of ``paramcalc.inference``.

The model is built from the counted config with seeded random weights (``runtime.build_model``, the trainer's
builder), in eval mode, and generates greedily from random prompts with the cache on, ``min_new_tokens`` equal to
``max_new_tokens`` so that it never stops early. Memory comes from torch's allocator events (``measure.CpuMeter``:
``torch.profiler`` with ``profile_memory=True``, its ``[memory]`` events summed in time order on top of what was
alive before: the weights, the prompts' token ids and their attention mask, all ones as a tokenizer returns them for
prompts without padding). A stopping criterion marks each new token, which splits the curve into the prefill (up to
the first token) and each decode step. The cache's bytes are its tensors' storages when generate returns
(``return_dict_in_generate=True``: ``past_key_values``).

Imports torch: not on the analytic path.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

from .inference import Inference


@dataclass
class Measured:
    weights: int  # parameters and buffers, as allocated
    before: int  # alive when generate starts: weights + the prompt's token ids
    peak_prefill: int
    peak_decode: int | None  # the highest decode step (None with one new token)
    peak_last_decode: int | None  # the last decode step's
    kv_cache: int  # bytes of the cache's key and value tensors when generate returns
    kv_shapes: list[tuple[int, ...]]  # each layer's keys

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def measure_generate(result, inference: Inference, seed: int = 0) -> Measured:
    """Build ``result``'s model, run ``generate`` for ``inference`` once to warm up, then once measured."""
    import torch
    import transformers

    from .measure import CpuMeter, alive_bytes
    from .runtime import build_model
    from .step import Step, resolve_attention

    step = resolve_attention(Step(batch=inference.batch, seq=inference.context, dtype=inference.dtype,
                                  attention=inference.attention), result)
    model = build_model(result, step, seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, result.values["V"], (inference.batch, inference.context), generator=generator)
    mask = torch.ones_like(ids)  # as a tokenizer returns it for prompts without padding
    config = model.config
    pad = next((i for i in (config.pad_token_id, config.eos_token_id, 0) if isinstance(i, int)), 0)

    class Mark(transformers.StoppingCriteria):
        """Called once per new token, after it is chosen: where one step of generate ends."""

        def __init__(self, meter):
            self.meter = meter

        def __call__(self, input_ids, scores, **kwargs):
            if self.meter is not None:
                self.meter.mark("token")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def generate(meter=None):
        marks = transformers.StoppingCriteriaList([Mark(meter)])
        return model.generate(ids, attention_mask=mask, max_new_tokens=inference.new_tokens,
                              min_new_tokens=inference.new_tokens, do_sample=False, use_cache=True, pad_token_id=pad,
                              return_dict_in_generate=True, stopping_criteria=marks)

    generate()  # warm up: kernels' caches and lazily built state exist before the measured run
    gc.collect()
    weights = alive_bytes(model)
    meter = CpuMeter()
    meter.offset = before = weights + ids.untyped_storage().nbytes() + mask.untyped_storage().nbytes()
    with meter.recording():
        with meter.phase("step"):
            out = generate(meter)
    steps = _split(meter.timeline().points, meter.marks().get("token", []))
    storages = {}
    for layer in out.past_key_values.layers:
        for tensor in (layer.keys, layer.values):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    decode = steps[1:]
    return Measured(weights, before, steps[0], max(decode) if decode else None, decode[-1] if decode else None,
                    sum(storages.values()), [tuple(layer.keys.shape) for layer in out.past_key_values.layers])


def _split(points: list[tuple[int, int]], marks: list[int]) -> list[int]:
    """The peak of each step of generate: the curve cut where each new token was marked (the last step ends with
    the curve)."""
    peaks, start = [], 0
    for end in marks:
        peaks.append(max(alive for when, alive in points if start <= when <= end))
        start = end
    return peaks
