"""``paramcalc trace``: run one real training step under FakeTensorMode and measure it.

Fake tensors carry shapes and dtypes but no data, so any model size runs here in seconds and no memory.
A TorchDispatchMode sees every tensor the step creates and follows its storage until it is freed; the
peak of live bytes is split by what the storages were: parameters (and buffers), gradients, optimizer
state, activations saved by the forward pass, and transient buffers. ``FlopCounterMode`` counts the
matmul FLOPs at the same time.

(torch's own ``mem_tracker`` fails when parameters are frozen, as with PEFT; tracking storages works for
any model.) The model is the user's, unchanged, with the attention kernel transformers builds for it
(``--attention auto``) or the one asked for; on this CPU build ``flash`` means torch's sdpa. What sdpa
then runs is torch's choice, as in a real step: its fused CPU kernel without attention dropout (its FLOPs
counted with torch's fused-attention formulas), its math path with dropout.

A model without a family file is traced the same way, built by its transformers class.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

from .errors import ParamcalcError
from . import attention, quantized
from .memory import weights_dtype
from .step import Step, attention_note, attn_implementation, check_fits_model, resolve_attention

CATEGORIES = ("parameters", "gradients", "optimizer", "activations", "transient")


@dataclass
class TraceReport:
    model_class: str
    peak: int
    at_peak: dict[str, int]
    after_step: dict[str, int]  # what stays alive after optimizer.step(): the model states
    flops: dict[str, int]
    phase_of_peak: str
    phase_peaks: dict[str, int]  # the live-bytes high-water mark in each phase of the steady step
    notes: list[str] = field(default_factory=list)
    attention: str = ""  # the kernel the model was built with (eager, sdpa, flash)

    def to_dict(self) -> dict:
        return {"model_class": self.model_class, "attention": self.attention, "peak": self.peak,
                "at_peak": self.at_peak, "after_step": self.after_step, "flops": self.flops,
                "phase_of_peak": self.phase_of_peak, "phase_peaks": self.phase_peaks, "notes": self.notes}


def _live_storage_tracker():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class LiveStorages(TorchDispatchMode):
        """Bytes of every storage created while active, until Python frees it."""

        def __init__(self):
            super().__init__()
            self.live: dict[int, tuple[int, str, weakref.ref]] = {}
            self.current = self.peak = 0
            self.phase = "setup"
            self.snapshot: list[tuple[int, str, weakref.ref]] = []
            self.peak_phase = ""
            self.phase_peaks: dict[str, int] = {}

        def reset_peak(self):
            self.peak, self.phase_peaks = self.current, {}

        def track(self, tensor, phase=None):
            storage = tensor.untyped_storage()
            key = id(storage)
            if key in self.live:
                return
            size = storage.nbytes()
            self.live[key] = (size, phase or self.phase, weakref.ref(storage))
            weakref.finalize(storage, self._free, key, size)
            self.current += size
            if self.current > self.phase_peaks.get(self.phase, 0):
                self.phase_peaks[self.phase] = self.current
            if self.current > self.peak:
                self.peak, self.peak_phase = self.current, self.phase
                self.snapshot = list(self.live.values())

        def _free(self, key, size):
            if self.live.pop(key, None) is not None:
                self.current -= size

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for item in tree_flatten(out)[0]:
                if isinstance(item, torch.Tensor):
                    self.track(item)
            return out

    return LiveStorages()


def _cpu_fused_attention_formulas():
    """torch counts the fused CUDA attention kernels; give its CPU kernel the same formulas."""
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten
    mapping = {}
    forward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    backward = getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
    # custom_mapping functions receive shapes (FlopCounterMode wraps them), like torch's own formulas
    if forward is not None:
        mapping[forward] = lambda q, k, v, *args, out_shape=None, **kwargs: flop_counter.sdpa_flop_count(
            q, *_query_heads(q, k, v))
    if backward is not None:
        mapping[backward] = lambda grad, q, k, v, *args, out_shape=None, **kwargs: (
            flop_counter.sdpa_backward_flop_count(grad, q, *_query_heads(q, k, v)))
    return mapping


def _query_heads(q, k, v):
    """Grouped-query attention (sdpa's enable_gqa) reads each K/V head for several query heads: the work is that
    of K and V repeated to the query's heads, which torch's formulas (equal heads only) then count."""
    return [(*shape[:-3], q[-3], *shape[-2:]) for shape in (k, v)]


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """torch._grouped_mm, the experts' matmul (transformers' grouped_mm experts): every row of the jagged operand
    belongs to one group, so the FLOPs are those of one matmul over all of them."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # tokens @ per-expert weights: [S, K] @ [E, K, N] -> [S, N]
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # weight gradients, jagged over S: [K, S] @ [S, N] -> [E, K, N]
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    rows = a_shape[-2] * (a_shape[0] if len(a_shape) == 3 and len(b_shape) == 3 else 1)
    return 2 * rows * a_shape[-1] * b_shape[-1]  # [E, M, K] @ [E, K, N], and [M, K] sliced by groups of N


def _flop_formulas():
    """Formulas FlopCounterMode lacks: torch's fused CPU attention kernel (it counts only the CUDA ones) and the
    grouped matmul of mixture-of-experts layers."""
    import torch

    mapping = _cpu_fused_attention_formulas()
    grouped = getattr(torch.ops.aten, "_grouped_mm", None)
    if grouped is not None:
        mapping[grouped] = _grouped_mm_flops
    return mapping


def _cpu_grouped_mm():
    """A fake-tensor rule for ``torch._grouped_mm`` on a CPU in fp32 / fp16, the kernel a real CPU step runs.

    transformers (5.x, torch > 2.8) runs a mixture of experts (Mixtral's) as ``grouped_mm`` by default
    (``experts_implementation``), and on a CPU ``torch._grouped_mm`` has a kernel for every float dtype. torch's
    meta function, which fake tensors use, copies the CUDA kernel's checks and wants bf16 inputs. This mode
    answers the same op with the CPU kernel's output (a new contiguous tensor of the shape torch's meta function
    gives); bf16 goes on to torch's own rule. It changes nothing the model runs, only how its output is shaped.
    """
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    grouped = getattr(torch.ops.aten, "_grouped_mm", None)

    class CpuGroupedMM(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if grouped is None or func is not grouped.default:
                return func(*args, **kwargs)
            a, b, offs = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("offs")
            out_dtype = (args[4] if len(args) > 4 else kwargs.get("out_dtype")) or a.dtype
            bias = args[3] if len(args) > 3 else kwargs.get("bias")
            if a.dtype == torch.bfloat16 or a.device.type != "cpu" or bias is not None:
                return func(*args, **kwargs)
            if a.dim() == 2 and b.dim() == 2:
                shape = (offs.size(0), a.size(0), b.size(1))  # [K, S] @ [S, N] in groups -> [E, K, N]
            elif a.dim() == 2:
                shape = (a.size(0), b.size(-1))  # [S, K] @ [E, K, N] -> [S, N]
            elif b.dim() == 2:
                shape = (a.size(1), b.size(1))
            else:
                shape = (a.size(0), a.size(1), b.size(-1))
            return torch.empty(shape, dtype=out_dtype, device=a.device)

    return CpuGroupedMM()


def _experts_note(model, result) -> str | None:
    """Which experts implementation a mixture-of-experts model runs (the model's, as a real step runs it)."""
    can_set = getattr(type(model), "_can_set_experts_implementation", None)
    if can_set is None or not can_set():
        return None
    implementation = model.config._experts_implementation
    asked = result.config.get("experts_implementation")
    why = "as its config asks" if asked else f"transformers' default for {result.family or result.hf_class}"
    kernel = {"grouped_mm": "; torch._grouped_mm, as a real CPU step runs it"}.get(implementation, "")
    return f"experts: {implementation} ({why}{kernel})"


def _inputs(result, step: Step, encoder_decoder: bool):
    import torch

    b, s = step.batch, step.seq
    vocab = result.config.get("vocab_size", 100)
    ids = torch.randint(0, vocab, (b, s))
    if result.task == "seq2seq-lm":
        return {"input_ids": ids, "labels": torch.randint(0, vocab, (b, step.target_length()))}
    if result.task == "base" and encoder_decoder:
        return {"input_ids": ids, "decoder_input_ids": torch.randint(0, vocab, (b, step.target_length()))}
    if result.task in ("causal-lm", "masked-lm"):
        return {"input_ids": ids, "labels": ids}
    if result.task == "seq-cls":
        return {"input_ids": ids, "labels": torch.randint(0, result.config.get("num_labels", 2), (b,))}
    if result.task == "token-cls":
        # soft prompts are prepended to the sequence, and peft leaves the labels as given: label them too
        virtual = sum(options.tokens for method, options in result.peft_options if method in ("prompt", "ptuning"))
        return {"input_ids": ids, "labels": torch.randint(0, result.config.get("num_labels", 2), (b, s + virtual))}
    return {"input_ids": ids}


def _loss(output):
    """The task's own loss; for a bare backbone, a stand-in over every output a head could read
    (hidden states and, for BERT, the pooled vector), so every module takes part in backward."""
    loss = getattr(output, "loss", None)
    if loss is not None:
        return loss
    outputs = [getattr(output, name, None) for name in ("last_hidden_state", "pooler_output")]
    return sum(t.float().pow(2).mean() for t in outputs if t is not None)


def _optimizer(step: Step, parameters):
    import torch

    if step.optimizer in ("adamw", "adam"):
        cls = torch.optim.AdamW if step.optimizer == "adamw" else torch.optim.Adam
        return cls(parameters, lr=1e-4, foreach=False)
    if step.optimizer in ("sgd", "sgd-momentum"):
        return torch.optim.SGD(parameters, lr=1e-3, momentum=0.9 if step.optimizer == "sgd-momentum" else 0.0,
                               foreach=False)
    raise ParamcalcError(f"paramcalc trace runs adamw, adam, sgd and sgd-momentum; {step.optimizer} needs its "
                         "own library (bitsandbytes / transformers' Adafactor) and is not traced yet")


def trace_step(result, step: Step, steady: bool = True) -> TraceReport:
    """One forward, backward and optimizer step of ``result``'s model (with its PEFT methods), on fake tensors.

    ``steady`` runs a second step and measures that one: from then on the optimizer state is alive
    throughout the step, which is what every step after the first needs.
    """
    import torch
    import transformers
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from .meta import hf_config
    from .verify import apply_real_peft

    if result.generic and not hasattr(transformers, result.hf_class):
        raise ParamcalcError(f"{result.model} is a custom module: paramcalc cannot run a training step of it "
                             "(it does not know its inputs or loss); it counts its parameters only")
    check_fits_model(step, result)
    notes = [attention_note(step, result)]
    step = resolve_attention(step, result)
    if not result.generic:
        notes += filter(None, [attention.runs_note(step, result, "cpu")])
    hf = hf_config(result.config)
    if getattr(hf, "is_encoder_decoder", False) and getattr(hf, "decoder_start_token_id", None) is None:
        hf.decoder_start_token_id = hf.pad_token_id or 0  # needed to shift labels into decoder inputs
    if result.task == "seq-cls" and getattr(hf, "pad_token_id", None) is None:
        hf.pad_token_id = 0  # GPT-2/BLOOM find each sequence's last token by padding; any id does on fake data
    hf._attn_implementation = attn_implementation(step, "cpu")
    from .runtime import as_loaded, default_dtype

    tracker = _live_storage_tracker()
    try:  # build in the step's dtype, on meta; apply peft there, then give every tensor a fake twin
        with default_dtype(weights_dtype(result, step)), torch.device("meta"):
            model = getattr(transformers, result.hf_class)(hf)
    except ValueError as exc:  # e.g. BLOOM has no sdpa path
        raise ParamcalcError(f"transformers cannot build {result.hf_class} this way: "
                             f"{str(exc).splitlines()[0][:200]}") from None
    as_loaded(model, result.config, weights_dtype(result, step))  # T5's wo in fp32 in fp16, a v1.1 lm_head
    notes += filter(None, [_experts_note(model, result)])
    if result.quant:  # bitsandbytes modules, as from_pretrained(quantization_config=...) makes them
        quantized.quantize_on_meta(model, result.quant.options)
        notes.append(f"{result.quant.options.type} weights quantized by bitsandbytes on fake tensors; its 4-bit "
                     "matmuls run as its CPU kernel does (the whole weight dequantized, then a linear)")
    if result.peft_options:
        model = apply_real_peft(model, result)
    with FakeTensorMode(allow_non_fake_inputs=True), _cpu_grouped_mm():  # peft keeps index tensors as attributes
        _fake_tensors(model)
        kept = quantized.fake_quantize(model, result.quant.options) if result.quant else []
        if step.grad_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        parameters = [p for p in model.parameters()]
        trainable = [p for p in parameters if p.requires_grad]
        optimizer = _optimizer(step, trainable)
        encoder_decoder = bool(getattr(hf, "is_encoder_decoder", False))
        inputs, second_inputs = (_inputs(result, step, encoder_decoder) for _ in range(2))
        for tensor in [*parameters, *model.buffers(), *kept]:
            tracker.track(tensor, "parameters")
        matmuls = (quantized.decomposed_4bit_matmuls if result.quant and result.quant.options.type != "int8"
                   else contextlib.nullcontext)
        counter = FlopCounterMode(display=False, custom_mapping=_flop_formulas())
        autocast = (torch.autocast("cpu", dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[step.mixed_precision])
                    if step.mixed_precision else contextlib.nullcontext())
        flops = {}
        with tracker:
            # Two steps: the first counts FLOPs; the second is the steady state users live in, where the
            # optimizer state made by the first step is alive throughout forward and backward.
            with counter, matmuls():
                _one_step(model, inputs, optimizer, autocast, tracker, result, flops, counter)
            if steady:
                optimizer.zero_grad(set_to_none=True)
                tracker.reset_peak()
                with matmuls():
                    _one_step(model, second_inputs, optimizer, autocast, tracker, result)
        del inputs
        flops["total"] = flops["forward"] + flops["backward"] + flops["optimizer"]
        grads = {id(p.grad.untyped_storage()) for p in trainable if p.grad is not None}
        states = {id(t.untyped_storage()) for state in optimizer.state.values() for t in state.values()
                  if isinstance(t, torch.Tensor)}
        after_step = _categorise(list(tracker.live.values()), grads, states)
    at_peak = _categorise(tracker.snapshot, grads, states)
    return TraceReport(type(model).__name__, tracker.peak, at_peak, after_step, flops, tracker.peak_phase,
                       dict(tracker.phase_peaks), notes, step.attention)


def _one_step(model, inputs, optimizer, autocast, tracker, result, flops=None, counter=None) -> None:
    """forward, backward and optimizer.step(), with the tracker told which phase is running."""
    tracker.phase = "forward"
    with autocast:
        try:
            loss = _loss(model(**inputs))
        except (ValueError, ZeroDivisionError, RuntimeError) as exc:
            if "DynamicOutputShape" in type(exc).__name__ or "DataDependent" in type(exc).__name__:
                hint = ("; its experts run as experts_implementation='eager', which picks the experts hit "
                        "(nonzero): grouped_mm, transformers' default, can be traced"
                        if getattr(getattr(model, "config", None), "_experts_implementation", None) == "eager"
                        and result.config.get("experts_implementation") == "eager" else "")
                raise ParamcalcError(f"{result.hf_class} looks at the token values ({exc}), which fake "
                                     f"tensors do not have; it cannot be traced{hint}") from None
            raise ParamcalcError(f"transformers cannot run this {result.hf_class}: "
                                 f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    del inputs
    done = counter.get_total_flops() if counter else 0
    if flops is not None:
        flops["forward"] = done
    tracker.phase = "backward"
    if not loss.requires_grad:
        raise ParamcalcError("no trainable parameter takes part in this forward pass, so there is no "
                             "backward to trace")
    loss.backward()
    del loss
    if flops is not None:
        flops["backward"] = counter.get_total_flops() - done
    tracker.phase = "optimizer"
    optimizer.step()
    if flops is not None:
        flops["optimizer"] = counter.get_total_flops() - flops["forward"] - flops["backward"]
    tracker.phase = "idle"


def _categorise(storages, grads: set[int], states: set[int]) -> dict[str, int]:
    totals = dict.fromkeys(CATEGORIES, 0)
    for size, phase, ref in storages:
        storage = ref()
        key = id(storage) if storage is not None else None
        if phase == "parameters":
            category = "parameters"
        elif key in grads:
            category = "gradients"
        elif key in states:
            category = "optimizer"
        elif phase == "forward":
            category = "activations"
        else:
            category = "transient"
        totals[category] += size
    return totals


def _fake_tensors(model) -> None:
    """Replace the meta parameters and buffers with fake CPU tensors, keeping tied tensors tied."""
    import torch

    twins = {}
    for module in model.modules():
        for name, tensor in list(module._parameters.items()):
            if tensor is not None:
                if id(tensor) not in twins:
                    twins[id(tensor)] = torch.nn.Parameter(torch.empty(tensor.shape, dtype=tensor.dtype),
                                                           requires_grad=tensor.requires_grad)
                module._parameters[name] = twins[id(tensor)]
        for name, tensor in list(module._buffers.items()):
            if tensor is not None:
                if id(tensor) not in twins:
                    twins[id(tensor)] = torch.zeros(tensor.shape, dtype=tensor.dtype)
                module._buffers[name] = twins[id(tensor)]
