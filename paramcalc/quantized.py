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

``build_quantized_meta_model(result)`` is the same model on the meta device, packed as loading packs it
(parameter names, shapes, dtypes and quantization state, no values), in well under a second for BLOOM-560m;
``stored_bytes`` gives the bytes a parameter or a model really keeps, bitsandbytes' quantization state
included.

torch, transformers and bitsandbytes are imported inside the functions (the analytic path stays light).
"""

from __future__ import annotations

import os

from .errors import ParamcalcError
from .quant import BLOCK

from .runtime import TORCH_DTYPES, as_loaded


def bnb_config(options):
    """transformers' ``BitsAndBytesConfig`` for ``--quant`` options (a ``paramcalc.quant.Options``)."""
    import torch
    import transformers

    if options.type == "int8":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=options.type, bnb_4bit_use_double_quant=options.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, TORCH_DTYPES[options.compute_dtype]))


def _model_class_and_config(result, config, attention):
    """The transformers class and config the real and the meta builders build from, after refusing a count
    neither can build."""
    if result.quant is None:
        raise ParamcalcError("build_quantized_model needs a count with --quant (e.g. quant='nf4')")
    if result.generic:
        raise ParamcalcError("--quant needs a formula file (bert, roberta, t5, gpt2, bloom)")
    import transformers

    from .meta import hf_config

    config = config if config is not None else hf_config(result.config)
    if result.task == "seq-cls" and getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0  # GPT-2/BLOOM find each sequence's last token by padding: any id runs
    if attention not in (None, "auto"):
        config._attn_implementation = attention
    return getattr(transformers, result.hf_class), config


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
    if weights_dir is not None and not os.path.isfile(os.path.join(weights_dir, "config.json")):
        raise ParamcalcError(f"{weights_dir} is not a local checkpoint folder (it has no config.json)")
    cls, config = _model_class_and_config(result, config, attention)
    import torch

    options = result.quant.options
    dtype = getattr(torch, TORCH_DTYPES[options.dtype])
    kwargs = {"config": config, "quantization_config": bnb_config(options), "device_map": "cpu", "dtype": dtype,
              "local_files_only": True}
    if attention not in (None, "auto"):
        kwargs["attn_implementation"] = attention
    state = torch.random.get_rng_state()
    try:
        if weights_dir is None:
            torch.manual_seed(seed)
            source = as_loaded(cls(config), result.config)  # a v1.1 T5 head of its own, as a checkpoint has
            weights = source.state_dict()
            del source
            model = cls.from_pretrained(None, state_dict=weights, **kwargs)
            del weights
        else:
            model = cls.from_pretrained(os.fspath(weights_dir), **kwargs)
    finally:
        torch.random.set_rng_state(state)
    return model.train()


def build_quantized_meta_model(result, attention: str | None = None, config=None):
    """``build_quantized_model(result)`` on the meta device: every parameter as loading stores it (packed
    ``Params4bit``/``Int8Params`` weights with their quantization state, the rest in ``--quant ...,dtype=``),
    with names, shapes and dtypes but no values. For counts and bytes at full size: BLOOM-560m takes about
    0.05 s (0.6 s the first time in a process), where building it with random weights and quantizing them
    takes 15 to 30 s on a 2-core CPU.

    ``attention`` and ``config`` as for ``build_quantized_model``. In train mode, quantized weights frozen,
    every other parameter trainable (as loaded, before peft).
    """
    cls, config = _model_class_and_config(result, config, attention)
    import torch

    from .runtime import default_dtype

    options = result.quant.options
    with default_dtype(options.dtype), torch.device("meta"):
        model = cls(config)
    as_loaded(model, result.config, options.dtype)
    quantize_on_meta(model, options, pack=True)
    return model.train()


# --- bitsandbytes' modules on the meta device -------------------------------------------------------------

def _skipped(model, options) -> tuple[object, list[str]]:
    """transformers' BitsAndBytesConfig and the modules from_pretrained leaves unquantized: tied and output
    embeddings, the module of the last parameter, ``_keep_in_fp32_modules``."""
    from transformers.quantizers import AutoHfQuantizer

    config = bnb_config(options)
    quantizer = AutoHfQuantizer.from_config(config)
    return config, quantizer.get_modules_to_not_convert(model, config.llm_int8_skip_modules,
                                                        model._keep_in_fp32_modules)


def quantize_on_meta(model, options, pack: bool = False) -> None:
    """Swap the Linear/Conv1D modules of a meta-device model for bitsandbytes ones, as ``from_pretrained``
    does before it loads weights (the same modules skipped: see ``_skipped``).

    The swapped modules hold full-size weights, as before loading: ``sum(p.numel())`` is still the real
    count. ``pack=True`` then quantizes each weight as loading does (``pack_on_meta``), so the model counts,
    prints and stores as a loaded one. Build the model in ``options.dtype`` first (or use
    ``build_quantized_meta_model``): loading leaves the unquantized parameters in that dtype.
    """
    from transformers.integrations import replace_with_bnb_linear

    from .runtime import default_dtype

    config, skip = _skipped(model, options)
    with default_dtype(options.dtype):  # loading gives the new modules' weights and biases this dtype
        replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=config)
    for module in model.modules():  # loading gives the biases new, trainable parameters; weights stay frozen
        if module.__module__.startswith("bitsandbytes") and getattr(module, "bias", None) is not None:
            module.bias.requires_grad_(True)
    _mark_as_loaded(model, config)
    if pack:
        pack_on_meta(model)


def _mark_as_loaded(model, config) -> None:
    """The marks ``from_pretrained`` leaves on a bitsandbytes model (its quantizer's ``preprocess_model`` and
    ``postprocess_model``), which others read: peft wraps a ``Linear4bit``/``Linear8bitLt`` in its
    bitsandbytes LoRA layers only when ``is_loaded_in_4bit``/``is_loaded_in_8bit`` is set, and
    transformers' ``num_parameters()`` doubles packed 4-bit tensors only then."""
    model.is_quantized = True
    model.quantization_method = config.quant_method
    model.config.quantization_config = config
    setattr(model, "is_loaded_in_4bit" if config.load_in_4bit else "is_loaded_in_8bit", True)


def pack_on_meta(model) -> None:
    """Quantize every bitsandbytes weight of a meta-device model as loading does, without values.

    Loading wraps each weight in a ``Params4bit``/``Int8Params`` and moves it to its device, and that move
    quantizes it (their ``to`` calls ``_quantize``): ``functional.quantize_4bit`` for a ``Linear4bit``,
    ``functional.int8_vectorwise_quant`` of an fp16 copy for a ``Linear8bitLt``. The same public functions
    run here on meta tensors, where bitsandbytes' fake kernels give the packed weight and its state their
    real shapes and dtypes. A weight already packed is left as it is.
    """
    import bitsandbytes as bnb
    import torch

    _keep_dynamic_code_off_meta()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and not module.weight.bnb_quantized:
            _pack_4bit(module)
        elif isinstance(module, bnb.nn.Linear8bitLt) and module.weight.dtype != torch.int8:
            _pack_int8(module)


def _keep_dynamic_code_off_meta() -> None:
    """Double quantization quantizes the absmax with bitsandbytes' 8-bit 'dynamic' code, which it builds once
    and caches (``functional.name2qmap``) on the device of the first tensor it quantizes: build it on the CPU
    first, or a meta (or fake) code would be cached and a later real quantization in this process fail."""
    import bitsandbytes as bnb

    bnb.functional.name2qmap.setdefault("dynamic", bnb.functional.create_dynamic_map())


def _pack_4bit(module) -> None:
    """What ``Params4bit._quantize`` does: the weight becomes the packed uint8 tensor (two values a byte); its
    ``QuantState`` (an absmax per block of 64, the 16-entry code; with double quantization uint8 absmax, an
    offset and a nested state) goes on the parameter and on the module, which reads it in forward."""
    import bitsandbytes as bnb

    weight = module.weight
    settings = {"blocksize": weight.blocksize, "compress_statistics": weight.compress_statistics,
                "quant_type": weight.quant_type, "quant_storage": weight.quant_storage}
    packed, state = bnb.functional.quantize_4bit(weight.data, **settings)
    module.weight = bnb.nn.Params4bit(packed, requires_grad=False, quant_state=state, module=module,
                                      bnb_quantized=True, **settings)
    module.quant_state = state


def _pack_int8(module) -> None:
    """What ``Int8Params._quantize`` does: the weight's fp16 copy is quantized row by row into int8 values
    (``CB``, which is the weight's data) and one fp32 scale per output row (``SCB``)."""
    import bitsandbytes as bnb
    import torch

    weight = module.weight
    values, scales, _ = bnb.functional.int8_vectorwise_quant(weight.data.to(torch.float16))
    module.weight = bnb.nn.Int8Params(values, requires_grad=False, has_fp16_weights=weight.has_fp16_weights,
                                      CB=values, SCB=scales)


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


# --- bytes as stored --------------------------------------------------------------------------------------

def quantization_tensors(owner) -> list:
    """The tensors bitsandbytes keeps beside quantized weights (the packed weights themselves left out), for
    a parameter or a module and its submodules.

    A ``Params4bit`` keeps a ``QuantState``: absmax and code, and with double quantization an offset and a
    nested state with absmax and code of its own (every weight its own copies). An ``Int8Params`` keeps
    ``CB`` (its own data) and ``SCB`` (row scales); a ``Linear8bitLt`` moves both to its ``state`` (a
    ``MatmulLtState``) in its first forward (``init_8bit_state``), so a module's state is read too.
    """
    import torch

    if isinstance(owner, torch.Tensor):
        held = [getattr(owner, "CB", None), getattr(owner, "SCB", None)]
        return [*_state_tensors(getattr(owner, "quant_state", None)), *(t for t in held if torch.is_tensor(t))]
    found = []
    for module in owner.modules():
        for parameter in module._parameters.values():
            if parameter is not None:
                found += quantization_tensors(parameter)
        state = getattr(module, "state", None)
        if type(state).__module__.startswith("bitsandbytes"):
            found += [value for value in vars(state).values() if torch.is_tensor(value)]
    return found


def _state_tensors(state) -> list:
    """Every tensor of a bitsandbytes ``QuantState`` (None: none), its nested ``state2`` included."""
    import torch

    found = []
    for value in vars(state).values() if state is not None else ():
        if torch.is_tensor(value):
            found.append(value)
        elif type(value) is type(state):
            found += _state_tensors(value)
    return found


def stored_bytes(owner, buffers: bool = False) -> int:
    """The bytes a parameter, or every parameter of a module, really stores: the tensors and bitsandbytes'
    quantization state beside them (``quantization_tensors``), each storage counted once (a tied weight;
    an ``Int8Params`` and its ``CB``); with ``buffers=True`` a module's buffers too. Works on meta tensors,
    which have sizes but no addresses.

    Without buffers, a model loaded with ``--quant`` options stores ``result.quant.weight_bytes``. Its
    ``get_memory_footprint()`` counts parameters and buffers but leaves the quantization state out.
    """
    import torch

    if isinstance(owner, torch.Tensor):
        tensors = [owner]
    else:
        tensors = [*owner.parameters(), *(owner.buffers() if buffers else ())]
    storages = {}
    for tensor in tensors + quantization_tensors(owner):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr() or id(storage)] = storage  # meta storages all have address 0
    return sum(storage.nbytes() for storage in storages.values())


# --- the same model on fake tensors, for ``paramcalc trace`` ---------------------------------------------

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
        _keep_dynamic_code_off_meta()
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
