"""INT6 (FlexQ-style) quantization, packing and W6A16 / W6A8 / W6A6 Triton kernels vs plain-torch oracles.

Tolerances (u = 2**-24, fp32 unit roundoff; mag = |fq(x)| @ |fq(W)|^T + |bias|): by Higham's bound a
computation whose every path has at most t fp32 roundings errs by <= t*u*mag. We compare the kernel to the
oracle evaluated in float64 (exact up to 2**-53) and to the fp32 oracle F.linear(fq(x), fq(W)) (which adds
its own (K + 1)*u*mag).
* W6A8 / W6A6: int8 x int8 -> int32 group partials are exact (|partial| <= 128*127*32 < 2**24, so the
  int -> fp32 conversion is exact too); the only roundings are the scale product, the rescale, the G-term
  group sum and the bias, plus the rounding already inside fq(x) = q*s_x in fp32: t = G + 5.
* W6A16: fq(W) = q * fp16 scale is exact in fp32; the kernel rounds inside each 128-term group dot, the
  rescale, the G-term group sum and the bias: t = GROUP + G + 3.
Measured errors are <= 0.1 x these bounds, while one weight one quantization step off (at the row's largest
activation) exceeds them 20-3000x; test_tolerance_detects_one_step_weight_error checks one such case.
"""

import pytest
import torch
import torch.nn.functional as F

from braze.kernels import INTERPRETER, TARGETS
from braze.kernels.int6 import (
    Int6MatmulSpec,
    int6_config,
    int6_linear_triton,
    quantize_activations_triton,
    render_int6_matmul,
)
from braze.quant.int6 import (
    Int6Weight,
    fake_quant_activation,
    fake_quant_weight,
    int6_linear_reference,
    pack_int6,
    quantize_activations_reference,
    quantize_int6,
    quantize_weight_groups,
    unpack_int6,
)

U32 = 2.0**-24
U16 = 2.0**-11
GROUP = 128


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_matches_oracle(
    out: torch.Tensor,
    xf: torch.Tensor,
    wf: torch.Tensor,
    bias: torch.Tensor | None,
    kernel_roundings: int,
    out_rel: float = 0.0,
) -> None:
    """out vs F.linear(xf, wf, bias); out_rel covers the final cast of a 16-bit output (|ref| * 2**-11)."""
    b64 = None if bias is None else bias.double()
    ref64 = F.linear(xf.double(), wf.double(), b64)
    ref32 = F.linear(xf, wf, None if bias is None else bias.float()).double()
    mag = F.linear(xf.double().abs(), wf.double().abs(), None if b64 is None else b64.abs())
    tol = kernel_roundings * U32 * mag + out_rel * ref64.abs() + 1e-30
    got = out.double()
    assert got.shape == ref64.shape
    assert torch.isfinite(got).all()
    worst = ((got - ref64).abs() / tol).max().item()
    assert worst <= 1.0, f"kernel vs float64 oracle: error {worst:.3f} x tolerance"
    tol32 = tol + (xf.shape[-1] + 1) * U32 * mag
    assert ((got - ref32).abs() <= tol32).all(), "kernel vs fp32 oracle F.linear(fq(x), fq(W))"


def _roundings(act_bits: int | None, k: int) -> int:
    g = -(-k // GROUP)
    return g + 5 if act_bits else GROUP + g + 3


def _oracle_operands(
    x: torch.Tensor, w: torch.Tensor, act_bits: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float() if act_bits is None else fake_quant_activation(x, act_bits)
    return xf, fake_quant_weight(w)


# ----------------------------------------------------------------------------------------------- packing

SHAPES = [(1, 128), (5, 576), (7, 200), (3, 1536), (33, 4), (2, 130), (9, 255), (4, 384)]


@pytest.mark.parametrize("n,k", SHAPES)
def test_pack_roundtrip_on_quantized_ints(n: int, k: int) -> None:
    w = torch.randn(n, k, generator=_gen(n * 1000 + k))
    q, _ = quantize_weight_groups(w)
    qw = quantize_int6(w)
    g = -(-k // GROUP)
    assert qw.packed.dtype == torch.uint8 and qw.packed.shape == (n, g * GROUP * 6 // 8)
    assert qw.scales.dtype == torch.float16 and qw.scales.shape == (n, g)
    assert torch.equal(unpack_int6(qw.packed, k), q)
    assert torch.equal(qw.int_values(), q)
    # The padded tail unpacks as zeros.
    assert not unpack_int6(qw.packed, g * GROUP)[:, k:].any()
    assert q.min() >= -32 and q.max() <= 31


@pytest.mark.parametrize("group_size", [128, 64, 4])
def test_pack_roundtrip_full_int6_range(group_size: int) -> None:
    q = torch.randint(-32, 32, (6, 3 * group_size), generator=_gen(1), dtype=torch.int8)
    q[0, :4] = torch.tensor([-32, 31, 0, -1], dtype=torch.int8)
    assert torch.equal(unpack_int6(pack_int6(q, group_size), q.shape[1], group_size), q)
    # Every byte pattern is a valid encoding when K is a multiple of the group: pack is a bijection.
    raw = torch.randint(0, 256, (6, 3 * group_size * 3 // 4), generator=_gen(2), dtype=torch.uint8)
    assert torch.equal(pack_int6(unpack_int6(raw, 3 * group_size, group_size), group_size), raw)


def test_packed_layout_is_byte_planes_of_24bit_words() -> None:
    # group_size 4 -> SUB 1: one word per group holding q[0] | q[1] << 6 | q[2] << 12 | q[3] << 18.
    q = torch.tensor([[1, -1, 0, -32]], dtype=torch.int8)
    word = 1 | (63 << 6) | (0 << 12) | (32 << 18)
    expected = torch.tensor([[word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF]], dtype=torch.uint8)
    assert torch.equal(pack_int6(q, group_size=4), expected)
    # group_size 8 -> SUB 2: values k = p*2 + j go to field p of word j; plane b holds byte b of both words.
    q8 = torch.arange(-4, 4, dtype=torch.int8).reshape(1, 8)
    words = [
        (int(q8[0, j]) & 63)
        | ((int(q8[0, 2 + j]) & 63) << 6)
        | ((int(q8[0, 4 + j]) & 63) << 12)
        | ((int(q8[0, 6 + j]) & 63) << 18)
        for j in range(2)
    ]
    planes = [(wd >> (8 * b)) & 0xFF for b in range(3) for wd in words]
    assert pack_int6(q8, group_size=8).tolist() == [planes]


# ---------------------------------------------------------------------------------- format and storage


@pytest.mark.parametrize(
    "k,bits",
    [
        (128, 6.125),
        (1536, 6.125),
        (4096, 6.125),
        (576, (640 * 6 + 5 * 16) / 576),
        (200, (256 * 6 + 2 * 16) / 200),
    ],
)
def test_bits_per_weight_counted_from_stored_tensors(k: int, bits: float) -> None:
    qw = quantize_int6(torch.randn(8, k, generator=_gen(k)))
    stored_bits = 8 * (qw.packed.numel() * 1 + qw.scales.numel() * 2)
    assert qw.packed.dtype == torch.uint8 and qw.scales.dtype == torch.float16
    assert stored_bits / qw.packed.shape[0] / k == pytest.approx(bits, abs=1e-12)
    assert qw.bits_per_weight == pytest.approx(bits, abs=1e-12)


def test_scales_rounding_and_dequantize() -> None:
    w = torch.randn(16, 576, generator=_gen(3)) * 0.02
    qw = quantize_int6(w)
    _, scales = quantize_weight_groups(w)
    wg = F.pad(w, (0, 640 - 576)).reshape(16, 5, GROUP)
    assert torch.equal(scales, (wg.abs().amax(-1) / 31).half())
    deq = qw.dequantize()
    assert torch.equal(deq, fake_quant_weight(w))
    # Round to nearest: the error is at most half a step of the (fp16-rounded) group scale.
    step = scales.float().repeat_interleave(GROUP, dim=1)[:, :576]
    assert ((deq - w).abs() <= step * (0.5 + 1e-6)).all()
    assert qw.dequantize(torch.float16).dtype == torch.float16


def test_all_zero_group_has_zero_scale_and_no_nan() -> None:
    w = torch.randn(4, 576, generator=_gen(4))
    w[1, 128:256] = 0.0
    w[2, 512:] = 0.0  # the short last group
    qw = quantize_int6(w)
    assert qw.scales[1, 1] == 0 and qw.scales[2, 4] == 0
    q = qw.int_values()
    assert not q[1, 128:256].any() and not q[2, 512:].any()
    deq = qw.dequantize()
    assert torch.isfinite(deq).all() and not deq[1, 128:256].any()
    assert torch.isfinite(fake_quant_weight(torch.zeros(3, 200))).all()
    x = torch.randn(3, 576, generator=_gen(5))
    x[0, :128] = 0.0
    xq, xs = quantize_activations_reference(x, 8)
    assert xs[0, 0] == 0 and not xq[0, :128].any()
    out = int6_linear_triton(x, qw, act_bits=8)
    _assert_matches_oracle(out, fake_quant_activation(x, 8), deq, None, _roundings(8, 576))


def test_state_dict_roundtrip() -> None:
    qw = quantize_int6(torch.randn(10, 200, generator=_gen(6)))
    state = qw.to_state_dict("layer.")
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    back = Int6Weight.from_state_dict(state, "layer.")
    assert back.shape == (10, 200) and back.group_size == 128
    assert torch.equal(back.packed, qw.packed) and torch.equal(back.scales, qw.scales)


# ------------------------------------------------------------------------------ activation quantization


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("m,k", [(17, 576), (3, 200), (1, 1536)])
def test_quantize_activations_kernel_is_bit_exact(bits: int, m: int, k: int) -> None:
    x = torch.randn(m, k, generator=_gen(m + k + bits)) * 3
    xq, xs = quantize_activations_triton(x, bits)
    rq, rs = quantize_activations_reference(x, bits)
    assert torch.equal(xq, rq) and torch.equal(xs, rs)


@pytest.mark.parametrize("bits,qmax", [(8, 127), (6, 31)])
def test_activation_rounding_is_half_to_even(bits: int, qmax: int) -> None:
    x = torch.zeros(1, 128)
    x[0, :8] = torch.tensor([qmax, 2.5, 3.5, -2.5, -0.5, 0.5, 1.5, -qmax])  # scale == 1 exactly
    expected = [qmax, 2, 4, -2, 0, 0, 2, -qmax]
    rq, _ = quantize_activations_reference(x, bits)
    xq, xs = quantize_activations_triton(x, bits)
    assert rq[0, :8].tolist() == expected and xq[0, :8].tolist() == expected
    assert xs.item() == 1.0


# ------------------------------------------------------------------------------------------- kernels

KERNEL_SHAPES = [(1, 72, 576), (3, 100, 200), (17, 136, 1536)]


@pytest.mark.parametrize("act_bits", [None, 8, 6])
@pytest.mark.parametrize("m,n,k", KERNEL_SHAPES)
def test_kernel_matches_oracle_fp32(act_bits: int | None, m: int, n: int, k: int) -> None:
    gen = _gen(m * 7 + n * 3 + k)
    x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen) * 0.05
    qw = quantize_int6(w)
    out = int6_linear_triton(x, qw, act_bits=act_bits)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    xf, wf = _oracle_operands(x, w, act_bits)
    _assert_matches_oracle(out, xf, wf, None, _roundings(act_bits, k))
    assert torch.equal(F.linear(xf, wf), int6_linear_reference(x, qw, act_bits))


@pytest.mark.parametrize("act_bits", [None, 8, 6])
def test_kernel_bias_split_k_and_3d_input(act_bits: int | None) -> None:
    gen = _gen(11)
    x, w = torch.randn(2, 3, 576, generator=gen), torch.randn(200, 576, generator=gen)
    bias = torch.randn(200, generator=gen)
    qw = quantize_int6(w)
    xf, wf = _oracle_operands(x, w, act_bits)
    # the sm_90 description makes the production launcher split K (atomic adds into a zeroed fp32 buffer)
    assert int6_config(6, 200, qw.n_groups, TARGETS["sm_90"]).split_k > 1
    assert int6_config(6, 200, qw.n_groups, INTERPRETER).split_k == 1
    # 1B decode linears (N >= 2048) narrow their tiles instead: no split-K, so no memset and cast launches
    assert all(int6_config(1, n, 16, TARGETS[t]).split_k == 1 for n in (2048, 3072) for t in TARGETS)
    for device in (INTERPRETER, TARGETS["sm_90"]):
        out = int6_linear_triton(x, qw, act_bits=act_bits, bias=bias, device=device)
        assert out.shape == (2, 3, 200)
        _assert_matches_oracle(out, xf, wf, bias, _roundings(act_bits, 576))
    ref = int6_linear_reference(x, qw, act_bits, bias)
    assert torch.equal(ref, F.linear(xf, wf, bias))


FUSED_CASES = {  # W6A16 prologue / epilogue combinations the quantize_int6 pass produces, and split-K
    "norm+residual": dict(norm=True, residual=True),
    "norm+smooth+swiglu": dict(norm=True, smooth=True, activation="silu", glu=True),
    "smooth+residual+bias": dict(smooth=True, residual=True, bias=True),
    "gelu_tanh": dict(activation="gelu_tanh"),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_fused_prologue_epilogue_matches_the_op_reference(case: str, dtype: torch.dtype) -> None:
    """braze::int6_linear with RMSNorm / smoothing prologue and activation / GLU / residual epilogue through the
    production launcher, on the interpreter's configuration and on sm_90's (which splits K for the linear
    epilogues: the residual is added by split 0), vs the op's reference (the unfused ops in sequence).
    Tolerance: fp32, reassociation and tf32x3's ~2**-22 per product over K = 576; fp16, the reference rounds each
    intermediate to fp16 where the kernel rounds the normalized x and the output only: a few fp16 ulps."""
    opts = FUSED_CASES[case]
    gen = _gen(len(case))
    m, n, k = 6, 200, 576
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    qw = quantize_int6(torch.randn(n, k, generator=gen) * 0.05)
    half = n // 2 if opts.get("glu") else n
    kw = dict(norm_weight=(1 + 0.1 * torch.randn(k, generator=gen)).to(dtype) if opts.get("norm") else None,
              eps=1e-5, smooth=(0.5 + torch.rand(k, generator=gen)).to(dtype) if opts.get("smooth") else None,
              activation=opts.get("activation", "none"), glu=opts.get("glu", False),
              residual=torch.randn(m, half, generator=gen).to(dtype) if opts.get("residual") else None)
    bias = torch.randn(n, generator=gen).to(dtype) if opts.get("bias") else None
    want = torch.ops.braze.int6_linear(x, qw.packed, qw.scales, bias, k, GROUP, 16, kw["norm_weight"], kw["eps"],
                                       kw["smooth"], kw["activation"], kw["glu"], kw["residual"])
    fused_epilogue = kw["glu"] or kw["activation"] != "none"
    assert (int6_config(m, half, qw.n_groups, TARGETS["sm_90"], split=not fused_epilogue).split_k > 1) \
        == (not fused_epilogue)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    for device in (INTERPRETER, TARGETS["sm_90"]):
        got = int6_linear_triton(x, qw, bias=bias, device=device, **kw)
        assert got.shape == want.shape == (m, half) and got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
    plain = int6_linear_triton(x, qw, bias=bias)  # the prologue / epilogue change the result: they ran
    assert plain.shape != want.shape or not torch.allclose(plain.float(), want.float(), atol=1e-2)


@pytest.mark.parametrize("act_bits", [None, 8])
def test_kernel_fp16_activations(act_bits: int | None) -> None:
    gen = _gen(12)
    m, n, k = 17, 100, 576
    x = torch.randn(m, k, generator=gen).half()
    w = torch.randn(n, k, generator=gen)
    qw = quantize_int6(w)
    xf, wf = _oracle_operands(x, w, act_bits)
    # fp16 x times a 6-bit int is exact in fp32, so the fp32-output bound is the same as for fp32 x.
    out32 = int6_linear_triton(x, qw, act_bits=act_bits, out_dtype=torch.float32)
    _assert_matches_oracle(out32, xf, wf, None, _roundings(act_bits, k))
    out16 = int6_linear_triton(x, qw, act_bits=act_bits)
    assert out16.dtype == torch.float16
    _assert_matches_oracle(out16, xf, wf, None, _roundings(act_bits, k), out_rel=U16)


def test_tolerance_detects_one_step_weight_error() -> None:
    gen = _gen(13)
    x, w = torch.randn(3, 1536, generator=gen), torch.randn(8, 1536, generator=gen)
    qw = quantize_int6(w)
    out = int6_linear_triton(x, qw, act_bits=8)
    xf, wf = _oracle_operands(x, w, 8)
    bad = wf.clone()
    bad[0, 700] += qw.scales[0, 700 // GROUP].float()  # one weight one quantization step off
    with pytest.raises(AssertionError):
        _assert_matches_oracle(out, xf, bad, None, _roundings(8, 1536))


def test_render_header_and_spec_validation() -> None:
    src = render_int6_matmul(
        Int6MatmulSpec("mm6", act_bits=6, has_bias=True, out_dtype="float32"),
        header="generated for layer 3\n# second line",
    )
    lines = src.splitlines()
    assert lines[0].startswith("# braze int6 matmul") and lines[1] == "# generated for layer 3"
    assert lines[2] == "# second line"
    assert "def mm6(" in src and "def mm6_quantize_activations(" in src and "b_ptr" in src
    a16 = render_int6_matmul(Int6MatmulSpec("mm16"))
    assert "quantize_activations" not in a16 and "b_ptr" not in a16 and "tl.float16" in a16
    with pytest.raises(ValueError):
        Int6MatmulSpec("bad name")
    with pytest.raises(ValueError):
        Int6MatmulSpec("k", act_bits=4)
