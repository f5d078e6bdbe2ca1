"""Read a braze/aten op node's arguments by name, whatever mix of args and kwargs the graph used."""

from __future__ import annotations

from typing import Any

import torch.fx as fx


def op_args(node: fx.Node) -> dict[str, Any]:
    """Bind a node's args/kwargs to its op schema's argument names, defaults filled in."""
    out: dict[str, Any] = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        else:
            out[arg.name] = arg.default_value if arg.has_default_value() else None
    return out
