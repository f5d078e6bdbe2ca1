"""The compiled plan: what a runtime needs to execute a model, and nothing from the compiler.

A plan is plain data (JSON-serializable): inputs with their symbolic shapes, weights, buffers, an ordered list of
steps (fused kernel launches, template kernel launches, free view ops, eager fallbacks) and the kernels' sources.
Shapes and grids are Python expressions over the dynamic dims, printed by the compiler from sympy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class InputSpec:
    name: str
    shape: list[str]  # expressions; a bare symbol binds a dynamic dim
    dtype: str
    kind: str  # "user" | "weight"
    index_bound: int | None = None  # ids that index an embedding table: valid values are [0, index_bound)


@dataclass
class SymbolSpec:
    name: str
    label: str  # what a user calls it: "batch", "seq", "dim 0 of x"
    lower: int
    upper: int | None


@dataclass
class BufferSpec:
    name: str
    shape: list[str]
    dtype: str
    strides: list[str] | None = None  # None: contiguous
    slot: int | None = None  # memory-plan arena (None: its own allocation)
    offset: str | None = None  # byte offset inside the arena (expression)


@dataclass
class Step:
    kind: str  # "fused" | "template" | "view" | "eager"
    outputs: list[str]
    inputs: list[str] = field(default_factory=list)
    kernel: str | None = None  # kernel name (fused/template)
    launcher: str | None = None  # template launcher name
    params: dict[str, Any] = field(default_factory=dict)
    target: str | None = None  # op name for view/eager steps
    args: Any = None  # encoded args for view/eager steps
    kwargs: Any = None
    nodes: list[str] = field(default_factory=list)  # FX nodes covered (for reports)
    free_after: list[str] = field(default_factory=list)  # buffers whose last use is this step


@dataclass
class Plan:
    name: str
    inputs: list[InputSpec]
    symbols: list[SymbolSpec]
    buffers: list[BufferSpec]
    steps: list[Step]
    outputs: list[str]
    kernels: dict[str, str]  # kernel name -> source
    slots: list[str] = field(default_factory=list)  # arena slot sizes in bytes (expressions)
    out_spec: Any = None
    launches: int = 0  # per call on the interpreter at the smallest shapes (braze.kernels.launch_count)

    def expressions(self) -> list[str]:
        """Every expression the executor evaluates (shapes, strides, offsets, slots, fused sizes, symbolic args)."""
        out = [e for i in self.inputs for e in i.shape] + list(self.slots)
        for b in self.buffers:
            out += [*b.shape, *(b.strides or []), *([b.offset] if b.offset is not None else [])]

        def walk(a: object) -> None:
            if isinstance(a, list):
                for x in a:
                    walk(x)
            elif isinstance(a, dict):
                if "sym" in a:
                    out.append(a["sym"])
                for x in a.values():
                    if isinstance(x, (list, dict)):
                        walk(x)

        for s in self.steps:
            if s.kind == "fused":
                out += [s.params.get("xnumel", "1"), s.params.get("rnumel", "1")]
            walk(s.params)
        return out

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw = json.loads(text)
        return cls(
            name=raw["name"],
            inputs=[InputSpec(**x) for x in raw["inputs"]],
            symbols=[SymbolSpec(**x) for x in raw["symbols"]],
            buffers=[BufferSpec(**x) for x in raw["buffers"]],
            steps=[Step(**x) for x in raw["steps"]],
            outputs=raw["outputs"],
            kernels=raw["kernels"],
            slots=raw.get("slots", []),
            out_spec=raw.get("out_spec"),
            launches=raw.get("launches", 0),
        )

