"""Small helpers for writing rewrites: op checks, node creation with fake meta, the rewrite driver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

import braze.ops  # noqa: F401  (registers braze::*)
from braze.passes.context import PassContext

aten = torch.ops.aten
Rule = Callable[[fx.Node, PassContext], "fx.Node | None"]


def is_op(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def fake_value(target: Any, args: tuple, kwargs: dict, ctx: PassContext) -> Any:
    def to_fake(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return a.meta["val"]
        if isinstance(a, (list, tuple)):
            return type(a)(to_fake(x) for x in a)
        return a

    with ctx.fake_mode:
        return target(*to_fake(args), **{k: to_fake(v) for k, v in kwargs.items()})


def new_node(gm: fx.GraphModule, target: Any, args: tuple, kwargs: dict | None, ctx: PassContext,
             before: fx.Node) -> fx.Node:
    """Insert `target(*args, **kwargs)` before `before`, with meta["val"] computed on fake tensors."""
    kwargs = kwargs or {}
    with gm.graph.inserting_before(before):
        node = gm.graph.call_function(target, args, kwargs)
    node.meta["val"] = fake_value(target, args, kwargs, ctx)
    for key in ("stack_trace", "nn_module_stack"):
        if key in before.meta:
            node.meta[key] = before.meta[key]
    return node


# braze::linear's `activation` argument -> the ATen node that applies it when a pass splits the epilogue out
ACTIVATION_NODES: dict[str, tuple[Any, dict[str, Any]]] = {
    "silu": (aten.silu.default, {}),
    "relu": (aten.relu.default, {}),
    "gelu": (aten.gelu.default, {}),
    "gelu_tanh": (aten.gelu.default, {"approximate": "tanh"}),
}


def activate(gm: fx.GraphModule, y: fx.Node, kind: str, ctx: PassContext, before: fx.Node) -> fx.Node:
    """`kind`(y) as an ATen node before `before` ("none": y itself)."""
    if kind == "none":
        return y
    target, kwargs = ACTIVATION_NODES[kind]
    return new_node(gm, target, (y,), dict(kwargs), ctx, before)


def dce(gm: fx.GraphModule) -> None:
    """Dead-code elimination that treats every op as pure (SDPA's dropout tag makes FX keep it otherwise)."""
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))


def graph_rewrite(gm: fx.GraphModule, rules: dict[Any, Rule], ctx: PassContext) -> int:
    """Apply (op -> rule) once over the graph in order; a rule returns the replacement node or None."""
    count = 0
    for node in list(gm.graph.nodes):
        if getattr(node, "_erased", False) or node.op != "call_function" or node.target not in rules:
            continue
        replacement = rules[node.target](node, ctx)
        if replacement is not None and replacement is not node:
            node.replace_all_uses_with(replacement)
            count += 1
            dce(gm)
    dce(gm)
    gm.recompile()
    return count


def single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node) and isinstance(val(a), torch.Tensor)]
