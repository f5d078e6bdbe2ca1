"""The braze::* ops' reference implementations against plain torch formulations."""

import torch

import braze.ops  # noqa: F401
from braze.ops.library import attention_reference, rms_norm_reference

ops = torch.ops.braze


def _qkv(seed=0, b=2, hq=4, hkv=2, s=6, d=8):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=g) for h in (hq, hkv, hkv))
    cos, sin = torch.randn(b, s, d, generator=g), torch.randn(b, s, d, generator=g)
    return q, k, v, cos, sin


def test_cached_attention_prefill_then_decode_equals_full_attention():
    q, k, v, cos, sin = _qkv()
    kc, vc = torch.zeros(2, 2, 16, 8), torch.zeros(2, 2, 16, 8)
    start = torch.zeros(2, dtype=torch.int32)
    parts = [ops.cached_attention(q[:, :, :4], k[:, :, :4], v[:, :, :4], cos[:, :4], sin[:, :4], kc, vc,
                                  torch.tensor([0]), start, 0.3)]
    for i in (4, 5):
        parts.append(ops.cached_attention(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], cos[:, i:i + 1],
                                          sin[:, i:i + 1], kc, vc, torch.tensor([i]), start, 0.3))
    want = attention_reference(q, k, v, 0.3, True, cos, sin)
    torch.testing.assert_close(torch.cat(parts, 2), want, atol=1e-5, rtol=1e-5)


def test_tree_attention_with_a_path_mask_is_causal_attention():
    q, k, v, cos, sin = _qkv(1)
    caches = [torch.zeros(2, 2, 16, 8) for _ in range(4)]
    start = torch.zeros(2, dtype=torch.int32)
    causal = ops.cached_attention(q, k, v, cos, sin, caches[0], caches[1], torch.tensor([0]), start, 0.5)
    path = torch.ones(6, 6, dtype=torch.bool).tril()
    tree = ops.tree_cached_attention(q, k, v, cos, sin, caches[2], caches[3], torch.tensor([0]), start, path, 0.5)
    torch.testing.assert_close(tree, causal)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


def test_left_padding_rows_are_masked():
    q, k, v, cos, sin = _qkv(2)
    kc, vc = torch.zeros(2, 2, 16, 8), torch.zeros(2, 2, 16, 8)
    kv_start = torch.tensor([0, 2], dtype=torch.int32)
    out = ops.cached_attention(q, k, v, cos, sin, kc, vc, torch.tensor([0]), kv_start, 0.4)
    want = attention_reference(q[1:, :, 2:], k[1:, :, 2:], v[1:, :, 2:], 0.4, True, cos[1:, 2:], sin[1:, 2:])
    torch.testing.assert_close(out[1:, :, 2:], want, atol=1e-5, rtol=1e-5)
    # keys below kv_start are masked for every query, so the pad rows see nothing and output exactly 0
    assert torch.count_nonzero(out[1, :, :2]) == 0


def test_linear_op_composes_prologue_and_epilogue():
    g = torch.Generator().manual_seed(3)
    x, w, nw, res = torch.randn(3, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(8, generator=g), \
        torch.randn(3, 5, generator=g)
    got = ops.linear(x, w, None, nw, 1e-6, "silu", res)
    want = res + torch.nn.functional.silu(rms_norm_reference(x, nw, 1e-6) @ w.t())
    torch.testing.assert_close(got, want)
