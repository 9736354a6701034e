"""Integer arithmetic over config symbols, without sympy.

Shapes in the family files are small expressions such as ``3*H`` or ``N*K``.
Counting must be exact and instant, so they are evaluated here on Python ints
(sympy is only needed to *show* formulas, see ``symbolic.py``).
"""

from __future__ import annotations

import ast
import operator

from .errors import ParamcalcError

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


def evaluate(expression: str | int, values: dict[str, int]) -> int:
    """Evaluate ``expression`` with ``values`` bound to its names; ints only."""
    if isinstance(expression, int):
        return expression
    try:
        tree = ast.parse(str(expression), mode="eval")
    except SyntaxError as exc:
        raise ParamcalcError(f"invalid shape expression {expression!r}: {exc.msg}") from None
    return _eval(tree.body, values, expression)


def names(expression: str | int) -> set[str]:
    """The symbol names an expression uses."""
    if isinstance(expression, int):
        return set()
    return {n.id for n in ast.walk(ast.parse(str(expression), mode="eval")) if isinstance(n, ast.Name)}


def _eval(node: ast.AST, values: dict[str, int], source) -> int:
    if isinstance(node, ast.Constant) and isinstance(node.value, int):
        return int(node.value)
    if isinstance(node, ast.Name):
        if node.id not in values:
            raise ParamcalcError(f"shape expression {source!r} uses unknown symbol {node.id!r}")
        return values[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_eval(node.left, values, source), _eval(node.right, values, source))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_eval(node.operand, values, source)
    raise ParamcalcError(f"shape expression {source!r} may only use integers, symbols and + - * // % **")
