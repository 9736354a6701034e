"""Formulas: sympy expressions of each component and of the whole model.

Counts never need sympy (``expr.py`` evaluates shapes on ints), but the formulas
users read do. Importing sympy costs ~0.4 s, more than the whole analytic run
should, and a formula depends only on the family file and which modules a
config switches on, never on the sizes. So formulas are computed once per
(family file, task, active modules) and kept in a small JSON cache; later runs
read them back in milliseconds. Delete the cache folder any time: it is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .families import Component, Family

CACHE_VERSION = "1"


def cache_dir() -> Path:
    if os.environ.get("PARAMCALC_CACHE_DIR"):
        return Path(os.environ["PARAMCALC_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "paramcalc"


def attach_formulas(family: Family, components: list[Component], symbols: list[str]) -> tuple[str, str]:
    """Fill each component's ``formula``/``latex``; return the whole model's closed form (text, LaTeX)."""
    key_material = json.dumps(
        [CACHE_VERSION, family.digest, sorted(symbols), [(c.name, c.numel_expression()) for c in components]]
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:24]
    path = cache_dir() / f"formulas-{key}.json"
    formulas = _read(path)
    if not _well_formed(formulas, len(components)):
        formulas = compute_formulas(symbols, components)
        _write(path, formulas)
    for component, (text, latex) in zip(components, formulas["rows"]):
        component.formula, component.latex = text, latex
    return formulas["closed"], formulas["closed_latex"]


def sympy_symbols(names) -> dict:
    import sympy

    # Sizes are positive integers; saying so lets sympy simplify without case splits.
    return {s: sympy.Symbol(s, positive=True, integer=True) for s in names}


def parse_formula(text: str):
    """A formula paramcalc wrote in sympy's text form (``closed_form``) as a sympy expression.

    Every name in it becomes a plain ``sympy.Symbol`` of that name. ``sympy.sympify`` would not do:
    it reads ``I`` (BERT's FFN width) as the imaginary unit, ``N`` (T5's heads) as sympy's ``N``
    function, ``E`` as Euler's number and ``S`` as sympy's singleton registry.
    """
    import sympy

    from .expr import names

    return sympy.parse_expr(text, local_dict={name: sympy.Symbol(name) for name in names(text)})


def component_expression(component: Component, symbols: dict):
    """The component's count as a sympy expression: repeat * (sum over parameters of their numel)."""
    import sympy

    def parse(text):
        # local_dict keeps names such as I, N, S and E as our symbols, not sympy's constants
        return sympy.parse_expr(str(text), local_dict=symbols)

    body = sympy.expand(sum((sympy.Mul(*[parse(d) for d in shape]) for shape in component.shapes.values()),
                            sympy.Integer(0)))
    repeat = parse(component.repeat)
    return body if repeat == 1 else sympy.Mul(repeat, body)


def compute_formulas(symbol_names: list[str], components: list[Component]) -> dict:
    import sympy

    symbols = sympy_symbols(symbol_names)
    rows, total = [], sympy.Integer(0)
    for component in components:
        expression = component_expression(component, symbols)
        total += expression
        rows.append((sympy.sstr(expression), sympy.latex(expression)))
    # Group the total by its repeat symbols (layers), so the per-layer cost reads off directly.
    repeats = sorted({s for c in components for s in sympy.parse_expr(c.repeat, local_dict=symbols).free_symbols},
                     key=str)
    closed = sympy.collect(sympy.expand(total), repeats) if repeats else sympy.expand(total)
    return {"rows": rows, "closed": sympy.sstr(closed), "closed_latex": sympy.latex(closed)}


def _well_formed(formulas, rows: int) -> bool:
    return (isinstance(formulas, dict) and isinstance(formulas.get("rows"), list) and len(formulas["rows"]) == rows
            and all(isinstance(r, list) and len(r) == 2 for r in formulas["rows"])
            and isinstance(formulas.get("closed"), str) and isinstance(formulas.get("closed_latex"), str))


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, formulas: dict) -> None:
    # Atomic: write a temporary file and rename it, so a concurrent run never reads half a file.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
            json.dump(formulas, tmp)
        os.replace(tmp.name, path)
    except OSError:
        pass  # a read-only home only costs speed
