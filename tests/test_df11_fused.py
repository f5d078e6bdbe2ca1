"""DFloat11 strategy (b): decode fused into the GEMV (braze/templates/df11_gemv.py.j2), under the interpreter.

Two kinds of checks:
* bit-exactness of the weights the fused kernel decodes: its test hook stores the fp32 values that enter the
  products, and one-hot rows of x (x = I, so out = W^T with a single nonzero product per output) must give the
  original BF16 bits back;
* numerics vs strategy (a), decode -> matmul. The decoded weights are identical, so the two differ by fp32
  summation order only (threads, blocks and atomics reassociate the dot products). The bound used is the
  standard one for a reassociated fp32 sum of K products: |diff| <= K * 2**-24 * sum_k |x_k| |w_k| (twice
  gamma_K's first-order term would also pass; this one is already loose by orders of magnitude in practice).
"""

import pytest
import torch
import transformers

import braze
import braze.ops
from braze.kernels.df11 import (
    df11_gemv_params,
    df11_gemv_supported,
    df11_linear_triton,
    render_df11_gemv,
)
from braze.quant.df11 import decode_df11_reference, encode_df11
from braze.runtime.errors import ConfigError

STREAM = ("encoded", "sign_mantissa", "gaps", "output_positions", "luts", "code_lengths")


def _normal(shape, seed, std=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def _special(shape, seed):
    """N(0, 0.02) with +0, -0, subnormals and a few large values mixed in."""
    w = _normal(shape, seed).reshape(-1)
    w[::5] = 0.0
    w[1::7] = -0.0
    w[2::11] = torch.tensor(3e-39).to(torch.bfloat16)  # subnormal
    w[3::13] = torch.tensor(-1e-40).to(torch.bfloat16)
    w[4::17] = 1234.0
    return w.view(shape)


def _bits_equal(got_fp32, want_bf16):
    got = got_fp32.to(torch.bfloat16).reshape(-1).view(torch.int16)
    want = want_bf16.reshape(-1).view(torch.int16)
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} mismatches, first at {bad[0].item()}"


def _assert_reassociation_close(got, x, w, bias=None):
    want = x.float() @ w.float().T + (0 if bias is None else bias.float())
    bound = x.shape[-1] * 2.0**-24 * (x.float().abs() @ w.float().abs().T) + 1e-30
    excess = ((got - want).abs() - bound).max().item()
    assert excess <= 0, f"fused GEMV differs from decode -> matmul by more than fp32 reassociation ({excess})"


UNITS = {
    # name -> (tensors, threads_per_block, which tensor is W)
    "ragged_single": ({"w": _normal((37, 70), 1)}, 32, "w"),
    "middle_of_unit": ({"q": _normal((24, 96), 2), "w": _special((45, 67), 3), "d": _normal((19, 96), 4)}, 32, "w"),
    "one_block": ({"w": _normal((9, 80), 5)}, 1024, "w"),
    "tail_of_unit": ({"a": _normal((50,), 6), "w": _normal((33, 64), 7)}, 64, "w"),
}


@pytest.mark.parametrize("case", list(UNITS))
def test_fused_kernel_decodes_bit_exact_weights(case):
    tensors, tpb, name = UNITS[case]
    unit = encode_df11(tensors, threads_per_block=tpb)
    w = tensors[name]
    n, k = w.shape
    assert unit.n_blocks > 1 or case == "one_block"
    assert (n * k) % (tpb * 8) != 0  # not a multiple of a block
    seen = torch.full((n * k,), float("nan"))
    x = torch.eye(k)  # one-hot rows: out[i, j] = W[j, i] * 1 plus exact zeros
    out = df11_linear_triton(unit, name, x, w_out=seen)
    _bits_equal(seen, w)  # every decoded value, -0.0 included
    nonzero = w.float() != 0
    _bits_equal(out.T[nonzero], w[nonzero])  # through the products and the cross-program reduction
    assert bool((out.T[~nonzero] == 0).all())  # a zero weight sums to +-0 (the sign of a sum of zeros is lost)


@pytest.mark.parametrize("m", [1, 3, 16, 17])
def test_fused_matches_decode_then_matmul(m):
    tensors, tpb, name = UNITS["middle_of_unit"]
    unit = encode_df11(tensors, threads_per_block=tpb)
    w = decode_df11_reference(unit)[name]
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, w.shape[1], generator=g)
    bias = torch.randn(w.shape[0], generator=g)
    got = df11_linear_triton(unit, name, x, bias=bias)
    assert got.shape == (m, w.shape[0])
    _assert_reassociation_close(got, x, w, bias)


def test_raw_bf16_fallback_tensor_and_its_encoded_neighbour():
    huge = _normal((12, 70), 8)
    huge[3, 5] = 2.0**120  # exponent 247: not encodable, the tensor stays raw BF16
    tensors = {"a": _normal((21, 70), 9), "huge": huge, "b": _normal((13, 70), 10)}
    unit = encode_df11(tensors, threads_per_block=32, warn=False)
    assert unit.fallback_names == ["huge"]
    for name in ("huge", "b"):
        w = tensors[name]
        seen = torch.empty(w.numel())
        out = df11_linear_triton(unit, name, torch.eye(70), w_out=seen)
        _bits_equal(seen, w)
        _bits_equal(out.T, w)  # no zeros in these N(0, 0.02) draws at BF16 precision
    assert bool((tensors["b"].float() != 0).all()) and bool((huge.float() != 0).all())


def test_fused_launcher_bias_and_output_dtypes():
    """The plan's launcher: fp32 output accumulated in place, fp16 through an fp32 temporary, bias pre-filled."""
    from braze.kernels import INTERPRETER, recording_launches
    from braze.kernels.df11 import DF11_GEMV
    from braze.runtime.kernel_loader import load_kernel_module

    w = _normal((40, 72), 11)
    unit = encode_df11({"w": w}, threads_per_block=32)
    module = load_kernel_module(render_df11_gemv(kernel_name="k"))
    params = df11_gemv_params(unit, 0, 40, 72)
    g = torch.Generator().manual_seed(12)
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(2, 1, 72, generator=g).to(dtype)
        bias = torch.randn(40, generator=g).to(dtype)
        tensors = {"x": x, "bias": bias, **{r: getattr(unit, r) for r in STREAM}}
        out = torch.full((2, 1, 40), float("nan"), dtype=dtype)
        with recording_launches() as seen:
            DF11_GEMV.launch(module, "k", tensors, out, params, INTERPRETER)
        # the kernel, the accumulator fill, and for fp16 the cast out of the fp32 accumulator
        assert [launch.kind for launch in seen].count("kernel") == 1
        assert len(seen) == DF11_GEMV.launch_count({**params, "out_dtype": str(dtype)[6:]}, INTERPRETER, out.shape)
        assert len(seen) == (2 if dtype == torch.float32 else 3)
        want = (x.float() @ w.float().T + bias.float()).to(dtype)
        torch.testing.assert_close(out, want, rtol=1e-3 if dtype == torch.float16 else 1e-5, atol=1e-5)


def test_op_reference_matches_kernel():
    tensors, tpb, name = UNITS["middle_of_unit"]
    unit = encode_df11(tensors, threads_per_block=tpb)
    p = df11_gemv_params(unit, unit.offsets[name], *tensors[name].shape)
    x = torch.randn(2, tensors[name].shape[1], generator=torch.Generator().manual_seed(13))
    ref = torch.ops.braze.df11_linear(
        x, *(getattr(unit, r) for r in STREAM), None, p["start"], p["out_features"], p["in_features"],
        p["threads_per_block"], p["max_codes"], p["lut_levels"], p["block_first"], p["block_count"])
    _assert_reassociation_close(ref, x, tensors[name])
    _assert_reassociation_close(df11_linear_triton(unit, name, x), x, tensors[name])


def test_short_rows_are_refused():
    assert df11_gemv_supported(64, 63) is not None and df11_gemv_supported(64, 64) is None
    unit = encode_df11({"w": _normal((40, 8), 14)}, threads_per_block=32)
    assert unit.max_codes_per_window > 8
    with pytest.raises(ValueError, match="in_features 8"):
        df11_linear_triton(unit, "w", torch.ones(1, 8))


def test_bad_strategy_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"df11_strategy='fast' is not valid; choose one of 'auto', 'scratch'"):
        braze.compile(torch.nn.Linear(4, 4), quant="df11", df11_strategy="fast")


# ---- whole model: fp32 compute, BF16-representable weights (Qwen2: merged QKV with bias, GLU, residuals) ----


@pytest.fixture(scope="module")
def qwen():
    from braze.eval import bf16_rounded
    from braze.models import tiny_causal_lm

    return bf16_rounded(tiny_causal_lm("qwen2", layers=1))


@pytest.fixture(scope="module")
def scratch(qwen):
    return braze.compile(qwen, max_seq=16, quant="df11", cast_bf16=True, df11_strategy="scratch")


@pytest.fixture(scope="module")
def fused(qwen):
    return braze.compile(qwen, max_seq=16, quant="df11", cast_bf16=True, df11_strategy="fused")


def _notes(cm, name):
    return next(p.notes for p in cm.report.passes if p.name == name)


def test_fused_model_logits_at_m1_match_scratch(scratch, fused):
    kinds = [k for _, k, _ in fused.report.kernels]
    # qkv, o, gate + up (the GLU splits into two GEMVs), down, lm_head; the embedding gathers its rows alone
    assert kinds.count("df11_gemv") == 6 and kinds.count("df11_embedding") == 1 and "df11_decode" not in kinds
    assert [k for _, k, _ in scratch.report.kernels].count("df11_gemv") == 0
    ids = torch.tensor([[17]])
    a, b = scratch(ids).logits, fused(ids).logits
    # fp32 reassociation in every linear, propagated through norms and attention (measured 1.7e-7 on the 2-layer
    # tiny Llama's logits, max |logit| 0.42): 1e-5 leaves room, while one wrong weight bit shows up far above it
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    notes = _notes(fused, "quantize_df11")
    assert any("layer0" in n and "strategy: fused GEMV in every plan" in n for n in notes)
    assert any("embed" in n and "strategy: embedding rows decoded alone (df11_embedding)" in n for n in notes)


def test_fused_greedy_generation_is_token_identical(scratch, fused):
    ids = torch.randint(0, 256, (1, 5), generator=torch.Generator().manual_seed(3))
    assert torch.equal(fused.generate(ids, max_new_tokens=4), scratch.generate(ids, max_new_tokens=4))


def test_auto_fuses_the_decode_plan_only_and_survives_a_package(qwen, scratch, tmp_path):
    auto = braze.compile(qwen, max_seq=16, quant="df11", cast_bf16=True)
    assert auto.report.pass_count("df11_fuse_decode") == 5
    launchers = {name: {s.launcher for s in plan.steps} for name, plan in auto.extra_plans.items()}
    # every weight read from the stream: GEMVs, and the embedding's rows decoded alone (no whole-unit decode)
    assert "df11_gemv" in launchers["decode"] and "df11_embedding" in launchers["decode"]
    assert "df11_decode" not in launchers["decode"]
    assert "df11_gemv" not in launchers["prefill"] | launchers["verify"]
    assert any("auto: fused GEMV in the decode plan" in n for n in _notes(auto, "quantize_df11"))
    assert "unit layer0: fused GEMV (4 linears)" in _notes(auto, "df11_fuse_decode")
    ids = torch.randint(0, 256, (1, 4), generator=torch.Generator().manual_seed(4))
    want = scratch.generate(ids, max_new_tokens=3)
    assert torch.equal(auto.generate(ids, max_new_tokens=3), want)
    auto.save(tmp_path / "pkg")
    loaded = braze.load(tmp_path / "pkg")
    assert "df11_gemv" in {s.launcher for s in loaded.extra_plans["decode"].steps}
    assert torch.equal(loaded.generate(ids, max_new_tokens=3), want)


def test_auto_keeps_scratch_for_large_batch_or_deterministic(qwen):
    for opts in ({"max_batch": 32}, {"deterministic": True}):
        cm = braze.compile(qwen, max_seq=16, quant="df11", cast_bf16=True, executor="reference", **opts)
        assert cm.report.pass_count("df11_fuse_decode") == 0
        assert any("auto: scratch" in n for n in _notes(cm, "quantize_df11"))


def test_reference_executor_runs_the_fused_op(qwen, scratch):
    cm = braze.compile(qwen, max_seq=16, quant="df11", cast_bf16=True, df11_strategy="fused", executor="reference")
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(cm(ids).logits, scratch(ids).logits, rtol=0, atol=1e-5)


def test_tied_embedding_decode_plan_decodes_no_whole_unit():
    """A tied table (Llama-3.2-1B's shape): the decode plan's lm_head reads the stream in the fused GEMV and the
    embedding gathers its rows from the same stream, so no launch decodes the whole vocabulary per step (it did:
    the embedding kept a scratch decode of the table); tokens equal the scratch strategy's."""
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    auto = braze.compile(model, max_seq=16, max_batch=2, quant="df11")
    decode = {s.launcher for s in auto.extra_plans["decode"].steps}
    assert {"df11_embedding", "df11_gemv"} <= decode and "df11_decode" not in decode
    assert "df11_decode" in {s.launcher for s in auto.extra_plans["prefill"].steps}  # the tied lm_head's scratch
    ids = torch.randint(0, 512, (2, 4), generator=torch.Generator().manual_seed(5))
    scratch = braze.compile(model, max_seq=16, max_batch=2, quant="df11", df11_strategy="scratch")
    assert torch.equal(auto.generate(ids, max_new_tokens=3), scratch.generate(ids, max_new_tokens=3))
