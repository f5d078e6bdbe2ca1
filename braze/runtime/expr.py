"""Plan expressions: shapes, strides, offsets and sizes over the dynamic dims, printed by the compiler from sympy
(integer arithmetic, `//`, `%`, `max`, `min`). Compiled once, evaluated per call."""

from __future__ import annotations

_EVAL_GLOBALS = {"__builtins__": {}, "max": max, "min": min}


class Expr:
    """A compiled shape/grid expression over the dynamic dims."""

    def __init__(self, text: str):
        self.text = text
        self.code = compile(text, "<braze-expr>", "eval")

    def __call__(self, syms: dict[str, int]) -> int:
        return int(eval(self.code, _EVAL_GLOBALS, syms))
