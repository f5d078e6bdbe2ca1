"""Small helpers for writing rewrites: op checks, node creation with fake meta, the rewrite driver."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

import braze.ops  # noqa: F401  (registers braze::*)
from braze.passes.context import PassContext
from braze.passes.fake_memo import memo_call

aten = torch.ops.aten
Rule = Callable[[fx.Node, PassContext], "fx.Node | None"]


def is_op(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def _braze_fake_kernel(target: Any) -> Callable[..., Any] | None:
    """The registered fake implementation of a braze:: custom op. Calling it directly inside the fake mode skips
    the dispatcher's autograd and fake-tensor-cache layers (~14 ms a call, a third of a SmolLM2 compile); braze's
    fake implementations only allocate outputs (none uses torch.library.get_ctx)."""
    if not isinstance(target, torch._ops.OpOverload) or target.namespace != "braze":
        return None
    entry = torch._library.simple_registry.singleton.find(target._schema.name)
    return entry.fake_impl.kernel if entry.fake_impl.kernel is not None else None


def fake_value(target: Any, args: tuple, kwargs: dict, ctx: PassContext) -> Any:
    def to_fake(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return a.meta["val"]
        if isinstance(a, (list, tuple)):
            return type(a)(to_fake(x) for x in a)
        return a

    fargs, fkwargs = to_fake(args), {k: to_fake(v) for k, v in kwargs.items()}

    def compute() -> Any:
        with ctx.fake_mode:
            kernel = _braze_fake_kernel(target)
            if kernel is not None:
                return kernel(*fargs, **fkwargs)
            return target(*fargs, **fkwargs)

    return memo_call(ctx.fake_memo, target, fargs, fkwargs, compute)


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
    "relu2": (aten.relu.default, {}),  # then squared (activate)
}


def activate(gm: fx.GraphModule, y: fx.Node, kind: str, ctx: PassContext, before: fx.Node) -> fx.Node:
    """`kind`(y) as ATen nodes before `before` ("none": y itself; relu2: relu, then squared)."""
    if kind == "none":
        return y
    target, kwargs = ACTIVATION_NODES[kind]
    out = new_node(gm, target, (y,), dict(kwargs), ctx, before)
    return new_node(gm, aten.pow.Tensor_Scalar, (out, 2), {}, ctx, before) if kind == "relu2" else out


def dce(gm: fx.GraphModule) -> None:
    """Dead-code elimination that treats every op as pure (SDPA's dropout tag makes FX keep it otherwise)."""
    gm.graph.eliminate_dead_code(is_impure_node=lambda n: n.op in ("placeholder", "output"))


def _erase_dead_from(node: fx.Node) -> None:
    """Erase `node` if nothing uses it, then whatever only it used: the local part of `dce` a rewrite leaves
    behind (a whole-graph pass per match made rewriting quadratic in the graph size)."""
    work = [node]
    while work:
        n = work.pop()
        if getattr(n, "_erased", False) or n.users or n.op in ("placeholder", "output"):
            continue
        inputs = [a for a in n.all_input_nodes]
        n.graph.erase_node(n)
        work.extend(inputs)


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
            _erase_dead_from(node)  # later rules' single_user checks must not count dead users
    dce(gm)
    return count


def single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def tensor_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.args if isinstance(a, fx.Node) and isinstance(val(a), torch.Tensor)]
