"""Render a ``TrainReport``: the prediction before the run, then predicted vs measured, and the JSON line
``--out`` appends. Calculation lives in ``train``; this module only formats and writes."""

from __future__ import annotations

import json
import os

from .report import _bytes

ROWS = (("peak", "peak"), ("forward", "forward peak"), ("backward", "backward peak"),
        ("optimizer", "optimizer step peak"))


def _title(report) -> str:
    o = report.options
    precision = f"{o['mixed_precision']} mixed" if o.get("mixed_precision") else o["dtype"]
    method = ", ".join(p["method"] for p in o["peft"]) or "full fine-tuning"
    quant = f" on a {o['quant']['type']} base" if o.get("quant") else ""
    return (f"{report.model} ({report.task}) · {method}{quant} · batch {o['batch']} x {o['seq']} · {precision} · "
            f"{o['optimizer']} · {o['attention']} attention{' · checkpointing' if o['grad_checkpointing'] else ''}"
            f" · {report.device['name']}" + (f" · process {report.device['rank']} of {report.device['processes']}"
                                             if report.device.get("processes", 1) > 1 else ""))


def prediction_text(report):
    from rich.markup import escape
    from rich.text import Text

    predicted = report.predicted
    if not predicted:
        return Text("\n".join(["prediction: none"] + report.notes), style="yellow")
    memory, throughput = predicted["memory"], predicted["throughput"]
    line = (f"predicted: peak {_bytes(memory['peak'])} during {predicted['phase_of_peak']} (weights "
            f"{_bytes(memory['weights'])}, gradients {_bytes(memory['gradients'])}, optimizer "
            f"{_bytes(memory['optimizer'])}, activations {_bytes(memory['activations'])})")
    if throughput.get("tokens_per_s"):
        line += f"; {throughput['tokens_per_s']:,.0f} tokens/s ({throughput['step_s']:.3f} s/step)"
    if predicted.get("fits") is False:
        line += f"; does NOT fit in {_bytes(predicted['device_memory'])}"
    return Text(escape(line))


def comparison_table(report):
    """Predicted vs measured, one row per figure, with the error and the verdict."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    table = Table(title=escape(_title(report)), title_justify="left")
    for column in ("", "predicted", "measured", "error"):
        table.add_column(column, justify="left" if not column else "right")
    predicted = (report.predicted or {}).get("memory", {})
    measured = report.measured.get("memory") or {}
    errors = report.errors()
    overhead = predicted.get("overhead", 0)
    for key, label in ROWS:
        mine = predicted.get("peak") - overhead if key == "peak" and predicted else (predicted.get("phases") or {}).get(key)
        table.add_row(label, _bytes(mine) if mine else "—", _bytes(measured[key]) if measured.get(key) else "—",
                      _percent(errors.get(key)))
    if measured.get("loaded") is not None:
        loaded = predicted.get("weights", 0) + predicted.get("ddp_buckets", 0) if predicted else None
        table.add_row("model before the first step", _bytes(loaded) if loaded else "—", _bytes(measured["loaded"]),
                      _percent(errors.get("loaded")))
    if measured.get("before") is not None:
        states = (sum(predicted.get(k, 0) for k in ("weights", "optimizer", "ddp_buckets", "cublas_workspaces"))
                  if predicted else None)
        table.add_row("alive before the step", _bytes(states) if states else "—", _bytes(measured["before"]),
                      _percent((states - measured["before"]) / measured["before"]) if states else "")
    throughput = (report.predicted or {}).get("throughput") or {}
    if report.measured.get("step_s"):
        table.add_row("step time", f"{throughput['step_s']:.3f} s" if throughput.get("step_s") else "—",
                      f"{report.measured['step_s']:.3f} s", _percent(errors.get("step_s")))
        table.add_row("tokens/s", f"{throughput['tokens_per_s']:,.0f}" if throughput.get("tokens_per_s") else "—",
                      f"{report.measured['tokens_per_s']:,.0f}", _percent(errors.get("tokens_per_s")))
    _phase_rows(table, report, errors)
    loss = report.measured.get("loss") or []
    lines = [table]
    if loss:
        lines.append(Text(f"loss {loss[0]:.4f} -> {loss[-1]:.4f} over {len(loss)} steps"))
    if report.measured.get("changed_params") is not None:
        frozen = report.measured["frozen_changed"]
        lines.append(Text(f"parameters training changed: {report.measured['changed_params']:,} of "
                          f"{report.measured['trainable_params']:,} with requires_grad"
                          + (f"; FROZEN parameters changed: {', '.join(frozen)}" if frozen else
                             "; every frozen parameter is bit-identical"), style="red" if frozen else ""))
    verdict = report.verdict()
    if "failed" in report.measured:
        at = report.measured["failed_at_step"]
        verdict = f"{report.measured['failed']} " + (f"at step {at}" if at else "while building the model")
    style = "green" if verdict == "within tolerance" else "red" if "OUTSIDE" in verdict or "failed" in report.measured else "yellow"
    lines.append(Text(f"verdict: {verdict} (peak tolerance ±{report.tolerance:.0%}; times are compared, not judged: "
                      "a machine's speed drifts with its load)", style=style))
    if measured.get("resident"):
        lines.append(Text(f"process resident memory (context: includes Python and libraries): "
                          f"{_bytes(measured['resident'])}", style="dim"))
    notes = report.notes + ((report.predicted or {}).get("notes") or [])
    lines.extend(Text(f"note: {note}", style="yellow") for note in notes)
    return Group(*lines)


def _backward_label(report) -> str:
    """What the trainer's backward clock holds besides the backward ops: the checkpointed layers' re-run
    (inside loss.backward()) and DDP's all-reduce (overlapped with it)."""
    phases = ((report.predicted or {}).get("throughput") or {}).get("phases") or {}
    extra = (["re-run"] if report.options.get("grad_checkpointing") or phases.get("recompute") else []) + \
            (["all-reduce"] if report.device.get("processes", 1) > 1 or phases.get("all_reduce") else [])
    return "backward time" + (f" (incl. {', '.join(extra)})" if extra else "")


def _phase_rows(table, report, errors) -> None:
    """One row per timed phase: the plan's seconds (— where it gave no phases), the median measured ones."""
    from .train import predicted_phases

    timed = report.measured.get("phases_s") or {}
    mine = predicted_phases(report.predicted)
    labels = {"forward": "forward time", "backward": _backward_label(report), "optimizer": "optimizer step time"}
    for phase, label in labels.items():
        if phase in timed or phase in mine:
            table.add_row(label, f"{mine[phase]:.3f} s" if phase in mine else "—",
                          f"{timed[phase]:.3f} s" if phase in timed else "—", _percent(errors.get(f"{phase}_s")))


def _percent(value) -> str:
    return "—" if value is None else f"{100 * value:+.2f} %"


def append_json_line(path, document: dict) -> None:
    """Append ``document`` as one line, whole or not at all: one write under an exclusive lock (several
    processes may share the file), and a failed write is cut back to where the file ended."""
    import fcntl

    line = (json.dumps(document, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(f"short write to {path}")
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, end)
            raise
    finally:
        os.close(fd)
