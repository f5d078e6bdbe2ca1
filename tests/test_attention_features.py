"""Logit softcapping (Gemma 2), sliding windows (Mistral, Gemma 2/3, gpt-oss), attention sinks (gpt-oss) and ALiBi
(Bloom, MPT) in the attention kernels, through the launchers the attention and general cached-attention families
call: flash (forward plans; prefill over the cache, also per row under deterministic=True), split-KV decode that
rotates and writes the new token, and the tree form of split-KV decode (verify). Each against the braze ops'
torch references (braze/ops/library.py), fp32 under the interpreter: the kernels sum in another order, so within
1e-5."""

from __future__ import annotations

import pytest
import torch

from braze.kernels import INTERPRETER, attention
from braze.kernels.attention import (
    GENERAL_CACHED_ATTENTION,
    AttentionExtras,
    AttentionSpec,
    DecodeAttentionSpec,
    flash_attention,
    render_attention,
    render_cache_write,
    render_decode_attention,
)
from braze.ops.library import general_attention_reference, general_cached_attention_reference
from braze.runtime.kernel_loader import load_kernel_module

TOL = {"rtol": 1e-5, "atol": 1e-5}
FEATURES = [  # (softcap, window, sinks, alibi)
    (5.0, 0, False, False), (0.0, 20, False, False), (0.0, 0, True, False), (3.0, 70, True, False),
    (0.0, 7, True, False), (0.0, 0, False, True), (2.0, 20, True, True),
]


def _extras(softcap: float, window: int, sinks: bool, heads: int, alibi: bool = False) -> AttentionExtras:
    """Sinks N(0, 2); ALiBi slopes 2^-(h + 1), Bloom's for 8 heads with the smallest made negative (a slope's
    sign must not matter to the kernel)."""
    g = torch.Generator().manual_seed(3)
    slopes = torch.tensor([2.0 ** -(h + 1) for h in range(heads)]) if alibi else None
    if slopes is not None:
        slopes[-1] = -slopes[-1]
    return AttentionExtras(softcap, window, torch.randn(heads, generator=g) * 2 if sinks else None, slopes)


def _flags(extras: AttentionExtras) -> dict[str, bool]:
    return {"softcap": extras.softcap > 0, "window": extras.window > 0, "sinks": extras.sinks is not None,
            "alibi": extras.alibi is not None}


def _rope(batch: int, n: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    ang = torch.arange(n).float()[:, None] * inv[None, :]
    ang = torch.cat([ang, ang], dim=-1)[None].expand(batch, n, dim)
    return ang.cos().contiguous(), ang.sin().contiguous()


@pytest.mark.parametrize("softcap, window, sinks, alibi", FEATURES)
@pytest.mark.parametrize("sq, skv", [(100, 100), (9, 100)])
def test_flash_forward_with_logit_features(softcap, window, sinks, alibi, sq, skv):
    """Several 64-wide query and key tiles (the interpreter's tiles), so the window's lower edge crosses tiles;
    GQA 4:2; Sq < Skv is prefill continuing a cache (the query rows sit at the end)."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, sq, 16, generator=g)
    k, v = torch.randn(2, 2, skv, 16, generator=g), torch.randn(2, 2, skv, 16, generator=g)
    extras = _extras(softcap, window, sinks, 4, alibi)
    kernel = load_kernel_module(render_attention(AttentionSpec("attn", causal=True, out_dtype="float32",
                                                               **_flags(extras)))).attn
    out = torch.full_like(q, float("nan"))
    flash_attention(kernel, q, k, v, out, 0.3, INTERPRETER, extras=extras)
    want = general_attention_reference(q, k, v, 0.3, True, softcap, window, sinks=extras.sinks, alibi=extras.alibi)
    torch.testing.assert_close(out, want, **TOL)


def _general_step(extras: AttentionExtras, *, decode: bool = False, tree: bool = False,
                  deterministic: bool = False, heads_kv: int = 2, s_max: int = 128):
    """The general cached-attention family's kernels and Step params, as its lower() renders them."""
    flags = _flags(extras)
    name = "gca"
    if decode or tree:
        body = render_decode_attention(DecodeAttentionSpec(name, True, "ieee", "float32", from_cache_len=True,
                                                           rope_write=decode, tree=tree, **flags))
    else:
        body = render_attention(AttentionSpec(name, causal=True, has_kv_start=True, device_len=True,
                                              out_dtype="float32", **flags))
    if not decode:
        body += "\n\n" + render_cache_write(name)
    params = {"scale": 0.3, "decode": decode, "tree": tree, "heads_kv": heads_kv, "s_max": s_max,
              "softcap": extras.softcap, "window": extras.window}
    if deterministic:
        params["deterministic"] = True
    return load_kernel_module(body), name, params


def _launch(module, name, params, tensors, extras, out_shape):
    if extras.sinks is not None:
        tensors = {**tensors, "sinks": extras.sinks}
    if extras.alibi is not None:
        tensors = {**tensors, "alibi": extras.alibi}
    out = torch.full(out_shape, float("nan"))
    GENERAL_CACHED_ATTENTION.launch(module, name, tensors, out, params, INTERPRETER)
    return out


@pytest.mark.parametrize("softcap, window, sinks, alibi", FEATURES)
@pytest.mark.parametrize("deterministic, splits", [(False, 3), (True, 1)])
def test_cached_prefill_then_decode_with_logit_features(softcap, window, sinks, alibi, deterministic, splits,
                                                        monkeypatch):
    """Prefill of a left-padded batch (row 1 starts at slot 5) through RoPE + cache write + flash over the cache
    (per row under deterministic=True), then decode steps (one kernel: rotate, write, attend; 3 KV splits and their
    combine, as on a GPU, or 1), each equal to the general cached reference run on a copy of the cache; the caches
    end up equal too."""
    monkeypatch.setattr(attention, "decode_splits", lambda *a: splits)
    g = torch.Generator().manual_seed(1)
    b, hq, hkv, d, s_max, prompt = 2, 4, 2, 16, 128, 90
    extras = _extras(softcap, window, sinks, hq, alibi)
    kc, vc = torch.zeros(b, hkv, s_max, d), torch.zeros(b, hkv, s_max, d)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    kv_start = torch.tensor([0, 5], dtype=torch.int32)
    cos_all, sin_all = _rope(b, s_max, d)
    module, name, params = _general_step(extras, deterministic=deterministic, s_max=s_max)
    dec_module, dec_name, dec_params = _general_step(extras, decode=True, s_max=s_max)
    start = 0
    for n in (prompt, 1, 1, 1):
        q = torch.randn(b, hq, n, d, generator=g)
        k, v = torch.randn(b, hkv, n, d, generator=g), torch.randn(b, hkv, n, d, generator=g)
        cos, sin = cos_all[:, start:start + n], sin_all[:, start:start + n]
        cache_len = torch.tensor([start])
        want = general_cached_attention_reference(q, k, v, ref_kc, ref_vc, cache_len, kv_start, 0.3, softcap, window,
                                                  cos, sin, sinks=extras.sinks, alibi=extras.alibi)
        tensors = {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "k_cache": kc, "v_cache": vc,
                   "cache_len": cache_len, "kv_start": kv_start}
        if n == 1:
            got = _launch(dec_module, dec_name, dec_params, tensors, extras, q.shape)
        else:
            got = _launch(module, name, params, tensors, extras, q.shape)
        rows = slice(None) if n == 1 else (slice(None), slice(None), slice(5, None))  # row 1's padding: unused
        torch.testing.assert_close(got[1:][rows] if n > 1 else got, want[1:][rows] if n > 1 else want, **TOL)
        torch.testing.assert_close(got[:1], want[:1], **TOL)
        start += n
    torch.testing.assert_close(kc, ref_kc.to(kc.dtype), rtol=0, atol=0)
    torch.testing.assert_close(vc, ref_vc, rtol=0, atol=0)


@pytest.mark.parametrize("softcap, window, sinks, alibi", FEATURES)
@pytest.mark.parametrize("splits", [1, 3])
def test_tree_verify_with_logit_features(softcap, window, sinks, alibi, splits, monkeypatch):
    """A draft tree of 5 nodes after 80 / 61 cached tokens (rows of different lengths): each node attends to the
    cache and its ancestors, the window and the ALiBi distances counted along its path (position = cache length +
    depth), as the general cached reference does with its tree mask; 1 or 3 KV splits."""
    monkeypatch.setattr(attention, "decode_splits", lambda *a: splits)
    g = torch.Generator().manual_seed(2)
    b, hq, hkv, d, s_max, nodes = 2, 4, 2, 16, 128, 5
    extras = _extras(softcap, window, sinks, hq, alibi)
    kc, vc = torch.randn(b, hkv, s_max, d, generator=g), torch.randn(b, hkv, s_max, d, generator=g)
    ref_kc, ref_vc = kc.clone(), vc.clone()
    parents = [-1, 0, 0, 1, 2]  # node 0 is the pending token
    tree = torch.zeros(nodes, nodes, dtype=torch.bool)
    for i, p in enumerate(parents):
        tree[i, i] = True
        while p >= 0:
            tree[i, p] = True
            p = parents[p]
    depth = tree.sum(-1) - 1
    cache_len = torch.tensor([80, 61])
    kv_start = torch.tensor([0, 3], dtype=torch.int32)
    cos_all, sin_all = _rope(b, s_max, d)
    pos = cache_len[:, None] + depth[None]
    cos = torch.stack([cos_all[r, pos[r]] for r in range(b)])
    sin = torch.stack([sin_all[r, pos[r]] for r in range(b)])
    q = torch.randn(b, hq, nodes, d, generator=g)
    k, v = torch.randn(b, hkv, nodes, d, generator=g), torch.randn(b, hkv, nodes, d, generator=g)
    want = general_cached_attention_reference(q, k, v, ref_kc, ref_vc, cache_len, kv_start, 0.3, softcap, window,
                                              cos, sin, tree_mask=tree[None].expand(b, nodes, nodes),
                                              sinks=extras.sinks, alibi=extras.alibi)
    module, name, params = _general_step(extras, tree=True, s_max=s_max)
    tensors = {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "k_cache": kc, "v_cache": vc, "cache_len": cache_len,
               "kv_start": kv_start, "tree_mask": tree[None]}
    got = _launch(module, name, params, tensors, extras, q.shape)
    torch.testing.assert_close(got, want, **TOL)
    assert GENERAL_CACHED_ATTENTION.launch_count(params, INTERPRETER, q.shape) == 3


def test_sinks_and_softcap_change_the_output():
    """The features are not inert: without them the kernel's output differs by far more than the tolerance."""
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 4, 30, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g), torch.randn(
        1, 2, 30, 16, generator=g)
    outs = []
    for extras in (AttentionExtras(), AttentionExtras(1.0, 0, None), AttentionExtras(0.0, 4, None),
                   AttentionExtras(0.0, 0, torch.full((4,), 3.0)), AttentionExtras(alibi=torch.full((4,), 0.25))):
        kernel = load_kernel_module(render_attention(AttentionSpec("attn", causal=True, out_dtype="float32",
                                                                   **_flags(extras)))).attn
        out = torch.empty_like(q)
        flash_attention(kernel, q, k, v, out, 1.0, INTERPRETER, extras=extras)
        outs.append(out)
    for other in outs[1:]:
        assert (other - outs[0]).abs().max() > 1e-2


def test_spec_rejects_window_with_tree_mask_or_o_proj():
    with pytest.raises(ValueError, match="window"):
        AttentionSpec("a", tree_mask=True, window=True)
    with pytest.raises(ValueError, match="alibi"):
        AttentionSpec("a", tree_mask=True, alibi=True)
    with pytest.raises(ValueError, match="o_proj"):
        DecodeAttentionSpec("a", from_cache_len=True, tree=True, o_proj=True, alibi=True)
    with pytest.raises(ValueError, match="o_proj"):
        DecodeAttentionSpec("a", from_cache_len=True, rope_write=True, o_proj=True, sinks=True)
    with pytest.raises(ValueError, match="o_proj"):
        DecodeAttentionSpec("a", from_cache_len=True, tree=True, o_proj=True, window=True)
    DecodeAttentionSpec("a", from_cache_len=True, rope_write=True, o_proj=True, window=True)  # decode: the block's
    DecodeAttentionSpec("a", from_cache_len=True, rope_write=True, o_proj=True, alibi=True)
