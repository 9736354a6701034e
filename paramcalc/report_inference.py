"""The inference plan as a table: weights, the KV cache with its formula and the model's numbers, and the prefill
and decode peaks with the terms that add up to them (``paramcalc MODEL --infer``)."""

from __future__ import annotations

from .report import _bytes


def inference_table(planned):
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    run, formulas, device = planned.inference, planned.formulas, planned.profile
    dtype = f"{run.dtype} weights" + ("" if planned.kv_dtype == run.dtype else f", {planned.kv_dtype} cache")
    title = (f"inference: batch {run.batch} x {run.context:,}-token prompt + {run.new_tokens:,} new "
             f"token{'s' if run.new_tokens > 1 else ''}, {dtype}, {run.attention} attention · {device.name}")
    table = Table(title=escape(title), title_justify="left")
    for column in ("memory", "formula", "bytes", "size"):
        table.add_column(column, justify="left" if column in ("memory", "formula") else "right")

    def row(name, formula, value, bold=False):
        style = "bold" if bold else ""
        table.add_row(Text(name, style=style), escape(formula), Text(f"{value:,}", style=style),
                      Text(_bytes(value), style=style))

    row("weights", formulas["weights"], planned.weights)
    row("KV cache", formulas["kv_cache"], planned.kv_cache)
    table.add_row("  tokens", escape(formulas["kv_cache_tokens"]), "", "")
    for phase, at in (("prefill", planned.prefill), ("decode", planned.decode)):
        if at is None:
            table.add_row(f"{phase} peak", "no decode step: the prompt's forward picks the only new token", "", "")
            continue
        if at["activations"] is not None:
            row(f"{phase} activations", formulas["activations" if phase == "prefill" else "activations_decode"],
                at["activations"])
        cache = "KV cache of the prompt" if phase == "prefill" else "KV cache"
        terms = [f"weights {at['weights']:,}", f"{cache} {at['kv_cache']:,}"]
        if at["activations"] is not None:
            terms.append(f"activations {at['activations']:,}")
        if at["overhead"]:
            terms.append(f"overhead {at['overhead']:,}")
        row(f"{phase} peak", " + ".join(terms), at["peak"], bold=True)
    if any(at and at["overhead"] for at in (planned.prefill, planned.decode)):
        table.add_row("  overhead", escape(formulas["overhead"]), "", "")
    lines = [table]
    fits = planned.fits()
    if fits is not None:
        lines.append(Text(f"{'fits' if fits else 'does NOT fit'} in {_bytes(device.memory)} ({device.memory:,} B)",
                          style="green" if fits else "red"))
    if planned.fit:  # the edge the search found (its whole curve is in the JSON)
        fit, what = planned.fit, planned.fit["what"]
        peaks = {point[what]: point["peak"] for point in fit["curve"]}
        over = fit["best"] + 1
        lines.append(Text(f"--fit-{what}: {fit['best']:,} is the largest that fits ({_bytes(planned.peak)})"
                          + (f"; {over:,} needs {_bytes(peaks[over])}" if over in peaks else "")
                          + f", {len(peaks)} sizes tried"))
    lines.extend(Text(note, style="dim") for note in planned.notes)
    return Group(*lines)
