"""KV-cache compression kernels (kernels/kv_compress.py, templates/kv_compress.py.j2) against the torch reference
(braze/kvcompress, braze/ops/kv_compress.py), under the interpreter, through `compress_layer`: the function the
prefill plan's kv_compress step and R-KV's decode-time re-compression both launch.

Exactness: the kept set is a top-k of float scores, so the test asserts the compressed caches and starts are
*equal*, not close. The kernels compute the same fp32 quantities as the reference in a different summation order
(~1e-7 relative); random data keeps the k-th and (k+1)-th scores far further apart than that, and exact ties
(duplicated keys) tie in both. RoPE on the window's queries runs in fp32 and is rounded once to q's dtype in both,
so 16-bit rings are equal too. bf16 computes as on a GPU under the interpreter (braze/kernels/interpreter_bf16.py:
exact products, fp32 sums, one rounding), so it is checked here as well as in the GPU suite's twin
(tests/test_gpu.py).
"""

from __future__ import annotations

import pytest
import torch

from braze.kernels import INTERPRETER
from braze.kernels.kv_compress import LayerTensors, compress_layer, new_scratch, render_kv_compress
from braze.kvcompress import compact, select_keep
from braze.kvcompress.policy import POLICIES
from braze.ops.kv_compress import kv_compress_reference
from braze.runtime.kernel_loader import load_kernel_module

HQ, HKV, D, WINDOW, SCALE = 4, 2, 16, 8, 0.25


@pytest.fixture(scope="module")
def module():
    return load_kernel_module(render_kv_compress("kvc"))


def _scratch(batch, prompt, heads_q=HQ, heads_kv=HKV):
    """Scratch poisoned (NaN, -7): a kernel reading an element it did not write shows up as a mismatch."""
    scratch = new_scratch(batch, prompt, heads_q, heads_kv)
    scratch["scratch_float32"].fill_(float("nan"))
    scratch["scratch_int32"].fill_(-7)
    return scratch


def _layer(prompt, slots, dtype, seed, pad=(0, 5), duplicates=True):
    g = torch.Generator().manual_seed(seed)
    b = len(pad)
    q = torch.randn(b, HQ, prompt, D, generator=g).to(dtype)
    k = torch.randn(b, HKV, slots, D, generator=g).to(dtype)
    v = torch.randn(b, HKV, slots, D, generator=g).to(dtype)
    if duplicates:  # exact score ties (keydiff: equal keys score equally; rkv: near-duplicates)
        k[:, :, 6:10] = k[:, :, 12:16]
    cos, sin = torch.randn(b, prompt, D, generator=g).to(dtype), torch.randn(b, prompt, D, generator=g).to(dtype)
    return q, k, v, cos, sin, torch.tensor(pad, dtype=torch.int32)


def _run(policy, q, k, v, cos, sin, kv_start, keep, capacity, module=None):
    """Compressed caches, starts and R-KV's ring: from the kernels (module) or the reference (None)."""
    b, prompt = q.shape[0], q.shape[2]
    ck = torch.full((b, HKV, capacity, D), 3.0, dtype=k.dtype)  # stale contents: every slot must be written
    cv = torch.full((b, HKV, capacity, D), 3.0, dtype=k.dtype)
    start = torch.full((b, HKV), -1, dtype=torch.int32)
    ring = torch.zeros(b, HQ, WINDOW, D, dtype=k.dtype) if policy == "rkv" else None
    if module is None:
        kv_compress_reference(q, k, v, kv_start, ck, cv, keep, start, SCALE, policy, WINDOW, cos, sin, ring)
    else:
        layer = LayerTensors(q, prompt - min(WINDOW, prompt), k, v, ck, cv, kv_start, keep[0:1], keep[1:2], start,
                             prompt, cos, sin, ring)
        compress_layer(module, "kvc", layer, policy, SCALE, WINDOW, _scratch(b, prompt), INTERPRETER)
    return ck, cv, start, ring


def _assert_same(got, want, dtype):
    for name, g, w in zip(("k", "v", "start"), got[:3], want[:3]):
        assert torch.equal(g, w), f"compressed {name} differs"
    if want[3] is not None:
        assert torch.equal(got[3], want[3]), "query ring differs"


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_policy_kernels_equal_the_reference(module, policy, dtype):
    """Scores, selection and compaction of a 70-token prompt (row 1 left-padded by 5, duplicated keys) into a
    48-slot cache: same kept tokens, same slots, same starts as the reference; zeros elsewhere."""
    q, k, v, cos, sin, kv_start = _layer(70, 96, dtype, seed=1)
    keep = torch.tensor([20, 30 if policy == "adakv" else 20])
    want = _run(policy, q, k, v, cos, sin, kv_start, keep, 48)
    got = _run(policy, q, k, v, cos, sin, kv_start, keep, 48, module)
    _assert_same(got, want, dtype)
    assert ((got[0].abs().sum(-1) > 0).sum(-1) >= WINDOW).all()  # every head holds at least its window

@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("prompt, keep", [(5, 40), (9, 4), (300, 100)])
def test_policy_kernels_at_edges(module, policy, prompt, keep):
    """A prompt shorter than the window (everything kept), a budget at the window, and one longer than a block."""
    q, k, v, cos, sin, kv_start = _layer(prompt, max(prompt, 16), torch.float32, seed=2, pad=(0, min(3, prompt - 1)),
                                         duplicates=prompt > 16)
    keep_t = torch.tensor([keep, min(2 * keep, 128) if policy == "adakv" else keep])
    capacity = int(keep_t[1]) + 4
    _assert_same(_run(policy, q, k, v, cos, sin, kv_start, keep_t, capacity, module),
                 _run(policy, q, k, v, cos, sin, kv_start, keep_t, capacity), torch.float32)


def test_selection_is_a_stable_top_k_with_ties_signed_zeros_and_infinities(module):
    """The radix select against a stable descending sort on crafted scores: runs of equal values (ties keep the
    earlier token), -0.0 vs +0.0 (equal), +-inf, and the window's tokens forced in (per head and Ada-KV's joint
    selection, whose tie order runs across heads); row 2 has fewer real tokens than Ada-KV's safeguard (its padding
    is never safe)."""
    p, b = 64, 3
    g = torch.Generator().manual_seed(3)
    base = torch.randint(-3, 4, (b, HKV, p), generator=g).float()  # few distinct values: many ties
    base[0, 0, :8] = torch.tensor([0.0, -0.0, float("inf"), -0.0, float("-inf"), 0.0, 2.0, 2.0])
    kv_start = torch.tensor([0, 9, 61], dtype=torch.int32)
    valid = torch.arange(p)[None] >= kv_start[:, None].long()
    keep, end = torch.tensor([21]), torch.tensor([30])
    for policy, joint in (("keydiff", False), ("adakv", True)):
        scores = base.clone().reshape(-1)
        mask = torch.full((b * HKV * p,), -1, dtype=torch.int32)
        args = (scores, kv_start, keep, end, mask, p, HKV, 4, 0.2)
        kernel = module.kvc_select
        if joint:
            kernel[(b * HKV,)](*args, MODE=1, BLOCK=16)
            kernel[(b,)](*args, MODE=2, BLOCK=16)
        else:
            kernel[(b * HKV,)](*args, MODE=0, BLOCK=16)
        want = _reference_select(policy, base, valid, keep, end)
        assert torch.equal(mask.view(b, HKV, p).bool(), want), policy
        assert not (want & ~valid[:, None]).any() and bool(want[2, :, 61:].all()), policy  # padding never kept


def _reference_select(policy, scores, valid, keep, end):
    """select_keep's selection over given scores (its scoring replaced by `scores`)."""
    import braze.kvcompress.policy as pol

    saved = pol.keydiff_scores
    pol.keydiff_scores = lambda keys, valid: scores
    try:
        if policy == "keydiff":
            return select_keep("keydiff", torch.zeros(*scores.shape, 1), valid, keep, end, 4)
        recent = (torch.arange(scores.shape[-1]) >= scores.shape[-1] - 4)[None, None]
        s = scores.masked_fill(recent, float("inf")).masked_fill(~valid[:, None], float("-inf"))
        kept = torch.minimum(valid.sum(-1), keep.reshape(()))
        return pol.joint_keep_mask(s, kept * scores.shape[1], end.reshape(()), pol.adakv_safe(keep, valid, 4))
    finally:
        pol.keydiff_scores = saved


@pytest.mark.parametrize("pad", [(0, 11), (0, 22)], ids=["full-budget", "fewer-than-budget"])
def test_rkv_recompression_in_place_equals_the_reference(module, pad):
    """R-KV's decode-time path: the full decode cache compacted back to the budget *in place* (source = destination)
    by the kernels, scored with the ring of recorded queries, equals the reference's compaction of a copy. With 22
    of 40 slots padding, row 1 has fewer real tokens than the budget: they all move down to start at 24 - 18."""
    from braze.kvcompress.policy import DURING_DECODE

    assert "rkv" in DURING_DECODE
    slots, budget = 40, torch.tensor([24])
    _, k, v, _, _, kv_start = _layer(4, slots, torch.float32, seed=4, pad=pad)
    ring = torch.randn(2, HQ, WINDOW, D, generator=torch.Generator().manual_seed(5))
    valid = torch.arange(slots)[None] >= kv_start[:, None].long()
    mask = select_keep("rkv", k, valid, budget, budget, WINDOW, ring, SCALE)
    want_k, want_v = torch.empty_like(k), torch.empty_like(v)
    compact(k, mask, want_k, budget)
    want_start = compact(v, mask, want_v, budget)
    got_k, got_v, got_start = k.clone(), v.clone(), torch.full((2, HKV), -1, dtype=torch.int32)
    layer = LayerTensors(ring, 0, got_k, got_v, got_k, got_v, kv_start, budget, budget, got_start, slots)
    compress_layer(module, "kvc", layer, "rkv", SCALE, WINDOW, _scratch(2, slots), INTERPRETER)
    assert torch.equal(got_start, want_start) and torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert int(got_start[1].min()) == (24 - (slots - pad[1]) if slots - pad[1] < 24 else 0)


def test_kernels_on_smollm2_real_keys_equal_the_reference(module):
    """One SmolLM2 layer's real post-RoPE K/V and queries (160 tokens of the shipped text): every policy's kernels
    compress it exactly as the reference does."""
    from tests.smollm2_layer import smollm2_layer_kv

    layer = smollm2_layer_kv(3, 160)
    q, keys, values, cos, sin = layer.q, layer.keys, layer.values, layer.cos, layer.sin
    cfg, hd, p = layer.config, layer.head_dim, q.shape[2]
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    kv_start = torch.zeros(1, dtype=torch.int32)
    for policy in POLICIES:
        keep = torch.tensor([40, 80 if policy == "adakv" else 40])
        results = []
        for kernels in (None, module):
            ck = torch.zeros(1, hkv, 80, hd)
            cv = torch.zeros(1, hkv, 80, hd)
            start = torch.zeros(1, hkv, dtype=torch.int32)
            ring = torch.zeros(1, hq, WINDOW, hd) if policy == "rkv" else None
            if kernels is None:
                kv_compress_reference(q, keys, values, kv_start, ck, cv, keep, start, hd ** -0.5, policy, WINDOW,
                                      cos, sin, ring)
            else:
                scratch = _scratch(1, p, hq, hkv)
                layer_t = LayerTensors(q, p - WINDOW, keys, values, ck, cv, kv_start, keep[0:1], keep[1:2], start, p,
                                       cos, sin, ring)
                compress_layer(kernels, "kvc", layer_t, policy, hd ** -0.5, WINDOW, scratch, INTERPRETER)
            results.append((ck, cv, start))
        for want, got in zip(*results):
            assert torch.equal(got, want), policy


@pytest.mark.parametrize("policy", ["snapkv", "rkv"])
def test_rope_tables_shared_by_the_batch(module, policy):
    """cos / sin [1, P, D] (one table for every row, as a batch at the same positions has): the window's queries
    rotate and score as the reference's broadcast does."""
    q, k, v, cos, sin, kv_start = _layer(40, 48, torch.float32, seed=6)
    keep = torch.tensor([12, 12])
    args = (q, k, v, cos[:1], sin[:1], kv_start, keep, 24)
    _assert_same(_run(policy, *args, module), _run(policy, *args), torch.float32)
