"""Plan expressions: shapes, strides, offsets and sizes over the dynamic dims, printed by the compiler from sympy
(integer arithmetic, `//`, `%`, `max`, `min`). Parsed into that restricted form (a plan read from a package is
data, never code: any other syntax is refused), compiled once, evaluated per call."""

from __future__ import annotations

import ast

from braze.runtime.errors import BrazeError

_EVAL_GLOBALS = {"__builtins__": {}, "max": max, "min": min}
_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.FloorDiv, ast.Mod)
_FUNCS = ("max", "min")
MAX_EXPR_CHARS = 4096


class ExprError(BrazeError, ValueError):
    """A plan expression outside the integer arithmetic plans are made of."""


def _check(node: ast.AST, text: str) -> None:
    def refuse(what: str) -> ExprError:
        return ExprError(f"plan expression {text[:80]!r}: {what} is not allowed (plans hold integer arithmetic "
                         "over their dims: + - * // %, max, min)")

    if isinstance(node, ast.Expression):
        _check(node.body, text)
    elif isinstance(node, ast.BinOp):
        if not isinstance(node.op, _BINOPS):
            raise refuse(f"operator {type(node.op).__name__}")
        _check(node.left, text)
        _check(node.right, text)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, (ast.USub, ast.UAdd)):
            raise refuse(f"operator {type(node.op).__name__}")
        _check(node.operand, text)
    elif isinstance(node, ast.Constant):
        if type(node.value) is not int:
            raise refuse(f"constant {node.value!r}")
    elif isinstance(node, ast.Name):
        if node.id.startswith("_") or node.id in _FUNCS:
            raise refuse(f"name {node.id!r}")
    elif isinstance(node, ast.Call):
        if not (isinstance(node.func, ast.Name) and node.func.id in _FUNCS) or node.keywords or not node.args:
            raise refuse("this call")
        for arg in node.args:
            _check(arg, text)
    else:
        raise refuse(type(node).__name__)


def parse_expr(text: str) -> ast.Expression:
    """The validated syntax tree of a plan expression (ExprError, one line, for anything else)."""
    if not isinstance(text, str):
        raise ExprError(f"plan expression must be a string, got {type(text).__name__}")
    if len(text) > MAX_EXPR_CHARS:
        raise ExprError(f"plan expression of {len(text)} characters (at most {MAX_EXPR_CHARS})")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ExprError(f"plan expression {text[:80]!r} does not parse") from None
    _check(tree, text)
    return tree


class Expr:
    """A compiled shape/grid expression over the dynamic dims."""

    def __init__(self, text: str):
        self.text = text
        self.code = compile(parse_expr(text), "<braze-expr>", "eval")

    def __call__(self, syms: dict[str, int]) -> int:
        return int(eval(self.code, _EVAL_GLOBALS, syms))  # validated by parse_expr: integer arithmetic only
