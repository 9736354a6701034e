"""The ``paramcalc`` command: a thin click layer over the library.

Commands parse arguments and render; all logic lives in ``paramcalc.counting``
and friends. Bad input becomes a one-line error with exit status 2.
"""

from __future__ import annotations

import sys

import click

from .cli_infer import check as check_inference, inference_options, inference_table, inference_task, plan_inference
from .errors import ParamcalcError

TASKS = ("base", "causal-lm", "masked-lm", "seq-cls", "seq2seq-lm", "token-cls")


class InputError(click.ClickException):
    exit_code = 2  # bad input, as documented: 0 ok, 1 --verify mismatch, 2 bad input


class DefaultToCount(click.Group):
    """``paramcalc MODEL ...`` is short for ``paramcalc count MODEL ...``."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["count", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultToCount, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="paramcalc")
def main():
    """Exact, explained parameter counts, memory and time for transformer fine-tuning, checked by real runs.

    paramcalc MODEL [options] counts (the count command is the default); the other commands trace a step on
    fake tensors, fine-tune for real, calibrate this machine and list the catalog. README.md is the manual.

    \b
    Example:
      paramcalc bert-base-uncased
      paramcalc bert-base-uncased --lora r=8 --verify
      paramcalc gpt2 --task causal-lm --json
      paramcalc bloom-560m --task causal-lm --quant nf4 --lora r=16 --batch 4 --seq 256
      paramcalc gpt2 --task causal-lm --seq 512 --mixed-precision fp16 --device t4 --fit-batch
      paramcalc gpt2 --infer --batch 8 --context 512 --new-tokens 64 --dtype fp16 --device t4
      paramcalc trace bert-base-uncased --task seq-cls --batch 8 --seq 128
      paramcalc train bert-base-uncased --task seq-cls --batch 4 --seq 64 --steps 4
      paramcalc calibrate
      paramcalc list
    """


PEFT_METHODS = ("lora", "adapter", "prompt", "prefix", "ptuning", "ia3")


def model_options(command):
    """MODEL and what shapes it: task, config overrides, PEFT methods, quantization (count and trace share them)."""
    options = [
        click.argument("model"),
        click.option("--task", type=click.Choice(TASKS), default="base", show_default=True,
                     help="Which head: base is the bare backbone AutoModel builds."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help="Override a config value (repeatable), e.g. --set num_hidden_layers=6."),
        click.option("--num-labels", type=int, default=None, help="Labels of a seq-cls/token-cls head (default 2)."),
        click.option("--lora", metavar="SPEC", default=None,
                     help="LoRA, e.g. r=8 or r=4,targets=c_attn,c_proj,bias=all (keys: r, alpha, dropout, targets, "
                          "bias, modules_to_save, dora, parameters: peft's target_parameters, e.g. Mixtral's "
                          "fused experts)."),
        click.option("--adapter", metavar="SPEC", default=None, is_flag=False, flag_value="",
                     help="Bottleneck adapters (AdapterHub): kind=pfeiffer|houlsby[,bottleneck=N|reduction=F,"
                          "cross=true,init=mam_adapter|bert|houlsby] (init: how train starts them)."),
        click.option("--prompt", metavar="SPEC", default=None, help="Prompt tuning: tokens=N[,submodules=1|2]."),
        click.option("--prefix", metavar="SPEC", default=None,
                     help="Prefix tuning: tokens=N[,projection=true,hidden=H]."),
        click.option("--ptuning", metavar="SPEC", default=None,
                     help="P-tuning (peft's prompt encoder): tokens=N[,encoder=mlp|lstm,hidden=H,layers=N]."),
        click.option("--ia3", metavar="SPEC", default=None, is_flag=False, flag_value="",
                     help="IA3 with peft's defaults, or targets=...,ff=..."),
        click.option("--quant", metavar="TYPE", default=None,
                     help="Quantized base weights: nf4, fp4 or int8 [,double_quant=true,dtype=bf16,compute_dtype=bf16]; adds bytes per "
                          "component and the counts peft's print_trainable_parameters shows."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def step_options(command):
    """The training step: batch, lengths, precision, optimizer, attention kernel, checkpointing."""
    options = [
        click.option("--batch", type=int, default=None, help="Sequences per step, per GPU (default 1)."),
        click.option("--seq", type=int, default=128, show_default=True, help="Tokens per sequence."),
        click.option("--tgt-seq", type=int, default=None, help="Target length of an encoder-decoder (default: --seq)."),
        click.option("--dtype", type=click.Choice(("fp32", "fp16", "bf16")), default="fp32", show_default=True,
                     help="Parameter dtype."),
        click.option("--mixed-precision", type=click.Choice(("fp16", "bf16")), default=None,
                     help="Autocast compute with fp32 master weights."),
        click.option("--optimizer", default="adamw", show_default=True,
                     help="adamw, adam, sgd, sgd-momentum, adamw-8bit or adafactor."),
        click.option("--grad-checkpointing", is_flag=True, help="Recompute activations in the backward pass."),
        click.option("--grad-accum", type=int, default=1, show_default=True,
                     help="Micro-batches per optimizer step (gradient accumulation)."),
        click.option("--attention", type=click.Choice(("auto", "eager", "sdpa", "flash")), default="auto",
                     show_default=True, help="auto: what transformers builds (sdpa where the model has it). eager, "
                     "and sdpa with attention dropout on a CPU, keep the s x s probabilities; fused kernels do not."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def make_step(batch, seq, tgt_seq, dtype, mixed_precision, optimizer, grad_checkpointing, attention, grad_accum):
    """The Step that step_options describe (batch defaults to 1)."""
    from .step import Step

    return Step(batch=1 if batch is None else batch, seq=seq, tgt_seq=tgt_seq, dtype=dtype,
                mixed_precision=mixed_precision, optimizer=optimizer, grad_checkpointing=grad_checkpointing,
                attention=attention, grad_accum=grad_accum)


def _count(model, task, overrides, num_labels, quant, methods):
    from . import configs
    from .counting import count

    parsed = dict(configs.parse_override(item) for item in overrides)
    chosen = [(name, spec) for name, spec in methods.items() if spec is not None]
    return count(model, task=task, overrides=parsed, num_labels=num_labels, peft=chosen or None, quant=quant)


def device_options(command):
    """Where the step runs: a device profile, its memory, data-parallel sharding, the batch search."""
    options = [
        click.option("--device", "device", default=None,
                     help="t4, a10g, l4, a100-40gb, a100-80gb, h100-80gb, cpu (default), or a calibrated profile."),
        click.option("--device-mem", default=None, metavar="SIZE", help="Device memory, e.g. 16GiB or 24GB."),
        click.option("--gpus", type=int, default=1, show_default=True, help="Data-parallel GPUs."),
        click.option("--zero", type=int, default=None, help="ZeRO stage 0-3: shard optimizer / gradients / weights."),
        click.option("--fsdp", default=None, help="FSDP sharding: full (= ZeRO-3) or grad-op (= ZeRO-2)."),
        click.option("--fit-batch", is_flag=True, help="Find the largest batch that fits the device's memory."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command("count")
@model_options
@step_options
@device_options
@inference_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema paramcalc/1).")
@click.option("--latex", is_flag=True, help="Print a LaTeX (booktabs) table.")
@click.option("--verify", is_flag=True,
              help="Build the model on the meta device (and apply peft) and match every parameter to a row.")
def count_command(model, task, overrides, num_labels, lora, adapter, prompt, prefix, ptuning, ia3, quant, batch, seq,
                  tgt_seq, dtype, mixed_precision, optimizer, grad_checkpointing, grad_accum, attention, device,
                  device_mem, gpus,
                  zero, fsdp, fit_batch, infer, context, new_tokens, kv_dtype, fit_context, as_json, latex, verify):
    """Count the parameters of MODEL: a catalog name, a config.json, or a folder holding one.

    \b
    Example:
      paramcalc bert-base-uncased --task seq-cls --num-labels 3 --verify
      paramcalc bert-base-uncased --lora r=8
      paramcalc t5-small --task seq2seq-lm --prompt tokens=20
      paramcalc bloom-560m --task causal-lm --quant nf4 --lora r=16
      paramcalc bert-base-uncased --task seq-cls --batch 8 --seq 128 --optimizer adamw
      paramcalc gpt2 --task causal-lm --seq 512 --mixed-precision fp16 --device t4 --fit-batch
      paramcalc bloom-560m --infer --batch 4 --context 2048 --new-tokens 256 --dtype bf16 --device a10g
      paramcalc gpt2 --infer --new-tokens 64 --dtype fp16 --device t4 --fit-context
    """
    try:
        methods = {"lora": lora, "adapter": adapter, "prompt": prompt, "prefix": prefix, "ptuning": ptuning,
                   "ia3": ia3}
        inference = {"context": context, "new_tokens": new_tokens, "kv_dtype": kv_dtype, "fit_context": fit_context,
                     "fit_batch": fit_batch, "batch": batch, "dtype": dtype, "attention": attention, "device": device,
                     "device_mem": device_mem}
        check_inference(infer, inference)
        task = inference_task(model, task) if infer else task  # generate() runs the causal LM head
        result = _count(model, task, overrides, num_labels, quant, methods)
        verification = None
        if verify:
            from .verify import verify as run_verify

            verification = run_verify(result)
        step_plan = curve = inference_plan = None
        if infer:
            inference_plan = plan_inference(result, inference)
        elif batch is not None or fit_batch or device or device_mem or gpus != 1 or zero is not None or fsdp:
            from .plan import Parallel, fit_batch as search, plan

            step = make_step(batch, seq, tgt_seq, dtype, mixed_precision, optimizer, grad_checkpointing, attention,
                             grad_accum)
            parallel = Parallel.from_options(gpus, zero, fsdp)
            if fit_batch:
                best, curve = search(result, step, device, device_mem, parallel)
                if best == 0:
                    raise ParamcalcError(f"even batch 1 does not fit: it needs {curve[0][1]:,} bytes")
                from dataclasses import replace

                step = replace(step, batch=best)
            step_plan = plan(result, step, device, device_mem, parallel)
    except ParamcalcError as exc:
        raise InputError(str(exc)) from None

    if as_json:
        document = result.to_dict()
        if step_plan is not None:
            document.update(step_plan.to_dict())
            step = step_plan.step  # --attention auto resolved
            from dataclasses import asdict

            document["step"] = asdict(step)
            if curve is not None:
                document["fit_batch"] = {"batch": step.batch, "curve": [{"batch": b, "peak": p} for b, p in curve]}
        if inference_plan is not None:
            document["inference"] = inference_plan.to_dict()
        if verification is not None:
            document["verify"] = {"ok": verification.ok, "meta_total": verification.meta_total,
                                  "model_class": verification.model_class,
                                  "mismatches": verification.mismatches()}
        import json

        click.echo(json.dumps(document, indent=2))
    elif latex:
        click.echo(result.to_latex(), nl=False)
    else:
        from rich.console import Console

        Console().print(result)
        if step_plan is not None:
            from .report import plan_table

            Console().print(plan_table(step_plan, step, curve))
        if inference_plan is not None:
            Console().print(inference_table(inference_plan))
    if verification is not None:
        _report_verification(verification, quiet=as_json or latex)
        if not verification.ok:
            sys.exit(1)


def _report_verification(verification, quiet: bool) -> None:
    if quiet:  # keep stdout machine-readable; the exit status still tells
        if not verification.ok:
            click.echo("\n".join(verification.mismatches()), err=True)
        return
    for check in verification.checks:
        mark = "✓" if check.ok else "✗"
        click.echo(f"  {mark} {check.name}: {check.actual:,}" + ("" if check.ok else f" — {'; '.join(check.problems)}"))
    if verification.ok and verification.generic:
        click.echo(f"counted directly from {verification.model_class} on the meta device "
                   f"({verification.meta_total:,} parameters); there are no formulas to check")
    elif verification.ok:
        click.echo(f"verified: all {verification.meta_total:,} parameters of {verification.model_class} "
                   "(built on the meta device) match the formulas")
    else:
        click.echo("verification FAILED:\n  " + "\n  ".join(verification.mismatches()), err=True)


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def list_command(as_json):
    """Show the offline catalog of real model configs.

    \b
    Example:
      paramcalc list
    """
    from . import catalog
    from .counting import count

    rows = []
    for entry in catalog.entries().values():
        result = count(entry.name, formulas=False)
        rows.append({"name": entry.name, "hub_id": entry.hub_id, "family": result.family,
                     "params": result.total_params, "source": entry.source})
    if as_json:
        import json

        click.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    from rich import box

    # one section per family instead of a column, no side borders: an 80-column terminal shows the longest
    # names, hub ids and 11-digit counts unbroken
    table = Table(title="paramcalc catalog (base model, as AutoModel builds it)", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("name", "hub id", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left", no_wrap=True)
    for family in dict.fromkeys(row["family"] for row in rows):
        table.add_row(f"[bold]{family}[/bold]", "", "")
        members = [row for row in rows if row["family"] == family]
        for i, row in enumerate(members):
            table.add_row(f"  {row['name']}", row["hub_id"], f"{row['params']:,}", end_section=i == len(members) - 1)
    Console().print(table)


@main.command("trace")
@model_options
@step_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def trace_command(model, task, overrides, num_labels, lora, adapter, prompt, prefix, ptuning, ia3, quant, batch, seq,
                  tgt_seq, dtype, mixed_precision, optimizer, grad_checkpointing, grad_accum, attention, as_json):
    """Run one real training step of MODEL on fake tensors and measure its memory and FLOPs.

    Fake tensors have shapes but no data: any size runs in seconds, in no memory. The step's
    live-tensor peak is split into parameters, gradients, optimizer state, activations and
    transient buffers, next to paramcalc's analytic model states and FLOPs.

    \b
    Example:
      paramcalc trace bert-base-uncased --task seq-cls --batch 8 --seq 128
      paramcalc trace gpt2 --task causal-lm --lora r=8 --mixed-precision bf16 --json
    """
    from .step import Step

    try:
        methods = {"lora": lora, "adapter": adapter, "prompt": prompt, "prefix": prefix, "ptuning": ptuning,
                   "ia3": ia3}
        result = _count(model, task, overrides, num_labels, quant, methods)
        if grad_accum != 1:
            raise ParamcalcError("paramcalc trace runs one micro-batch; drop --grad-accum (the plan and "
                                 "'paramcalc train' model accumulation)")
        step = make_step(batch, seq, tgt_seq, dtype, mixed_precision, optimizer, grad_checkpointing, attention,
                         grad_accum)
        from .report import trace_comparison
        from .trace import trace_step

        report = trace_step(result, step)
        comparison = trace_comparison(result, step, report)
    except ParamcalcError as exc:
        raise InputError(str(exc)) from None
    if as_json:
        import json

        click.echo(json.dumps(comparison, indent=2))
        return
    from rich.console import Console

    from .report import trace_table

    Console().print(trace_table(result, comparison))


@main.command("calibrate")
@click.option("--name", default=None,
              help="Profile name, used later as --device NAME (default: cpu, or the GPU's name for cuda).")
@click.option("--device", "kind", type=click.Choice(("cpu", "cuda")), default="cpu", show_default=True,
              help="What to measure.")
@click.option("--size", type=int, default=None, help="Matrix side of the square matmuls whose rates are the "
                                                      "headline fp32 / half figures (default 2048 on cpu, 8192 "
                                                      "on cuda, 256 with --quick; at least 64).")
@click.option("--quick", is_flag=True, help="Small shapes and two samples: a few seconds, for tests and a first "
                                            "look (cache-sized shapes: less representative rates).")
@click.option("--json", "as_json", is_flag=True, help="Print the saved profile as JSON.")
def calibrate_command(name, kind, size, quick, as_json):
    """Measure this machine and save it as a device profile that throughput estimates use: matmul FLOP/s
    (fp32 and half precision) and memory bandwidth, plus what a per-op time model needs: matmul rates by
    shape class (square, Linear, LoRA, attention), elementwise rates (add, mul, softmax, layer_norm, GELU,
    dropout, their backward kernels, the loss's log_softmax, the embedding's gradient, dtype casts), the fused
    attention kernel forward and backward, the fixed cost of one dispatched op and one step of each optimizer
    (adamw, adam, sgd, sgd-momentum, adafactor, adamw-8bit). Each number is saved with how it was measured.

    The CPU's profile (--name cpu) is what the default device reads; any other name becomes
    usable as --device NAME. Profiles live in ~/.cache/paramcalc/profiles (or $PARAMCALC_CACHE_DIR).

    \b
    Example:
      paramcalc calibrate
      paramcalc bert-base-uncased --task seq-cls --batch 8 --seq 128
      paramcalc calibrate --device cuda --name lab-gpu && paramcalc gpt2 --batch 8 --device lab-gpu
    """
    from .calibrate import calibrate, save_profile

    try:
        measured = calibrate(name, kind, size, quick=quick)
        path = save_profile(measured)
    except ParamcalcError as exc:
        raise InputError(str(exc)) from None
    if as_json:
        import json

        click.echo(json.dumps({**measured, "path": str(path)}, indent=2))
        return
    from rich.console import Console

    from .report import calibration_table

    Console().print(calibration_table(measured, path))


from .cli_train import train_command  # noqa: E402  (the train command reuses the option groups above)

main.add_command(train_command)
