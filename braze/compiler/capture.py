"""Capture: torch.export with dynamic dims, decomposed to ATen (keeping linear and SDPA whole for the patterns).

HF causal LMs are captured through a wrapper `forward(input_ids, position_ids) -> logits` with dynamic batch
and sequence dims; any other nn.Module is captured from example arguments with a dynamic leading dim.

`torch.export` gives the training IR; `run_decompositions` would trace the whole graph a second time to reach
the decomposed ATen IR, which costs more than the export itself. When every op of the training IR is either
already in that IR or one of the few that `LOCAL_DECOMPOSITIONS` rewrites node by node (transpose -> permute,
`to` -> `_to_copy`, `diff` -> slices, ...), the training IR is consumed directly; anything else (mutations,
higher-order ops, other composite ops) takes the full re-trace.

Tracing a decoder stack costs the same per layer, so when a causal LM's layers are built alike (same modules,
shapes and attributes; no per-layer config list such as alternating attention types), a two-layer copy is traced
and layer 1 is stamped out for the remaining layers (`_capture_stamped`); the plans are the same as from tracing
every layer (tests/test_compile_cache.py compares them), and anything unexpected traces the whole model.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import operator
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from braze.compiler.hf_functions import braze_functions
from braze.runtime.errors import CaptureError, KVCacheUnsupportedError, first_line
from braze.runtime.plan import SymbolSpec

aten = torch.ops.aten
KEEP_WHOLE = [aten.linear.default, aten.scaled_dot_product_attention.default, aten.silu.default,
              aten.gelu.default, aten.matmul.default, aten._softmax.default]
# composite ops torch.export keeps whole that decompose into ops the fused kernels lower: InstanceNorm, vector norms
# (F.normalize), elementwise ops defined by others, global average pooling
EXTRA_DECOMPOSITIONS = [
    aten._log_softmax.default, aten.native_layer_norm.default, aten._native_batch_norm_legit.no_stats,
    aten.linalg_vector_norm.default, aten.leaky_relu.default, aten.elu.default, aten.hardtanh.default,
    aten._adaptive_avg_pool2d.default,
]


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
    # buffers the forward writes (placeholder name -> the module's buffer): plan inputs the compiled model feeds
    # itself, kept out of `weights` so no pass folds or quantizes them
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    # the graph's leading outputs, one per in-place write: ("state", name) or ("input", user input name)
    mutations: list[tuple[str, str]] = field(default_factory=list)


def capture_failure(error: CaptureError) -> bool:
    """Whether `error` says the model could not become one graph (the Dynamo fallback's cue), not that a captured
    graph lacks something later (KVCacheUnsupportedError: the forward plan still runs)."""
    return not isinstance(error, KVCacheUnsupportedError)


def is_causal_lm(model: torch.nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    name = type(model).__name__
    if cfg is None or not hasattr(model, "generate") or getattr(cfg, "is_encoder_decoder", False):
        return False
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")  # GPT2LMHeadModel, GPTJ, CodeGen, ...


class CausalLMWrapper(torch.nn.Module):
    """The graph we capture from a HF causal LM: logits from token ids and explicit positions."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def _decomposition_table() -> dict:
    return dict(_built_decomposition_table())  # a copy: the built one is shared by every compile of the process


@functools.lru_cache(maxsize=1)
def _built_decomposition_table() -> Any:
    """Built once per process (~1.5 s: torch materializes every default decomposition)."""
    table = torch.export.default_decompositions()
    for op in KEEP_WHOLE:
        if op in table:
            del table[op]
    extra = torch._decomp.get_decompositions(EXTRA_DECOMPOSITIONS)
    for op, fn in extra.items():
        table[op] = fn
    table[aten.var_mean.correction] = _var_mean
    table[aten.var.correction] = lambda x, dim=None, *, correction=None, keepdim=False: _var_mean(
        x, dim, correction=correction, keepdim=keepdim)[0]
    table[aten.mean.default] = lambda x, dtype=None: torch.mean(x, list(range(x.dim())), dtype=dtype)
    table[aten._native_batch_norm_legit_no_training.default] = _batch_norm_eval
    table[aten.native_group_norm.default] = _group_norm
    return table


def _group_norm(x, weight, bias, n, c, hw, group, eps):
    """GroupNorm as row statistics over [N, G, C / G * HW] (torch's decomposition leaves as_strided views, which
    no kernel lowers)."""
    rows = x.reshape(n, group, -1)
    mean = rows.mean(-1, keepdim=True)
    centered = rows - mean
    rstd = torch.rsqrt((centered * centered).mean(-1, keepdim=True) + eps)
    out = _channel_affine((centered * rstd).reshape(x.shape), weight, bias)
    return out, mean.reshape(n, group), rstd.reshape(n, group)


def _channel_affine(x, weight, bias):
    """x * weight + bias per channel (dim 1), either optional: the normalizations' affine tail."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    if weight is not None:
        x = x * weight.reshape(shape)
    if bias is not None:
        x = x + bias.reshape(shape)
    return x


def _batch_norm_eval(x, weight, bias, running_mean, running_var, momentum, eps):
    """Eval-mode BatchNorm as a per-channel affine map of dim 1 (the fused kernels lower it; torch's decomposition
    goes through the training form, which is not functional)."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = (x - running_mean.reshape(shape)) * torch.rsqrt(running_var.reshape(shape) + eps)
    return _channel_affine(out, weight, bias), x.new_empty(0), x.new_empty(0)


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


# ---- local decompositions of the training IR ------------------------------------------------------------
# Each rule rewrites one node into the ops run_decompositions would produce for it (up to what the normalize pass
# erases anyway: clones, aliases, same-dtype casts, view vs reshape); `_local_ok` says beforehand whether it can.
LocalRule = Callable[[fx.Node, Any], None]
SYM_FUNCTIONS = {operator.getitem, operator.add, operator.sub, operator.mul, operator.floordiv, operator.mod,
                 operator.neg, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                 operator.truediv, torch.sym_int, torch.sym_float, torch.sym_max, torch.sym_min, torch.sym_not}


def _replace(node: fx.Node, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """`target(*args, **kwargs)` in place of `node`, with node's meta (its value is the same tensor)."""
    with node.graph.inserting_before(node):
        new = node.graph.call_function(target, args, kwargs or {})
    new.meta.update(node.meta)
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)
    return new


def _add(node: fx.Node, target: Any, args: tuple, kwargs: dict, fake_mode: Any) -> fx.Node:
    """A new node before `node` (meta copied from it) whose value is computed on fake tensors."""
    with node.graph.inserting_before(node):
        new = node.graph.call_function(target, args, kwargs)
    new.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    fake = fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
    with fake_mode:
        new.meta["val"] = target(*fake[0], **fake[1])
    return new


def _alias_input(node: fx.Node, _fake_mode: Any) -> None:
    node.replace_all_uses_with(node.args[0])
    node.graph.erase_node(node)


def _to(node: fx.Node, _fake_mode: Any) -> None:
    """aten.to.* / type_as: the input itself when nothing changes, else _to_copy (what the decomposition does)."""
    src, out = node.args[0].meta["val"], node.meta["val"]
    if src.dtype == out.dtype and src.device == out.device:
        return _alias_input(node, _fake_mode)
    kwargs: dict[str, Any] = {"dtype": out.dtype} if src.dtype != out.dtype else {}
    if src.device != out.device:
        kwargs["device"] = out.device
    _replace(node, aten._to_copy.default, (node.args[0],), kwargs)


def _transpose(node: fx.Node, _fake_mode: Any) -> None:
    x = node.args[0]
    ndim = x.meta["val"].dim()
    perm = list(range(ndim))
    if node.target == aten.t.default:
        if ndim < 2:
            return _alias_input(node, _fake_mode)
        perm = [1, 0]
    elif ndim:
        d0, d1 = (d % ndim for d in node.args[1:3])
        perm[d0], perm[d1] = perm[d1], perm[d0]
    _replace(node, aten.permute.default, (x, perm))


def _rename(target: Any) -> LocalRule:
    def rule(node: fx.Node, _fake_mode: Any) -> None:
        _replace(node, target, node.args, dict(node.kwargs))

    return rule


def _arange(node: fx.Node, _fake_mode: Any) -> None:
    args = list(node.args)
    if node.target == aten.arange.default:
        start, end, step = 0, args[0], 1
    else:
        start, end, step = (args + [1])[:3]
    kwargs = {"layout": torch.strided, **node.kwargs}
    _replace(node, aten.arange.start_step, (start, end) if step == 1 else (start, end, step), kwargs)


def _new_filled(node: fx.Node, _fake_mode: Any) -> None:
    out = node.meta["val"]
    fill = {aten.new_ones.default: 1, aten.new_zeros.default: 0}.get(node.target)
    if fill is None:
        fill = node.args[2] if len(node.args) > 2 else node.kwargs["fill_value"]
    kwargs = {"dtype": out.dtype, "layout": torch.strided, "device": out.device, "pin_memory": False}
    _replace(node, aten.full.default, (node.args[1], fill), kwargs)


def _diff_options(node: fx.Node) -> dict[str, Any]:
    names = ("n", "dim", "prepend", "append")
    opts = dict(zip(names, (1, -1, None, None)))
    opts.update(dict(zip(names, node.args[1:])))
    opts.update(node.kwargs)
    return opts


def _diff(node: fx.Node, fake_mode: Any) -> None:
    """diff(x, 1, dim, prepend, append) -> cat -> slice[1:] - slice[:-1] along dim."""
    opts = _diff_options(node)
    x = node.args[0]
    dim = opts["dim"] % x.meta["val"].dim()
    parts = [p for p in (opts["prepend"], x, opts["append"]) if p is not None]
    whole = _add(node, aten.cat.default, (parts, dim), {}, fake_mode) if len(parts) > 1 else x
    length = whole.meta["val"].shape[dim]
    if isinstance(length, int):
        end: Any = length
        before_end: Any = length - 1
    else:
        end = _add(node, aten.sym_size.int, (whole, dim), {}, fake_mode)
        before_end = _add(node, operator.sub, (end, 1), {}, fake_mode)
    hi = _add(node, aten.slice.Tensor, (whole, dim, 1, end), {}, fake_mode)
    lo = _add(node, aten.slice.Tensor, (whole, dim, 0, before_end), {}, fake_mode)
    _replace(node, aten.sub.Tensor, (hi, lo))


def _argument(node: fx.Node, name: str, default: Any = None) -> Any:
    for i, arg in enumerate(node.target._schema.arguments):
        if arg.name == name:
            return node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
    return default


def _local_ok(node: fx.Node) -> bool:
    """Whether the node's local rule applies (checked for every node before any is rewritten)."""
    if not isinstance(node.meta.get("val"), torch.Tensor):
        return False
    if node.target not in (aten.arange.default, aten.arange.start, aten.arange.start_step) and not (
            node.args and isinstance(node.args[0], fx.Node) and isinstance(node.args[0].meta.get("val"), torch.Tensor)):
        return False
    if node.target in TO_OPS:
        return not _argument(node, "copy", False) and _argument(node, "memory_format") in (None, torch.preserve_format)
    if node.target == aten.diff.default:
        opts = _diff_options(node)
        parts = (opts["prepend"], opts["append"])
        return opts["n"] == 1 and all(p is None or isinstance(p, fx.Node) for p in parts)
    if node.target == aten.dropout.default:
        return not _argument(node, "train", False)
    return True


TO_OPS = (aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.to.other, aten.type_as.default)
LOCAL_DECOMPOSITIONS: dict[Any, LocalRule] = {
    **dict.fromkeys(TO_OPS, _to),
    aten.transpose.int: _transpose, aten.t.default: _transpose,
    aten.contiguous.default: _rename(aten.clone.default),
    aten.__and__.Tensor: _rename(aten.bitwise_and.Tensor), aten.__or__.Tensor: _rename(aten.bitwise_or.Tensor),
    aten.__xor__.Tensor: _rename(aten.bitwise_xor.Tensor),
    aten.arange.default: _arange, aten.arange.start: _arange,
    aten.new_ones.default: _new_filled, aten.new_zeros.default: _new_filled, aten.new_full.default: _new_filled,
    aten.diff.default: _diff,
    aten.dropout.default: _alias_input,
}
# composite or table ops that the decomposed IR keeps as they are (reshape: the normalize pass turns the view /
# clone + view the decomposition makes back into reshape)
LOCAL_KEEP = {aten.reshape.default, aten.sym_size.int}


def _is_composite(op: torch._ops.OpOverload) -> bool:
    key = torch._C.DispatchKey.CompositeImplicitAutograd
    return torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), key) or key in op.py_kernels


def _training_ir_usable(ep: torch.export.ExportedProgram, table: Any) -> bool:
    """Whether `decompose_locally` can bring this training IR to the decomposed IR without a re-trace."""
    sig = torch.export.graph_signature
    if any(spec.kind != sig.OutputKind.USER_OUTPUT for spec in ep.graph_signature.output_specs):
        return False  # mutated buffers or inputs need functionalization
    decomposed = set(table.keys()) if hasattr(table, "keys") else set(table)
    for node in ep.graph.nodes:
        if node.op == "get_attr":
            return False
        if node.op != "call_function":
            continue
        op = node.target
        if not isinstance(op, torch._ops.OpOverload):
            if op in SYM_FUNCTIONS:
                continue
            return False  # higher-order ops, grad-mode wrappers, ...
        if op in LOCAL_DECOMPOSITIONS:
            if not _local_ok(node):
                return False
            continue
        if op in LOCAL_KEEP or op in KEEP_WHOLE:
            continue
        if op._schema.is_mutable or op in decomposed or _is_composite(op):
            return False
    return True


def decompose_locally(ep: torch.export.ExportedProgram, table: Any) -> bool:
    """Rewrite ep's training IR into the decomposed ATen IR in place, node by node; False (and ep untouched) when
    the graph needs the full `run_decompositions` re-trace."""
    if not _training_ir_usable(ep, table):
        return False
    gm = ep.graph_module
    fake_mode = torch._guards.detect_fake_mode([n.meta["val"] for n in gm.graph.nodes
                                                if n.op == "placeholder" and "val" in n.meta])
    todo = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in LOCAL_DECOMPOSITIONS]
    for node in todo:
        LOCAL_DECOMPOSITIONS[node.target](node, fake_mode)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return True


def lazy_module(root: torch.nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule whose Python code is generated on first use (a call, `.code`), not on every recompile().

    Passes only read and edit the graph; regenerating the code of a 30-layer graph costs ~0.2 s, and the generated
    kernels never run it (only the reference executor and golden checks do). Inductor uses the same class for the
    same reason; torch is pinned, so this private class is stable for us."""
    from torch.fx._lazy_graph_module import _LazyGraphModule

    return _LazyGraphModule(root, graph)


def _symbol_ranges(ep: torch.export.ExportedProgram) -> dict[Any, tuple[int, int | None]]:
    """(lower, upper) of each dynamic dim; an unbounded end is 0 / None."""
    out = {}
    for sym, rng in ep.range_constraints.items():
        lower = int(rng.lower) if rng.lower.is_number and "oo" not in str(rng.lower) else 0
        upper = int(rng.upper) if rng.upper.is_number and "oo" not in str(rng.upper) else None
        out[sym] = (lower, upper)
    return out


MAX_ASSERT_POINTS = 1 << 16  # enumerated only when value ranges cannot prove an assert


def holds_over_ranges(expr: Any, ranges: dict[Any, tuple[int, int | None]]) -> bool:
    """Whether the sympy condition `expr` is true at every integer point of the symbols' declared ranges: proven by
    torch's value-range analysis, else checked point by point with torch's own evaluator of its sympy functions
    (False when a range is unbounded or the grid is too large to enumerate)."""
    import itertools

    import sympy
    from torch.utils._sympy.interp import sympy_interp
    from torch.utils._sympy.reference import PythonReferenceAnalysis
    from torch.utils._sympy.value_ranges import ValueRanges, bound_sympy

    if expr in (sympy.true, True):
        return True
    syms = sorted(expr.free_symbols, key=str)
    if any(sym not in ranges or ranges[sym][1] is None for sym in syms):
        return False
    bounds = bound_sympy(expr, {sym: ValueRanges(*ranges[sym]) for sym in syms})
    if bounds.lower in (sympy.true, True):
        return True
    axes = [range(ranges[sym][0], ranges[sym][1] + 1) for sym in syms]
    if functools.reduce(operator.mul, (len(axis) for axis in axes), 1) > MAX_ASSERT_POINTS:
        return False
    return all(bool(sympy_interp(PythonReferenceAnalysis, dict(zip(syms, point)), expr))
               for point in itertools.product(*axes))


def _largest_size_that_holds(expr: Any, ranges: dict[Any, tuple[int, int | None]]) -> str:
    """', which holds up to N of lo..hi' when `expr` has one size and holds from its lower bound up to N: what
    to pass as max_seq / max_batch instead (MPT refuses its config's max_seq_len positions and more)."""
    from torch.utils._sympy.interp import sympy_interp
    from torch.utils._sympy.reference import PythonReferenceAnalysis

    syms = list(getattr(expr, "free_symbols", ()))
    if len(syms) != 1 or syms[0] not in ranges or ranges[syms[0]][1] is None:
        return ""
    lo, hi = ranges[syms[0]]
    if hi - lo > MAX_ASSERT_POINTS:
        return ""
    best = None
    for size in range(lo, hi + 1):
        if not bool(sympy_interp(PythonReferenceAnalysis, {syms[0]: size}, expr)):
            break
        best = size
    return "" if best is None else f", which holds for sizes {lo}..{best} of {lo}..{hi}"


def drop_proven_asserts(gm: fx.GraphModule, ranges: dict[Any, tuple[int, int | None]]) -> None:
    """Remove the runtime shape asserts a deferred-guard export leaves, each after proving it over the compiled
    range (plans check their inputs against that range); CaptureError names one that does not hold."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten._assert_scalar.default:
            continue
        cond = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else node.args[0]
        expr = cond.node.expr if isinstance(cond, torch.SymBool) else None
        if expr is None or not holds_over_ranges(expr, ranges):
            raise CaptureError(f"the model constrains its input shapes ({expr}) inside the compiled range"
                               f"{_largest_size_that_holds(expr, ranges)}; compile with a max_batch / max_seq "
                               "range the model accepts")
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.recompile()


def _export_program(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any) -> Any:
    """torch.export, and once more with deferred runtime asserts when the shape solver cannot prove a guard that
    holds over the whole range (torch 2.11 cannot prove min(D*s, r*D*s) == D*s from the reshape of an expanded
    KV head, HF's repeat_kv, though s >= 1): `drop_proven_asserts` then checks each assert over the range."""
    try:
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes), False
    except Exception as exc:
        if "Constraints violated" not in str(exc) or dynamic_shapes is None:
            raise
        return torch.export.export(module, args, kwargs, dynamic_shapes=dynamic_shapes,
                                   prefer_deferred_runtime_asserts_over_guards=True), True


@contextlib.contextmanager
def _quiet_export() -> Any:
    """A refused export prints the partial graph to stderr (and torch's loggers write about it); braze
    says why in one line (CaptureError, or the Dynamo fallback's warning), so that text is dropped. What an export
    that succeeds writes to stderr is passed on."""
    # the shape solver warns; fake tensors log each failing meta function with its whole trace at ERROR level
    # torch.export also warns that a batch-1 example specializes dim 0 (a later call recompiles it dynamic)
    quieted = {"torch.fx.experimental.symbolic_shapes": logging.ERROR,
               "torch._subclasses.fake_tensor": logging.CRITICAL, "torch._export.non_strict_utils": logging.ERROR}
    loggers = {logging.getLogger(name): level for name, level in quieted.items()}
    saved = {logger: logger.level for logger in loggers}
    for logger, level in loggers.items():
        logger.setLevel(level)
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    finally:
        for logger, level in saved.items():
            logger.setLevel(level)
    sys.stderr.write(held.getvalue())


@contextlib.contextmanager
def _unmarked_after(args: tuple, kwargs: dict) -> Any:
    """torch.export marks the caller's tensors with Dynamo's dynamic-dim attributes and leaves them there, so a
    later torch.compile of the same tensors (the Dynamo fallback) would trace them dynamic: they are removed."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    before = [set(vars(t)) for t in tensors]
    try:
        yield
    finally:
        for t, had in zip(tensors, before):
            for name in [n for n in vars(t) if "_dynamo" in n and n not in had]:
                delattr(t, name)


def _inline_constant_inputs(gm: fx.GraphModule, user_inputs: list[str]) -> list[str]:
    """torch.export keeps a float / int / bool / str argument as a graph input holding the value it specialized on;
    the plan's inputs are tensors, so the value is written into the ops that read it and the input removed (the
    call signature, runtime/call_signature.py, holds calls to that value). Returns the remaining user inputs."""
    kept = []
    for node in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        if node.name not in user_inputs:
            continue
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor) or not isinstance(value, (bool, int, float, str)):
            kept.append(node.name)
            continue
        def constant(a: fx.Node, node: fx.Node = node, value: Any = value) -> Any:
            return value if a is node else a

        for user in list(node.users):
            user.args, user.kwargs = fx.node.map_arg(user.args, constant), fx.node.map_arg(user.kwargs, constant)
        gm.graph.erase_node(node)
    if len(kept) != len(user_inputs):
        gm.recompile()
    return kept


def _export(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any, labels: dict) -> Captured:
    try:
        with _quiet_export(), _unmarked_after(args, kwargs), braze_functions(module):
            ep, deferred = _export_program(module, args, kwargs, dynamic_shapes)
        table = _decomposition_table()
        if not decompose_locally(ep, table):
            ep = ep.run_decompositions(table)
        gm = lazy_module(ep.graph_module, ep.graph_module.graph)
        if deferred:
            drop_proven_asserts(gm, _symbol_ranges(ep))
    except CaptureError:
        raise
    except Exception as exc:  # export errors are long; keep the first line and say what to do
        name = type(module.model if isinstance(module, CausalLMWrapper) else module).__name__
        raise CaptureError(f"torch.export could not capture {name}: {_export_reason(exc)}") from exc
    sig = ep.graph_signature
    mutated_buffers, mutations = _mutations(ep, module)
    weights: dict[str, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}
    user_inputs: list[str] = []
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
            user_inputs.append(name)
        elif spec.target in mutated_buffers:
            state[name] = ep.state_dict[spec.target].detach()
            mutations = [("state", name) if m == ("buffer", spec.target) else m for m in mutations]
        elif spec.target in ep.state_dict:
            weights[name] = ep.state_dict[spec.target].detach()
        elif spec.target in ep.constants:
            weights[name] = ep.constants[spec.target].detach()
        else:
            raise CaptureError(f"cannot find the value of graph input {name} ({spec.target})")
    user_inputs = _inline_constant_inputs(gm, user_inputs)
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    symbols: list[SymbolSpec] = []
    for sym, (lower, upper) in _symbol_ranges(ep).items():
        name = str(sym)
        label = labels.get(name)
        if label is None:
            for inp in user_inputs:
                val = placeholders[inp].meta["val"]
                for d, s in enumerate(val.shape):
                    if isinstance(s, torch.SymInt) and str(s.node.expr) == name and label is None:
                        label = f"dim {d} of {inp}"
        symbols.append(SymbolSpec(name, label or name, lower, upper))
    fake_mode = torch._guards.detect_fake_mode([n.meta["val"] for n in placeholders.values() if "val" in n.meta])
    flat, _ = pytree.tree_flatten((args, kwargs))
    return Captured(gm, weights, user_inputs, symbols, ep.call_spec.out_spec, ep.call_spec.in_spec, False,
                    fake_mode, [t for t in flat if isinstance(t, torch.Tensor)], state, mutations)


def _export_reason(exc: Exception) -> str:
    """The first line of an export error, with the shape solver's "Constraints violated (seq)!" (the model's code
    fixes a dimension braze asked to keep dynamic) said in words."""
    first = first_line(exc)
    m = re.match(r"(Constraints violated|Specializations unexpectedly required) \((.+?)\)!", first)
    if m:
        return f"its code fixes {m.group(2)} to the example's size (torch.export: {m.group(1).lower()})"
    return first


def _mutations(ep: Any, module: torch.nn.Module) -> tuple[set[str], list[tuple[str, str]]]:
    """The in-place writes torch.export lifted to leading graph outputs: the buffers written (by target) and, per
    leading output, ("buffer", target) or ("input", user input name). Other lifted outputs are refused."""
    kinds = torch.export.graph_signature.OutputKind
    buffers: set[str] = set()
    out: list[tuple[str, str]] = []
    specs = ep.graph_signature.output_specs
    for i, spec in enumerate(specs):
        if spec.kind == kinds.USER_OUTPUT:
            continue
        if any(s.kind == kinds.USER_OUTPUT for s in specs[:i]):
            raise CaptureError(f"{type(module).__name__}: torch.export put an in-place write after the outputs")
        if spec.kind == kinds.BUFFER_MUTATION:
            buffers.add(spec.target)
            out.append(("buffer", spec.target))
        elif spec.kind == kinds.USER_INPUT_MUTATION:
            out.append(("input", spec.target))
        else:
            raise CaptureError(f"{type(module).__name__} writes {spec.target} in place ({spec.kind.name}); braze "
                               "compiles writes to buffers and tensor inputs only")
    return buffers, out


# ---- one traced layer, stamped N times ---------------------------------------------------------------------
# Tracing dominates a compile, and a decoder stack traces the same layer N times. When every layer is built the
# same way, a copy of the model with two layers is exported, the two traced layers are checked to be the same
# graph (same ops, same arguments up to the layer's own weights and the hidden state it reads from the layer
# before), and layer 1's nodes are copied for layers 2..N-1 over their own weights. Anything unexpected falls back
# to tracing the whole model.
STAMP_MIN_LAYERS = 4
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks")


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):
        return a.func is b.func and _same_value(list(a.args), list(b.args)) and _same_value(a.keywords, b.keywords)
    try:
        return a is b or bool(a == b)
    except Exception:
        return False


def _built_alike(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Same module tree, parameter/buffer shapes and dtypes, and non-tensor attributes (but `layer_idx`)."""
    mods_a, mods_b = list(a.named_modules()), list(b.named_modules())
    if [(n, type(m)) for n, m in mods_a] != [(n, type(m)) for n, m in mods_b]:
        return False
    for (_, x), (_, y) in zip(mods_a, mods_b):
        if any(getattr(x, h, None) or getattr(y, h, None) for h in _HOOKS):
            return False
        for kind in ("_parameters", "_buffers"):
            tx, ty = getattr(x, kind), getattr(y, kind)
            if tx.keys() != ty.keys() or any(
                    (tx[k] is None) != (ty[k] is None) or (tx[k] is not None and (
                        tx[k].shape != ty[k].shape or tx[k].dtype != ty[k].dtype)) for k in tx):
                return False
        attrs_x = {k: v for k, v in vars(x).items() if not k.startswith("_") and k != "layer_idx"}
        attrs_y = {k: v for k, v in vars(y).items() if not k.startswith("_") and k != "layer_idx"}
        if attrs_x.keys() != attrs_y.keys() or not all(_same_value(attrs_x[k], attrs_y[k]) for k in attrs_x):
            return False
    return True


def _decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList] | None:
    """(path, layers) of the decoder stack when stamping applies: one ModuleList of num_hidden_layers modules
    built alike, and no per-layer list in the config that tells the layers apart (layer_types, ...)."""
    cfg = getattr(model, "config", None)
    count = getattr(cfg, "num_hidden_layers", None)
    if not isinstance(count, int) or count < STAMP_MIN_LAYERS:
        return None
    stacks = [(name, m) for name, m in model.named_modules()
              if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if len(stacks) != 1:
        return None
    raw = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    for value in raw.values():
        if isinstance(value, (list, tuple)) and len(value) == count and len({repr(v) for v in value}) > 1:
            return None
    path, layers = stacks[0]
    if not path or any(not _built_alike(layers[0], layer) for layer in layers):
        return None
    return path, layers


def _capture_stamped(model: torch.nn.Module, args: tuple, dyn: Any) -> Captured | None:
    found = _decoder_layers(model)
    if found is None:
        return None
    path, layers = found
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    cfg = model.config
    count = cfg.num_hidden_layers
    setattr(parent, attr, torch.nn.ModuleList(list(layers)[:2]))
    cfg.num_hidden_layers = 2
    try:
        cap = _export(CausalLMWrapper(model), args, {}, dyn, {})
    except CaptureError:
        return None
    finally:
        setattr(parent, attr, layers)
        cfg.num_hidden_layers = count
    return cap if _stamp_layers(cap, f"model.{path}", layers) else None


def _weight_suffixes(cap: Captured, prefix: str, layer: int) -> dict[str, fx.Node]:
    """Weight placeholders of one layer by the rest of their name (export names them p_/b_/c_ + dotted path)."""
    pattern = re.compile(rf"^[pbc]_{re.escape(prefix.replace('.', '_'))}_{layer}_(.+)$")
    out = {}
    for n in cap.gm.graph.nodes:
        m = pattern.match(n.name) if n.op == "placeholder" and n.name in cap.weights else None
        if m:
            out[m.group(1)] = n
    return out


def _layer_of(node: fx.Node, prefix: str) -> int | None:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        if isinstance(path, str) and path.startswith(prefix + "."):
            head = path[len(prefix) + 1:].split(".")[0]
            if head.isdigit():
                return int(head)
    return None


def _renamed_stack(stack: dict, prefix: str, layer: int) -> dict:
    dotted = re.compile(rf"{re.escape(prefix)}\.1(?!\d)")
    under = re.compile(rf"{re.escape(prefix.replace('.', '_'))}_1(?!\d)")

    def rename(text: Any) -> Any:
        if not isinstance(text, str):
            return text
        text = dotted.sub(f"{prefix}.{layer}", text)
        return under.sub(f"{prefix.replace('.', '_')}_{layer}", text)

    return {rename(k): (rename(v[0]), *v[1:]) if isinstance(v, tuple) else v for k, v in stack.items()}


def _stamp_layers(cap: Captured, prefix: str, layers: torch.nn.ModuleList) -> bool:
    """Copy traced layer 1 for layers 2..N-1 in place (False, cap untouched, when the trace is not uniform)."""
    graph = cap.gm.graph
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    segs: dict[int, list[fx.Node]] = {0: [], 1: []}
    for n in nodes:
        layer = _layer_of(n, prefix) if n.op == "call_function" else None
        if layer is not None:
            if layer not in segs:
                return False
            segs[layer].append(n)
    seg0, seg1 = segs[0], segs[1]
    if not seg0 or len(seg0) != len(seg1):
        return False
    first, mid, end = index[seg0[0]], index[seg1[0]], index[seg1[-1]]
    if mid - first != len(seg0) or end + 1 - mid != len(seg1):
        return False  # each layer must be one contiguous run, layer 1 right after layer 0
    w0, w1 = _weight_suffixes(cap, prefix, 0), _weight_suffixes(cap, prefix, 1)
    if not w1 or w0.keys() != w1.keys():
        return False
    pos0 = {n: k for k, n in enumerate(seg0)}
    pos1 = {n: k for k, n in enumerate(seg1)}
    suffix0 = {n: s for s, n in w0.items()}
    suffix1 = {n: s for s, n in w1.items()}
    carry: dict[fx.Node, fx.Node] = {}  # layer 0's input from before the stack -> layer 0's node layer 1 reads
    shared: set[fx.Node] = set()

    def same(x: Any, y: Any) -> bool:
        if isinstance(x, fx.Node) or isinstance(y, fx.Node):
            if not (isinstance(x, fx.Node) and isinstance(y, fx.Node)):
                return False
            if x in pos0:
                return pos1.get(y) == pos0[x]
            if x in suffix0:
                return suffix1.get(y) == suffix0[x]
            if y is x:
                shared.add(x)
                return True
            if y in pos0 and carry.setdefault(x, y) is y:
                return True
            return False
        if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
            return type(x) is type(y) and len(x) == len(y) and all(same(a, b) for a, b in zip(x, y))
        if isinstance(x, dict) and isinstance(y, dict):
            return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return type(x) is type(y) and (x == y or (x != x and y != y))  # NaN equals NaN here

    for a, b in zip(seg0, seg1):
        if a.target != b.target or not same(a.args, b.args) or not same(a.kwargs, b.kwargs):
            return False
    if shared & carry.keys():
        return False
    seg1_set = set(seg1)
    if any(u not in seg1_set and u not in pos0 for n in seg0 for u in n.users):
        return False  # layer 0's values are read only by layers 0 and 1
    outputs = {pos1[n] for n in seg1 if any(u not in seg1_set for u in n.users)}
    if not outputs <= {pos0[y] for y in carry.values()}:
        return False  # what leaves layer 1 must be what layer 1 took from layer 0

    # the weights of layers 2..N-1, found by the same names in their modules (checked on layer 1)
    def tensors_of(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
        named = {**dict(layer.named_parameters(remove_duplicate=False)),
                 **dict(layer.named_buffers(remove_duplicate=False))}
        return {k.replace(".", "_"): v for k, v in named.items()}

    if any(tensors_of(layers[1]).get(s) is None or not _same_tensor(tensors_of(layers[1])[s], cap.weights[n.name])
           for s, n in w1.items()):
        return False
    stacked = [tensors_of(layers[i]) for i in range(2, len(layers))]
    if any(s not in t for t in stacked for s in w1):
        return False

    fake_mode = cap.fake_mode
    prev = list(seg1)
    anchor = seg1[-1]
    # each new layer's weights go after the previous layer's, parameters and buffers apart (export's order)
    placeholder_anchor = {n.name[0]: n for n in w1.values()}
    for i, tensors in enumerate(stacked, start=2):
        env: dict[fx.Node, fx.Node] = {}
        for s, template in w1.items():
            name = re.sub(rf"_{re.escape(prefix.replace('.', '_'))}_1_", f"_{prefix.replace('.', '_')}_{i}_",
                          template.name, count=1)
            with graph.inserting_after(placeholder_anchor[template.name[0]]):
                ph = graph.placeholder(name)
            placeholder_anchor[template.name[0]] = ph
            ph.meta.update({k: v for k, v in template.meta.items() if k != "val"})
            ph.meta["val"] = fake_mode.from_tensor(tensors[s], static_shapes=True)
            cap.weights[ph.name] = tensors[s].detach()
            env[template] = ph
        for y in carry.values():
            env[y] = prev[pos0[y]]
        copies = []
        for n in seg1:
            with graph.inserting_after(anchor):
                new = graph.node_copy(n, lambda a: env.get(a, a))
            new.meta = dict(n.meta)
            if "nn_module_stack" in n.meta:
                new.meta["nn_module_stack"] = _renamed_stack(n.meta["nn_module_stack"], prefix, i)
            env[n] = new
            copies.append(new)
            anchor = new
        prev = copies
    copied = {n for n in graph.nodes} - set(nodes)
    for k in outputs:
        for user in list(seg1[k].users):
            if user not in seg1_set and user not in copied:
                user.replace_input_with(seg1[k], prev[k])
    graph.lint()
    cap.gm.recompile()
    return True


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and (
        a.data_ptr() == b.data_ptr() or bool(torch.equal(a.detach().cpu(), b.detach().cpu())))


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
    try:
        with torch.no_grad():
            cap = _capture_stamped(model, (ids, pos), dyn) or _export(CausalLMWrapper(model), (ids, pos), {}, dyn, {})
    finally:
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


def capture_module(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic_shapes: Any = None,
                   dynamic: dict[str, set[int]] | None = None) -> Captured:
    """Capture any module from example arguments; by default dim 0 of every tensor input is dynamic, and the dims
    `dynamic` names per argument (the ones calls changed)."""
    # plans index their inputs as contiguous (the executor makes them so), so the graph must not be traced with an
    # example's strides (a transposed KV cache Dynamo hands over would be read with the wrong strides)
    args, kwargs = pytree.tree_map(lambda a: a.contiguous() if isinstance(a, torch.Tensor) else a, (args, kwargs))
    if dynamic_shapes is not None:  # "static": every dim as in the example (what Dynamo hands a backend)
        with torch.no_grad():
            return _export(module, tuple(args), dict(kwargs), None if dynamic_shapes == "static" else dynamic_shapes,
                           {})
    bound = inspect.signature(module.forward).bind(*args, **kwargs)

    params = inspect.signature(module.forward).parameters

    def leading(kind):
        def one(name, value):
            if not isinstance(value, torch.Tensor) or value.dim() < 1:
                return None
            dims = sorted({0} | {d for d in (dynamic or {}).get(name, ()) if d < value.dim()})
            # the dims calls changed: AUTO (export bounds them where the model does: a position table's length)
            return {d: kind(f"{name}_dim{d}") if d == 0 else torch.export.Dim.AUTO for d in dims}

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
                           leading(lambda n: torch.export.Dim(n, min=1)), {})
    except CaptureError:
        with torch.no_grad():
            return _export(module, tuple(args), dict(kwargs), leading(lambda n: torch.export.Dim.AUTO), {})
