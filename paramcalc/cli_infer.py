"""``paramcalc MODEL --infer``: the options of an inference plan and the checks of how they combine with the count
command's (parse and call; ``paramcalc.inference`` plans, ``paramcalc.report_inference`` renders)."""

from __future__ import annotations

import click

from .errors import ParamcalcError

# count options that describe a training step, not generate(): refused with --infer, with what to give instead
TRAINING_ONLY = {"seq": "give the prompt's length as --context", "tgt_seq": "", "mixed_precision": "give --dtype",
                 "optimizer": "", "grad_checkpointing": "", "grad_accum": "", "gpus": "", "zero": "", "fsdp": ""}
INFERENCE_ONLY = ("context", "new_tokens", "kv_dtype", "fit_context")


def inference_options(command):
    options = [
        click.option("--infer", is_flag=True,
                     help="Plan inference instead of a training step: weights, KV cache and the prefill / decode peaks "
                          "of greedy generate() (decoder-only models; the causal LM head)."),
        click.option("--context", type=int, default=None, help="--infer: tokens in each prompt."),
        click.option("--new-tokens", type=int, default=None, help="--infer: tokens generated per prompt (default 1)."),
        click.option("--kv-dtype", type=click.Choice(("fp32", "fp16", "bf16", "fp8")), default=None,
                     help="--infer: the KV cache's dtype (default: the model's; fp8 as serving engines store it)."),
        click.option("--fit-context", is_flag=True,
                     help="--infer: find the longest --context that fits the device's memory."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def check(infer: bool, values: dict) -> None:
    """Refuse options that do not go together with (or without) --infer, in one line."""
    ctx = click.get_current_context()
    given = {name for name in (*TRAINING_ONLY, *INFERENCE_ONLY)
             if ctx.get_parameter_source(name) not in (click.core.ParameterSource.DEFAULT, None)}
    if not infer:
        for name in INFERENCE_ONLY:
            if name in given:
                raise ParamcalcError(f"--{name.replace('_', '-')} plans inference: add --infer")
        return
    for name, instead in TRAINING_ONLY.items():
        if name in given:
            raise ParamcalcError(f"--{name.replace('_', '-')} describes a training step, not generate()"
                                 + (f"; {instead}" if instead else "; drop it with --infer"))
    if values["fit_context"] and values["fit_batch"]:
        raise ParamcalcError("--fit-context and --fit-batch each search one size: give one of them")
    if values["context"] is None and not values["fit_context"]:
        raise ParamcalcError("--infer needs --context N (the tokens in each prompt), or --fit-context with a device")


def inference_task(model, task: str) -> str:
    """The head --infer counts: generate() runs the causal LM head, so the default task (base) becomes causal-lm where
    the model's family is decoder-only (others keep it, and ``inference.supported`` says why they are refused)."""
    from . import configs, families

    if task != "base" or configs.is_factory_spec(model) or callable(model):
        return task
    try:
        family = families.family_for(configs.resolve(model).config.get("model_type"))
    except ParamcalcError:
        return task  # (counting it says what is wrong)
    decoder = family is not None and "causal-lm" in family.tasks and "seq2seq-lm" not in family.tasks
    return "causal-lm" if decoder else task


def plan_inference(result, values: dict):
    """The inference plan the count command's options ask for."""
    from .inference import Inference, fit_batch, fit_context, infer

    run = Inference(batch=1 if values["batch"] is None else values["batch"],
                    context=1 if values["context"] is None else values["context"],
                    new_tokens=1 if values["new_tokens"] is None else values["new_tokens"], dtype=values["dtype"],
                    kv_dtype=values["kv_dtype"], attention=values["attention"])
    device, device_mem = values["device"], values["device_mem"]
    if values["fit_context"]:
        return fit_context(result, run, device, device_mem)
    if values["fit_batch"]:
        return fit_batch(result, run, device, device_mem)
    return infer(result, run, device, device_mem)


def inference_table(planned):
    """The plan's table (rich renderables)."""
    from .report_inference import inference_table as table

    return table(planned)
