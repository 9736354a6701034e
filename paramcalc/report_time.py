"""The time table of a training step: by phase and op kind, its FLOPs, bytes moved, predicted time and
what bounds it (``paramcalc.timing``), rendered with rich beside the memory table."""

from __future__ import annotations

PHASE_NAMES = {"forward": "forward", "backward": "backward", "recompute": "checkpointed re-run",
               "optimizer": "optimizer step", "all_reduce": "all-reduce"}


def _amount(value: float, unit: str) -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:,.1f} {prefix}{unit}"
    return f"{value:,.0f} {unit}" if value else "—"


def _seconds(value: float) -> str:
    return f"{value * 1000:,.1f} ms" if value < 10 else f"{value:,.1f} s"


def time_table(throughput: dict, step):
    """A rich table of ``plan(...).throughput["table"]`` with the step's total underneath."""
    from rich.table import Table
    from rich.text import Text

    rows, total = throughput["table"], throughput["step_s"]
    accumulation = f", {step.grad_accum} micro-batches" if step.grad_accum > 1 else ""
    table = Table(title=f"step time on {throughput['profile']} ({throughput['source']}{accumulation})",
                  title_justify="left")
    for column in ("phase", "op kind", "FLOPs", "bytes moved", "time", "share", "bound"):
        table.add_column(column, justify="left" if column in ("phase", "op kind", "bound") else "right")
    shown = None
    for row in rows:
        phase = PHASE_NAMES[row["phase"]] if row["phase"] != shown else ""
        shown = row["phase"]
        table.add_row(phase, row["kind"], _amount(row["flops"], "FLOP"), _amount(row["bytes"], "B"),
                      _seconds(row["seconds"]), f"{100 * row['seconds'] / total:.1f} %", row["bound"])
    table.add_row(Text("step", style="bold"), "", _amount(sum(r["flops"] for r in rows), "FLOP"),
                  _amount(sum(r["bytes"] for r in rows), "B"), Text(_seconds(total), style="bold"), "100 %",
                  Text(throughput["bound"], style="bold"))
    return table


def phase_line(throughput: dict) -> str:
    """One line: the time of each phase."""
    return " + ".join(f"{PHASE_NAMES[k]} {_seconds(v)}" for k, v in throughput["phases"].items())
