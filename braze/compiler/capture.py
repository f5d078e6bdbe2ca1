"""Capture: torch.export with dynamic dims, decomposed to ATen (keeping linear and SDPA whole for the patterns).

HF causal LMs are captured through a wrapper `forward(input_ids, position_ids) -> logits` with dynamic batch
and sequence dims; any other nn.Module is captured from example arguments with a dynamic leading dim.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from braze.runtime.errors import CaptureError
from braze.runtime.plan import SymbolSpec

aten = torch.ops.aten
KEEP_WHOLE = [aten.linear.default, aten.scaled_dot_product_attention.default, aten.silu.default,
              aten.gelu.default, aten.matmul.default, aten._softmax.default]
EXTRA_DECOMPOSITIONS = [aten._log_softmax.default, aten.native_layer_norm.default]


@dataclass
class Captured:
    gm: fx.GraphModule
    weights: dict[str, torch.Tensor]
    user_inputs: list[str]
    symbols: list[SymbolSpec]
    out_spec: Any
    in_spec: Any
    causal_lm: bool
    fake_mode: Any
    example_inputs: list[torch.Tensor]


def is_causal_lm(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and type(model).__name__.endswith("ForCausalLM") and hasattr(model, "generate")


class CausalLMWrapper(torch.nn.Module):
    """The graph we capture from a HF causal LM: logits from token ids and explicit positions."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def _decomposition_table():
    table = torch.export.default_decompositions()
    for op in KEEP_WHOLE:
        if op in table:
            del table[op]
    extra = torch._decomp.get_decompositions(EXTRA_DECOMPOSITIONS)
    for op, fn in extra.items():
        table[op] = fn
    table[aten.var_mean.correction] = _var_mean
    return table


def _var_mean(x, dim=None, *, correction=None, keepdim=False):
    """var_mean as mean / sub / square / sum over the dims, which the fused family lowers (no prims)."""
    dims = list(range(x.dim())) if dim is None else [d % x.dim() for d in dim]
    n = 1
    for d in dims:
        n = n * x.shape[d]
    correction = 1 if correction is None else correction
    mean = torch.mean(x, dims, keepdim=True)
    centered = x - mean
    var = torch.sum(centered * centered, dims, keepdim=keepdim) / (n - correction)
    return var, (mean if keepdim else torch.squeeze(mean, dims))


def _export(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any, labels: dict) -> Captured:
    try:
        ep = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes)
        ep = ep.run_decompositions(_decomposition_table())
    except Exception as exc:  # export errors are long; keep the first line and say what to do
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"torch.export could not capture {type(module).__name__}: {first}") from exc
    gm = ep.graph_module
    sig = ep.graph_signature
    weights: dict[str, torch.Tensor] = {}
    user_inputs: list[str] = []
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
            user_inputs.append(name)
        elif spec.target in ep.state_dict:
            weights[name] = ep.state_dict[spec.target].detach()
        elif spec.target in ep.constants:
            weights[name] = ep.constants[spec.target].detach()
        else:
            raise CaptureError(f"cannot find the value of graph input {name} ({spec.target})")
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    symbols: list[SymbolSpec] = []
    for sym, rng in ep.range_constraints.items():
        name = str(sym)
        label = labels.get(name)
        if label is None:
            for inp in user_inputs:
                val = placeholders[inp].meta["val"]
                for d, s in enumerate(val.shape):
                    if isinstance(s, torch.SymInt) and str(s.node.expr) == name and label is None:
                        label = f"dim {d} of {inp}"
        upper = int(rng.upper) if rng.upper.is_number and str(rng.upper) not in ('oo', 'int_oo') else None
        lower = int(rng.lower) if rng.lower.is_number and 'oo' not in str(rng.lower) else 0
        symbols.append(SymbolSpec(name, label or name, lower, upper))
    fake_mode = torch._guards.detect_fake_mode([n.meta["val"] for n in placeholders.values() if "val" in n.meta])
    flat, _ = pytree.tree_flatten((args, kwargs))
    return Captured(gm, weights, user_inputs, symbols, ep.call_spec.out_spec, ep.call_spec.in_spec, False,
                    fake_mode, [t for t in flat if isinstance(t, torch.Tensor)])


def capture_causal_lm(model: torch.nn.Module, max_batch: int, max_seq: int) -> Captured:
    """Capture a HF causal LM with dynamic batch in [1, max_batch] and sequence in [1, max_seq]."""
    if hasattr(model, "set_attn_implementation"):
        try:
            current = getattr(model.config, "_attn_implementation", None)
            if current not in ("sdpa", "eager"):
                model.set_attn_implementation("sdpa")
        except Exception:  # older transformers: leave whatever the model uses
            pass
    device = next(model.parameters()).device
    b, s = min(2, max_batch), min(8, max_seq)
    vocab = int(getattr(model.config, "vocab_size", 32))
    ids = (torch.arange(b * s, device=device).reshape(b, s) * 7) % vocab
    pos = torch.arange(s, device=device).repeat(b, 1)
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch > 1 else None
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    dyn = ({0: batch, 1: seq} if batch else {1: seq},) * 2
    was_training = model.training
    model.eval()
    with torch.no_grad():
        cap = _export(CausalLMWrapper(model), (ids, pos), {}, dyn, {})
    model.train(was_training)
    for sym in cap.symbols:
        val = None
        for inp in cap.user_inputs[:1]:
            node = next(n for n in cap.gm.graph.nodes if n.name == inp)
            shape = node.meta["val"].shape
            if isinstance(shape[0], torch.SymInt) and str(shape[0].node.expr) == sym.name:
                val = "batch"
            if isinstance(shape[1], torch.SymInt) and str(shape[1].node.expr) == sym.name:
                val = "seq"
        sym.label = val or sym.label
    cap.causal_lm = True
    return cap


def capture_module(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any = None) -> Captured:
    """Capture any module from example arguments; by default dim 0 of every tensor input is dynamic."""
    if dynamic_shapes is not None:  # "static": every dim as in the example (what Dynamo hands a backend)
        with torch.no_grad():
            return _export(module, tuple(args), dict(kwargs), None if dynamic_shapes == "static" else dynamic_shapes,
                           {})
    bound = inspect.signature(module.forward).bind(*args, **kwargs)

    params = inspect.signature(module.forward).parameters

    def leading(kind):
        def one(name, value):
            return {0: kind(name)} if isinstance(value, torch.Tensor) and value.dim() >= 1 else None

        out = {}
        for name, value in bound.arguments.items():
            if params[name].kind is inspect.Parameter.VAR_POSITIONAL:
                out[name] = tuple(one(f"{name}{i}", v) for i, v in enumerate(value))
            elif params[name].kind is inspect.Parameter.VAR_KEYWORD:
                out[name] = {k: one(k, v) for k, v in value.items()}
            else:
                out[name] = one(name, value)
        return out

    # a named dim from 1 up keeps batch-1 calls in range; if the model pins the dim, let export decide (AUTO)
    try:
        with torch.no_grad():
            return _export(module, tuple(args), dict(kwargs),
                           leading(lambda n: torch.export.Dim(f"{n}_dim0", min=1)), {})
    except CaptureError:
        with torch.no_grad():
            return _export(module, tuple(args), dict(kwargs), leading(lambda n: torch.export.Dim.AUTO), {})
