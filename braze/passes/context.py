"""What every pass receives: the config, the weights it may add, the fake mode and the report it writes to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx


@dataclass
class PassContext:
    config: Any
    weights: dict[str, torch.Tensor]
    fake_mode: Any
    causal_lm: bool = False
    notes: dict[str, list[str]] = field(default_factory=dict)
    current_pass: str = ""
    fake_memo: dict = field(default_factory=dict)  # braze/passes/fake_memo.py: one fake op per distinct signature

    @property
    def device(self) -> torch.device:
        """Where the model's weights live: weights a pass adds go there too, so plans never mix devices."""
        return next((w.device for w in self.weights.values() if isinstance(w, torch.Tensor)), torch.device("cpu"))

    def note(self, message: str) -> None:
        self.notes.setdefault(self.current_pass, []).append(message)

    def add_weight(self, gm: fx.GraphModule, name: str, value: torch.Tensor) -> fx.Node:
        """Register a new weight and its placeholder (placed first, so every node can use it)."""
        base, k = name, 0
        names = {n.name for n in gm.graph.nodes}
        while name in names or name in self.weights:
            k += 1
            name = f"{base}_{k}"
        value = value.to(self.device)  # no copy when it is there already
        self.weights[name] = value
        first = next(iter(gm.graph.nodes))
        with gm.graph.inserting_before(first):
            node = gm.graph.placeholder(name)
        node.meta["val"] = self.fake_mode.from_tensor(value, static_shapes=True)
        return node
