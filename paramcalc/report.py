"""Render a CountResult: a rich table for people, a LaTeX table for teaching.

Calculation lives in ``counting``; this module only formats what it is given.
"""

from __future__ import annotations

from .counting import CountResult


def used_symbols(result: CountResult) -> set[str]:
    """The symbols the shown formulas actually use (a model's head count, say, sizes no parameter)."""
    from .expr import names

    return {n for c in result.components for e in (c.repeat, *(d for s in c.shapes.values() for d in s))
            for n in names(e)} if not result.generic else set()


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.2f} %" if total else "-"


def rich_report(result: CountResult):
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from rich.markup import escape

    title = escape(f"{result.model} · {result.hf_class} ({result.family}, task {result.task})")
    table = Table(title=title, title_justify="left", show_lines=False)
    table.add_column("component")
    table.add_column("group", style="dim")
    table.add_column("formula", style="cyan")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right", style="dim")
    if result.quant:
        table.add_column("bytes", justify="right")
    for c in result.components:
        formula = c.formula or ("—" if result.generic else "")
        if c.tied_to:
            formula = "0 (tied)"
        trainable = "" if c.trainable else " [dim](frozen)[/dim]"
        cells = [escape(c.name) + trainable, c.group, formula, f"{c.count:,}", _share(c.count, result.total_params)]
        if result.quant:
            quantized = c.name in result.quant.quantized
            cells.append(_bytes(c.weight_bytes) + (f" ({result.quant.options.type})" if quantized else ""))
        table.add_row(*cells)
    total, trainable = result.total_params, result.trainable_params
    lines = [table]
    lines.append(Text.from_markup(
        f"[bold]total[/bold] {total:,}   [bold]trainable[/bold] {trainable:,} ({_share(trainable, total)})"
    ))
    if result.peft:  # the line peft's print_trainable_parameters prints, computed here
        lines.append(Text(f"trainable params: {trainable:,} || all params: {total:,} || "
                          f"trainable%: {100 * trainable / total:.4f}"))
    if result.closed_form:
        lines.append(Text.from_markup(f"[bold]closed form[/bold] [cyan]{result.closed_form}[/cyan]"))
    used = used_symbols(result)
    if used:
        where = ", ".join(f"{s}={k}={v:,}" for s, (k, v, _doc) in result.symbols.items() if s in used)
        lines.append(Text(f"where {where}", style="dim"))
    if result.quant:
        q = result.quant
        lines.append(Text(f"{q.options.type} weights: {_bytes(q.weight_bytes)} as stored "
                          f"({len(q.quantized)} quantized components, the rest {q.options.dtype}); "
                          f"peft_print: trainable {q.peft_print[0]:,} || all {q.peft_print[1]:,}"))
    for note in result.all_notes():
        lines.append(Text(f"note: {note}", style="yellow"))
    return Group(*lines)


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "_": r"\_", "#": r"\#", "{": r"\{",
                  "}": r"\}", "$": r"\$", "^": r"\textasciicircum{}", "~": r"\textasciitilde{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)  # one pass: no double escaping


def _latex_symbol(symbol: str) -> str:
    stem, _, sub = symbol.partition("_")
    return f"{stem}_{{{sub}}}" if sub else stem


def _latex_int(n: int) -> str:
    return f"{n:,}".replace(",", "{,}")  # thousands separators without LaTeX's math-mode comma spacing


def latex_table(result: CountResult) -> str:
    """A booktabs table a student can paste into a document."""
    rows = []
    for c in result.components:
        formula = f"${c.latex}$" if c.latex else "--"
        if c.tied_to:
            formula = f"0 (tied to {_latex_escape(c.tied_to)})"
        rows.append(f"  {_latex_escape(c.name)} & {formula} & {_latex_int(c.count)} \\\\")
    total_formula = f"${result.closed_form_latex}$" if result.closed_form_latex else ""
    used = used_symbols(result)
    symbols = ", ".join(
        f"${_latex_symbol(s)}$ = \\texttt{{{_latex_escape(k)}}} = {_latex_int(v)}"
        for s, (k, v, _d) in result.symbols.items() if s in used
    )
    caption = _latex_escape(f"Parameters of {result.model} ({result.hf_class})") + (f"; {symbols}" if symbols else "")
    lines = [
        r"% requires \usepackage{booktabs}",
        r"\begin{table}[ht]",
        r"\centering",
        r"\begin{tabular}{llr}",
        r"\toprule",
        r"Component & Formula & Parameters \\",
        r"\midrule",
        *rows,
        r"\midrule",
        f"  Total & {total_formula} & {_latex_int(result.total_params)} \\\\",
        f"  Trainable & & {_latex_int(result.trainable_params)} \\\\",
        r"\bottomrule",
        r"\end{tabular}",
        f"\\caption{{{caption}}}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def trace_comparison(result, step, report) -> dict:
    """The traced step next to paramcalc's analytic figures, with relative errors (raw numbers only)."""
    from dataclasses import asdict, replace

    from .errors import ParamcalcError
    from .flops import step_flops
    from .memory import model_states

    traced_step = replace(step, attention=report.attention or step.attention)
    notes = list(report.notes)
    if result.generic:  # nothing analytic to compare with
        notes.append("no family file: there are no analytic figures to compare the trace with")
        return {"model": result.model, "task": result.task, "step": asdict(traced_step), "traced": report.to_dict(),
                "analytic": {"model_states": {}, "flops": None}, "relative_error": {}, "notes": notes}
    states = model_states(result, step)
    analytic = {"model_states": states.to_dict(), "flops": None}
    try:
        analytic["flops"] = step_flops(result, step).to_dict()
    except ParamcalcError as exc:
        notes.append(str(exc))
    traced_states = {"weights": report.after_step["parameters"], "gradients": report.after_step["gradients"],
                     "optimizer": report.after_step["optimizer"]}
    errors = {k: _relative(states.to_dict()[k], v) for k, v in traced_states.items()}
    if analytic["flops"]:
        errors.update({f"flops_{k}": _relative(analytic["flops"][k], report.flops[k])
                       for k in ("forward", "backward", "total")})
    return {"model": result.model, "task": result.task, "step": asdict(traced_step), "traced": report.to_dict(),
            "analytic": analytic, "relative_error": errors, "notes": notes}


def _relative(predicted: int, measured: int) -> float:
    return 0.0 if predicted == measured else (predicted - measured) / measured if measured else float("inf")


def trace_table(result, comparison: dict):
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    traced, analytic = comparison["traced"], comparison["analytic"]
    step = comparison["step"]
    title = escape(f"{result.model} · {traced['model_class']} · one training step, batch {step['batch']} x "
                   f"seq {step['seq']}, {step['mixed_precision'] or step['dtype']}, {step['optimizer']}")
    table = Table(title=title, title_justify="left")
    for column in ("memory", "traced at peak", "traced after step", "analytic", "error"):
        table.add_column(column, justify="left" if column == "memory" else "right")
    rows = (("weights", "parameters"), ("gradients", "gradients"), ("optimizer", "optimizer"),
            ("activations", "activations"), ("transient", "transient"))
    errors = comparison["relative_error"]
    for name, category in rows:
        predicted = analytic["model_states"].get(name)
        table.add_row(name, _bytes(traced["at_peak"][category]), _bytes(traced["after_step"][category]),
                      _bytes(predicted) if predicted is not None else "—",
                      f"{100 * errors[name]:+.2f} %" if name in errors else "—")
    table.add_row("[bold]peak[/bold]", f"[bold]{_bytes(traced['peak'])}[/bold]", "", "",
                  f"during {traced['phase_of_peak']}")
    flops = Table(title="FLOPs (matmuls, as torch.utils.flop_counter counts them)", title_justify="left")
    for column in ("", "traced", "analytic", "error"):
        flops.add_column(column, justify="right")
    for key in ("forward", "backward", "optimizer", "total"):
        predicted = (analytic["flops"] or {}).get(key)
        error = errors.get(f"flops_{key}")
        flops.add_row(key, f"{traced['flops'][key]:,}", f"{predicted:,}" if predicted is not None else "—",
                      f"{100 * error:+.2f} %" if error is not None else "—")
    notes = [Text(f"note: {n}", style="yellow") for n in comparison["notes"]]
    return Group(table, flops, *notes)


def plan_table(step_plan, step, curve=None):
    """The memory of a training step, term by term, with FLOPs and throughput underneath."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    memory, formulas = step_plan.memory, step_plan.formulas
    device = step_plan.profile
    step = step_plan.step or step  # its attention resolved
    title = (f"training step: batch {step.batch} x {step.seq} tokens, {step.mixed_precision or step.dtype}"
             f"{' mixed' if step.mixed_precision else ''}, {step.optimizer}, {step.attention} attention"
             f"{', checkpointing' if step.grad_checkpointing else ''} · {device.name}"
             f"{f' x {step_plan.parallel.gpus}, ZeRO-{step_plan.parallel.zero}' if step_plan.parallel.gpus > 1 or step_plan.parallel.zero else ''}")
    table = Table(title=escape(title), title_justify="left")
    for column in ("memory", "formula", "bytes"):
        table.add_column(column, justify="right" if column == "bytes" else "left")
    for term in ("weights", "gradients", "optimizer", "ddp_buckets", "activations", "transient", "cublas_workspaces",
                 "overhead"):
        if term in memory and (term not in ("ddp_buckets", "cublas_workspaces") or memory[term]):
            table.add_row(term, escape(formulas.get(term, "")), _bytes(memory[term]))
    low, high = memory["band"]
    table.add_row(Text("peak", style="bold"), f"during {step_plan.phase_of_peak} (band {_bytes(low)} - {_bytes(high)})"
                  + (", traced" if step_plan.source == "trace" else ""), Text(_bytes(memory["peak"]), style="bold"))
    lines = [table]
    fits = step_plan.fits()
    if fits is not None:
        lines.append(Text(f"{'fits' if fits else 'does NOT fit'} in {_bytes(device.memory)}",
                          style="green" if fits else "red"))
    if step_plan.flops:
        f = step_plan.flops
        rerun = f" (re-running checkpointed layers: {f['recompute']:,})" if f.get("recompute") else ""
        lines.append(Text(f"FLOPs per step: forward {f['forward']:,} + backward {f['backward']:,}{rerun} = {f['total']:,}"))
    t = step_plan.throughput
    if t and t.get("table"):
        from .report_time import time_table

        lines.append(time_table(t, step))
        lines.append(Text(f"throughput: {t['tokens_per_s']:,.0f} tokens/s, {t['step_s']:.3f} s/step, "
                          f"{t['bound']}-bound"))
    elif t and t.get("step_s"):
        lines.append(Text(f"throughput ({t['source']}, a lower bound): {t['tokens_per_s']:,.0f} tokens/s, "
                          f"{t['step_s']:.3f} s/step"))
    elif t:
        lines.append(Text(f"throughput: {t['why']}"))
    if curve:
        lines.append(Text("batch -> peak: " + ", ".join(f"{b}: {_bytes(p)}" for b, p in curve)))
    lines.extend(Text(note, style="dim") for note in step_plan.notes)
    return Group(*lines)


def _rate(value: float, unit: str) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if value >= scale:
            return f"{value / scale:,.1f} {prefix}{unit}"
    return f"{value:,.0f} {unit}"


def _per(seconds: float, what: str) -> str:
    """A time per element or per tensor in the unit that keeps it under 1000: '1.28 ns/element'."""
    for unit, scale in (("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3)):
        if seconds < 1000 * scale:
            return f"{seconds / scale:5.3g} {unit}/{what}"
    return f"{seconds:5.3g} s/{what}"


def calibration_table(profile: dict, path) -> "object":
    """What ``paramcalc calibrate`` measured, and where it saved it: the headline rates plan.py uses, then
    one row per measured op kind (its how, the sizes timed, a rate per size and dtype), grouped."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    table = Table(title=escape(f"calibrated {profile['name']}: {profile['device']} ({profile['kind']}, "
                               f"{profile['threads']} threads, torch {profile['torch']})"), title_justify="left")
    table.add_column("measured")
    table.add_column("how")
    table.add_column("rate", justify="right")
    size = profile["size"]
    table.add_row("fp32 matmul", f"mm {size}x{size}, 2*n**3 FLOPs", _rate(profile["fp32"], "FLOP/s"))
    for dtype in ("fp16", "bf16"):
        if dtype in profile:
            used = " (used for half)" if dtype == profile["half_dtype"] else ""
            table.add_row(f"{dtype} matmul{used}", f"mm {size}x{size}", _rate(profile[dtype], "FLOP/s"))
    table.add_row("memory bandwidth", f"copy {_bytes(profile['copy_bytes'])}, 2 x bytes",
                  _rate(profile["bandwidth"], "B/s"))
    if profile.get("memory"):
        table.add_row("memory", "physical RAM" if profile["kind"] == "cpu" else "device total", _bytes(profile["memory"]))

    def rates(by_dtype: dict, unit: str) -> str:
        """One line per dtype, the sizes' rates in one unit (the largest's) so a row reads left to right; each
        rate 5 characters wide, so the table's layout (and README's copy of it) does not move with the figures."""
        top = max(max(values) for values in by_dtype.values())
        prefix, scale = next(((p, s) for p, s in (("T", 1e12), ("G", 1e9), ("M", 1e6)) if top >= s), ("", 1))

        def fixed(value: float) -> str:
            return f"{value:5.3g}" if value >= 0.1 else f"{value:5.3f}"

        return "\n".join(f"{dtype} " + " · ".join(fixed(v / scale) for v in values) + f" {prefix}{unit}"
                         for dtype, values in by_dtype.items())

    def matmul(batch, m, k, n) -> str:
        return f"{batch} x ({m}x{k} @ {k}x{n})" if batch > 1 else f"{m}x{k} @ {k}x{n}"

    # one section per group; the per-op groups are absent from profiles made before per-op calibration
    gemm = profile.get("gemm", {}).get("classes", {})
    if gemm:
        table.add_section()
    for name, entry in gemm.items():
        table.add_row(f"matmul: {name.replace('_', ' ')}", escape(entry["how"]) + "\nat " + ", ".join(
            matmul(*shape) for shape in entry["shapes"]), rates(entry["rate"], "FLOP/s"))
    elementwise = profile.get("elementwise", {}).get("ops", {})
    if elementwise:
        table.add_section()
    for name, entry in elementwise.items():
        vocab = entry.get("vocab")  # the embedding's gradient: [tokens, hidden] into [vocab, hidden]
        table.add_row(name, escape(entry["how"]) + "\nat " + ", ".join(
            f"{r}x{c}" + (f" into {vocab[n]}x{c}" if vocab else "") for n, (r, c) in enumerate(entry["shapes"])),
            rates(entry["rate"], "B/s"))
    attention = profile.get("attention")
    if attention:
        table.add_section()
        at = "\nat " + ", ".join(f"{h} x ({q}x{d} @ {d}x{k})" for h, q, k, d in attention["shapes"])
        kernels = "\nbackend: " + ", ".join(f"{dtype} {name}" for dtype, name in attention["backend"].items())
        for phase in ("forward", "backward"):
            work = attention[f"flops_{phase}"]
            how = escape(attention["how"]) + kernels + at if phase == "forward" else \
                "torch.autograd.grad(forward) less the forward; 10*b*h*q*k*d FLOPs, at the same shapes"
            table.add_row(f"attention {phase} (sdpa)", how, rates(
                {dtype: [f / t for f, t in zip(work, times)] for dtype, times in attention[phase].items()}, "FLOP/s"))
    if "overhead" in profile or "optimizer" in profile:
        table.add_section()
    if "overhead" in profile:
        table.add_row("per-op overhead", escape(profile["overhead"]["how"]),
                      f"{profile['overhead']['seconds'] * 1e6:.3g} µs/op")
    if "optimizer" in profile:
        adamw = profile["optimizer"]
        runs = ", ".join(f"{r['tensors']} x {r['elements']:,}" for r in adamw["runs"])
        table.add_row("AdamW step", escape(f"{adamw['how']}; {adamw['implementation']}; tensors x elements: {runs}"),
                      f"{_rate(1 / adamw['per_byte'], 'B/s')} of state\n+ {adamw['per_tensor'] * 1e6:.3g} µs/tensor")
    optimizers, missing = profile.get("optimizers", {}), profile.get("optimizers_missing", {})
    if optimizers or missing:
        from .calibrate_step import OPTIMIZERS_HOW

        table.add_section()
        table.add_row("optimizer steps", escape(OPTIMIZERS_HOW[0].upper() + OPTIMIZERS_HOW[1:]), "")
    for name, entry in optimizers.items():
        runs = ", ".join(f"{r['tensors']} x {r['shape'][0]}x{r['shape'][1]}" for r in entry["runs"])
        table.add_row(f"optimizer: {name}", escape(f"{entry['how'].removesuffix('; ' + OPTIMIZERS_HOW)}; "
                                                   f"{entry['implementation']}; tensors x shape: {runs}"),
                      f"{_per(entry['per_element'], 'element')}\n+ {_per(entry['per_tensor'], 'tensor')}")
    for name, why in missing.items():
        table.add_row(f"optimizer: {name}", escape(f"not measured: {why}"), "-")
    touch = profile.get("first_touch")
    if touch and touch.get("runs"):
        table.add_section()
        sizes = ", ".join(f"{r['mib']} MiB" for r in touch["runs"])
        table.add_row("first touch", escape(f"{touch['how']}; at {sizes}"),
                      f"from {_bytes(touch['threshold'])}\n{_rate(touch['rate'], 'B/s')}" if touch["threshold"]
                      else "none seen")
    lines = [table]
    if "how" in profile:
        lines.append(Text(f"each time: {profile['how']['method']}" + (" (--quick: small shapes)" if profile.get(
            "quick") else "")))
    if (profile.get("load") or 0) >= 0.25:
        lines.append(Text(f"warning: other processes kept {profile['load']:.2f} CPU cores busy while measuring, "
                          "which slows every figure: calibrate an idle machine", style="yellow"))
    use = "the default device" if profile["name"] == "cpu" else f"--device {profile['name']}"
    lines.append(Text(f"saved to {path}; throughput estimates use it as {use}"))
    return Group(*lines)
