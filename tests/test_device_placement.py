"""Compile-time fake tensors follow the model's device: a model on a GPU must not meet CPU-made placeholders in
fake propagation (the first GPU run failed so: "found two different devices cuda:0, cpu"). The device here is
`meta`, which needs no GPU: a placeholder or weight made on the CPU shows up as such."""

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from braze.compiler.generation import _respecialize_decode
from braze.passes.context import PassContext


class Embed(torch.nn.Module):
    def forward(self, embed_weight, input_ids):
        return torch.nn.functional.embedding(input_ids, embed_weight)


def test_decode_respecialization_makes_inputs_on_the_models_device():
    gm = fx.symbolic_trace(Embed())
    weights = {"embed_weight": torch.empty(10, 4, device="meta")}
    capture_mode = FakeTensorMode()
    for node in gm.graph.nodes:
        if node.name == "input_ids":
            node.meta["val"] = capture_mode.from_tensor(torch.empty(2, 5, dtype=torch.long, device="meta"))
    assert _respecialize_decode(gm, weights, max_batch=2) == []
    ids = next(n for n in gm.graph.nodes if n.name == "input_ids")
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert ids.meta["val"].device.type == "meta" and tuple(ids.meta["val"].shape) == (2, 1)  # decode: S = 1
    assert out.meta["val"].device.type == "meta" and tuple(out.meta["val"].shape) == (2, 1, 4)


def test_weights_a_pass_adds_go_to_the_models_device():
    gm = fx.symbolic_trace(Embed())
    ctx = PassContext(config=None, weights={"embed_weight": torch.empty(10, 4, device="meta")},
                      fake_mode=FakeTensorMode())
    node = ctx.add_weight(gm, "attn_bias_full", torch.zeros(1, 8, 8))
    assert ctx.weights[node.name].device.type == "meta" and node.meta["val"].device.type == "meta"
