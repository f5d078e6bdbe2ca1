"""bf16 under the Triton interpreter (braze/kernels/interpreter_bf16.py): the interpreter alone keeps bf16 as bit
patterns and computes on the bits (a bf16 model ran to garbage on CPU, a CUDA-compiled package too) and truncates
fp32 -> bf16 casts. With braze's builder patch each bf16 operation computes in fp32 and rounds to nearest even, as
a GPU does, so these checks compare bits with torch's CPU bf16 wherever the operation rounds once.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from braze.kernels import INTERPRETER
from braze.kernels.interpreter_bf16 import bf16_to_fp32, fp32_to_bf16

pytestmark = pytest.mark.skipif(not INTERPRETER, reason="checks the Triton interpreter (TRITON_INTERPRET=1)")


def test_numpy_conversions_match_torch_bit_for_bit():
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e38, 3.4e38,
                            1.00390625, 1.01171875, 1.0 + 2 ** -9, 1.0 + 3 * 2 ** -9])  # ties round to even
    x = torch.cat([special, torch.randn(4096) * 10 ** torch.randint(-6, 6, (4096,)).float()])
    got = torch.from_numpy(fp32_to_bf16(x.numpy()).view(np.int16))
    want = x.to(torch.bfloat16).view(torch.int16)
    finite = ~x.isnan()
    assert torch.equal(got[finite], want[finite])
    assert torch.from_numpy(fp32_to_bf16(x.numpy())).view(torch.bfloat16)[~finite].isnan().all()
    b = x.to(torch.bfloat16)
    back = torch.from_numpy(bf16_to_fp32(b.view(torch.int16).numpy().view(np.uint16)))
    assert torch.equal(back[finite], b.float()[finite])


@triton.jit
def _elementwise(x_ptr, w_ptr, f_ptr, add_ptr, mul_ptr, div_ptr, max_ptr, sub_ptr, pos_ptr, cast_ptr, fma_ptr,
                 N: tl.constexpr):
    o = tl.arange(0, N)
    x = tl.load(x_ptr + o)
    w = tl.load(w_ptr + o)
    f = tl.load(f_ptr + o)
    tl.store(add_ptr + o, x + w)
    tl.store(mul_ptr + o, x * w)
    tl.store(div_ptr + o, x / w)
    tl.store(max_ptr + o, tl.maximum(x, w))  # Triton's math functions take fp32: kernels cast bf16 first
    tl.store(sub_ptr + o, tl.abs(x) - w)
    tl.store(pos_ptr + o, tl.where(x > w, x, -w))  # a bf16 comparison, not one of bit patterns
    tl.store(cast_ptr + o, f.to(tl.bfloat16))
    tl.store(fma_ptr + o, tl.fma(x, w, x))


def test_elementwise_ops_round_once_like_torch():
    g = torch.Generator().manual_seed(0)
    n = 1024
    x, w = (torch.randn(n, generator=g).bfloat16() for _ in range(2))
    f = torch.randn(n, generator=g) * 7
    outs = [torch.empty(n, dtype=torch.bfloat16) for _ in range(8)]
    _elementwise[(1,)](x, w, f, *outs, N=n)
    xf, wf = x.float(), w.float()
    wants = [x + w, x * w, x / w, torch.maximum(x, w), x.abs() - w, torch.where(x > w, x, -w), f.bfloat16(),
             (xf.double() * wf.double() + xf.double()).float().bfloat16()]
    names = ["add", "mul", "div", "max", "sub", "where", "cast", "fma"]
    for name, got, want in zip(names, outs, wants):
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), name


@triton.jit
def _dot_and_reduce(a_ptr, b_ptr, i_ptr, dot_ptr, max_ptr, sum_ptr, N: tl.constexpr):
    r = tl.arange(0, N)
    a = tl.load(a_ptr + r[:, None] * N + r[None, :])
    b = tl.load(b_ptr + r[:, None] * N + r[None, :])
    ints = tl.load(i_ptr + r[:, None] * N + r[None, :])
    tl.store(dot_ptr + r[:, None] * N + r[None, :], tl.dot(a, b))
    tl.store(max_ptr + r, tl.max(a, 1))
    tl.store(sum_ptr + r, tl.sum(ints, 1))


def test_dot_accumulates_exact_products_in_fp32_and_reductions_compare_values():
    g = torch.Generator().manual_seed(1)
    n = 32
    a, b = (torch.randn(n, n, generator=g).bfloat16() for _ in range(2))
    ints = torch.randint(-8, 9, (n, n), generator=g).bfloat16()  # small integers: every partial sum is exact
    dot = torch.empty(n, n)
    mx, sm = torch.empty(n, dtype=torch.bfloat16), torch.empty(n, dtype=torch.bfloat16)
    _dot_and_reduce[(1,)](a, b, ints, dot, mx, sm, N=n)
    # products of bf16 values are exact in fp32; only the fp32 summation order differs from torch's
    torch.testing.assert_close(dot, a.float() @ b.float(), rtol=1e-6, atol=1e-5)
    assert torch.equal(mx, a.amax(1))  # negative values too: compared as numbers, not as uint16 bits
    assert torch.equal(sm, ints.float().sum(1).bfloat16())


def test_bf16_llama_greedy_generation_matches_hf_under_the_interpreter():
    """End to end: a bf16 model's plans (fused kernels, matmuls, flash and decode attention, the decode-layer
    blocks) give HF's greedy tokens, and prefill logits within one bf16 step of the eager model's at their scale
    (kernels sum in fp32 in another order than torch's bf16 ops, then round once)."""
    import braze
    from braze.models import tiny_causal_lm

    model = tiny_causal_lm("llama", layers=2).to(torch.bfloat16).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    compiled = braze.compile(model, max_seq=64, max_batch=2)
    with torch.no_grad():
        want = model(ids).logits.float()
        got = compiled(ids)
        got = (got.logits if hasattr(got, "logits") else got[0]).float()
        ulp = 2.0 ** (torch.floor(torch.log2(want.abs().max())) - 7)
        assert (got - want).abs().max() <= 2 * ulp
        hf = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(compiled.generate(ids, max_new_tokens=6, do_sample=False), hf)


def test_fp16_model_with_a_bf16_kv_cache_samples_without_nan():
    """The case that ran to NaN before the patch: attention over a bf16 cache feeding fp16 activations."""
    import braze
    from braze.models import tiny_causal_lm

    model = tiny_causal_lm("llama", layers=1).to(torch.float16).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    compiled = braze.compile(model, max_seq=64, kv_dtype="bfloat16")
    with torch.no_grad():
        got = compiled(ids)
        got = (got.logits if hasattr(got, "logits") else got[0]).float()
        assert got.isfinite().all()
        torch.testing.assert_close(got, model(ids).logits.float(), rtol=0, atol=0.02)
    out = compiled.generate(ids, max_new_tokens=5, do_sample=True, top_p=0.9, seed=3)
    assert out.shape == (1, 11)  # sampling refuses NaN logits, so this fails if any step produced one
