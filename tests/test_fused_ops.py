"""Ops the fused (pointwise / reduction) family generates beyond plain elementwise math: F.pad (constant_pad_nd)
as an index shift under an in-range mask, and full_like / zeros_like / ones_like as constants, fused with their
neighbours instead of running as eager torch ops. Compared exactly with eager (no arithmetic reassociation: a
pad selects, a fill is a literal)."""

import pytest
import torch
import torch.nn.functional as F

import braze


class Pads(torch.nn.Module):
    def forward(self, x, mask):
        return (F.pad(x, (1, 2), value=-3.5) * 2,  # last dim, a fill value, then fused math
                F.pad(x, (2, 0, -1, 1)),  # two dims, one of them cropped (a negative pad)
                F.pad(mask, (0, 3), value=True),  # bool
                F.pad(x.int(), (1, 1), value=4))  # integer


class Fills(torch.nn.Module):
    def forward(self, x):
        return torch.full_like(x, 7.0) + torch.zeros_like(x) + torch.ones_like(x) * x


@pytest.mark.parametrize("batch", [2, 3])
def test_pads_run_in_fused_kernels(batch):
    x, mask = torch.randn(batch, 5, 6), torch.rand(batch, 5, 6) > 0.5
    compiled = braze.compile(Pads())
    for got, want in zip(compiled(x, mask), Pads()(x, mask), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert compiled.report.fallbacks == []


def test_fills_are_constants_in_fused_kernels():
    x = torch.randn(4, 9)
    compiled = braze.compile(Fills())
    torch.testing.assert_close(compiled(x), Fills()(x), atol=0, rtol=0)
    assert compiled.report.fallbacks == [] and compiled.plan.launches == 1


class NanPaths(torch.nn.Module):
    def forward(self, x):
        return (torch.relu(x), x.clamp(-1, 1), torch.maximum(x, torch.zeros_like(x)), x.amax(-1), x.amin(-1),
                torch.nn.functional.linear(x, torch.eye(x.shape[-1])).relu())


def test_nan_propagates_as_in_torch():
    """relu / clamp / maximum / amax / amin keep a NaN, as torch does (tl.maximum and tl.max drop it by default)."""
    x = torch.tensor([[float("nan"), 1.0, -2.0, float("inf")], [0.5, -0.5, 3.0, -3.0]])
    compiled = braze.compile(NanPaths())
    for got, want in zip(compiled(x), NanPaths()(x), strict=True):
        torch.testing.assert_close(got, want, equal_nan=True)


class Inverts(torch.nn.Module):
    def forward(self, ints, flags):
        return ~ints, ~flags, ~(ints > 0)


def test_bitwise_not_of_integers_is_twos_complement():
    ints, flags = torch.tensor([[0, 1, 5, -7]]), torch.tensor([[True, False, True, False]])
    compiled = braze.compile(Inverts())
    for got, want in zip(compiled(ints, flags), Inverts()(ints, flags), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert compiled.report.fallbacks == []


class Cumulative(torch.nn.Module):
    def forward(self, ids, x):
        mask = ids.ne(1).int()  # RoBERTa's position ids from its padding mask
        positions = torch.cumsum(mask, dim=1).type_as(mask) * mask + 1
        return positions, torch.cumsum(x, -1) * 2, x.half().cumsum(-1), torch.cumsum(x > 0, -1)


def test_cumsum_over_the_last_dim_is_a_scan_in_a_fused_kernel():
    """Integer results exact (int64 as torch promotes them); fp32 within summation order; fp16 within one fp16
    rounding of the fp32 running sum."""
    ids, x = torch.tensor([[5, 6, 1, 1], [1, 7, 8, 9]]), torch.randn(2, 4)
    compiled = braze.compile(Cumulative())
    got, want = compiled(ids, x), Cumulative()(ids, x)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
    assert torch.equal(got[0], want[0]) and torch.equal(got[3], want[3])
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[2], want[2], atol=2e-3, rtol=2e-3)
    assert compiled.report.fallbacks == []


class ConstantIndexGather(torch.nn.Module):
    """BERT's token type ids: a constant buffer gathered by a slice of its constant position-ids buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("types", torch.zeros(1, 16, dtype=torch.long))
        self.register_buffer("positions", torch.arange(16)[None])
        self.table = torch.nn.Embedding(2, 4)

    def forward(self, ids):
        index = self.positions[:, : ids.shape[1]]
        return self.table(torch.gather(self.types.expand(ids.shape[0], -1), 1, index.expand(ids.shape[0], -1)))


def test_a_gather_by_a_constant_in_range_index_is_fused():
    ids, model = torch.zeros(3, 7, dtype=torch.long), ConstantIndexGather()
    model.types[0, 3:9] = 1
    compiled = braze.compile(model)
    torch.testing.assert_close(compiled(ids), model(ids))
    assert compiled.report.fallbacks == []


class Elementwise(torch.nn.Module):
    def forward(self, x, i):
        return (torch.sign(x), torch.round(x), torch.trunc(x), torch.remainder(x, 0.7), torch.isnan(x),
                torch.remainder(i, 3), torch.remainder(i, -3), i ^ (i >> 1), i << 2, torch.logical_xor(x > 0, i > 0),
                torch.nn.functional.leaky_relu(x, 0.1), torch.nn.functional.elu(x), torch.nn.functional.relu6(x),
                2.0 ** x.clamp(-3, 3), torch.fmod(x, 0.7), torch.fmod(i, -3), torch.fmod(x, x.flip(-1)))


def test_elementwise_ops_beyond_arithmetic():
    """Rounding (ties to even, as torch.round), sign (0 at NaN, as torch), Python's remainder for floats and
    integers of either sign, C's fmod (the dividend's sign; by zero: NaN), bit ops and shifts, logical xor, and ops
    torch defines by others: exact where torch's result is (selects, integer ops, rounding, fmod); the float
    remainder, elu and pow within fp32 rounding."""
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 2.4999, float("nan"), -7.3, 7.3, 0.0]])
    i = torch.tensor([[-7, 7, 0, 5, -5, 1, 2, -1, 9, -9]])
    compiled = braze.compile(Elementwise())
    got, want = compiled(x, i), Elementwise()(x, i)
    for n, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.dtype == w.dtype, n
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6, equal_nan=True, msg=f"output {n}")
    for g, w in zip(got[-3:], want[-3:], strict=True):  # fmod is exact
        assert torch.equal(g.nan_to_num(), w.nan_to_num()) and torch.equal(g.isnan(), w.isnan())
    assert compiled.report.fallbacks == []


class Flips(torch.nn.Module):
    def forward(self, x):
        return x.flip(0, -1) + 1, torch.fliplr(x[0]), (x * 2).flip(1)


def test_flip_is_an_index_remap():
    """torch.flip over one or several dims (the batch dim too, whose size is dynamic): fused as size - 1 - i,
    exact, at two batch sizes."""
    compiled = braze.compile(Flips())
    for batch in (3, 5):
        x = torch.randn(batch, 4, 6)
        for got, want in zip(compiled(x), Flips()(x), strict=True):
            assert torch.equal(got, want)
    assert compiled.report.fallbacks == []


class Norms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.bn2d, self.bn1d, self.inorm = torch.nn.BatchNorm2d(3), torch.nn.BatchNorm1d(3), torch.nn.InstanceNorm1d(3)
        for bn in (self.bn2d, self.bn1d):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.normal_()

    def forward(self, img, seq):
        pooled = torch.nn.functional.adaptive_avg_pool2d(self.bn2d(img), 1)
        return (pooled, self.bn1d(seq), self.inorm(seq), torch.nn.functional.normalize(seq, dim=-1), seq.var(-1),
                seq.std(-1), seq.mean(), torch.nn.functional.mse_loss(seq, seq * 0.5))


@pytest.mark.parametrize("name", ["Norms", "GroupNorms"])
def test_cnn_norms_and_statistics_run_in_fused_kernels(name):
    """Norms: eval BatchNorm (a per-channel affine map), InstanceNorm, global average pooling, F.normalize,
    var / std, a full mean and an MSE loss. GroupNorms: 4 groups over an image with a per-channel affine map, 1 group
    over a sequence (LayerNorm-like), as row statistics over [N, G, C / G * HW]. fp32 within summation order."""
    model, channels = {"Norms": (Norms, 3), "GroupNorms": (GroupNorms, 16)}[name]
    model = model().eval()
    img, seq = torch.randn(2, channels, 5, 5), torch.randn(3, channels, 7)
    compiled = braze.compile(model)
    for g, w in zip(compiled(img, seq), model(img, seq), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert compiled.report.fallbacks == []


class ShortConvs(torch.nn.Module):
    """The convolutions a fused kernel unrolls: a causal depthwise conv1d (Mamba / LFM2 / Qwen3.5's linear attention:
    padded by kernel - 1, then cut to the sequence), a strided 3-channel stem, a dilated grouped conv2d (2 outputs
    per group) without bias."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.causal = torch.nn.Conv1d(16, 16, 4, groups=16, padding=3)
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.grouped = torch.nn.Conv2d(8, 16, 3, padding=2, dilation=2, groups=8, bias=False)

    def forward(self, seq, img, feat):
        causal = F.silu(self.causal(seq.transpose(1, 2))[..., :seq.shape[1]]).transpose(1, 2)
        return causal, torch.relu(self.stem(img)), self.grouped(feat) * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_short_convolutions_unroll_in_fused_kernels(dtype):
    """Each conv is one kernel with its neighbours fused. fp32: summation order only; fp16: the kernel sums in fp32
    and rounds once, torch's CPU conv may round differently, so one fp16 ulp at |y| < 4 (2**-9 * 2)."""
    model = ShortConvs().to(dtype)
    args = (torch.randn(2, 9, 16), torch.randn(2, 3, 10, 11), torch.randn(1, 8, 7, 6))
    args = tuple(a.to(dtype) for a in args)
    compiled = braze.compile(model)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for got, want in zip(compiled(*args), model(*args), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert compiled.report.fallbacks == [] and compiled.plan.launches == 3


def test_a_convolution_too_wide_to_unroll_is_an_implicit_gemm():
    """64 input channels x 9 taps: matmul-shaped work, not unrolled here but the conv family's implicit GEMM
    (tests/test_conv_models.py)."""
    conv = torch.nn.Conv2d(64, 8, 3, padding=1)
    x = torch.randn(1, 64, 5, 5)
    compiled = braze.compile(conv)
    torch.testing.assert_close(compiled(x), conv(x), atol=1e-5, rtol=1e-5)
    assert compiled.report.fallbacks == []
    assert [s.launcher for s in compiled.plan.steps if s.kind == "template"] == ["conv"]


class SliceWrites(torch.nn.Module):
    def forward(self, x, y, flags):
        x = x.clone()
        x[:, 2:5] = y * 3  # slice_scatter over a copy of y
        x[:, ::3] = 0.5  # a stepped slice filled with a scalar
        x[:, -2:] = y[:, :2]  # a negative start
        flags = flags.clone()
        flags[1:, 1:3] = True
        return x + 1, flags


def test_slice_assignments_are_fused():
    x, y, flags = torch.randn(4, 10), torch.randn(4, 3), torch.rand(3, 5) > 0.5
    compiled = braze.compile(SliceWrites())
    for got, want in zip(compiled(x, y, flags), SliceWrites()(x, y, flags), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert compiled.report.fallbacks == []


class ConvStack(torch.nn.Module):
    """A MobileNet-style block: stem conv + eval BatchNorm + relu6, depthwise 3x3 + relu6, pointwise 1x1, global
    average pooling, classifier."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.bn = torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.BatchNorm2d(16)
        self.dw, self.pw = torch.nn.Conv2d(16, 16, 3, padding=1, groups=16), torch.nn.Conv2d(16, 32, 1)
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu6(self.dw(F.relu6(self.bn(self.stem(x)))))
        return self.fc(F.adaptive_avg_pool2d(self.pw(x), 1).flatten(1))


def test_a_conv_reads_a_stored_input():
    """A conv reads its input at every tap: computed inline, a stack of convs multiplies (9 x 27 x 16 products per
    output here, and a 40 s compile); each conv's computed input is stored instead, one kernel per conv that
    feeds another: stem + norm + relu6, depthwise + relu6, then pointwise + pooling, then the linear."""
    model = ConvStack().eval()
    x = torch.randn(2, 3, 16, 16)
    compiled = braze.compile(model)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    steps = [s for s in compiled.plan.steps if s.kind != "view"]
    assert [s.kind for s in steps] == ["fused", "fused", "fused", "template"], steps
    assert compiled.report.fallbacks == []


class GroupNorms(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.affine, self.plain = torch.nn.GroupNorm(4, 16), torch.nn.GroupNorm(1, 16, affine=False)
        self.affine.weight.data.normal_()
        self.affine.bias.data.normal_()

    def forward(self, img, seq):
        return F.silu(self.affine(img)), self.plain(seq)


class ArgExtremes(torch.nn.Module):
    def forward(self, x, ids):
        return (x.argmax(-1), x.argmin(-1, keepdim=True), ids.argmax(-1), x[0, 0].argmax(), (x * 2).argmax(dim=1),
                x.argmin(0, keepdim=True), x.argmax(), (x + 1).argmax(keepdim=True))


def test_argmax_and_argmin_are_fused():
    """The first index of the extreme, a NaN counting as the extreme (torch's rule), ties to the first; ints too.
    Over another dim or the flattened tensor (dim=None), over a view that moves the dim last or flattens."""
    x = torch.randn(3, 5, 7)
    x[1, 2, 3], x[0, 0, 4], x[0, 0, 6] = float("nan"), float("nan"), float("nan")
    x[2, 1, :] = 1.0  # all tied: index 0
    ids = torch.randint(0, 3, (4, 9))
    compiled = braze.compile(ArgExtremes())
    for got, want in zip(compiled(x, ids), ArgExtremes()(x, ids), strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
    assert compiled.report.fallbacks == []


class Pools(torch.nn.Module):
    """nn.MaxPool2d / AvgPool2d and their 1-D forms (torch runs them as 2-D over an unsqueezed dim) over computed
    inputs: padding, stride, dilation, ceil_mode, count_include_pad=False, divisor_override."""

    POOLS = (torch.nn.MaxPool2d(3, 2, 1), torch.nn.MaxPool2d(3, 2, 1, dilation=2, ceil_mode=True),
             torch.nn.AvgPool2d(2), torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
             torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True), torch.nn.AvgPool2d(3, 1, 1, divisor_override=5))
    POOLS_1D = (torch.nn.MaxPool1d(3, 2, 1, ceil_mode=True), torch.nn.AvgPool1d(3, 1, 1, count_include_pad=False))

    def forward(self, img, seq):
        img, seq = img * 2, F.relu(seq)
        return [pool(img) for pool in self.POOLS] + [pool(seq) for pool in self.POOLS_1D]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pooling_windows_are_fused(dtype):
    """Each pool is one fused kernel reading its stored input (8 pools + the 2 inputs: 10 launches, no torch op),
    with the ops after it (the 1-D pools' squeeze is a view). Max pooling selects (exact,
    a NaN in the window propagates as torch's); average pooling sums the window in fp32 and divides by torch's
    count: fp32 within summation order, fp16 within one output rounding (2**-11 relative, 2e-3 at |y| < 4)."""
    img, seq = torch.randn(2, 4, 9, 10).to(dtype), torch.randn(2, 4, 11).to(dtype)
    img[0, 1, 2, 3] = float("nan")
    model = Pools().eval()
    compiled = braze.compile(model)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    for i, (got, want) in enumerate(zip(compiled(img, seq), model(img, seq), strict=True)):
        assert got.shape == want.shape and got.dtype == want.dtype, i
        exact = i in (0, 1, 6)  # max pools
        torch.testing.assert_close(got, want, atol=0 if exact else tol, rtol=0 if exact else tol, equal_nan=True)
    assert compiled.report.fallbacks == [] and compiled.plan.launches == 10


def test_a_pool_reads_a_stored_input():
    """A pool after a conv reads the conv's output at each of its taps: stored by the conv's kernel and read, not
    recomputed per tap (a stem conv, then a 3x3 max pool, as ResNet's)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1))
    x = torch.randn(2, 3, 12, 12)
    compiled = braze.compile(model.eval())
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert [s.kind for s in compiled.plan.steps if s.kind != "view"] == ["fused", "fused"]
    assert compiled.report.fallbacks == []
