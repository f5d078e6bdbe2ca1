"""Codegen for fused pointwise / last-dim-reduction regions (the `fused` kernel family).

A region's value at an index is built the way Inductor's inner functions are: each FX node knows how to
produce its value at a sympy index tuple, recursing into its inputs with remapped indices (views, slices,
broadcasts, cat, gathers) until it reaches a realized buffer, which is loaded with sympy strides. Views
therefore cost nothing inside a kernel, and a region may recompute cheap producers instead of storing them.

Two iteration modes: `pointwise` (flat index over the whole space) and `reduction` (XBLOCK rows x RBLOCK
row elements, reductions over the last dim with the whole row in registers).

Grouped quantization epilogue (braze::int6_act_scales / int6_act_codes): in reduction mode a row's K values
are in registers, so a per-128-group absmax is one more reduction over a [XBLOCK, RBLOCK // G, G] reshape of
the row. The region producing x (RMSNorm, SwiGLU, a smoothing multiply) thus stores int8 codes [rows, G * n_g]
(zero tail) and fp32 scales [rows, n_g] in the same launch, with the fp32 ops of
braze.quant.int6.quantize_activations_reference (IEEE division, round half to even), so bit-identical.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import sympy
import torch
import torch.fx as fx

import braze.ops  # noqa: F401  (registers braze::*, for the grouped-quantization ops)
from braze.codegen import pointwise_ops as P
from braze.codegen.symbolic import (
    FloorDiv,
    ModularIndexing,
    contiguous_strides,
    pexpr,
    product,
    shape_of,
    simplify_index,
    to_sympy,
)
from braze.kernels.render import render_template
from braze.ops.schema import op_args
from braze.quant.int6 import ACT_RANGES

XINDEX = sympy.Symbol("xindex", integer=True, nonnegative=True)
RINDEX = sympy.Symbol("rindex", integer=True, nonnegative=True)
Index = tuple[sympy.Expr, ...]


class IllegalFusion(Exception):
    """The region cannot be generated as one kernel (e.g. a reduction read at another row)."""


class Unsupported(Exception):
    """The node has no fused lowering; it runs eagerly."""


@dataclass(frozen=True)
class BufferInfo:
    """How a kernel reads a realized tensor: its runtime name, layout and dtype."""

    name: str
    shape: Index
    strides: Index
    dtype: torch.dtype


@dataclass
class FusedKernel:
    name: str
    source: str
    reduction: bool
    xnumel: sympy.Expr
    rnumel: sympy.Expr
    inputs: list[str]  # buffer names, in parameter order
    outputs: list[tuple[str, fx.Node]]  # (buffer name, node stored)
    symbols: list[str]  # dynamic dims passed as ints
    nodes: list[str] = field(default_factory=list)


def meta(node: Any) -> Any:
    return node.meta["val"] if isinstance(node, fx.Node) else node


def scalar_arg(a: Any) -> Any:
    """A graph argument that is a number (int, float, SymInt node) as a Python/sympy value."""
    if isinstance(a, fx.Node):
        return to_sympy(a.meta["val"])
    if isinstance(a, torch.SymInt):
        return to_sympy(a)
    return a


def is_fusable(node: fx.Node) -> bool:
    """Whether `node` has a lowering in the fused family (checked on op and arguments)."""
    if node.op != "call_function":
        return False
    t = node.target
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dtype not in P.TRITON_DTYPES:
        return False
    if any(isinstance(v := a.meta.get("val"), torch.Tensor) and v.dtype not in P.TRITON_DTYPES
           for a in node.all_input_nodes):  # e.g. abs of a complex tensor: a real result, no Triton input type
        return False
    if any(isinstance(a.meta.get("val"), (torch.SymFloat, torch.SymBool)) for a in node.all_input_nodes):
        return False  # a symbolic float / bool scalar (a tensor's .item()): no index expression a kernel takes
    if t in P.ELEMENTWISE:
        if t is P.aten.pow.Tensor_Scalar and P._pow("x", node.args[1]) is None:
            return False
        if t is P.aten.pow.Scalar and not (isinstance(node.args[0], (int, float)) and 0 < node.args[0] < math.inf):
            return False
        if t is P.aten.gelu.default and node.kwargs.get("approximate", "none") not in ("none", "tanh"):
            return False
        return True
    if t in P.VIEW_OPS or t in P.INDEX_OPS or t in P.COPY_OPS:
        return True
    if t in P.REDUCTIONS:
        src = meta(node.args[0])
        dims = node.args[1] if len(node.args) > 1 else None
        if t in P.ARG_REDUCTIONS:  # one dim (an int), or None: the flattened tensor
            if src.dtype == torch.bool or src.dim() == 0:
                return False
            dims = None if dims is None else [dims]
        if not dims:
            return src.dim() <= 1
        dims = [d % src.dim() for d in dims]
        return dims == [src.dim() - 1] and node.kwargs.get("dtype") in (None, val.dtype)
    if t in P.SCANS:
        src = meta(node.args[0])
        return src.dim() >= 1 and node.args[1] % src.dim() == src.dim() - 1 and "dtype" not in node.kwargs
    if t in GROUP_QUANT:
        return _group_quant_ok(node)
    if t in (P.aten.cat.default, P.aten.constant_pad_nd.default, P.aten.flip.default):
        return True
    if t is P.aten.slice_scatter.default:
        return _slice_scatter_args(node) is not None
    if t is P.aten.copy.default:  # functionalized `x[...] = y`: y broadcast to x's shape and dtype
        return isinstance(meta(node.args[1]), torch.Tensor)
    if t is P.aten.convolution.default:
        return _small_conv(node) is not None
    if t in POOLS:
        return _pool_args(node) is not None
    if t is P.aten.embedding.default:
        return meta(node.args[0]).dim() == 2
    if t is P.aten.gather.default:  # indices proven in range (passes/normalize.py marks it): no bound check here
        return bool(node.meta.get("braze_in_bounds")) and not node.kwargs.get("sparse_grad", False)
    return False


def _slice_scatter_args(node: fx.Node) -> tuple[fx.Node, fx.Node, int, Any, int] | None:
    """(input, src, dim, start, step) of a slice_scatter with a static step, src shaped like the slice."""
    x, src = node.args[0], node.args[1]
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % meta(node).dim()
    start = node.args[3] if len(node.args) > 3 else node.kwargs.get("start")
    step = node.args[5] if len(node.args) > 5 else node.kwargs.get("step", 1)
    if not isinstance(step, int) or step < 1 or meta(src).dim() != meta(node).dim():
        return None
    start = 0 if start is None else scalar_arg(start)
    if isinstance(start, int) and start < 0:
        start += meta(x).shape[dim]
    if isinstance(start, int) and start < 0 or not isinstance(start, (int, sympy.Expr)):
        return None
    return x, src, dim, start, step


# a convolution is a fused kernel when each output element sums at most this many products (input channels per
# group x kernel taps, unrolled): depthwise and causal short convolutions (Mamba, LFM2, Qwen3.5's linear attention,
# MobileNet) and 3-channel stems; wider convolutions are matmul-shaped and stay torch's
CONV_UNROLL_LIMIT = 32


@dataclass(frozen=True)
class ConvArgs:
    x: fx.Node
    weight: fx.Node
    bias: fx.Node | None
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


def _small_conv(node: fx.Node) -> ConvArgs | None:
    """The arguments of a non-transposed convolution small enough to unroll (CONV_UNROLL_LIMIT), static weights."""
    x, weight, bias, stride, padding, dilation, transposed, _, groups = node.args[:9]
    w = meta(weight)
    if transposed or not all(isinstance(d, int) for d in w.shape) or not isinstance(groups, int):
        return None
    taps = 1
    for d in w.shape[1:]:
        taps *= d
    spatial = w.dim() - 2
    if taps > CONV_UNROLL_LIMIT or spatial < 1 or meta(x).dim() != w.dim():
        return None
    values = [tuple(v) if len(v) == spatial else tuple(v) * spatial for v in (stride, padding, dilation)]
    if not all(isinstance(v, int) for vs in values for v in vs) or not is_float(meta(node).dtype):
        return None
    return ConvArgs(x, weight, bias, *values, groups)


# max / average pooling with a window of at most this many taps is a fused kernel (unrolled like a conv; no
# products): nn.MaxPool2d / AvgPool2d and their 1-D forms (which torch runs as 2-D over an unsqueezed dim)
POOL_WINDOW_LIMIT = 64
POOLS = (P.aten.max_pool2d.default, P.aten.avg_pool2d.default)


@dataclass(frozen=True)
class PoolArgs:
    x: fx.Node
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool
    average: bool
    count_include_pad: bool = True
    divisor: int | None = None


def _pool_args(node: fx.Node) -> PoolArgs | None:
    """A 2-D max or average pool over the last two dims, static window of at most POOL_WINDOW_LIMIT taps."""
    a = op_args(node)
    x = a["self"]
    if not isinstance(x, fx.Node) or meta(x).dim() not in (3, 4) or not is_float(meta(node).dtype):
        return None

    def pair(v: Any, default: Any) -> tuple[int, int] | None:
        v = list(v) if v else list(default)
        v = v * 2 if len(v) == 1 else v
        return (v[0], v[1]) if len(v) == 2 and all(isinstance(i, int) for i in v) else None

    kernel = pair(a["kernel_size"], ())
    if kernel is None or kernel[0] * kernel[1] > POOL_WINDOW_LIMIT:
        return None
    stride, padding = pair(a["stride"], kernel), pair(a["padding"], (0,))
    average = node.target is P.aten.avg_pool2d.default
    dilation = (1, 1) if average else pair(a["dilation"], (1,))
    if None in (stride, padding, dilation):
        return None
    if average:
        return PoolArgs(x, kernel, stride, padding, dilation, bool(a["ceil_mode"]), True,
                        bool(a["count_include_pad"]), a["divisor_override"])
    return PoolArgs(x, kernel, stride, padding, dilation, bool(a["ceil_mode"]), False)


def is_reduction(node: fx.Node) -> bool:
    """Reductions over the last dim of their first argument (their region iterates over its rows)."""
    return node.op == "call_function" and (node.target in P.REDUCTIONS or node.target in P.SCANS
                                           or node.target in GROUP_QUANT)


GROUP_QUANT = frozenset({torch.ops.braze.int6_act_scales.default, torch.ops.braze.int6_act_codes.default})


def group_quant_args(node: fx.Node) -> tuple[fx.Node, int, int]:
    """(x, group size, act bits) of a grouped-quantization node."""
    a = op_args(node)
    return a["x"], int(a["group_size"]), int(a["act_bits"])


def _group_quant_ok(node: fx.Node) -> bool:
    """Static K, a power-of-two group (the in-register reshape) and a float x."""
    x, group, bits = group_quant_args(node)
    k = meta(x).shape[-1]
    return (isinstance(k, int) and group > 0 and group & (group - 1) == 0 and bits in ACT_RANGES
            and meta(x).dtype.is_floating_point)


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def _reshape_index(idx: Index, out_shape: Index, in_shape: Index) -> Index:
    """Map an index of a reshaped tensor back to its input, dim group by dim group."""
    # drop size-1 dims (their index is 0)
    out_dims = [(i, s) for i, s in enumerate(out_shape) if s != 1]
    in_dims = [(j, s) for j, s in enumerate(in_shape) if s != 1]
    result: list[sympy.Expr] = [sympy.Integer(0)] * len(in_shape)
    oi = ii = 0
    while oi < len(out_dims) or ii < len(in_dims):
        go, gi = [out_dims[oi]] if oi < len(out_dims) else [], [in_dims[ii]] if ii < len(in_dims) else []
        oi, ii = oi + len(go), ii + len(gi)
        while True:
            po = product(s for _, s in go)
            pi = product(s for _, s in gi)
            diff = sympy.simplify(po - pi)
            if diff == 0:
                break
            ratio = sympy.simplify(po / pi)
            if ratio.is_number and ratio < 1 and oi < len(out_dims):
                go.append(out_dims[oi])
                oi += 1
            elif ratio.is_number and ratio > 1 and ii < len(in_dims):
                gi.append(in_dims[ii])
                ii += 1
            elif oi < len(out_dims) or ii < len(in_dims):  # symbolic mismatch: widen both sides
                if oi < len(out_dims):
                    go.append(out_dims[oi])
                    oi += 1
                if ii < len(in_dims):
                    gi.append(in_dims[ii])
                    ii += 1
            else:
                raise IllegalFusion(f"cannot map reshape {out_shape} -> {in_shape}")
        flat = sympy.Integer(0)
        stride = sympy.Integer(1)
        for i, s in reversed(go):
            flat = flat + idx[i] * stride
            stride = stride * s
        after = sympy.Integer(1)
        for pos, (j, s) in enumerate(reversed(gi)):
            first = pos == len(gi) - 1
            result[j] = FloorDiv(flat, after) if first else ModularIndexing(flat, after, s)
            after = after * s
    return tuple(result)


class KernelBuilder:
    """Generates one fused kernel for a group of FX nodes over one iteration space."""

    def __init__(
        self,
        name: str,
        space: Index,
        reduction: bool,
        members: list[fx.Node],
        load_buffer: Callable[[fx.Node], BufferInfo | None],
    ):
        self.name = name
        self.space = space
        self.reduction = reduction
        self.members = set(members)
        self.load_buffer = load_buffer
        self.lines: list[str] = []
        self.cse: dict[Any, str] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.mask_ctx: tuple[str, ...] = ()
        self.inputs: dict[str, str] = {}  # buffer name -> param name
        self.outputs: list[tuple[str, fx.Node]] = []
        self.symbols: set[str] = set()
        self.counter = 0
        if reduction:
            lead = space[:-1]
            self.leading = self._unravel(XINDEX, lead)
            self.canonical = self.leading + (RINDEX,)
        else:
            self.leading = ()
            self.canonical = self._unravel(XINDEX, space)

    # ---- index helpers -------------------------------------------------------------------------------
    @staticmethod
    def _unravel(flat: sympy.Expr, shape: Index) -> Index:
        out = []
        for d, size in enumerate(shape):
            after = product(shape[d + 1 :])
            if size == 1:
                out.append(sympy.Integer(0))
            elif d == 0:
                out.append(FloorDiv(flat, after))
            else:
                out.append(ModularIndexing(flat, after, size))
        return tuple(out)

    def canonical_index(self, node: fx.Node) -> Index:
        """The index of `node`'s element at the kernel's current position: the space itself, or (reductions) the
        rows, up to size-1 dims (a [1, S, D] residual add after a sum over [S, D, k] shares its kernel)."""
        shape = shape_of(meta(node))
        if _same(shape, self.space):
            return self.canonical
        targets = [(self.space, self.canonical)] + ([(self.space[:-1], self.leading)] if self.reduction else [])
        for target, index in targets:
            if same_up_to_unit_dims(shape, target):
                spread = iter(i for d, i in zip(target, index) if d != 1)
                return tuple(sympy.Integer(0) if d == 1 else next(spread) for d in shape)
        raise IllegalFusion(f"{node.name} has shape {shape}, not compatible with space {self.space}")

    def _expr(self, e: sympy.Expr) -> str:
        e = simplify_index(to_sympy(e))
        for s in e.free_symbols:
            if s not in (XINDEX, RINDEX) and not s.name.startswith("tmp"):
                self.symbols.add(s.name)
        return pexpr(e)

    def _tmp(self, code: str, dtype: torch.dtype) -> str:
        var = f"tmp{self.counter}"
        self.counter += 1
        self.lines.append(f"{var} = {code}")
        self.dtypes[var] = dtype
        return var

    def _mask_for(self, offset: sympy.Expr) -> str:
        parts = ["xmask"]
        if self.reduction and RINDEX in to_sympy(offset).free_symbols:
            parts.append("rmask")
        parts.extend(self.mask_ctx)
        return " & ".join(parts)

    # ---- values --------------------------------------------------------------------------------------
    def value(self, node: Any, idx: Index) -> str:
        if not isinstance(node, fx.Node):
            return _literal(node)
        key = (node, tuple(idx), self.mask_ctx)  # sympy expressions hash and compare structurally
        if key in self.cse:
            return self.cse[key]
        buf = None if node in self.members else self.load_buffer(node)
        var = self._load(buf, idx) if buf is not None else self._compute(node, idx)
        self.cse[key] = var
        return var

    def _load(self, buf: BufferInfo, idx: Index) -> str:
        if len(idx) != len(buf.shape):
            raise IllegalFusion(f"rank mismatch loading {buf.name}")
        offset = sum((i * s for i, s in zip(idx, buf.strides) if s != 0), sympy.Integer(0))
        param = self.inputs.setdefault(buf.name, f"in_ptr{len(self.inputs)}")
        other = "0.0" if is_float(buf.dtype) else "0"
        ptr = f"{param} + ({self._expr(offset)})"
        if not (simplify_index(to_sympy(offset)).free_symbols & {XINDEX, RINDEX}):
            ptr += " + tl.zeros_like(xindex)"  # a constant offset is a scalar pointer; the mask is a block
        code = f"tl.load({ptr}, {self._mask_for(offset)}, other={other})"
        if buf.dtype in (torch.float16, torch.bfloat16):
            code += ".to(tl.float32)"
        dtype = torch.float32 if is_float(buf.dtype) else buf.dtype
        if buf.dtype == torch.bool:
            code = f"({code} != 0)"
        return self._tmp(code, dtype)

    def _compute(self, node: fx.Node, idx: Index) -> str:
        t = node.target
        out_dtype = meta(node).dtype
        if t in P.VIEW_OPS:
            src = node.args[0]
            return self.value(src, self._view_index(node, idx))
        if t in P.COPY_OPS:
            return self._cast(self.value(node.args[0], idx), out_dtype)
        if t in P.INDEX_OPS:
            return self._index_op(node, idx)
        if t in P.REDUCTIONS:
            return self._reduce(node, idx)
        if t in P.SCANS:
            return self._scan(node, idx)
        if t is P.aten.cat.default:
            return self._cat(node, idx)
        if t is P.aten.constant_pad_nd.default:
            return self._pad(node, idx)
        if t is P.aten.flip.default:  # reversed dims: an index remap, size - 1 - i
            src, shape = node.args[0], shape_of(meta(node))
            flipped = {d % len(idx) for d in node.args[1]}
            return self.value(src, tuple(shape[d] - 1 - i if d in flipped else i for d, i in enumerate(idx)))
        if t is P.aten.slice_scatter.default:
            return self._slice_scatter(node, idx)
        if t is P.aten.copy.default:
            src = node.args[1]
            return self._cast(self.value(src, _broadcast_index(idx, shape_of(meta(node)), shape_of(meta(src)))),
                              out_dtype)
        if t is P.aten.convolution.default:
            return self._conv(node, idx)
        if t in POOLS:
            return self._pool(node, idx)
        if t is P.aten.embedding.default:
            weight, ids = node.args[0], node.args[1]
            ids_var = self.value(ids, idx[:-1])
            return self._indirect(weight, (sympy.Symbol(ids_var, integer=True), idx[-1]))
        if t is P.aten.gather.default:  # out[..., j, ...] = x[..., index[..., j, ...], ...] along `dim`
            x, dim, index = node.args[:3]
            dim %= len(idx)
            ids_var = self.value(index, idx)
            return self._indirect(x, (*idx[:dim], sympy.Symbol(ids_var, integer=True), *idx[dim + 1:]))
        if t in P.ELEMENTWISE:
            return self._elementwise(node, idx)
        raise Unsupported(f"no fused lowering for {t}")

    def _indirect(self, src: fx.Node, at: Index) -> str:
        """src's element at an index holding loaded values (embedding rows, gather positions)."""
        buf = self.load_buffer(src)
        if buf is None:  # computed in this kernel or viewed from a buffer: its elements there
            return self.value(src, at)
        return self._load(buf, at)

    def _view_index(self, node: fx.Node, idx: Index) -> Index:
        t = node.target
        src = meta(node.args[0])
        in_shape = shape_of(src)
        out_shape = shape_of(meta(node))
        if t in (P.aten.view.default, P.aten._unsafe_view.default, P.aten.reshape.default):
            return idx if _same(in_shape, out_shape) else _reshape_index(idx, out_shape, in_shape)
        if t is P.aten.alias.default:
            return idx
        if t is P.aten.permute.default:
            perm = [d % len(in_shape) for d in node.args[1]]
            res = [sympy.Integer(0)] * len(in_shape)
            for i, d in enumerate(perm):
                res[d] = idx[i]
            return tuple(res)
        if t in (P.aten.transpose.int, P.aten.t.default):
            d0, d1 = (node.args[1], node.args[2]) if t is P.aten.transpose.int else (0, 1)
            d0, d1 = d0 % len(in_shape), d1 % len(in_shape)
            res = list(idx)
            res[d0], res[d1] = idx[d1], idx[d0]
            return tuple(res)
        if t is P.aten.unsqueeze.default:
            d = node.args[1] % len(out_shape)
            return idx[:d] + idx[d + 1 :]
        if t in (P.aten.squeeze.dim, P.aten.squeeze.dims, P.aten.squeeze.default):
            if t is P.aten.squeeze.default:
                dims = set(range(len(in_shape)))
            else:
                arg = node.args[1]
                dims = {d % len(in_shape) for d in (arg if isinstance(arg, (list, tuple)) else [arg])}
            removed = {d for d in dims if in_shape[d] == 1}
            it = iter(idx)
            return tuple(sympy.Integer(0) if d in removed else next(it) for d in range(len(in_shape)))
        if t is P.aten.expand.default:
            lead = len(out_shape) - len(in_shape)
            return tuple(
                sympy.Integer(0) if (s == 1 and out_shape[lead + j] != 1) else idx[lead + j]
                for j, s in enumerate(in_shape)
            )
        if t is P.aten.slice.Tensor:
            dim = (node.args[1] if len(node.args) > 1 else 0) % len(in_shape)
            start = scalar_arg(node.args[2]) if len(node.args) > 2 and node.args[2] is not None else 0
            step = node.args[4] if len(node.args) > 4 else 1
            start = to_sympy(start)
            if start.is_number and start < 0:
                start = sympy.Max(start + in_shape[dim], 0)
            if start.is_number and in_shape[dim].is_number and start > in_shape[dim]:
                start = in_shape[dim]
            res = list(idx)
            res[dim] = start + idx[dim] * step
            return tuple(res)
        if t is P.aten.select.int:
            dim = node.args[1] % len(in_shape)
            i = to_sympy(scalar_arg(node.args[2]))
            if i.is_number and i < 0:
                i = i + in_shape[dim]
            return idx[:dim] + (i,) + idx[dim:]
        raise Unsupported(f"view {t}")

    def _cast(self, var: str, dtype: torch.dtype) -> str:
        src = self.dtypes.get(var)
        if dtype == torch.bool:
            return self._tmp(f"({var} != 0)", torch.bool)
        if is_float(dtype):
            if dtype in (torch.float16, torch.bfloat16):  # round like eager, keep computing in fp32
                return self._tmp(f"({var}).to({P.TRITON_DTYPES[dtype]}).to(tl.float32)", torch.float32)
            if src == torch.float32:
                return var
            return self._tmp(f"({var}).to(tl.float32)", torch.float32)
        if src == dtype:
            return var
        return self._tmp(f"({var}).to({P.TRITON_DTYPES[dtype]})", dtype)

    def _index_op(self, node: fx.Node, idx: Index) -> str:
        t = node.target
        dtype = meta(node).dtype
        if t in (P.aten.full.default, P.aten.scalar_tensor.default, P.aten.full_like.default):
            value = node.args[0] if t is P.aten.scalar_tensor.default else node.args[1]
            return self._tmp(
                f"tl.full([], {_literal(value)}, {P.TRITON_DTYPES[_compute_dtype(dtype)]})", _compute_dtype(dtype)
            )
        if t is P.aten.arange.default:
            start, step = 0, 1
        else:
            start = scalar_arg(node.args[0])
            step = scalar_arg(node.args[2]) if len(node.args) > 2 else 1
        expr = to_sympy(start) + idx[0] * to_sympy(step) if not isinstance(start, float) else None
        if expr is None:
            raise Unsupported("float arange")
        code = self._expr(expr)
        if is_float(dtype):
            code = f"({code}).to(tl.float32)"
        return self._tmp(code if not code.isdigit() else f"tl.full([], {code}, tl.int64)", _compute_dtype(dtype))

    def _elementwise(self, node: fx.Node, idx: Index) -> str:
        t = node.target
        out_shape = shape_of(meta(node))
        out_dtype = meta(node).dtype
        # operands: tensor args broadcast to the output, scalars as literals; math in fp32 for floats
        tensor_args = [a for a in node.args if isinstance(a, fx.Node) and isinstance(meta(a), torch.Tensor)]
        math_float = is_float(out_dtype) or any(is_float(meta(a).dtype) for a in tensor_args)
        # where's condition and masked_fill's mask select, they are not math: kept boolean (tl.where wants int1)
        cond = {P.aten.where.self: 0, P.aten.masked_fill.Scalar: 1}.get(t)
        operands = []
        for i, a in enumerate(node.args):
            if isinstance(a, fx.Node) and isinstance(meta(a), torch.Tensor):
                var = self.value(a, _broadcast_index(idx, out_shape, shape_of(meta(a))))
                if i == cond:
                    var = var if meta(a).dtype == torch.bool else f"({var} != 0)"
                elif math_float and not is_float(meta(a).dtype):
                    var = self._tmp(f"({var}).to(tl.float32)", torch.float32)
                elif t in P.BITWISE and meta(a).dtype != out_dtype:  # int32 | bool: one integer type (the
                    var = self._tmp(f"({var}).to({P.TRITON_DTYPES[out_dtype]})", out_dtype)  # interpreter refuses)
                operands.append(var)
            elif isinstance(a, fx.Node):
                operands.append(self._expr(scalar_arg(a)))
            elif a is None and t is P.aten.clamp.default:  # a one-sided clamp (gpt-oss: clamp(x, None, limit))
                operands.append(None)
            else:
                operands.append(_literal(a))
        kwargs = {k: v for k, v in node.kwargs.items() if k in ("alpha", "approximate", "rounding_mode")}
        if t in (P.aten.div.Tensor_mode, P.aten.div.Scalar_mode, P.aten.remainder.Tensor, P.aten.remainder.Scalar):
            kwargs["integer"] = not math_float
        if t is P.aten.pow.Tensor_Scalar:
            code = P._pow(operands[0], node.args[1])
        elif t is P.aten.bitwise_not.default and out_dtype == torch.bool:
            code = f"({operands[0]} == 0)"
        elif t is P.aten.clamp.default:
            code = P._clamp(operands[0], *(operands[1:] + [None, None])[:2])  # literals: inf prints as float('inf')
        else:
            code = P.ELEMENTWISE[t](*operands, **kwargs)
        if code is None:
            raise Unsupported(f"{t} with arguments {node.args[1:]}")
        result_dtype = out_dtype if not is_float(out_dtype) else torch.float32
        var = self._tmp(code, result_dtype)
        if out_dtype in (torch.float16, torch.bfloat16):
            var = self._cast(var, out_dtype)
        elif not is_float(out_dtype) and out_dtype != torch.bool and math_float:
            var = self._tmp(f"({var}).to({P.TRITON_DTYPES[out_dtype]})", out_dtype)
        return var

    def _reduce(self, node: fx.Node, idx: Index) -> str:
        if not self.reduction:
            raise IllegalFusion("reduction in a pointwise kernel")
        src = node.args[0]
        if not _same(shape_of(meta(src)), self.space):
            raise IllegalFusion(f"reduction {node.name} over another space")
        lead = idx[: len(self.leading)]
        if any(sympy.simplify(a - b) != 0 for a, b in zip(lead, self.leading)):
            raise IllegalFusion(f"reduction {node.name} read at another row")
        key = ("reduce", node)
        if key in self.cse:
            return self.cse[key]
        kind = P.REDUCTIONS[node.target]
        # the reduction reads its whole row whatever masks its consumer is under (e.g. inside a cat piece)
        saved, self.mask_ctx = self.mask_ctx, ()
        try:
            v = self.value(src, self.canonical)
        finally:
            self.mask_ctx = saved
        dtype = meta(node).dtype
        v = f"tl.broadcast_to({v}, [XBLOCK, RBLOCK])"
        if kind in ("argmax", "argmin"):
            red = self._arg_reduce(v, kind, meta(node.args[0]).dtype)
        elif kind in ("sum", "mean"):
            red = self._tmp(f"tl.sum(tl.where(xmask & rmask, {v}, 0), 1)[:, None]", _compute_dtype(dtype))
            if kind == "mean":
                red = self._tmp(f"{red} / ({self._expr(self.space[-1])})", torch.float32)
        else:
            fill = "float('-inf')" if kind == "max" else "float('inf')"
            if not is_float(dtype):
                fill = "-9223372036854775807" if kind == "max" else "9223372036854775807"
            fn = "tl.max" if kind == "max" else "tl.min"
            red = self._tmp(f"{fn}(tl.where(xmask & rmask, {v}, {fill}), 1)[:, None]", _compute_dtype(dtype))
            if is_float(dtype):  # torch's amax / amin propagate NaN; tl.max / tl.min skip it
                nan = self._tmp(f"tl.max(tl.where(xmask & rmask, ({v} != {v}).to(tl.int32), 0), 1)[:, None]",
                                torch.int32)
                red = self._tmp(f"tl.where({nan} > 0, float('nan'), {red})", _compute_dtype(dtype))
        if dtype in (torch.float16, torch.bfloat16):
            red = self._cast(red, dtype)
        self.cse[key] = red
        return red

    def _arg_reduce(self, v: str, kind: str, src_dtype: torch.dtype) -> str:
        """torch.argmax / argmin over the row: the smallest index holding the extreme value, or holding a NaN when
        the row has one (torch treats NaN as the extreme)."""
        fn, fill = ("tl.max", "float('-inf')") if kind == "argmax" else ("tl.min", "float('inf')")
        if not is_float(src_dtype):
            fill = "-9223372036854775807" if kind == "argmax" else "9223372036854775807"
        live = "xmask & rmask"
        best = self._tmp(f"{fn}(tl.where({live}, {v}, {fill}), 1)[:, None]", _compute_dtype(src_dtype))
        hit = f"({v} == {best})"
        if is_float(src_dtype):
            nan = self._tmp(f"tl.max(tl.where({live}, ({v} != {v}).to(tl.int32), 0), 1)[:, None]", torch.int32)
            hit = f"tl.where({nan} > 0, {v} != {v}, {hit})"
        first = f"tl.where({live} & {hit}, rindex, 2147483647)"
        return self._tmp(f"tl.min(tl.broadcast_to({first}, [XBLOCK, RBLOCK]), 1)[:, None].to(tl.int64)", torch.int64)

    def _scan(self, node: fx.Node, idx: Index) -> str:
        """A cumulative op over the row in registers (cumsum: RoBERTa's position ids from its padding mask): each
        element's value, read where it lies."""
        if not self.reduction or not _same(shape_of(meta(node.args[0])), self.space):
            raise IllegalFusion(f"scan {node.name} outside its own row space")
        if any(sympy.simplify(a - b) != 0 for a, b in zip(idx, self.canonical)):
            raise IllegalFusion(f"scan {node.name} read at another element")
        key = ("scan", node)
        if key in self.cse:
            return self.cse[key]
        saved, self.mask_ctx = self.mask_ctx, ()  # the whole row, whatever masks the consumer is under
        try:
            v = self.value(node.args[0], self.canonical)
        finally:
            self.mask_ctx = saved
        dtype = _compute_dtype(meta(node).dtype)
        v = self._cast(v, meta(node).dtype) if not is_float(meta(node).dtype) else v
        zero = "0.0" if is_float(dtype) else "0"
        out = self._tmp(f"{P.SCANS[node.target]}(tl.where(xmask & rmask, tl.broadcast_to({v}, [XBLOCK, RBLOCK]), "
                        f"{zero}), 1)", dtype)
        if meta(node).dtype in (torch.float16, torch.bfloat16):
            out = self._cast(out, meta(node).dtype)
        self.cse[key] = out
        return out

    def _cat(self, node: fx.Node, idx: Index) -> str:
        tensors = node.args[0]
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(idx)
        dtype = _compute_dtype(meta(node).dtype)
        offset = sympy.Integer(0)
        pieces: list[tuple[str, str]] = []
        for t in tensors:
            size = shape_of(meta(t))[dim]
            if size == 0:
                continue
            lo, hi = offset, offset + size
            cond = f"(({self._expr(idx[dim])}) >= ({self._expr(lo)})) & (({self._expr(idx[dim])}) < ({self._expr(hi)}))"
            sub = list(idx)
            sub[dim] = idx[dim] - lo
            pieces.append((cond, self._masked_value(t, tuple(sub), cond)))
            offset = hi
        if dtype == torch.bool:  # select int8 lanes: the interpreter's tl.where of a scalar int1 yields floats
            pieces = [(cond, self._tmp(f"({var}).to(tl.int8)", torch.int8)) for cond, var in pieces]
        result = pieces[-1][1]
        for cond, var in reversed(pieces[:-1]):
            result = self._tmp(f"tl.where({cond}, {var}, {result})", torch.int8 if dtype == torch.bool else dtype)
        return self._tmp(f"({result} != 0)", dtype) if dtype == torch.bool else result

    def _pad(self, node: fx.Node, idx: Index) -> str:
        """F.pad(x, pad, value): x's element where the shifted index lands inside x, else `value` (a negative
        pad crops: its dim's index only shifts)."""
        src, pad = node.args[0], node.args[1]
        fill = node.args[2] if len(node.args) > 2 else 0
        in_shape = shape_of(meta(src))
        sub, conds = list(idx), []
        for i in range(len(pad) // 2):
            d = len(idx) - 1 - i
            sub[d] = idx[d] - to_sympy(scalar_arg(pad[2 * i]))
            at = self._expr(sub[d])
            conds.append(f"(({at}) >= 0) & (({at}) < ({self._expr(in_shape[d])}))")
        cond = " & ".join(conds) or "True"
        var = self._masked_value(src, tuple(sub), cond)
        dtype = _compute_dtype(meta(node).dtype)
        if dtype == torch.bool:  # select int8 lanes (as _cat does)
            picked = self._tmp(f"tl.where({cond}, ({var}).to(tl.int8), {int(bool(fill))})", torch.int8)
            return self._tmp(f"({picked} != 0)", dtype)
        literal = _literal(float(fill) if is_float(dtype) else int(fill))
        return self._tmp(f"tl.where({cond}, {var}, {literal})", dtype)

    def _masked_value(self, src: fx.Node, at: Index, cond: str) -> str:
        """src's element at `at`, loaded only where `cond` holds (the caller selects another value elsewhere)."""
        saved, self.mask_ctx = self.mask_ctx, self.mask_ctx + (cond,)
        try:
            return self.value(src, at)
        finally:
            self.mask_ctx = saved

    def _slice_scatter(self, node: fx.Node, idx: Index) -> str:
        """x with x[..., start:end:step, ...] = src along `dim`: src's element where the index lands in the slice,
        x's elsewhere."""
        x, src, dim, start, step = _slice_scatter_args(node)
        at = idx[dim] - to_sympy(start)
        rel = self._expr(at)
        cond = f"(({rel}) >= 0) & (({rel}) < ({self._expr(shape_of(meta(src))[dim] * step)}))"
        sub = list(idx)
        sub[dim] = at if step == 1 else FloorDiv(at, step)
        if step > 1:
            cond += f" & ((({rel}) % {step}) == 0)"
        dtype = _compute_dtype(meta(node).dtype)
        picked = self._masked_value(src, tuple(sub), cond)
        base = self.value(x, idx)
        if dtype == torch.bool:  # select int8 lanes (as _cat does)
            chosen = self._tmp(f"tl.where({cond}, ({picked}).to(tl.int8), ({base}).to(tl.int8))", torch.int8)
            return self._tmp(f"({chosen} != 0)", dtype)
        return self._tmp(f"tl.where({cond}, {picked}, {base})", dtype)

    def _reads_stored_input(self, node: fx.Node, x: fx.Node) -> None:
        """A conv or pool reads x at every tap: schedule.realize stores a computed x, read it, never recompute it."""
        src = x
        while isinstance(src, fx.Node) and src.target in P.VIEW_OPS:
            src = src.args[0]
        if src in self.members:
            raise IllegalFusion(f"{node.name} reads {src.name} at every tap: not in the kernel that computes it")

    def _tap(self, points: Index, stride: tuple[int, ...], padding: tuple[int, ...], k: tuple[int, ...],
             dilation: tuple[int, ...], in_sizes: Index) -> tuple[list[Any], list[str], str]:
        """Tap k of a window at output `points`: the input positions p * stride - padding + k * dilation, the
        in-range conditions that are not statically true, and their conjunction ("True" when none)."""
        where = [p * s - pad + kk * d for p, s, pad, kk, d in zip(points, stride, padding, k, dilation)]
        conds = [f"(({self._expr(e)}) >= 0) & (({self._expr(e)}) < ({self._expr(n)}))"
                 for e, n in zip(where, in_sizes) if not (e.is_nonnegative and (e - n).is_negative)]
        return where, conds, " & ".join(conds) or "True"

    def _conv(self, node: fx.Node, idx: Index) -> str:
        """out[b, o, p...] = bias[o] + sum over the group's input channels c and taps k of
        w[o, c, k...] * x[b, g * C + c, p * stride - padding + k * dilation ...], unrolled (at most
        CONV_UNROLL_LIMIT products), taps outside x reading zero (as zero padding does)."""
        import itertools

        conv = _small_conv(node)
        self._reads_stored_input(node, conv.x)
        w_shape = tuple(meta(conv.weight).shape)
        cin_per_group, taps = w_shape[1], w_shape[2:]
        out_per_group = w_shape[0] // conv.groups
        in_shape = shape_of(meta(conv.x))
        batch, out_ch, points = idx[0], idx[1], idx[2:]
        first_in = (out_ch if out_per_group == 1 else FloorDiv(out_ch, out_per_group)) * cin_per_group
        dtype = _compute_dtype(meta(node).dtype)
        terms: list[str] = []
        for c in range(cin_per_group):
            for k in itertools.product(*(range(t) for t in taps)):
                where, conds, cond = self._tap(points, conv.stride, conv.padding, k, conv.dilation, in_shape[2:])
                xv = self._masked_value(conv.x, (batch, first_in + c, *where), cond)
                if conds:
                    xv = self._tmp(f"tl.where({cond}, {xv}, 0.0)", dtype)
                wv = self.value(conv.weight, (out_ch, sympy.Integer(c), *(sympy.Integer(kk) for kk in k)))
                terms.append(f"{xv} * {wv}")
        total = self._tmp(" + ".join(terms), dtype)
        if conv.bias is not None:
            total = self._tmp(f"{total} + {self.value(conv.bias, (out_ch,))}", dtype)
        return total

    def _pool(self, node: fx.Node, idx: Index) -> str:
        """Max (NaN propagating, taps outside x ignored) or average (sum over the taps inside x, divided by torch's
        count: the window clipped to the padded input, or to x itself without count_include_pad, or
        divisor_override) over out[..., p, q]'s window x[..., p * s - pad + k * d, ...], unrolled."""
        import itertools

        pool = _pool_args(node)
        self._reads_stored_input(node, pool.x)
        in_shape = shape_of(meta(pool.x))
        lead, points = idx[:-2], idx[-2:]
        dtype = _compute_dtype(meta(node).dtype)
        out: str | None = None
        counts: list[str] = []
        for k in itertools.product(range(pool.kernel[0]), range(pool.kernel[1])):
            where, conds, cond = self._tap(points, pool.stride, pool.padding, k, pool.dilation, in_shape[-2:])
            v = self._masked_value(pool.x, (*lead, *where), cond)
            if pool.average:
                v = self._tmp(f"tl.where({cond}, {v}, 0.0)", dtype) if conds else v
                out = v if out is None else self._tmp(f"{out} + {v}", dtype)
                inside = cond if not pool.count_include_pad else " & ".join(
                    f"(({self._expr(e)}) < ({self._expr(n + pad)}))"
                    for e, n, pad in zip(where, in_shape[-2:], pool.padding)) or "True"
                counts.append(f"tl.where({inside}, 1.0, 0.0)")
            else:
                v = self._tmp(f"tl.where({cond}, {v}, float('-inf'))", dtype) if conds else v
                out = v if out is None else self._tmp(f"tl.maximum({out}, {v}, {P.NAN})", dtype)
        if not pool.average:
            return out
        if pool.divisor:
            return self._tmp(f"{out} / {float(pool.divisor)}", dtype)
        if pool.count_include_pad and not pool.ceil_mode:  # every window fits the padded input
            return self._tmp(f"{out} / {float(len(counts))}", dtype)
        return self._tmp(f"{out} / ({' + '.join(counts)})", dtype)

    # ---- whole kernel --------------------------------------------------------------------------------
    def store(self, node: fx.Node, buffer_name: str) -> None:
        if node.target in GROUP_QUANT:
            self._store_group_quant(node, buffer_name)
            return
        idx = self.canonical_index(node)
        var = self.value(node, idx)
        shape = shape_of(meta(node))
        strides = contiguous_strides(shape)
        offset = sum((i * s for i, s in zip(idx, strides)), sympy.Integer(0))
        param = f"out_ptr{len(self.outputs)}"
        dtype = meta(node).dtype
        value = f"({var}).to({P.TRITON_DTYPES[dtype]})" if dtype != torch.bool else f"({var} != 0).to(tl.int1)"
        mask = self._mask_for(offset) if idx == self.canonical else "xmask"
        if RINDEX not in to_sympy(offset).free_symbols and self.reduction and idx == self.canonical:
            mask = "xmask & rmask"
        shape_hint = (
            "[XBLOCK, RBLOCK]"
            if (self.reduction and idx == self.canonical)
            else ("[XBLOCK, 1]" if self.reduction else "[XBLOCK]")
        )
        ptr = f"{param} + ({self._expr(offset)})"
        if not (simplify_index(to_sympy(offset)).free_symbols & {XINDEX, RINDEX}):
            ptr += " + tl.zeros_like(xindex)"  # a constant offset (all-size-1 output) is a scalar pointer
        self.lines.append(f"tl.store({ptr}, tl.broadcast_to({value}, {shape_hint}), {mask})")
        self.outputs.append((buffer_name, node))

    # ---- grouped quantization epilogue ---------------------------------------------------------------
    def _group_quant(self, x: fx.Node, group: int, bits: int) -> tuple[str, str]:
        """(codes, scales) as [XBLOCK, RBLOCK] blocks (each element carries its group's scale), once per kernel.

        Same fp32 ops as quantize_activations_reference: absmax over the zero-padded group, div_rn (IEEE
        division; plain `/` is approximate on NVIDIA), round half to even by the floor trick (libdevice rint is
        unavailable in the interpreter; a - floor(a) is exact for |a| < 2**23)."""
        key = ("group_quant", x, group, bits)
        if key in self.cse:
            return self.cse[key]
        if not self.reduction or not _same(shape_of(meta(x)), self.space):
            raise IllegalFusion(f"grouped quantization of {x.name} needs a reduction region over its rows")
        qmin, qmax = ACT_RANGES[bits]
        saved, self.mask_ctx = self.mask_ctx, ()
        try:
            v = self.value(x, self.canonical)
        finally:
            self.mask_ctx = saved
        f32 = torch.float32
        xv = self._tmp(f"tl.where(xmask & rmask, tl.broadcast_to({v}, [XBLOCK, RBLOCK]), 0.0)", f32)
        x3 = f"tmp{self.counter}"
        self.counter += 1
        self.lines += [  # one group per row when the row is shorter than a group (K < G, so n_groups == 1)
            f"if RBLOCK >= {group}:",
            f"    {x3} = tl.reshape({xv}, [XBLOCK, RBLOCK // {group}, {group}])",
            "else:",
            f"    {x3} = tl.reshape({xv}, [XBLOCK, 1, RBLOCK])",
        ]
        s3 = self._tmp(f"tl.math.div_rn(tl.max(tl.abs({x3}), 2), {qmax}.0)[:, :, None]", f32)
        t = self._tmp(f"tl.math.div_rn({x3}, tl.where({s3} > 0.0, {s3}, 1.0))", f32)
        a = self._tmp(f"tl.abs({t})", f32)
        r = self._tmp(f"tl.floor({a})", f32)
        frac = self._tmp(f"{a} - {r}", f32)
        half = self._tmp(f"{r} * 0.5", f32)
        r = self._tmp(f"tl.where(({frac} > 0.5) | (({frac} == 0.5) & (tl.floor({half}) != {half})), {r} + 1.0, {r})",
                      f32)
        q = self._tmp(f"tl.minimum(tl.maximum(tl.where({t} < 0.0, -{r}, {r}), {qmin}.0), {qmax}.0)", f32)
        codes = self._tmp(f"tl.reshape({q}, [XBLOCK, RBLOCK]).to(tl.int8)", torch.int8)
        scales = self._tmp(f"tl.reshape({s3} + tl.zeros_like({x3}), [XBLOCK, RBLOCK])", f32)
        self.cse[key] = (codes, scales)
        return codes, scales

    def _store_group_quant(self, node: fx.Node, buffer_name: str) -> None:
        """Codes [rows, n_g * G] (zero tail past K) or scales [rows, n_g] (stored by each group's first lane)."""
        x, group, bits = group_quant_args(node)
        codes, scales = self._group_quant(x, group, bits)
        k = int(meta(x).shape[-1])
        n_g = -(-k // group)
        width = n_g * group
        param = f"out_ptr{len(self.outputs)}"
        if node.target is torch.ops.braze.int6_act_codes.default:
            self.lines.append(f"tl.store({param} + xindex * {width} + rindex, {codes}, xmask & (rindex < {width}))")
            if k < group:  # the row fits in RBLOCK < G lanes: zero the rest of the one group
                self.lines += [
                    f"for tq in tl.static_range(1, {group} // RBLOCK):",
                    f"    tl.store({param} + xindex * {width} + rindex + tq * RBLOCK, "
                    f"tl.zeros([XBLOCK, RBLOCK], tl.int8), xmask & (rindex + tq * RBLOCK < {width}))",
                ]
        else:
            self.lines.append(f"tl.store({param} + xindex * {n_g} + rindex // {group}, {scales}, "
                              f"xmask & (rindex % {group} == 0) & (rindex < {width}))")
        self.outputs.append((buffer_name, node))

    def render(self, header: str) -> FusedKernel:
        params = list(self.inputs.values()) + [f"out_ptr{i}" for i in range(len(self.outputs))]
        xnumel = product(self.space[:-1]) if self.reduction else product(self.space)
        rnumel = self.space[-1] if self.reduction else sympy.Integer(1)
        xn, rn = self._expr(xnumel), self._expr(rnumel)
        symbols = sorted(self.symbols)
        source = render_template(
            "fused.py.j2",
            header=header,
            name=self.name,
            params=params + symbols,
            reduction=self.reduction,
            xnumel=xn,
            rnumel=rn,
            body=self.lines,
        )
        return FusedKernel(
            name=self.name,
            source=source,
            reduction=self.reduction,
            xnumel=xnumel,
            rnumel=rnumel,
            inputs=list(self.inputs.keys()),
            outputs=self.outputs,
            symbols=symbols,
        )


def _same(a: Index, b: Index) -> bool:
    return len(a) == len(b) and all(sympy.simplify(x - y) == 0 for x, y in zip(a, b))


def same_up_to_unit_dims(a: Index, b: Index) -> bool:
    """The same sizes in the same order once size-1 dims are dropped: one flat iteration covers both."""
    return _same(tuple(d for d in a if d != 1), tuple(d for d in b if d != 1))


def _broadcast_index(idx: Index, out_shape: Index, in_shape: Index) -> Index:
    lead = len(out_shape) - len(in_shape)
    return tuple(
        sympy.Integer(0) if (s == 1 and out_shape[lead + j] != 1) else idx[lead + j] for j, s in enumerate(in_shape)
    )


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype.is_floating_point else dtype


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        if value == float("inf"):
            return "float('inf')"
        if value == float("-inf"):
            return "float('-inf')"
        if value != value:
            return "float('nan')"
        return repr(value)
    if isinstance(value, int):
        return repr(value)
    if isinstance(value, sympy.Basic):
        return pexpr(value)
    raise Unsupported(f"literal {value!r}")
