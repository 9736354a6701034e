"""Real models for real training steps, built the way the prediction assumes.

The model comes from the counted config with seeded random weights (memory and speed do not depend on
the values), or from a local checkpoint folder (``--weights``); nothing is ever downloaded. Then, as
the step asks: the parameter dtype, the attention kernel, a bitsandbytes-quantized base, the PEFT
method (peft itself), gradient checkpointing, and the optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

from .errors import ParamcalcError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def check_weights_dir(path) -> Path:
    """A local checkpoint folder holding weights, or a one-line error."""
    folder = Path(path)
    if not folder.is_dir():
        raise ParamcalcError(f"--weights {path}: no such folder (give a local checkpoint folder; nothing is "
                             "downloaded)")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ParamcalcError(f"--weights {path}: the folder holds no weights ({' or '.join(WEIGHT_FILES[::2])})")
    return folder


def hf_config_for(result, step, device: str = "cpu", batches=None):
    """The transformers config of ``result``, ready to build the model the step runs: the attention kernel
    the prediction assumed, and the pad / decoder-start ids the batches use."""
    from .meta import hf_config
    from .step import attn_implementation

    hf = hf_config(result.config)
    if batches is not None:
        batches.fill_config(hf)
    else:  # the same ids the batches would give
        from .data import make_batches

        make_batches(result, batch=1, seq=1).fill_config(hf)
    hf._attn_implementation = attn_implementation(step, "cuda" if device.startswith("cuda") else "cpu")
    return hf


@contextlib.contextmanager
def default_dtype(name: str):
    """Build new tensors in ``name`` (fp32, fp16, bf16) inside the block, as a model built in that dtype."""
    import torch

    before = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, TORCH_DTYPES[name]))
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def as_loaded(model, config: dict, dtype: str = "fp32"):
    """``model``, built from ``config`` (paramcalc's normalised config dict) by its class, made what
    ``from_pretrained`` of a checkpoint in ``dtype`` gives and paramcalc counts; every builder of a model from
    a config goes through here (``--verify``'s meta model, ``paramcalc train``'s seeded model, the traced and
    the quantized ones). With ``--weights DIR`` transformers' loading does it itself.

    Two differences: loading keeps some parameters in fp32 (``keep_in_fp32``), and it leaves a head untied
    that the class ties to its input embeddings whatever the config says (``untie_output_embeddings``)."""
    keep_in_fp32(model, dtype)
    untie_output_embeddings(model, config)
    return model


def keep_in_fp32(model, dtype: str) -> None:
    """Upcast what loading in ``dtype`` keeps in fp32: in fp16 the model's ``_keep_in_fp32_modules`` (T5's
    ``wo``), in fp16 or bf16 its ``_keep_in_fp32_modules_strict``. transformers' loader takes them from the
    model's ``_get_dtype_plan(dtype)`` and upcasts every parameter whose name one of its patterns matches (a
    regex search, ``*`` for any text); building the class alone upcasts nothing."""
    import re

    import torch

    plan = model._get_dtype_plan(getattr(torch, TORCH_DTYPES[dtype]))
    for key, kept in plan.items():
        pattern = re.compile(key.replace("*", ".*"))
        for name, parameter in model.named_parameters():
            if pattern.search(name):
                parameter.data = parameter.data.to(kept)


def untie_output_embeddings(model, config: dict) -> None:
    """Give the output embedding (``lm_head``) its own parameter when a family's config says
    ``tie_word_embeddings: false`` but the class tied it anyway, as loading the released checkpoint does.

    T5 is that family: transformers 5's T5Config forces ``tie_word_embeddings=True`` (T5Config.__post_init__),
    so ``T5ForConditionalGeneration(config)`` ties ``lm_head`` to ``shared``; a v1.1 checkpoint stores both
    with different values and ``from_pretrained`` leaves them untied (modeling_utils.py,
    PreTrainedModel.tie_weights, which also drops ``lm_head.weight`` from ``all_tied_weights_keys``). A
    model with no family file is left as transformers builds it (LongT5 checkpoints store ``shared`` only).

    The new weight has the tied one's shape, dtype and device (meta included) and the values
    T5PreTrainedModel._init_weights gives an untied ``lm_head`` (normal, std ``initializer_factor``), so a
    seeded build differs from ``shared`` as a checkpoint does. Nothing ties it back: ``get_peft_model`` and
    gradient checkpointing do not tie; an explicit ``model.tie_weights()`` re-ties it, as it does a loaded one.
    """
    from . import families

    if families.family_for(config.get("model_type")) is None or config.get("tie_word_embeddings") is not False:
        return
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embeddings is None or head.weight is not embeddings.weight:
        return  # no head (T5Model, the classifiers), or one the class already builds untied (GPT-2, BLOOM...)
    import torch

    tied = head.weight
    head.weight = torch.nn.Parameter(torch.empty_like(tied), requires_grad=tied.requires_grad)
    torch.nn.init.normal_(head.weight, mean=0.0, std=getattr(model.config, "initializer_factor", 1.0))
    name = next(name for name, module in model.named_modules() if module is head)
    getattr(model, "all_tied_weights_keys", {}).pop(f"{name}.weight", None)


def build_model(result, step, seed: int = 0, weights=None, device: str = "cpu", batches=None):
    """The Hugging Face model of ``result`` for ``step`` (its attention resolved: see
    ``step.resolve_attention``), PEFT applied, checkpointing on if asked, in training mode on ``device``."""
    import torch
    import transformers

    from .verify import apply_real_peft

    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.disable_progress_bar()  # from_pretrained's bar would break paramcalc's own
    hf = hf_config_for(result, step, device, batches)
    torch.manual_seed(seed)
    cls = _model_class(result)
    try:
        if result.quant is not None:
            from .quantized import build_quantized_model

            model = build_quantized_model(result, seed=seed, weights_dir=weights, attention=hf._attn_implementation)
        elif weights is not None:
            model = cls.from_pretrained(str(check_weights_dir(weights)), config=hf, local_files_only=True,
                                        dtype=getattr(torch, TORCH_DTYPES[step.dtype]))
        else:
            with default_dtype(step.dtype):
                model = cls(hf)
            model = as_loaded(model, result.config, step.dtype)  # what loading a checkpoint in this dtype gives
    except (OSError, ValueError, RuntimeError, TypeError) as exc:
        if type(exc).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(exc):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:240]
        raise ParamcalcError(f"cannot build {result.hf_class} for training: {first}") from None
    if result.quant is None:
        model = model.to(device)
    if result.peft_options:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = apply_real_peft(model, result)  # adapters: tuners.adapter.inject, real modules run by hooks
    if step.grad_checkpointing:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the method's name is deprecated in transformers 5; its effect is not
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _model_class(result):
    import transformers

    if result.generic:
        from .meta import AUTO_CLASSES

        auto = getattr(transformers, AUTO_CLASSES[result.task])
        return lambda hf: auto.from_config(hf)
    return getattr(transformers, result.hf_class)


def make_optimizer(name: str, parameters, lr: float):
    """The optimizer the step names, with torch's defaults otherwise (what a user gets)."""
    import torch

    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        raise ParamcalcError("nothing to train: no parameter of this model requires a gradient")
    if name in ("adamw", "adam"):
        return (torch.optim.AdamW if name == "adamw" else torch.optim.Adam)(parameters, lr=lr)
    if name in ("sgd", "sgd-momentum"):
        return torch.optim.SGD(parameters, lr=lr, momentum=0.9 if name == "sgd-momentum" else 0.0)
    if name == "adamw-8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(parameters, lr=lr)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(parameters, lr=lr, relative_step=False, scale_parameter=False)
    raise ParamcalcError(f"unknown optimizer {name!r}")
