"""Build real Hugging Face models on the meta device (shapes only, no memory, no download).

The one place paramcalc imports transformers to construct models; the verifier
and the generic counter both go through it.
"""

from __future__ import annotations

import logging

from .errors import ParamcalcError

AUTO_CLASSES = {
    "base": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq-cls": "AutoModelForSequenceClassification",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "token-cls": "AutoModelForTokenClassification",
}


def hf_config(config: dict):
    """A ``transformers`` config object from a plain config dict."""
    import transformers

    transformers.logging.set_verbosity_error()  # token-id range warnings are noise for counting
    # peft imports bitsandbytes when installed, which warns about optional CPU kernels it cannot fetch
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    model_type = config.get("model_type")
    if model_type not in transformers.CONFIG_MAPPING:
        import difflib

        close = difflib.get_close_matches(str(model_type), list(transformers.CONFIG_MAPPING), n=3)
        raise ParamcalcError(
            f"unknown model_type {model_type!r}: transformers has no such model"
            + (f"; did you mean {', '.join(close)}?" if close else "")
        )
    values = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    if "id2label" in values and "num_labels" in values and len(values["id2label"]) != values["num_labels"]:
        values.pop("id2label")  # --num-labels wins over the labels a checkpoint was saved with
        values.pop("label2id", None)
    try:
        return transformers.AutoConfig.for_model(config["model_type"], **values)
    except Exception as exc:  # transformers raises ValueError, TypeError, StrictDataclass errors...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first_line = first_line if len(first_line) < 300 else first_line[:297] + "..."
        raise ParamcalcError(f"transformers rejects this config: {first_line}") from None


def config_keys(config: dict) -> dict:
    """Every key the transformers config class of ``config`` knows, with its value (for --set checks)."""
    keys = hf_config(config).to_dict()
    keys.setdefault("num_labels", len(keys.get("id2label") or {}) or 2)
    return keys


def build_meta_model(config: dict, class_name: str | None = None, task: str = "base"):
    """Instantiate the model on the meta device: every parameter has its real shape, no storage; the model
    ``from_pretrained`` gives (``runtime.as_loaded``: a T5 v1.1 ``lm_head`` of its own), not the one the
    class alone builds."""
    import torch
    import transformers

    from .runtime import as_loaded

    hf = hf_config(config)
    try:
        with torch.device("meta"):
            if class_name:
                model = getattr(transformers, class_name)(hf)
            else:
                model = getattr(transformers, AUTO_CLASSES[task]).from_config(hf)
    except Exception as exc:  # no mapping for this task, padding_idx out of range, sizes too large...
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ParamcalcError(f"transformers cannot build this model for task {task!r}: {first_line}") from None
    return as_loaded(model, config)
