"""``paramcalc train``: the CLI over ``paramcalc.train`` (parse, call, render; nothing else)."""

from __future__ import annotations

import sys

import click

from .cli import InputError, _count, make_step, model_options, step_options
from .errors import ParamcalcError

RUN_FAILED = 3  # exit status: the run failed at run time (out of memory), or would not fit and was not started


@click.command("train")
@model_options
@step_options
@click.option("--steps", type=int, default=5, show_default=True, help="Optimizer steps to run.")
@click.option("--warmup", type=int, default=1, show_default=True,
              help="Steps before the measured one (the first step creates the optimizer state).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--device-mem", default=None, metavar="SIZE",
              help="Memory to plan against (default: the device's), e.g. 8GiB; a larger prediction is not started.")
@click.option("--weights", default=None, metavar="DIR", help="A local checkpoint folder (default: random weights).")
@click.option("--data", default=None, metavar="FILE", help=".jsonl / .csv (text, label) or .txt (a line each).")
@click.option("--tokenizer", default=None, metavar="DIR",
              help="A local tokenizer folder for --data (default: a byte-level mapping that needs no files).")
@click.option("--lr", type=float, default=1e-4, show_default=True, help="Learning rate.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the weights and the batches.")
@click.option("--force", is_flag=True, help="Start even when the predicted peak exceeds the device's memory.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (schema paramcalc-train/1).")
@click.option("--out", default=None, metavar="FILE", help="Append the JSON document to FILE as one line.")
def train_command(model, task, overrides, num_labels, lora, adapter, prompt, prefix, ptuning, ia3, quant, batch, seq,
                  tgt_seq, dtype, mixed_precision, optimizer, grad_checkpointing, grad_accum, attention, steps,
                  warmup, device, device_mem, weights, data, tokenizer, lr, seed, force, as_json, out):
    """Fine-tune MODEL for real (random weights unless --weights), measure its memory and speed, and
    compare them with paramcalc's prediction.

    Exit status: 0 ok, 2 bad input, 3 the run failed (out of memory) or would not fit.
    Several processes: accelerate launch --multi_gpu --num_processes 2 -m paramcalc train ... (each reports its
    own peak; on a CPU too, where --multi_gpu starts the processes over gloo).

    \b
    Example:
      paramcalc train gpt2 --task causal-lm --batch 2 --seq 128 --steps 5
      paramcalc train bert-base-uncased --task seq-cls --lora r=8 --mixed-precision bf16 --json
      paramcalc train bloom-560m --task causal-lm --quant nf4 --lora r=16 --mixed-precision bf16
      paramcalc train gpt2 --task causal-lm --data notes.txt --steps 20 --out runs.jsonl
    """
    from rich.console import Console

    from .train import RunFailed, TrainOptions, train
    from .train_report import append_json_line, comparison_table, prediction_text

    console, progress_console = Console(), Console(stderr=True)
    try:
        methods = {"lora": lora, "adapter": adapter, "prompt": prompt, "prefix": prefix, "ptuning": ptuning,
                   "ia3": ia3}
        result = _count(model, task, overrides, num_labels, quant, methods)
        step = make_step(batch, seq, tgt_seq, dtype, mixed_precision, optimizer, grad_checkpointing, attention,
                         grad_accum)
        options = TrainOptions(steps=steps, warmup=warmup, device=device, weights=weights,
                               data=data, tokenizer=tokenizer, lr=lr, seed=seed, device_mem=device_mem, force=force)
        progress = _Progress(progress_console, steps, step.batch * step.seq * grad_accum)
        with progress:
            report = train(result, step, options,
                           on_prediction=lambda r: progress.print(prediction_text(r)),
                           on_step=progress.advance)
        failure = None
    except ParamcalcError as exc:
        raise InputError(str(exc)) from None
    except RunFailed as exc:
        if exc.report is None:
            raise click.ClickException(str(exc)) from None
        report, failure = exc.report, str(exc)
    document = report.to_dict()
    if failure:
        document["failed"] = failure
    if out:
        try:
            append_json_line(out, document)
        except OSError as exc:
            raise InputError(f"--out {out}: {exc.strerror or exc}") from None
    if as_json:
        import json

        click.echo(json.dumps(document, indent=2))
    else:
        console.print(comparison_table(report))
    if failure:
        click.echo(f"Error: {failure}", err=True)
        sys.exit(RUN_FAILED)


class _Progress:
    """A rich progress bar on stderr (stdout stays a clean table or JSON): loss, tokens/s and memory."""

    def __init__(self, console, steps: int, tokens_per_step: int):
        self.console, self.steps, self.tokens = console, steps, tokens_per_step
        self.bar = None

    def __enter__(self):
        import os

        if os.environ.get("RANK", "0") != "0":  # under accelerate launch only the first process draws a bar
            self.console.quiet = True
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), console=self.console, transient=True)
        self.bar.__enter__()
        self.task = self.bar.add_task("train", total=self.steps, status="building the model")
        return self

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)

    def print(self, renderable):
        self.bar.console.print(renderable)

    def advance(self, index: int, loss: float, seconds: float | None):
        from .measure import resident_bytes
        from .report import _bytes

        speed = f"{self.tokens / seconds:,.0f} tokens/s" if seconds else "warm-up / memory step"
        resident = resident_bytes()
        self.bar.update(self.task, completed=index + 1,
                        status=f"loss {loss:.4f} · {speed}" + (f" · RSS {_bytes(resident)}" if resident else ""))
