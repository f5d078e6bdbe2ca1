"""quant="df11" / quant="int6" end to end: passes, lowering, launchers, report, perplexity.

CPU runs use fp32 compute (an exact check needs it): for DFloat11 the tiny Llama's
weights are rounded to BF16 and back, so the BF16 streams decode (then widen exactly to fp32) to the very weights
of the uncompressed model, and the compiled logits must be bit-identical to the uncompressed compile's.
"""

import math
import re

import pytest
import torch

import braze
from braze.eval import bf16_rounded, compressed_bits_per_weight, eval_text, perplexity
from braze.models import tiny_causal_lm
from braze.passes.quantize import layer_index
from braze.quant.df11 import encode_df11
from braze.runtime.errors import ConfigError

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
EAGER_TOL = 1e-4  # fp32 kernels vs fp32 eager (summation order only)
# INT6 kernels vs the reference executor (same fake-quant math in torch): the W6A16 kernel applies the group scale
# to each group's fp32 partial instead of to the weights, so the two differ by fp32 rounding (measured ~2e-7 on
# logits of magnitude ~0.6); activation quantization (A8/A6) could flip a rounding tie, hence the looser bound.
INT6_TOL_A16 = 1e-5
INT6_TOL_ACT = 1e-3


@pytest.fixture(scope="module")
def rounded_llama():
    return bf16_rounded(tiny_causal_lm("llama"))


@pytest.fixture(scope="module")
def plain(rounded_llama):
    return braze.compile(rounded_llama, max_seq=32)


@pytest.fixture(scope="module")
def df11(rounded_llama):
    return braze.compile(rounded_llama, max_seq=32, quant="df11", cast_bf16=True)


def _notes(cm, name):
    return next(p.notes for p in cm.report.passes if p.name == name)


# ---- DFloat11 --------------------------------------------------------------------------------------------------
def test_df11_logits_bit_identical_to_uncompressed_compile(rounded_llama, plain, df11):
    want = plain(IDS).logits
    before = df11.stats["launches"]
    got = df11(IDS).logits
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    with torch.no_grad():
        eager = rounded_llama(IDS).logits
    assert (got - eager).abs().max().item() < EAGER_TOL
    # one decode launch per unit (2 layers + lm_head) plus one widening launch each (fp32 model); the embedding's
    # rows are gathered from the stream in the launch that replaces the plain gather
    assert df11.stats["launches"] - before == plain.stats["launches"] + 2 * 3
    assert df11.stats["eager_ops"] == 0 and not df11.report.fallbacks


def test_df11_pass_report_and_weights(df11):
    assert df11.report.pass_count("quantize_df11") == 12  # 2 x (qkv, o, gate, up, down) + embedding + lm_head
    notes = _notes(df11, "quantize_df11")
    assert notes[0].startswith("total: 4 units")
    bits = compressed_bits_per_weight(df11)
    assert 10.0 < bits < 12.0, bits  # N(0, 0.02) weights in small units: codebook/LUT overhead on ~37k weights
    assert any(n.startswith("unit layer0: 5 tensors") for n in notes)
    names = set(df11.weights)
    assert not any(n.endswith("proj_weight") or n.startswith("merged_") for n in names), names
    assert {"df11_layer0_encoded", "df11_layer1_sign_mantissa"} <= names
    assert df11.weights["df11_layer0_sign_mantissa"].dtype == torch.uint8
    # the linear fusions still happened: the same matmul template launches as the uncompressed plan
    kinds = [k for _, k, _ in df11.report.kernels]
    assert kinds.count("df11_decode") == 3 and kinds.count("df11_embedding") == 1
    assert kinds.count("matmul") == 9  # 4 per layer + lm_head


def test_df11_refuses_non_bf16_weights_without_cast():
    with pytest.raises(ConfigError, match="float32.*cast_bf16=True"):
        braze.compile(tiny_causal_lm("llama", layers=1), max_seq=16, quant="df11", executor="reference")


def test_df11_bf16_model_reference_executor_is_lossless():
    model = tiny_causal_lm("llama", layers=1, dtype=torch.bfloat16)
    ref = braze.compile(model, max_seq=16, executor="reference")
    cm = braze.compile(model, max_seq=16, executor="reference", quant="df11")
    assert cm.report.pass_count("quantize_df11") == 7
    a, b = ref(IDS).logits, cm(IDS).logits
    assert a.dtype == torch.bfloat16 and torch.equal(a.view(torch.int16), b.view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_df11_decode_launcher(dtype):
    """The decode (+ widen) launch on its own: bit patterns of every output dtype, sizes off the block grid."""
    from braze.kernels import INTERPRETER, recording_launches
    from braze.kernels.df11 import DF11_DECODE, render_df11_decode
    from braze.runtime.kernel_loader import load_kernel_module

    g = torch.Generator().manual_seed(1)
    w = (torch.randn(3000, generator=g) * 0.02).to(torch.bfloat16)
    w[:7] = torch.tensor([0.0, -0.0, 1e-40, -3e-39, 1.0, -2.5, 3.0e4]).to(torch.bfloat16)  # zeros, subnormals
    unit = encode_df11({"w": w}, threads_per_block=32)
    module = load_kernel_module(render_df11_decode(kernel_name="k", widen=True))
    tensors = {k: getattr(unit, k) for k in ("encoded", "sign_mantissa", "gaps", "output_positions", "luts",
                                             "code_lengths")}
    params = {"numel": w.numel(), "threads_per_block": 32, "n_threads": unit.n_threads, "n_blocks": unit.n_blocks,
              "max_codes": unit.max_codes_per_window, "lut_levels": unit.lut_levels,
              "dtype": str(dtype).removeprefix("torch.")}
    out = torch.empty(w.numel(), dtype=dtype)
    with recording_launches() as seen:
        DF11_DECODE.launch(module, "k", tensors, out, params, INTERPRETER)
    expected = 1 if dtype == torch.bfloat16 else 2
    assert len(seen) == DF11_DECODE.launch_count(params, INTERPRETER, out.shape) == expected
    want = w.to(dtype)
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       want.view(torch.int16 if dtype != torch.float32 else torch.int32))


def test_layer_index_parsing():
    assert layer_index("p_model_model_layers_13_mlp_down_proj_weight") == 13
    assert layer_index("merged_proj_proj_proj", "model.model.layers.2.self_attn.q_proj") == 2
    assert layer_index("p_model_lm_head_weight", "model.lm_head") is None
    assert layer_index("transformer.h.4.attn.c_attn") == 4


# ---- INT6 ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return tiny_causal_lm("llama")


@pytest.mark.parametrize("act,tol", [("a16", INT6_TOL_A16), ("mixed", INT6_TOL_ACT)])
def test_int6_kernels_match_fake_quant_reference(llama, act, tol):
    cm = braze.compile(llama, max_seq=32, quant="int6", int6_act=act)
    ref = braze.compile(llama, max_seq=32, quant="int6", int6_act=act, executor="reference")
    got, want = cm(IDS).logits, ref(IDS).logits
    assert (got - want).abs().max().item() < tol
    with torch.no_grad():
        eager = llama(IDS).logits
    err = (got - eager).abs().max().item()
    assert 0 < err < 0.1 * eager.abs().max().item()  # quantized, but close
    assert cm.report.pass_count("quantize_int6") == 8  # qkv, o, gate+up, down per layer; lm_head stays FP
    notes = _notes(cm, "quantize_int6")
    assert notes[0].startswith("total:") and "no calibration data" in notes[1]  # tiny model: no tokenizer
    assert any("lm_head" in n and n.startswith("kept") for n in notes)
    tags = [n.split(": ")[1].split(",")[0] for n in notes if re.match(r"\S+: W6A", n)]
    assert len(tags) == 8 and all(", rtn" in n for n in notes if re.match(r"\S+: W6A", n))
    if act == "a16":
        assert set(tags) == {"W6A16"}
        # the norms, the SwiGLU product and the residual adds run in the int6 kernels (prologue / epilogue): no
        # other kernel between a layer's int6 matmuls and attention
        kinds = [k for _, k, _ in cm.report.kernels]
        first = kinds.index("int6_matmul")
        assert set(kinds[first:-1]) == {"int6_matmul", "attention"} and kinds[-1] == "matmul"
    else:
        assert tags.count("W6A8") == 2 and tags.count("W6A6") == 6  # down_proj A8, the rest A6 (FlexQ)
    int6_steps = [k for _, k, _ in cm.report.kernels if k == "int6_matmul"]
    assert len(int6_steps) == 8
    assert cm.stats["eager_ops"] == 0 and not cm.report.fallbacks
    # one launch per kernel: W6A8 / W6A6 activations are quantized by fused kernels (braze/passes/int6_act.py),
    # not by a second launch inside the int6 matmul step
    assert cm.stats["launches"] == len(cm.report.kernels)


def test_int6_act_option_is_validated():
    with pytest.raises(ConfigError, match="int6_act.*'a16', 'a8', 'a6', 'mixed'"):
        braze.compile(tiny_causal_lm("llama", layers=1), quant="int6", int6_act="a4")


def test_perplexity_int6_close_to_fp_and_df11_exact(llama):
    ids = torch.tensor(list(eval_text().encode()[:600]), dtype=torch.long)  # bytes: the tiny vocab is 256
    fp = perplexity(llama, ids, window=32)
    int6 = perplexity(braze.compile(llama, max_seq=32, quant="int6", executor="reference"), ids, window=32)
    assert math.isfinite(fp) and abs(int6 / fp - 1) < 0.03, (fp, int6)
    rounded = bf16_rounded(llama)
    base = perplexity(braze.compile(rounded, max_seq=32, executor="reference"), ids, window=32)
    df11 = perplexity(braze.compile(rounded, max_seq=32, executor="reference", quant="df11", cast_bf16=True), ids,
                      window=32)
    assert df11 == base
