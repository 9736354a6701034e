"""The real bitsandbytes-quantized model for a ``--quant`` count, built on the CPU, offline.

``build_quantized_model(result)`` gives what a user gets from
``AutoModelFor...from_pretrained(checkpoint, quantization_config=BitsAndBytesConfig(...), dtype=...)``:
transformers swaps its Linear/Conv1D modules for bitsandbytes' ``Linear4bit``/``Linear8bitLt`` and
quantizes the weights as they load. Without a checkpoint the weights are the model's own seeded random
initialisation, handed to ``from_pretrained`` as a state dict (nothing is written to disk, nothing is
downloaded); with ``weights_dir`` they come from that local checkpoint.

What it does not do: ``peft.prepare_model_for_kbit_training``. QLoRA tutorials call it; for the weights
it freezes every parameter (``get_peft_model`` freezes the base anyway) and upcasts fp16/bf16 parameters
to fp32 (a no-op with the default ``dtype=fp32``), and by default it turns on (reentrant) gradient
checkpointing. paramcalc's step says whether layers are checkpointed (``--grad-checkpointing``, which
its caller applies, as for any model) and ``--quant ...,dtype=`` which dtype the weights left
unquantized have, so the model returned is the loaded one, and the memory model describes that.

torch, transformers and bitsandbytes are imported inside the function (the analytic path stays light).
"""

from __future__ import annotations

import os

from .errors import ParamcalcError
from .quant import BLOCK

from .runtime import TORCH_DTYPES


def bnb_config(options):
    """transformers' ``BitsAndBytesConfig`` for ``--quant`` options (a ``paramcalc.quant.Options``)."""
    import torch
    import transformers

    if options.type == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=options.type, bnb_4bit_use_double_quant=options.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, TORCH_DTYPES[options.compute_dtype]))


def build_quantized_model(result, seed: int = 0, weights_dir: str | os.PathLike | None = None,
                          attention: str | None = None, config=None):
    """The bitsandbytes-quantized Hugging Face model of ``result`` (a ``paramcalc.count(..., quant=...)``).

    ``seed`` seeds the random weights (when no ``weights_dir``); ``weights_dir`` is a local checkpoint
    (a ``save_pretrained`` folder) to quantize instead; ``attention`` is transformers'
    ``attn_implementation`` (``eager``, ``sdpa``; None or ``auto``: transformers' default); ``config`` a transformers
    config to build with instead of one made from ``result.config``. The model is on the CPU, in train
    mode, loaded as transformers loads it: quantized weights frozen, every other parameter trainable until
    peft (e.g. ``paramcalc.verify.apply_real_peft(model, result)``) freezes the base.
    """
    if result.quant is None:
        raise ParamcalcError("build_quantized_model needs a count with --quant (e.g. quant='nf4')")
    if result.generic:
        raise ParamcalcError("--quant needs a formula file (bert, roberta, t5, gpt2, bloom)")
    if weights_dir is not None and not os.path.isfile(os.path.join(weights_dir, "config.json")):
        raise ParamcalcError(f"{weights_dir} is not a local checkpoint folder (it has no config.json)")
    import torch
    import transformers

    from .meta import hf_config

    options = result.quant.options
    config = config if config is not None else hf_config(result.config)
    if result.task == "seq-cls" and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0  # GPT-2/BLOOM find each sequence's last token by padding: any id runs
    cls = getattr(transformers, result.hf_class)
    dtype = getattr(torch, TORCH_DTYPES[options.dtype])
    kwargs = {"config": config, "quantization_config": bnb_config(options), "device_map": "cpu", "dtype": dtype,
              "local_files_only": True}
    if attention not in (None, "auto"):
        config._attn_implementation = kwargs["attn_implementation"] = attention
    state = torch.random.get_rng_state()
    try:
        if weights_dir is None:
            torch.manual_seed(seed)
            source = cls(config)
            weights = source.state_dict()
            del source
            model = cls.from_pretrained(None, state_dict=weights, **kwargs)
            del weights
        else:
            model = cls.from_pretrained(os.fspath(weights_dir), **kwargs)
    finally:
        torch.random.set_rng_state(state)
    return model.train()


# --- the same model on fake tensors, for ``paramcalc trace`` ---------------------------------------------

def _skipped(model, options) -> tuple[object, list[str]]:
    """transformers' BitsAndBytesConfig and the modules from_pretrained leaves unquantized: tied and output
    embeddings, the module of the last parameter, ``_keep_in_fp32_modules``."""
    from transformers.quantizers import AutoHfQuantizer

    config = bnb_config(options)
    quantizer = AutoHfQuantizer.from_config(config)
    return config, quantizer.get_modules_to_not_convert(model, config.llm_int8_skip_modules,
                                                        model._keep_in_fp32_modules)


def quantize_on_meta(model, options) -> None:
    """Swap the Linear/Conv1D modules of a meta-device model for bitsandbytes ones, as ``from_pretrained``
    does before it loads weights (the same modules skipped: see ``_skipped``)."""
    from transformers.integrations import replace_with_bnb_linear

    config, skip = _skipped(model, options)
    replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=config)
    for module in model.modules():  # loading gives the biases new, trainable parameters; weights stay frozen
        if module.__module__.startswith("bitsandbytes") and getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)


def freeze_quantized(model, options) -> list[str]:
    """Without swapping modules (shapes stay as the model declares them, Conv1D's included): freeze the
    weights ``from_pretrained`` would quantize, as it does, and return their modules' names. For
    ``--verify`` of a quantized count, on the meta model before peft is applied."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.quantizers_utils import should_convert_module

    _, skip = _skipped(model, options)
    names = []
    for name, module in model.named_modules():
        if (isinstance(module, Conv1D) or type(module) is torch.nn.Linear) and should_convert_module(name, skip):
            module.weight.requires_grad_(False)
            names.append(name)
    return names


def fake_quantize(model, options) -> list:
    """Inside ``FakeTensorMode``, after the model's tensors became fake: quantize each bitsandbytes
    module's weight as loading would (bitsandbytes' own fake kernels give the packed tensor and its
    absmax), and return the quantization state tensors the model now keeps beside its parameters.

    A fake tensor cannot become a ``Params4bit``/``Int8Params`` subclass, so the weight is a plain
    frozen parameter carrying the attributes the bitsandbytes modules read (``quant_state``; ``CB``/``SCB``).
    """
    import bitsandbytes as bnb
    import torch

    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():  # double quantization's 8-bit code is built from Python floats
        bnb.functional.name2qmap.setdefault("dynamic", bnb.functional.create_dynamic_map())
    kept = []
    for module in model.modules():
        weight = module._parameters.get("weight")
        if isinstance(module, bnb.nn.Linear4bit):
            settings = {"blocksize": BLOCK, "compress_statistics": options.double_quant, "quant_type": options.type,
                        "quant_storage": module.quant_storage}
            packed, state = bnb.functional.quantize_4bit(torch.empty(weight.shape, dtype=weight.dtype), **settings)
            parameter = torch.nn.Parameter(packed, requires_grad=False)
            parameter.quant_state, parameter.bnb_quantized, parameter.module = state, True, module
            for key, value in settings.items():
                setattr(parameter, key, value)
            module._parameters["weight"], module.quant_state = parameter, state
            kept += [state.absmax, state.code]
            if state.nested:  # each weight keeps its own copy of the code, as when it is loaded
                state.state2.code = torch.empty(state.state2.code.shape, dtype=state.state2.code.dtype)
                kept += [state.state2.absmax, state.state2.code, state.offset]
        elif isinstance(module, bnb.nn.Linear8bitLt):
            values = torch.empty(weight.shape, dtype=torch.int8)  # int8_vectorwise_quant: values, row scales
            scales = torch.empty(weight.shape[0], dtype=torch.float32)
            parameter = torch.nn.Parameter(values, requires_grad=False)
            parameter.CB, parameter.SCB, parameter.has_fp16_weights = values, scales, False
            module._parameters["weight"] = parameter
            kept.append(scales)
    return kept


def decomposed_4bit_matmuls():
    """A dispatch mode that runs bitsandbytes' 4-bit matmul as its CPU kernel does (dequantize the whole
    weight, then ``linear``) instead of its fake kernel, which allocates only the output: so a trace sees
    the dequantized weight every 4-bit matmul makes. Enter it inside the mode that tracks memory."""
    import torch
    from bitsandbytes.backends.default.ops import _gemm_4bit_default_impl
    from torch.utils._python_dispatch import TorchDispatchMode

    class Decomposed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.bitsandbytes.gemm_4bit.default:
                return _gemm_4bit_default_impl(*args, **(kwargs or {}))
            return func(*args, **(kwargs or {}))

    return Decomposed()
