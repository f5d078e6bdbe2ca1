"""Property tests: random pointwise / last-dim-reduction programs through braze's fusion + codegen.

A hypothesis strategy draws a small program (a list of ops over 2-3 input tensors of shape (B, R) or
(B, C, R)); `Program` is an nn.Module whose forward interprets it. Each program is compiled with braze
(executor="interpret": generated Triton kernels run under TRITON_INTERPRET=1), compared with eager PyTorch,
re-run at a second batch size (dim 0 is dynamic), and must not fall back to eager for any node, since every
op the strategy draws has a fused lowering.

Tolerance: everything is fp32 on both sides and braze evaluates the same formulas in fp32, so results differ
only by rounding: reduction order (tl.sum over a row vs ATen's vectorised sum), and a few ops written with
other formulas (tanh = 2*sigmoid(2x) - 1, silu = x*sigmoid(x), rsqrt, exp). Values are kept O(1)-O(100) by
construction (exp of clamped values, bounded factors), so a few ulps of fp32 (~1e-7 relative) stay well
inside atol = rtol = 1e-5, while any indexing / broadcasting / masking bug produces O(1) errors.
"""

from __future__ import annotations

import os

import pytest
import sympy
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import braze
from braze.codegen.symbolic import FloorDiv, ModularIndexing, simplify_index

# a non-boolean tl.where condition is deprecated by triton (an error in a later release)
pytestmark = pytest.mark.filterwarnings("error:tl.where with a non-boolean condition")
ATOL = RTOL = 1e-5
# more examples for a bug hunt: BRAZE_PROPERTY_EXAMPLES=500 pytest tests/test_fused_property.py
EXAMPLES = int(os.environ.get("BRAZE_PROPERTY_EXAMPLES", "25"))

# ---------------------------------------------------------------------------------------------------------
# the program interpreter
# ---------------------------------------------------------------------------------------------------------

UNARY = {
    "neg": lambda a: -a,
    "exp": lambda a: torch.exp(torch.clamp(a, -3.0, 3.0)),
    "abs": torch.abs,
    "sin": torch.sin,
    "cos": torch.cos,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
    "sqrt": lambda a: torch.sqrt(torch.abs(a) + 1.0),
    "rsqrt": lambda a: torch.rsqrt(a * a + 1.0),
    "softplus": torch.nn.functional.softplus,
    "expm1": lambda a: torch.expm1(torch.clamp(a, -3.0, 3.0)),
    "log1p": lambda a: torch.log1p(torch.abs(a)),
}
BINARY = {
    "add": torch.add,
    "sub": torch.sub,
    "mul": lambda a, b: a * torch.tanh(b),  # bounded growth
    "max": torch.maximum,
    "min": torch.minimum,
}
SCALAR = {
    "add": lambda a, c: a + c,
    "mul": lambda a, c: a * c,
    "rsub": lambda a, c: c - a,
    "div": lambda a, c: a / c,  # c is never near zero
}
COMPARE = {"gt": torch.gt, "lt": torch.lt, "ge": torch.ge, "le": torch.le}
REDUCE = {
    "sum": lambda a: a.sum(-1, keepdim=True),
    "mean": lambda a: a.mean(-1, keepdim=True),
    "amax": lambda a: a.amax(-1, keepdim=True),
    "amin": lambda a: a.amin(-1, keepdim=True),
}
COMBINE = {"sub": torch.sub, "add": torch.add, "mul": lambda a, b: a * torch.tanh(b)}


class Program(torch.nn.Module):
    """forward(x0, x1, x2) interprets `ops`; every value has the input shape `shape` (batch dim first)."""

    def __init__(self, shape: tuple[int, ...], ops: list[tuple], outputs: list[tuple]):
        super().__init__()
        self.shape = shape
        self.ops = ops
        self.outputs = outputs
        g = torch.Generator().manual_seed(0)
        r = shape[-1]
        self.register_buffer("w_row", torch.randn(r, generator=g))  # [R] broadcast operand
        self.register_buffer("w_col", torch.randn(*shape[1:-1], 1, generator=g))  # [(C,) 1] operand

    def forward(self, x0, x1, x2):
        vals = [x0, x1, x2]
        for op in self.ops:
            vals.append(self._apply(op, vals))
        outs = []
        for kind, *args in self.outputs:
            v = vals[args[0]]
            if kind == "plain":
                outs.append(v)
            elif kind == "transpose":  # a non-contiguous-looking output (last two dims swapped)
                outs.append(v.transpose(-1, -2) * 2.0)
            elif kind == "slice":
                outs.append(v[..., args[1]:args[2]])
            elif kind == "cat":  # output wider than the inputs
                outs.append(torch.cat([v, vals[args[1]]], dim=-1))
            else:
                raise AssertionError(kind)
        return tuple(outs)

    def _apply(self, op: tuple, v: list[torch.Tensor]) -> torch.Tensor:
        kind, *a = op
        if kind == "unary":
            return UNARY[a[0]](v[a[1]])
        if kind == "binary":
            name, i, j, bcast = a
            rhs = {"full": lambda: v[j], "last1": lambda: v[j][..., :1], "row": lambda: self.w_row,
                   "col": lambda: self.w_col}[bcast]()
            return BINARY[name](v[i], rhs)
        if kind == "scalar":
            return SCALAR[a[0]](v[a[1]], a[2])
        if kind == "where":
            cmp, i, j, k, against_scalar = a
            cond = COMPARE[cmp](v[i], 0.25) if against_scalar else COMPARE[cmp](v[i], v[j])
            return torch.where(cond, v[j], torch.tanh(v[k]))
        if kind == "masked_fill":  # a mask computed in the kernel (a comparison, or-ed): the vocab-parallel lookup
            cmp, i, j = a
            return v[j].masked_fill(COMPARE[cmp](v[i], 0.25) | (v[i] > 1.0), -0.5)
        if kind == "reduce":
            red, comb, i, j = a
            return COMBINE[comb](v[j], REDUCE[red](v[i]))
        if kind == "softmax":
            return torch.softmax(v[a[0]], dim=-1)
        if kind == "transpose_pw":  # transpose the last two dims, pointwise with a broadcast, transpose back
            i, j = a
            t = v[i].transpose(-1, -2)
            t = torch.sigmoid(t) * v[j].transpose(-1, -2)[..., :1]
            return t.transpose(-1, -2)
        if kind == "transpose_reduce":  # reduce over the second-to-last dim (a transposed view)
            red, i, j = a
            col = REDUCE[red](v[i].transpose(-1, -2)).transpose(-1, -2)  # [..., 1, R]
            return v[j] - col
        if kind == "split":  # reshape (..., R) -> (..., R // k, k), pointwise + reduction, back
            i, k = a
            x = v[i]
            s = x.reshape(*x.shape[:-1], x.shape[-1] // k, k)
            s = s - s.amax(-1, keepdim=True) + torch.arange(k, dtype=x.dtype)
            return s.reshape(x.shape)
        if kind == "merge":  # reshape (B, ..., R) -> (B, prod), reduce over the merged dim, back
            i = a[0]
            x = v[i]
            m = x.reshape(x.shape[0], -1)
            m = m - m.mean(-1, keepdim=True)
            return m.reshape(x.shape)
        if kind == "expand":  # unsqueeze + expand a new last dim, reduce it away again
            i, n = a
            x = v[i]
            e = x.unsqueeze(-1).expand(*x.shape, n) * torch.arange(1, n + 1, dtype=x.dtype)
            return e.sum(-1) / n
        if kind == "roll_cat":  # slices of the last dim, concatenated back to full width
            i, j, k = a
            return torch.cat([v[i][..., k:], v[j][..., :k] * 0.5], dim=-1)
        raise AssertionError(kind)


# ---------------------------------------------------------------------------------------------------------
# the strategy
# ---------------------------------------------------------------------------------------------------------


@st.composite
def programs(draw, rank: int | None = None):
    rank = draw(st.sampled_from([2, 3])) if rank is None else rank
    r = draw(st.integers(1, 40))
    shape = (0, r) if rank == 2 else (0, draw(st.integers(1, 4)), r)  # batch filled in by the caller
    n_inputs = draw(st.integers(2, 3))
    n_ops = draw(st.integers(1, 6))
    ops: list[tuple] = []
    for step in range(n_ops):
        n_vals = 3 + step
        avail = list(range(n_inputs)) + list(range(3, n_vals))
        ix = st.sampled_from(avail)
        kinds = ["unary", "binary", "scalar", "where", "masked_fill", "reduce", "softmax", "transpose_pw",
                 "transpose_reduce", "merge", "expand"]
        if r >= 2:
            kinds.append("roll_cat")
        divisors = [k for k in range(2, r + 1) if r % k == 0 and k < r]
        if divisors:
            kinds.append("split")
        kind = draw(st.sampled_from(kinds))
        if kind == "unary":
            op = (kind, draw(st.sampled_from(sorted(UNARY))), draw(ix))
        elif kind == "binary":
            bcasts = ["full", "last1", "row"] + (["col"] if rank == 3 else [])
            op = (kind, draw(st.sampled_from(sorted(BINARY))), draw(ix), draw(ix), draw(st.sampled_from(bcasts)))
        elif kind == "scalar":
            c = draw(st.sampled_from([-2.0, -0.5, 0.5, 1.5, 3.0]))
            op = (kind, draw(st.sampled_from(sorted(SCALAR))), draw(ix), c)
        elif kind == "where":
            op = (kind, draw(st.sampled_from(sorted(COMPARE))), draw(ix), draw(ix), draw(ix), draw(st.booleans()))
        elif kind == "masked_fill":
            op = (kind, draw(st.sampled_from(sorted(COMPARE))), draw(ix), draw(ix))
        elif kind == "reduce":
            op = (kind, draw(st.sampled_from(sorted(REDUCE))), draw(st.sampled_from(sorted(COMBINE))), draw(ix),
                  draw(ix))
        elif kind == "softmax":
            op = (kind, draw(ix))
        elif kind == "transpose_pw":
            op = (kind, draw(ix), draw(ix))
        elif kind == "transpose_reduce":
            op = (kind, draw(st.sampled_from(sorted(REDUCE))), draw(ix), draw(ix))
        elif kind == "split":
            op = (kind, draw(ix), draw(st.sampled_from(divisors)))
        elif kind == "merge":
            op = (kind, draw(ix))
        elif kind == "expand":
            op = (kind, draw(ix), draw(st.integers(1, 3)))
        else:
            op = (kind, draw(ix), draw(ix), draw(st.integers(1, r - 1)))
        ops.append(op)
    last = 3 + n_ops - 1
    every = list(range(n_inputs)) + list(range(3, last + 1))
    outputs = [("plain", last)]
    extra = draw(st.sampled_from(["none", "plain", "transpose", "slice", "cat"]))
    other = draw(st.sampled_from(every))
    if extra == "plain" and other != last:
        outputs.append(("plain", other))
    elif extra == "transpose":
        outputs.append(("transpose", other))
    elif extra == "slice":
        lo = draw(st.integers(0, r - 1))
        outputs.append(("slice", other, lo, draw(st.integers(lo + 1, r))))
    elif extra == "cat":
        outputs.append(("cat", other, draw(st.sampled_from(every))))
    b1 = draw(st.integers(2, 4))  # compile batch: >= 2, or torch.export specialises the dim to 1
    b2 = draw(st.sampled_from([b for b in range(2, 7) if b != b1]))  # Dim.AUTO's range is [2, inf)
    return shape, ops, outputs, b1, b2


# ---------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------


def _compile(module: torch.nn.Module):
    # the default capture: dim 0 of every tensor input dynamic (torch.export Dim.AUTO)
    return braze.compile(module, executor="interpret")


def _inputs(shape: tuple[int, ...], batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, *shape[1:], generator=g) for _ in range(3)]


def _check(module: torch.nn.Module, shape, b1: int, b2: int, allow_fallbacks: bool = False):
    cm = _compile(module)
    for seed, batch in ((1, b1), (2, b2)):
        xs = _inputs(shape, batch, seed)
        with torch.no_grad():
            ref = module(*xs)
            out = cm(*xs)
        assert len(out) == len(ref)
        for o, r in zip(out, ref):
            assert o.shape == r.shape, (o.shape, r.shape)
            torch.testing.assert_close(o, r, atol=ATOL, rtol=RTOL)
    report = cm.compiled.report
    if not allow_fallbacks:
        assert len(report.fallbacks) == 0, str(report)
        assert cm.compiled.stats["eager_ops"] == 0, str(report)
    return cm


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(programs(rank=2))
def test_random_programs_2d(prog):
    shape, ops, outputs, b1, b2 = prog
    _check(Program(shape, ops, outputs).eval(), shape, b1, b2)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(programs(rank=3))
def test_random_programs_3d(prog):
    shape, ops, outputs, b1, b2 = prog
    _check(Program(shape, ops, outputs).eval(), shape, b1, b2)


# ---------------------------------------------------------------------------------------------------------
# hand-written regressions and edge cases
# ---------------------------------------------------------------------------------------------------------

REGRESSIONS = [
    # R == 1: the transposed [..., :1] operand is x[0, 0], a load at a constant offset (scalar pointer, block mask)
    ((0, 1), [("transpose_pw", 0, 0)], [("plain", 3)], 2, 3),
    # R == 1: a reduction over the (dynamic) batch dim whose result has shape (1, 1): a store at a constant offset
    ((0, 1), [("transpose_reduce", "amax", 0, 0)], [("plain", 3)], 2, 3),
    # a reduction first reached inside a cat piece must not inherit that piece's mask (its row loads were masked)
    ((0, 1, 2), [("reduce", "amax", "add", 0, 0), ("roll_cat", 0, 3, 1)], [("plain", 4)], 2, 3),
    ((0, 5), [("reduce", "sum", "add", 0, 1), ("roll_cat", 0, 3, 2)], [("plain", 4)], 3, 2),
    # size-1 last dim: reductions over one element, broadcasting [..., 1] against itself
    ((0, 1), [("reduce", "sum", "sub", 0, 1), ("softmax", 3)], [("plain", 4)], 2, 3),
    ((0, 3, 1), [("transpose_reduce", "amax", 0, 1), ("binary", "mul", 3, 2, "col")], [("plain", 4)], 3, 2),
    # softmax then a column reduction of its result (two reductions over different spaces)
    ((0, 4, 7), [("softmax", 0), ("transpose_reduce", "sum", 3, 1)], [("plain", 4), ("transpose", 3)], 2, 5),
    # split / merge reshapes feeding reductions, with a sliced extra output
    ((0, 12), [("split", 0, 4), ("merge", 3), ("reduce", "amax", "sub", 4, 1)], [("plain", 5), ("slice", 3, 2, 9)],
     3, 6),
    ((0, 2, 6), [("merge", 0), ("split", 3, 3), ("roll_cat", 4, 1, 5)], [("plain", 5), ("cat", 3, 4)], 2, 4),
    # cat of slices, then a reduction over the concatenated row
    ((0, 9), [("roll_cat", 0, 1, 4), ("reduce", "mean", "mul", 3, 3), ("where", "gt", 4, 0, 1, False)],
     [("plain", 5)], 4, 2),
    # masked_fill with a mask computed in the kernel (captured as where.self over an or-ed comparison)
    ((0, 6), [("masked_fill", "gt", 0, 1), ("unary", "tanh", 3)], [("plain", 4)], 2, 3),
    # unsqueeze/expand + reduction, broadcast operands of all kinds
    ((0, 3, 5), [("expand", 0, 3), ("binary", "add", 3, 1, "last1"), ("binary", "min", 4, 2, "row")],
     [("plain", 5), ("transpose", 4)], 2, 3),
]


@pytest.mark.parametrize("case", REGRESSIONS, ids=lambda c: "-".join(op[0] for op in c[1]))
def test_regressions(case):
    shape, ops, outputs, b1, b2 = case
    _check(Program(shape, ops, outputs).eval(), shape, b1, b2)


# ---------------------------------------------------------------------------------------------------------
# targeted unit tests
# ---------------------------------------------------------------------------------------------------------


def test_simplify_index_folds_contiguous_unravel():
    x = sympy.Symbol("xindex", integer=True, nonnegative=True)
    assert simplify_index(16 * FloorDiv(x, 16) + ModularIndexing(x, 1, 16)) == x
    # three digits: (x // 64) * 64 + ((x // 16) % 4) * 16 + x % 16 == x
    expr = 64 * FloorDiv(x, 64) + 16 * ModularIndexing(x, 16, 4) + ModularIndexing(x, 1, 16)
    assert simplify_index(expr) == x
    # a symbolic row length folds too
    s = sympy.Symbol("s0", integer=True, positive=True)
    assert sympy.simplify(simplify_index(s * FloorDiv(x, s) + ModularIndexing(x, 1, s)) - x) == 0


def test_simplify_index_keeps_transpose():
    x = sympy.Symbol("xindex", integer=True, nonnegative=True)
    # reading a (4, 16) tensor transposed: element (i, j) of the (16, 4) view is at j * 16 + i
    transposed = 16 * ModularIndexing(x, 1, 4) + FloorDiv(x, 4)
    out = simplify_index(transposed)
    assert out != x
    for v in range(64):
        assert int(out.subs(x, v).doit()) == int(transposed.subs(x, v).doit()) == (v % 4) * 16 + v // 4
    # wrong coefficient / wrong divisor: no fold
    assert simplify_index(8 * FloorDiv(x, 16) + ModularIndexing(x, 1, 16)) != x
    assert simplify_index(16 * FloorDiv(x, 8) + ModularIndexing(x, 1, 16)) != x


class RMSNormLike(torch.nn.Module):
    def __init__(self, r: int):
        super().__init__()
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, r))

    def forward(self, x0):
        return x0 * torch.rsqrt(torch.mean(x0 * x0, -1, keepdim=True) + 1e-6) * self.w


@pytest.mark.parametrize("r", [1, 7, 32])
def test_rmsnorm_like_is_one_launch(r):
    m = RMSNormLike(r).eval()
    cm = _compile(m)
    for b in (3, 2, 5):
        x = torch.randn(b, r)
        with torch.no_grad():
            torch.testing.assert_close(cm(x), m(x), atol=ATOL, rtol=RTOL)
    assert cm.compiled.stats["launches"] == 3  # one launch per forward, three forwards
    assert len(cm.compiled.report.fallbacks) == 0


def test_rmsnorm_like_stats_single_forward():
    m = RMSNormLike(32).eval()
    cm = _compile(m)
    with torch.no_grad():
        cm(torch.randn(4, 32))
    assert cm.compiled.stats["launches"] == 1
    assert cm.compiled.stats["eager_ops"] == 0


def test_explicit_dynamic_dim():
    """An explicit torch.export.Dim (bounded) for the batch works as well as Dim.AUTO."""
    m = RMSNormLike(16).eval()
    batch = torch.export.Dim("batch", min=1, max=64)
    cm = braze.compile(m, executor="interpret", dynamic_shapes={"x0": {0: batch}})
    with torch.no_grad():
        for b in (3, 1):  # the bounded Dim's range includes 1
            x = torch.randn(b, 16)
            torch.testing.assert_close(cm(x), m(x), atol=ATOL, rtol=RTOL)
    assert cm.compiled.stats["launches"] == 2


@pytest.mark.parametrize("bounds", [(0.0, float("inf")), (float("-inf"), 2.0), (None, float("inf"))])
def test_clamp_with_infinite_bound(bounds):
    """Falcon-H1 clamps with max=inf: the bound is a literal in the kernel (float('inf')), not the name `inf`."""
    lo, hi = bounds
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Identity())
    x = torch.randn(3, 4)

    class Clamped(torch.nn.Module):
        def forward(self, x):
            return torch.clamp(model(x) * 3, lo, hi)

    out = braze.compile(Clamped())(x)
    assert torch.allclose(out, Clamped()(x), atol=1e-6)


def test_xielu_expm1_and_log1p_fuse_to_full_precision():
    """Apertus's xIELU (softplus of its parameters, expm1 of min(x, -1e-6)), log1p and softplus with beta /
    threshold (captured as log1p(exp(beta * x)) / beta where beta * x <= threshold) run in one fused kernel, no
    eager step. expm1 / log1p keep full relative precision near 0 (|x| down to 1e-30, where exp(x) - 1 and log(1 +
    x) would give 0 or lose every digit) and their range at the top (expm1(85) = 8.2e36, expm1 past fp32's range =
    inf, log1p(5e37) = 86.8, log1p(inf) = inf: no overflow in the corrections) and bottom (expm1(-200) = -1):
    rtol 1e-6, a few fp32 ulps."""
    class Ops(torch.nn.Module):
        def forward(self, x, big):
            a = torch.expm1(torch.minimum(x, torch.tensor(-1e-6))) - x
            b = torch.log1p(x.abs() * 1e-3) + torch.nn.functional.softplus(x, beta=2.0, threshold=5.0)
            return torch.stack([a, b, torch.expm1(x * 1e-30) * 1e30, torch.log1p(x.abs() * 1e-30) * 1e30,
                                torch.nn.functional.softplus(x * 30)]), torch.expm1(big), torch.log1p(big.abs() * 1e36)

    x = torch.linspace(-12.0, 12.0, 96).reshape(4, 24)
    big = torch.tensor([[85.0, 100.0, float("inf"), -200.0, 50.0, -0.0]])
    cm = braze.compile(Ops())
    got, want = cm(x, big), Ops()(x, big)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6)
    assert not [s for s in cm.plan.steps if s.kind == "eager"]


@pytest.mark.parametrize("mode", ["floor", "trunc"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32])
def test_div_with_rounding_mode_fuses(mode, dtype):
    """torch.div(..., rounding_mode=) in a fused kernel (MoE routing's perm // top_k): negative dividends and
    divisors, where floor and trunc differ (Triton's integer // truncates, as C does); no eager step."""
    class Div(torch.nn.Module):
        def forward(self, a, b):
            return torch.div(a * 1, b, rounding_mode=mode) + torch.div(a, -3, rounding_mode=mode)

    a = torch.arange(-7, 8, dtype=dtype).reshape(3, 5)
    b = torch.tensor([[2, -2, 3, -3, 5]], dtype=dtype).expand(3, 5).contiguous()
    cm = braze.compile(Div())
    assert torch.equal(cm(a, b), Div()(a, b))
    assert not [s for s in cm.plan.steps if s.kind == "eager"]


def test_index_select_of_table_rows_is_an_embedding_lookup():
    """XGLM reads its sinusoidal position table with index_select(0, position ids): the same rows as table[ids],
    so it becomes an embedding lookup in a fused kernel (it ran eagerly). index_select along another dim keeps its
    eager step and its values."""
    class Table(torch.nn.Module):
        def __init__(self, dim):
            super().__init__()
            self.dim = dim
            self.register_buffer("table", torch.randn(12, 8, generator=torch.Generator().manual_seed(3)))

        def forward(self, pos):
            return self.table.index_select(self.dim, pos.view(-1) + 2) * 2

    pos = torch.tensor([[0, 3, 5], [1, 1, 4]])
    rows, cols = braze.compile(Table(0)), braze.compile(Table(1))
    assert torch.equal(rows(pos), Table(0)(pos)) and torch.equal(cols(pos), Table(1)(pos))
    assert not [s for s in rows.plan.steps if s.kind == "eager"]
    assert [s.target for s in cols.plan.steps if s.kind == "eager"] == ["aten.index_select.default"]


def test_gather_and_scatter_by_proven_indices_fuse():
    """torch.gather by top-k indices (proven in range) is an indirect load in a fused kernel, along the last dim
    and along dim 1 of a 3-D tensor, and a scatter of a constant into a constant fill by an unsorted top-k's
    indices (their order is the implementation's; the set is not) is a comparison mask; max over the last dim
    with its indices is a top-1, clamp by tensors elementwise, a scatter into a computed tensor a select: exact,
    no eager step.
    A gather by indices nothing bounds (a model input) stays eager: the fused load would not bound-check them,
    where torch raises."""
    class Routed(torch.nn.Module):
        def forward(self, x, y):
            top = torch.topk(x, 3, dim=-1).indices  # [B, 5, 3], values in [0, 8)
            picked = torch.gather(y, -1, top) * 2
            across = torch.gather(x.transpose(1, 2), 1, top.transpose(1, 2)[:, :2])  # dim 1 of [B, 8, 5]
            unsorted = torch.topk(x, 3, dim=-1, sorted=False).indices  # any order: a set of indices
            mask = torch.full_like(x, -1.0).scatter(-1, unsorted, 4.0)
            best, where = x.max(dim=-1)  # values and the first maximal index (a top-1)
            clamped = torch.clamp(y, min=best[..., None] * 0.5, max=best[..., None])
            masked = y.scatter(-1, where[..., None], float("-inf"))  # into a computed tensor: a select
            return picked, across, mask, best, where, clamped, masked, unsorted

    class Unbounded(torch.nn.Module):
        def forward(self, y, idx):
            return torch.gather(y, 1, idx) + 1

    x, y = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0)), torch.randn(2, 5, 8)
    cm = braze.compile(Routed())
    got, want = cm(x, y), Routed()(x, y)
    for g, w in zip(got[:-1], want[:-1]):
        assert torch.equal(g, w)
    assert torch.equal(got[-1].sort(dim=-1).values, want[-1].sort(dim=-1).values)
    assert not [s for s in cm.plan.steps if s.kind == "eager"]
    idx = torch.tensor([[0, 2], [1, 1]])
    cm = braze.compile(Unbounded())
    assert torch.equal(cm(torch.ones(2, 3), idx), Unbounded()(torch.ones(2, 3), idx))
    assert [s.target for s in cm.plan.steps if s.kind == "eager"] == ["aten.gather.default"]


def test_llama4_moe_ops_lower_to_kernels():
    """Llama 4's MoE ops: its router scatters the top-k logits into a -inf fill (a comparison select by the top-k's
    distinct indices, also into a computed tensor, with -inf among the values, and of int64 values past fp32's
    integers), repeats every token once per expert (a broadcast view) and runs
    every expert over all of them by bmm with the expert weights (braze::grouped_mm, expert e on rows [e * T, (e +
    1) * T)). The selects exact; the repeated tokens times the sigmoid scores and the matmuls within fp32 rounding
    (Triton's sigmoid, the summation order); no eager step at two token counts. A bmm of two activations keeps its
    eager step."""
    class Moe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 8, 6, generator=torch.Generator().manual_seed(1)))

        def forward(self, logits, x):
            top = torch.topk(logits, 2, dim=1)
            scores = torch.full_like(logits, float("-inf")).scatter_(1, top.indices, top.values)
            into = (logits * 0.5).scatter(1, top.indices, top.values * 3)
            masked = torch.where(logits > 0, logits, float("-inf"))  # -inf among the top-k values (k > positives)
            kept = torch.full_like(logits, float("-inf")).scatter(1, torch.topk(masked, 3, dim=1).indices,
                                                                  torch.topk(masked, 3, dim=1).values)
            ints = torch.zeros(logits.shape, dtype=torch.int64).scatter(1, top.indices, top.indices * 123456789 + 1)
            routed = x.repeat(4, 1) * torch.sigmoid(scores).transpose(0, 1).reshape(-1, 1)
            out = torch.bmm(routed.view(4, -1, 8), self.w)
            return scores, into, kept, ints, routed, out

    class Pair(torch.nn.Module):
        def forward(self, a, b):
            return torch.bmm(a, b) + 1

    cm = braze.compile(Moe())
    for tokens in (5, 3):
        logits, x = torch.randn(tokens, 4), torch.randn(tokens, 8)
        got, want = cm(logits, x), Moe()(logits, x)
        for g, w in zip(got[:4], want[:4]):
            assert torch.equal(g, w)
        for g, w in zip(got[4:], want[4:]):  # (after the sigmoid: Triton's, not torch's)
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert not [s for s in cm.plan.steps if s.kind == "eager"]
    assert [s.launcher for s in cm.plan.steps if s.kind == "template"].count("grouped_matmul") == 1
    pair = braze.compile(Pair())
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    torch.testing.assert_close(pair(a, b), Pair()(a, b))
    # a bmm between activations (no expert weights): the batched matmul family's kernel
    assert [s.launcher for s in pair.plan.steps if s.kind != "eager"][0] == "bmm"
    assert not [s for s in pair.plan.steps if s.kind == "eager"]


def test_repeat_along_any_dims_is_a_broadcast_view():
    """repeat along an inner dim (DiffLlama doubles its value heads: repeat(1, 2, 1, 1)), along several dims, along
    the dynamic batch dim, and with new leading dims: broadcast views, exact, no eager step at two batch sizes. Two
    repeated dynamic dims keep their eager step (one merged size can be the reshape's -1, not two)."""
    class Repeats(torch.nn.Module):
        def forward(self, v):
            heads = v.repeat(1, 2, 1, 1) * 2
            both = v.repeat(1, 3, 1, 2) + 1
            batch = v.repeat(2, 1, 1, 1) - 1
            lead = v[0].repeat(2, 1, 1, 3) * 3
            return heads, both, batch, lead

    class TwoDynamic(torch.nn.Module):
        def forward(self, v):
            return v.repeat(2, 1, 2, 1) + 1

    dims = {"v": {0: torch.export.Dim("b", min=1, max=8), 2: torch.export.Dim("s", min=1, max=16)}}
    v0 = torch.randn(2, 2, 5, 4)
    cm = braze.compile(Repeats(), dynamic_shapes=dims)
    for shape in ((2, 2, 5, 4), (3, 2, 7, 4)):
        v = torch.randn(*shape)
        for g, w in zip(cm(v), Repeats()(v)):
            assert torch.equal(g, w)
    assert not [s for s in cm.plan.steps if s.kind == "eager"]
    two = braze.compile(TwoDynamic(), dynamic_shapes=dims)
    assert torch.equal(two(v0), TwoDynamic()(v0))
    assert [s.target for s in two.plan.steps if s.kind == "eager"] == ["aten.repeat.default"]


def test_boolean_cats_and_mixed_integer_bitwise_ops_fuse():
    """CPM-Ant's mask: a cat of a constant true block (a float full cast to bool) and a comparison, and'ed with a
    broadcast of itself, and an int32 | bool. The interpreter's tl.where of a scalar int1 gave float lanes (and an
    int32 & int1 its own refusal): the fused kernel failed. Bool pieces now select as int8 and bitwise operands
    take the output's integer type: exact, no eager step."""
    class Mask(torch.nn.Module):
        def forward(self, x, n):
            keep = torch.cat([torch.full((x.shape[0], 3), 1.0).to(torch.bool), x > 0], dim=1)
            pair = keep[:, :, None] & keep[:, None, :]
            ones = torch.ones(x.shape[0], 1, dtype=torch.int32)
            return pair, (ones | (x > n)) & (x < 1)

    x, n = torch.randn(2, 5), torch.tensor(0.5)
    cm = braze.compile(Mask())
    for got, want in zip(cm(x, n), Mask()(x, n)):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert not [s for s in cm.plan.steps if s.kind == "eager"]


def test_reductions_over_other_dims_fuse():
    """sum / mean / amax / amin over several dims, all dims, or a non-last dim (and softmax over dim 1) become
    last-dim reductions of a view (passes/normalize.py): fused, no eager step, exact up to summation order, at two
    batch sizes (dim 0 is dynamic, and some of these reduce over it)."""

    class Reductions(torch.nn.Module):
        def forward(self, x):
            return (x.sum(), x.mean((1, 2)), x.amax(0), x.sum(dim=1, keepdim=True), x.amin((0, 2), keepdim=True),
                    torch.softmax(x, dim=1), x.sum((-2, -1), keepdim=True) * 2)

    model = Reductions()
    compiled = braze.compile(model)
    for batch in (2, 5):
        x = torch.randn(batch, 3, 7)
        for got, want in zip(compiled(x), model(x)):
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert compiled.report.fallbacks == []


class ResidualChain(torch.nn.Module):
    """A residual stream between ops no kernel template fuses a residual into (sort runs eagerly): each layer
    normalizes the stream, transforms it, and adds the result back."""

    def __init__(self, layers: int):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        for _ in range(self.layers):
            h = x * torch.rsqrt(torch.mean(x * x, -1, keepdim=True) + 1e-6)
            x = x + torch.sort(h, -1).values
        return x


def test_residual_stream_is_stored_not_recomputed_from_every_layer():
    """The stream is read by the next norm and the next add: stored once (schedule._worth_reusing), so no kernel's
    inputs grow with depth (recomputed inline, the last norm of L layers reloaded all L earlier outputs: O(L^2)
    bytes in the int6 / fused-DF11 plans, whose linears have no residual epilogue), same launches, same values."""
    x = torch.randn(3, 16)
    widest = {}
    for layers in (2, 6):
        model = ResidualChain(layers)
        compiled = braze.compile(model)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
        fused = [s for s in compiled.compiled.plan.steps if s.kind == "fused"]
        assert len(fused) == layers + 1  # one kernel per norm (the add and its store ride along), the last add
        widest[layers] = max(len(s.inputs) for s in fused)
    assert widest[6] == widest[2] <= 2
