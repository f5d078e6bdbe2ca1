"""Matmul template vs plain torch, run under the Triton interpreter (CPU, fp32 and fp16 only).

Shapes are small and ragged on purpose (M=1 decode rows, N and K not multiples of the tile) so every
mask is exercised. Every case launches through the production launcher (braze.kernels.MATMUL.launch); a few run
with the sm_90 description, whose decode-sized tiles give several programs per dimension under the interpreter.
"""

import ast

import pytest
import torch
import torch.nn.functional as F
from triton.language import TRITON_MAX_TENSOR_NUMEL

from braze.kernels import INTERPRETER, TARGETS, DeviceSpec
from braze.kernels.matmul import (
    INTERPRETER_MAX_BLOCK_N,
    MATMUL,
    MatmulSpec,
    gemv_config,
    matmul_config,
    render_matmul,
    takes_gemv_form,
)
from braze.runtime.kernel_loader import load_kernel_module

# fp32: the kernel accumulates in fp32 like torch, only the summation order differs.
# fp16: inputs are identical and accumulation is fp32, so the error is the fp16 rounding of the output
# (unit roundoff 4.9e-4 relative) plus, with the RMSNorm prologue, the rounding of the normalized A to
# fp16 before tl.dot (as on tensor cores): a few ulps of outputs of magnitude ~1-4.
TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 2e-3, "rtol": 2e-3}}

# GPU tiles under the interpreter: for M=33, N=96 a 1x3 grid with a ragged last N tile (BLOCK_N shrinks to 32 to
# cover the SMs); K=576 takes 9 K iterations.
SMALL_BLOCKS = TARGETS["sm_90"]


def run_matmul(spec: MatmulSpec, a: torch.Tensor, w: torch.Tensor, *, out: torch.Tensor | None = None,
               eps: float = 1e-6, blocks: DeviceSpec | None = None, **roles: torch.Tensor | None) -> torch.Tensor:
    """Render `spec` and launch it through the production launcher (the plan's roles: x, w, w2, bias, ...)."""
    if out is None:
        out = torch.empty(a.shape[0], w.shape[0], dtype=getattr(torch, spec.out_dtype))
    tensors = {"x": a, "w": w, **{k: v for k, v in roles.items() if v is not None}}
    MATMUL.launch(load_kernel_module(render_matmul(spec)), spec.name, tensors, out, {"eps": eps},
                  blocks or INTERPRETER)
    return out


def _rand(*shape: int, dtype: torch.dtype, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(dtype)


def _operands(M: int, N: int, K: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A ~ N(0, 1) and a Linear-like W scaled by 1/sqrt(K), so outputs are O(1)."""
    return _rand(M, K, dtype=dtype, seed=1), _rand(N, K, dtype=dtype, scale=K**-0.5, seed=2)


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])


def _hf_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm, evaluated in fp32."""
    h = x.float()
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight.float() * h


def _spec(dtype: torch.dtype, **kw: object) -> MatmulSpec:
    out_dtype = {torch.float32: "float32", torch.float16: "float16"}[dtype]
    return MatmulSpec(**{"name": "mm", "out_dtype": out_dtype, **kw})


@pytest.mark.parametrize(
    ("M", "N", "K", "dt", "blocks"),
    [
        (1, 24, 40, "float32", None),
        (5, 96, 128, "float16", None),
        (33, 96, 576, "float32", None),
        (33, 96, 40, "float32", SMALL_BLOCKS),
        (33, 96, 40, "float16", SMALL_BLOCKS),
    ],
)
def test_plain_gemm(M: int, N: int, K: int, dt: str, blocks: tuple[int, int, int] | None) -> None:
    dtype = getattr(torch, dt)
    a, w = _operands(M, N, K, dtype)
    out = run_matmul(_spec(dtype), a, w, blocks=blocks)
    assert out.dtype == dtype and out.shape == (M, N)
    _check(out, F.linear(a.float(), w.float()), dtype)
    if dtype == torch.float32:  # ieee fp32 should agree far better than the generic tolerance
        torch.testing.assert_close(out, F.linear(a, w), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("activation", "has_bias", "dt"),
    [
        (None, True, "float32"),
        ("silu", True, "float32"),
        ("gelu", True, "float32"),
        ("gelu_tanh", True, "float32"),
        ("relu", False, "float32"),
        ("silu", False, "float16"),
        ("gelu_tanh", True, "float16"),
    ],
)
def test_bias_activation(activation: str | None, has_bias: bool, dt: str) -> None:
    dtype = getattr(torch, dt)
    M, N, K = 5, 96, 128
    a, w = _operands(M, N, K, dtype)
    bias = _rand(N, dtype=dtype, seed=3) if has_bias else None
    ref = F.linear(a.float(), w.float(), None if bias is None else bias.float())
    ref = {
        None: lambda x: x,
        "silu": F.silu,
        "gelu": F.gelu,
        "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }[activation](ref)
    out = run_matmul(_spec(dtype, has_bias=has_bias, activation=activation), a, w, bias=bias)
    _check(out, ref, dtype)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_activations_extreme_values() -> None:
    """Large |x| must not turn into inf/nan (sigmoid-based SiLU/GELU-tanh, erf GELU)."""
    a = torch.tensor([[1.0], [-1.0]]) * torch.tensor([[1e3, 60.0, 1.0, 1e-3]]).repeat_interleave(4, dim=1)
    a = a.reshape(2, 16)
    w = torch.eye(16)
    for activation, fn in [
        ("silu", F.silu),
        ("gelu", F.gelu),
        ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    ]:
        out = run_matmul(_spec(torch.float32, activation=activation), a, w)
        assert torch.isfinite(out).all(), activation
        _check(out, fn(a), torch.float32)


@pytest.mark.parametrize("dt", ["float32", "float16"])
def test_residual(dt: str) -> None:
    dtype = getattr(torch, dt)
    M, N, K = 33, 24, 40
    a, w = _operands(M, N, K, dtype)
    bias = _rand(N, dtype=dtype, seed=3)
    residual = _rand(N, M, dtype=dtype, seed=4).t()  # its own, transposed strides
    spec = _spec(dtype, has_bias=True, activation="silu", has_residual=True)
    out = run_matmul(spec, a, w, bias=bias, residual=residual)
    _check(out, F.silu(F.linear(a.float(), w.float(), bias.float())) + residual.float(), dtype)


@pytest.mark.parametrize(
    ("M", "K", "dt", "blocks"),
    [
        (5, 576, "float32", None),
        (33, 128, "float16", None),
        (33, 40, "float32", SMALL_BLOCKS),
    ],
)
def test_rmsnorm_prologue(M: int, K: int, dt: str, blocks: tuple[int, int, int] | None) -> None:
    dtype = getattr(torch, dt)
    N, eps = 96, 1e-6
    a, w = _operands(M, N, K, dtype)
    a = a * _rand(M, 1, dtype=dtype, scale=3.0, seed=5).abs()  # rows of different scale
    norm_w = (1.0 + _rand(K, dtype=torch.float32, scale=0.1, seed=6)).to(dtype)
    out = run_matmul(_spec(dtype, rmsnorm_prologue=True), a, w, norm_weight=norm_w, eps=eps, blocks=blocks)
    _check(out, F.linear(_hf_rmsnorm(a, norm_w, eps), w.float()), dtype)


@pytest.mark.parametrize(
    ("M", "K", "dt", "blocks", "shifted"),
    [
        (5, 576, "float32", None, True),
        (33, 128, "float16", None, True),
        (33, 40, "float32", SMALL_BLOCKS, False),
        (1, 72, "float16", SMALL_BLOCKS, True),
    ],
)
def test_layernorm_prologue(M: int, K: int, dt: str, blocks: DeviceSpec | None, shifted: bool) -> None:
    """GPT-2 / OPT / Falcon's LayerNorm as the prologue (weight, with and without a bias), on rows with a large
    mean (the two-pass variance must not cancel) and ragged K tiles, vs torch's layer_norm in fp32 rounded once."""
    dtype = getattr(torch, dt)
    N, eps = 96, 1e-5
    a, w = _operands(M, N, K, dtype)
    a = (a * _rand(M, 1, dtype=dtype, scale=3.0, seed=5).abs() + 20.0).to(dtype)  # mean >> std
    norm_w = (1.0 + _rand(K, dtype=torch.float32, scale=0.1, seed=6)).to(dtype)
    norm_b = _rand(K, dtype=torch.float32, scale=0.5, seed=8).to(dtype) if shifted else None
    spec = _spec(dtype, layernorm_prologue=True, has_norm_bias=shifted, has_bias=True)
    bias = _rand(N, dtype=dtype, seed=3)
    out = run_matmul(spec, a, w, norm_weight=norm_w, norm_bias=norm_b, bias=bias, eps=eps, blocks=blocks)
    x = F.layer_norm(a.float(), (K,), norm_w.float(), None if norm_b is None else norm_b.float(), eps).to(dtype)
    _check(out, F.linear(x.float(), w.float(), bias.float()), dtype)
    centred_wrong = F.linear(F.rms_norm(a.float(), (K,), norm_w.float(), eps), w.float(), bias.float())
    assert (out.float() - centred_wrong).abs().max() > 0.1  # the prologue centres: not an RMSNorm


def test_layernorm_spec_rejects_two_prologues() -> None:
    with pytest.raises(ValueError, match="one norm prologue"):
        MatmulSpec("k", rmsnorm_prologue=True, layernorm_prologue=True)
    with pytest.raises(ValueError, match="needs layernorm_prologue"):
        MatmulSpec("k", has_norm_bias=True)


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
@pytest.mark.parametrize("dt", ["float32", "float16"])
def test_dual(kind: str, dt: str) -> None:
    dtype = getattr(torch, dt)
    M, N, K = 5, 96, 128
    a, wg = _operands(M, N, K, dtype)
    wu = _rand(N, K, dtype=dtype, scale=K**-0.5, seed=7)
    act = F.silu if kind == "swiglu" else (lambda x: F.gelu(x, approximate="tanh"))
    ref = act(F.linear(a.float(), wg.float())) * F.linear(a.float(), wu.float())
    _check(run_matmul(_spec(dtype, dual=kind), a, wg, w2=wu), ref, dtype)


def _check_norm_swiglu_residual(a: torch.Tensor, wg: torch.Tensor, dtype: torch.dtype, device: DeviceSpec) -> None:
    """norm -> gate/up -> SwiGLU -> + residual through the launcher for `device`, vs torch."""
    (M, K), N, eps = a.shape, wg.shape[0], 1e-5
    wu = _rand(N, K, dtype=dtype, scale=K**-0.5, seed=7)
    norm_w = (1.0 + _rand(K, dtype=torch.float32, scale=0.1, seed=6)).to(dtype)
    residual = _rand(M, N, dtype=dtype, seed=4)
    spec = _spec(dtype, rmsnorm_prologue=True, dual="swiglu", has_residual=True)
    out = run_matmul(spec, a, wg, w2=wu, norm_weight=norm_w, residual=residual, eps=eps, blocks=device)
    x = _hf_rmsnorm(a, norm_w, eps)
    _check(out, F.silu(F.linear(x, wg.float())) * F.linear(x, wu.float()) + residual.float(), dtype)


@pytest.mark.parametrize("dt", ["float32", "float16"])
def test_fused_norm_swiglu_residual(dt: str) -> None:
    """Everything at once, on a multi-tile grid: norm -> gate/up -> SwiGLU -> + residual."""
    dtype = getattr(torch, dt)
    _check_norm_swiglu_residual(*_operands(33, 96, 40, dtype), dtype, SMALL_BLOCKS)


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_strided_a_and_out(layout: str) -> None:
    M, N, K = 33, 24, 40
    dtype = torch.float32
    if layout == "transposed":
        a = _rand(K, M, dtype=dtype, seed=1).t()  # stride_am=1, stride_ak=M
        out = torch.full((N, M), float("nan")).t()  # column-major output
    else:
        a = _rand(M, 2 * K + 3, dtype=dtype, seed=1)[:, 3::2]  # row stride 2K+3, column stride 2
        buf = torch.full((M, N + 8), float("nan"))
        out = buf[:, 4 : 4 + N]  # a window of a wider buffer
    w = _rand(N, K, dtype=dtype, scale=K**-0.5, seed=2)
    assert not a.is_contiguous() and not out.is_contiguous()
    result = run_matmul(_spec(dtype), a, w, out=out, blocks=SMALL_BLOCKS)
    assert result is out
    _check(out, F.linear(a, w), dtype)
    if layout == "sliced":  # the columns around the window are untouched
        assert torch.isnan(buf[:, :4]).all() and torch.isnan(buf[:, 4 + N :]).all()


@pytest.mark.parametrize("out_dtype", ["float16", "bfloat16"])
def test_out_dtype_cast(out_dtype: str) -> None:
    """fp32 math, narrow store (only the final cast touches bf16, which the interpreter handles)."""
    M, N, K = 5, 24, 40
    a, w = _operands(M, N, K, torch.float32)
    out = run_matmul(MatmulSpec("mm", out_dtype=out_dtype), a, w)
    assert out.dtype == getattr(torch, out_dtype)
    # bf16 unit roundoff is 3.9e-3 relative.
    torch.testing.assert_close(out.float(), F.linear(a, w), atol=1e-2, rtol=1e-2)


def test_tf32_precision_runs() -> None:
    spec = MatmulSpec("mm_tf32", input_precision="tf32")
    assert 'input_precision="tf32"' in render_matmul(spec)
    a, w = _operands(5, 24, 40, torch.float32)
    # tf32 keeps 10 mantissa bits on GPU (the interpreter computes in full fp32).
    torch.testing.assert_close(run_matmul(spec, a, w), F.linear(a, w), atol=1e-2, rtol=1e-2)


def test_header_and_module_layout() -> None:
    spec = MatmulSpec("my_kernel", rmsnorm_prologue=True, dual="geglu", has_residual=True)
    src = render_matmul(spec, header="# generated by braze\n# layer: mlp.gate_up")
    lines = src.splitlines()
    assert lines[:2] == ["# generated by braze", "# layer: mlp.gate_up"]
    body = [ln for ln in lines if ln and not ln.startswith("#")]
    assert body[:2] == ["import triton", "import triton.language as tl"]
    tree = ast.parse(src)
    funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert [f.name for f in funcs] == ["my_kernel"]
    params = [arg.arg for arg in funcs[0].args.args]
    assert params == [
        "a_ptr", "w_ptr", "w2_ptr", "norm_w_ptr", "res_ptr", "out_ptr",
        "M", "N", "K",
        "stride_am", "stride_ak", "stride_wn", "stride_wk", "stride_w2n", "stride_w2k",
        "stride_rm", "stride_rn", "stride_om", "stride_on",
        "eps", "BLOCK_M", "BLOCK_N", "BLOCK_K", "ROW_DOT",
    ]  # fmt: skip
    # No header: the module still opens with the generated description comment.
    assert render_matmul(MatmulSpec("k")).startswith("# braze matmul kernel `k`")
    with pytest.raises(ValueError, match="comments"):
        render_matmul(spec, header="not a comment")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "not-an-identifier"},
        {"name": "k", "dual": "reglu"},
        {"name": "k", "activation": "tanh"},
        {"name": "k", "dual": "swiglu", "has_bias": True},
        {"name": "k", "dual": "swiglu", "activation": "silu"},
        {"name": "k", "input_precision": "tf32x3"},
        {"name": "k", "out_dtype": "int8"},
    ],
)
def test_spec_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        MatmulSpec(**kwargs)


@pytest.mark.parametrize("device", [INTERPRETER, *TARGETS.values()], ids=lambda d: d.name)
def test_matmul_config_fits_the_device(device: DeviceSpec) -> None:
    """Tiles are powers of two >= 16; on a GPU the pipelined stages fit the device's shared memory per block."""
    for M, N, K in [(1, 24, 40), (8, 4096, 4096), (33, 96, 576), (512, 14336, 4096), (4096, 128256, 4096)]:
        for dual in (False, True):
            for elem in (2, 4):
                cfg = matmul_config(M, N, K, device, elem_size=elem, dual=dual)
                gemv = takes_gemv_form(M, N, K, dual=dual) and not device.interpret
                assert cfg.row_dot == gemv
                for b in (cfg.block_m, cfg.block_n, cfg.block_k):
                    assert b >= (1 if gemv else 16) and b & (b - 1) == 0
                if device.interpret:
                    # wide tiles (fewer interpreted programs and ops) within Triton's block-size limit
                    assert cfg.block_m <= 64 and cfg.block_n <= INTERPRETER_MAX_BLOCK_N and cfg.block_k <= 128
                    assert cfg.block_n * max(cfg.block_m, cfg.block_k) <= TRITON_MAX_TENSOR_NUMEL
                    continue
                stage = (cfg.block_m * cfg.block_k + (2 if dual else 1) * cfg.block_k * cfg.block_n) * elem
                assert cfg.num_stages >= (1 if gemv else 2), (M, N, K, dual, elem)
                assert cfg.num_stages * stage <= device.smem_per_block, (M, N, K, dual, elem)
    # decode: BLOCK_M hugs M (the GEMV form on a GPU has no MMA tile to pad to)
    assert matmul_config(1, 4096, 4096, device).block_m == (16 if device.interpret else 1)
    if device.interpret:  # never (much) bigger than the problem
        cfg = matmul_config(1, 24, 40, device)
        assert (cfg.block_m, cfg.block_n, cfg.block_k) == (16, 32, 64)


# ---- the small-M GEMV form (decode on a GPU: ROW_DOT, no MMA padding) -------------------------------------------
# Llama-3.2-1B decode linears: (N, K, dual) for QKV, o_proj, gate/up, down_proj, lm_head
LLAMA_1B_DECODE = [(3072, 2048, False), (2048, 2048, False), (8192, 2048, True), (2048, 8192, False),
                   (128256, 2048, False)]


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_gemv_grid_covers_every_sm(target: str) -> None:
    """Every decode linear of the 1B shape launches at least one program per SM at batch 1 to 16."""
    device = TARGETS[target]
    for M in (1, 2, 5, 16):
        for N, K, dual in LLAMA_1B_DECODE:
            cfg = gemv_config(M, N, K, device, dual=dual)
            programs = -(-M // cfg.block_m) * -(-N // cfg.block_n)
            assert cfg.row_dot and cfg.block_m == max(1, 1 << (M - 1).bit_length()), (M, N)
            assert programs >= device.sm_count, (target, M, N, K, programs)
            per_thread = cfg.block_m * cfg.block_k * cfg.block_n * (2 if dual else 1) / (32 * cfg.num_warps)
            assert per_thread <= 32, (M, N, K, cfg)


def test_gemv_form_only_where_it_measured_faster() -> None:
    """The H200 tile benchmark's verdict on the 1B decode linears: GEMV at M=1 for o_proj and down_proj only."""
    o, down = (2048, 2048), (2048, 8192)
    for M in (1, 2, 16):
        for N, K, dual in LLAMA_1B_DECODE:
            cfg = matmul_config(M, N, K, TARGETS["sm_90"], dual=dual)
            assert cfg.row_dot == (M == 1 and (N, K) in (o, down)), (M, N, K, dual)


@pytest.mark.parametrize(("M", "dt", "target"), [(1, "float32", "sm_90"), (1, "float16", "sm_80")])
def test_gemv_form_through_the_launcher(M: int, dt: str, target: str) -> None:
    """The GEMV launch a GPU gets at decode, under the interpreter: plain + bias + GELU, and the fused
    norm -> gate/up -> SwiGLU -> + residual block, vs torch; ragged N and K tiles."""
    dtype, device = getattr(torch, dt), TARGETS[target]
    N, K = 40, 72
    assert matmul_config(M, N, K, device).row_dot
    a, w = _operands(M, N, K, dtype)
    bias = _rand(N, dtype=dtype, seed=3)
    out = run_matmul(_spec(dtype, has_bias=True, activation="gelu"), a, w, bias=bias, blocks=device)
    _check(out, F.gelu(F.linear(a.float(), w.float(), bias.float())), dtype)
    _check_norm_swiglu_residual(a, w, dtype, device)
