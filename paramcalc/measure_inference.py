"""Measuring a real ``model.generate()``: the judge of ``paramcalc.inference``.

The model is built from the counted config with seeded random weights (``runtime.build_model``, the trainer's
builder), in eval mode, and generates greedily from random prompts with the cache on, ``min_new_tokens`` equal to
``max_new_tokens`` so that it never stops early. On a CPU memory comes from torch's allocator events
(``measure.CpuMeter``: ``torch.profiler`` with ``profile_memory=True``, its ``[memory]`` events summed in time
order on top of what was alive before: the weights and the prompt's token ids); a stopping criterion marks each
new token, which splits the curve into the prefill (up to the first token) and each decode step. On CUDA,
``torch.cuda.max_memory_allocated``, its peak reset at the first token. The cache's bytes are its tensors'
storages when generate returns (``return_dict_in_generate=True``: ``past_key_values``).

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
    device: str

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def measure_generate(result, inference: Inference, device: str = "cpu", seed: int = 0) -> Measured:
    """Build ``result``'s model, run ``generate`` for ``inference`` once to warm up, then once measured."""
    import torch
    import transformers

    from .measure import CpuMeter, alive_bytes
    from .runtime import build_model
    from .step import Step, resolve_attention

    step = resolve_attention(Step(batch=inference.batch, seq=inference.context, dtype=inference.dtype,
                                  attention=inference.attention), result)
    model = build_model(result, step, seed=seed, device=device).eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, result.values["V"], (inference.batch, inference.context), generator=generator).to(device)
    config = model.config
    pad = next((i for i in (config.pad_token_id, config.eos_token_id, 0) if isinstance(i, int)), 0)
    marks: list[int] = []

    class Mark(transformers.StoppingCriteria):
        """Called once per new token, after it is chosen: where one step of generate ends."""

        def __init__(self, meter):
            self.meter = meter

        def __call__(self, input_ids, scores, **kwargs):
            if self.meter is not None:
                self.meter.mark("token")
            elif device != "cpu":
                torch.cuda.synchronize(device)
                marks.append(torch.cuda.max_memory_allocated(device))
                torch.cuda.reset_peak_memory_stats(device)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def generate(meter=None):
        return model.generate(ids, max_new_tokens=inference.new_tokens, min_new_tokens=inference.new_tokens,
                              do_sample=False, use_cache=True, pad_token_id=pad, return_dict_in_generate=True,
                              stopping_criteria=transformers.StoppingCriteriaList([Mark(meter)]))

    with torch.inference_mode(False), torch.no_grad():
        generate()  # warm up: kernels' caches and lazily built state exist before the measured run
        gc.collect()
        weights = alive_bytes(model)
        before = weights + ids.untyped_storage().nbytes()
        if device == "cpu":
            meter = CpuMeter()
            meter.offset = before
            with meter.recording():
                with meter.phase("step"):
                    out = generate(meter)
            points = meter.timeline().points
            steps = _split(points, meter.marks().get("token", []))
        else:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            out = generate()
            steps = marks
    storages = {}
    for layer in out.past_key_values.layers:
        for tensor in (layer.keys, layer.values):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    decode = steps[1:]
    return Measured(weights, before, steps[0], max(decode) if decode else None, decode[-1] if decode else None,
                    sum(storages.values()), [tuple(layer.keys.shape) for layer in out.past_key_values.layers],
                    device)


def _split(points: list[tuple[int, int]], marks: list[int]) -> list[int]:
    """The peak of each step of generate: the curve cut where each new token was marked (the last step ends with
    the curve)."""
    peaks, start = [], 0
    for end in marks:
        peaks.append(max(alive for when, alive in points if start <= when <= end))
        start = end
    return peaks
