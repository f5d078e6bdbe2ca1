"""Attention kernel family under the Triton interpreter, against float64 torch references.

Tolerances: fp32 kernels use atol = rtol = 1e-4. With at most 40 keys and D <= 32 the fp32
accumulation and exp2 rescaling error is ~1e-6, so 1e-4 leaves margin for reordering while any
masking or indexing bug shows up as an O(0.1) error. fp16 kernels round the inputs, the probabilities
fed to the P@V dot and the output to fp16 (unit roundoff 4.9e-4), hence atol = rtol = 3e-3.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from braze.kernels import INTERPRETER, TARGETS
from braze.kernels.attention import (
    AttentionSpec,
    DecodeAttentionSpec,
    attention_blocks,
    decode_blocks,
    decode_splits,
    flash_attention,
    render_attention,
    render_decode_attention,
    split_kv_decode,
)
from braze.runtime.kernel_loader import load_kernel_module

TOL = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.float16: {"atol": 3e-3, "rtol": 3e-3}}


# ---------------------------------------------------------------------------------------------
# references


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF apply_rotary_pos_emb for x [B, H, S, D] and cos/sin [B, S, D]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


def _rope_tables(batch: int, seq: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, S, D] from per-row position ids (row 1 shifted, as with left padding)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    shift = torch.arange(batch, dtype=torch.float64)[:, None] * 3
    pos = torch.arange(seq, dtype=torch.float64)[None, :] + shift
    freqs = pos[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().float(), emb.sin().float()


def _reference(q, k, v, *, causal, kv_start=None, cos=None, sin=None, scale=None):
    """float64 SDPA with an explicit boolean mask; rows without a visible key are 0."""
    batch, hq, sq, _ = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    if cos is not None:
        q_rows = torch.arange(skv - sq, skv)  # query i sits at absolute position skv - sq + i
        q = _rope_ref(q, cos[:, q_rows].double(), sin[:, q_rows].double())
        k = _rope_ref(k, cos[:, :skv].double(), sin[:, :skv].double())
    k = k.repeat_interleave(hq // hkv, dim=1)
    v = v.repeat_interleave(hq // hkv, dim=1)
    i = torch.arange(sq)[:, None] + (skv - sq)
    j = torch.arange(skv)[None, :]
    mask = torch.ones(batch, 1, sq, skv, dtype=torch.bool)
    if causal:
        mask = mask & (j <= i)
    if kv_start is not None:
        mask = mask & (j >= kv_start.long()[:, None, None, None])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return torch.where(mask.any(-1, keepdim=True), out, torch.zeros_like(out))


def _packed_qkv(batch, seq, hq, hkv, dim, dtype):
    """Strided [B, H, S, D] views of one fused QKV projection output [B, S, (Hq + 2 Hkv) * D]."""
    packed = torch.randn(batch, seq, (hq + 2 * hkv) * dim, dtype=dtype)
    q = packed[..., : hq * dim].view(batch, seq, hq, dim).transpose(1, 2)
    k = packed[..., hq * dim : (hq + hkv) * dim].view(batch, seq, hkv, dim).transpose(1, 2)
    v = packed[..., (hq + hkv) * dim :].view(batch, seq, hkv, dim).transpose(1, 2)
    return q, k, v


def run_attention(q, k, v, *, causal=True, sm_scale=None, cos=None, sin=None, kv_start=None, tree_mask=None,
                  out=None, device=INTERPRETER):
    """Render the flash kernel for these flags and launch it through the production launch function (the one the
    attention / cached / tree-cached families call). Sequences > 64 give several query and key tiles."""
    batch, hq, sq, dim = q.shape
    spec = AttentionSpec("attn", causal=causal, rope=cos is not None, has_kv_start=kv_start is not None,
                         tree_mask=tree_mask is not None, out_dtype=str(q.dtype).removeprefix("torch."))
    out = torch.empty(batch, hq, sq, dim, dtype=q.dtype) if out is None else out
    past = None if tree_mask is None else torch.full((1,), k.shape[2] - sq, dtype=torch.int64)
    kernel = load_kernel_module(render_attention(spec)).attn
    flash_attention(kernel, q, k, v, out, sm_scale or dim**-0.5, device, cos=cos, sin=sin, kv_start=kv_start,
                    tree_mask=tree_mask, past=past)
    return out


def run_decode_attention(q, k_cache, v_cache, seq_lens, *, kv_start=None, out=None, num_splits=None,
                         device=INTERPRETER):
    """The decode kernels through the production split-KV launch function."""
    spec = DecodeAttentionSpec("dec", has_kv_start=kv_start is not None, out_dtype=str(q.dtype).removeprefix("torch."))
    out = torch.empty_like(q) if out is None else out
    split_kv_decode(load_kernel_module(render_decode_attention(spec)), "dec", q, k_cache, v_cache, out, seq_lens,
                    kv_start, q.shape[-1] ** -0.5, device, splits=num_splits)
    return out


def _check(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, **TOL[out.dtype])


# ---------------------------------------------------------------------------------------------
# flash attention forward


@pytest.mark.parametrize(
    "causal, batch, hq, hkv, sq, skv, dim, dtype, block_m",
    [
        (True, 2, 4, 4, 77, 77, 32, torch.float32, 16),  # causal MHA, 2x2 tiles, ragged last block
        (True, 1, 4, 2, 40, 40, 16, torch.float32, 32),  # one tile
        (False, 2, 4, 2, 33, 33, 16, torch.float32, 16),  # GQA
        (False, 1, 4, 1, 9, 40, 32, torch.float32, 16),  # Sq != Skv, MQA
        (True, 2, 4, 2, 7, 40, 16, torch.float32, 16),  # prefill continuing a cache: causal offset
        (True, 1, 4, 1, 24, 24, 32, torch.float16, 16),
    ],
)
def test_forward_matches_sdpa(causal, batch, hq, hkv, sq, skv, dim, dtype, block_m):
    torch.manual_seed(0)
    q = torch.randn(batch, hq, sq, dim, dtype=dtype)
    k = torch.randn(batch, hkv, skv, dim, dtype=dtype)
    v = torch.randn(batch, hkv, skv, dim, dtype=dtype)
    out = run_attention(q, k, v, causal=causal)
    _check(out, _reference(q, k, v, causal=causal))


def test_forward_packed_views_and_strided_out():
    torch.manual_seed(1)
    batch, seq, hq, hkv, dim = 2, 21, 4, 2, 16
    q, k, v = _packed_qkv(batch, seq, hq, hkv, dim, torch.float32)
    assert not q.is_contiguous()
    # Output written straight into the [B, S, Hq * D] layout the o-projection reads.
    out_buf = torch.full((batch, seq, hq * dim), float("nan"))
    out = out_buf.view(batch, seq, hq, dim).transpose(1, 2)
    run_attention(q, k, v, causal=True, out=out, sm_scale=0.3)
    _check(out, _reference(q, k, v, causal=True, scale=0.3))


@pytest.mark.parametrize(
    "sq, skv, dim",
    [(19, 19, 32), (5, 21, 16), (18, 18, 24)],  # plain, causal offset, D not a power of two
)
def test_forward_rope(sq, skv, dim):
    torch.manual_seed(2)
    batch, hq, hkv = 2, 4, 2
    _, k, v = _packed_qkv(batch, skv, hq, hkv, dim, torch.float32)
    q = torch.randn(batch, sq, hq, dim).transpose(1, 2)
    cos, sin = _rope_tables(batch, skv, dim)
    out = run_attention(q, k, v, causal=True, cos=cos, sin=sin)
    _check(out, _reference(q, k, v, causal=True, cos=cos, sin=sin))


@pytest.mark.parametrize(
    "causal, kv_start",
    [
        (True, [5, 17]),  # rows before kv_start see nothing under causal: zeros
        (False, [7, 25]),  # kv_start past Skv: the whole second sequence is masked
    ],
)
def test_forward_kv_start(causal, kv_start):
    torch.manual_seed(3)
    batch, hq, hkv, seq, dim = 2, 4, 2, 20, 16
    q, k, v = _packed_qkv(batch, seq, hq, hkv, dim, torch.float32)
    starts = torch.tensor(kv_start, dtype=torch.int32)
    out = run_attention(q, k, v, causal=causal, kv_start=starts)
    ref = _reference(q, k, v, causal=causal, kv_start=starts)
    _check(out, ref)
    if kv_start[1] >= seq:
        assert torch.count_nonzero(out[1]) == 0
    if causal:
        assert torch.count_nonzero(out[0, :, : kv_start[0]]) == 0


def test_forward_everything_fp16():
    """causal + rope + kv_start + GQA + packed views in fp16."""
    torch.manual_seed(4)
    batch, hq, hkv, seq, dim = 2, 4, 1, 26, 32
    q, k, v = _packed_qkv(batch, seq, hq, hkv, dim, torch.float16)
    cos, sin = _rope_tables(batch, seq, dim)
    starts = torch.tensor([0, 3], dtype=torch.int32)
    out = run_attention(q, k, v, causal=True, cos=cos, sin=sin, kv_start=starts)
    _check(out, _reference(q, k, v, causal=True, kv_start=starts, cos=cos, sin=sin))


def _random_tree_mask(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, n] bool: node 0 is the root, node i > 0 has a random parent < i; each node sees itself and its ancestors."""
    mask = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        parent = int(torch.randint(0, i, (1,), generator=gen))
        mask[i] |= mask[parent]
    return mask


@pytest.mark.parametrize(
    "batch, hq, hkv, past, sq, dim, dtype, kind, kv_start, block_m",
    [
        (2, 4, 2, 29, 11, 16, torch.float32, "tree", [0, 13], 16),  # GQA, tree straddling a key block edge
        (1, 4, 1, 5, 9, 32, torch.float32, "tree", [2], 16),  # MQA, short cache
        (1, 4, 2, 70, 9, 16, torch.float32, "tree", [0], 16),  # two key tiles: the tree in the second
        (2, 4, 2, 16, 12, 16, torch.float32, "any", [3, 20], 16),  # arbitrary mask (also j > i); kv_start past cache
        (1, 4, 2, 0, 7, 16, torch.float32, "tree", [0], 16),  # no cache at all
        (2, 4, 1, 40, 20, 32, torch.float16, "tree", [0, 5], 32),  # fp16, two query blocks
    ],
)
def test_forward_tree_mask(batch, hq, hkv, past, sq, dim, dtype, kind, kv_start, block_m):
    """Speculative tree verification: the cache prefix is fully visible, the new keys follow the tree mask."""
    gen = torch.Generator().manual_seed(past * 100 + sq)
    torch.manual_seed(past + sq)
    skv = past + sq
    q = torch.randn(batch, hq, sq, dim, dtype=dtype)
    k = torch.randn(batch, hkv, skv, dim, dtype=dtype)
    v = torch.randn(batch, hkv, skv, dim, dtype=dtype)
    if kind == "tree":
        tree = _random_tree_mask(sq, gen)
    else:
        tree = torch.rand(sq, sq, generator=gen) < 0.4
        tree[0] = False  # a row that sees only the cache (nothing at all in batch row 1: kv_start past the cache)
    starts = torch.tensor(kv_start, dtype=torch.int32)
    out = run_attention(q, k, v, causal=True, kv_start=starts, tree_mask=tree)

    visible = torch.zeros(sq, skv, dtype=torch.bool)
    visible[:, :past] = True
    visible[:, past:] = tree
    mask = visible[None, None] & (torch.arange(skv)[None, None, None, :] >= starts.long()[:, None, None, None])
    qd = q.double()
    kd = k.double().repeat_interleave(hq // hkv, dim=1)
    vd = v.double().repeat_interleave(hq // hkv, dim=1)
    ref = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask)
    ref = torch.where(mask.any(-1, keepdim=True), ref, torch.zeros_like(ref))
    _check(out, ref)
    # a bool mask and its integer twin are the same kernel input
    if kind == "any":
        torch.testing.assert_close(
            run_attention(q, k, v, kv_start=starts, tree_mask=tree.to(torch.int32)), out)
        assert torch.count_nonzero(out[1, :, 0]) == 0


def test_tree_mask_needs_causal():
    with pytest.raises(ValueError, match="causal"):
        AttentionSpec("a", causal=False, tree_mask=True)


# ---------------------------------------------------------------------------------------------
# split-KV decode


def _decode_reference(q, k_cache, v_cache, seq_lens, kv_start=None):
    """q [B, Hq, D]; softmax attention over positions [kv_start, seq_len) of each row."""
    batch, hq, _ = q.shape
    s_max = k_cache.shape[2]
    j = torch.arange(s_max)[None, :]
    mask = j < seq_lens.long()[:, None]
    if kv_start is not None:
        mask = mask & (j >= kv_start.long()[:, None])
    k = k_cache.double().repeat_interleave(hq // k_cache.shape[1], dim=1)
    v = v_cache.double().repeat_interleave(hq // k_cache.shape[1], dim=1)
    attn_mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.double()[:, :, None], k, v, attn_mask=attn_mask)[:, :, 0]
    return torch.where(mask.any(-1)[:, None, None], out, torch.zeros_like(out))


def _decode_inputs(batch, hq, hkv, s_max, dim, dtype):
    # q sliced from a packed QKV row; caches in the [B, S, H, D] layout, viewed as [B, H, S, D].
    packed = torch.randn(batch, (hq + 2 * hkv) * dim, dtype=dtype)
    q = packed[:, : hq * dim].view(batch, hq, dim)
    k_cache = torch.randn(batch, s_max, hkv, dim, dtype=dtype).transpose(1, 2)
    v_cache = torch.randn(batch, s_max, hkv, dim, dtype=dtype).transpose(1, 2)
    return q, k_cache, v_cache


@pytest.mark.parametrize("hkv, dim", [(1, 32), (2, 16), (4, 32)])
def test_decode_ragged_rows(hkv, dim):
    torch.manual_seed(5)
    batch, hq, s_max = 2, 4, 300
    q, k_cache, v_cache = _decode_inputs(batch, hq, hkv, s_max, dim, torch.float32)
    seq_lens = torch.tensor([300, 77], dtype=torch.int32)  # row 1 leaves its last splits empty
    out = run_decode_attention(q, k_cache, v_cache, seq_lens, num_splits=4)
    _check(out, _decode_reference(q, k_cache, v_cache, seq_lens))


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_kv_start_and_empty_row(num_splits):
    torch.manual_seed(6)
    batch, hq, hkv, s_max, dim = 2, 4, 2, 40, 16
    q, k_cache, v_cache = _decode_inputs(batch, hq, hkv, s_max, dim, torch.float32)
    seq_lens = torch.tensor([37, 12], dtype=torch.int32)
    kv_start = torch.tensor([9, 12], dtype=torch.int32)  # row 1 has no valid position at all
    out = torch.full((batch, hq, dim), float("nan"))
    run_decode_attention(q, k_cache, v_cache, seq_lens, kv_start=kv_start, out=out, num_splits=num_splits)
    _check(out, _decode_reference(q, k_cache, v_cache, seq_lens, kv_start))
    assert torch.count_nonzero(out[1]) == 0


def test_decode_fp16_default_blocks():
    torch.manual_seed(7)
    batch, hq, hkv, s_max, dim = 2, 4, 1, 33, 32
    q, k_cache, v_cache = _decode_inputs(batch, hq, hkv, s_max, dim, torch.float16)
    seq_lens = torch.tensor([33, 20], dtype=torch.int32)
    out = run_decode_attention(q, k_cache, v_cache, seq_lens, num_splits=2)
    _check(out, _decode_reference(q, k_cache, v_cache, seq_lens))


@pytest.mark.parametrize("num_splits", [1, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_with_fused_rope_and_cache_write(num_splits, dtype):
    """rope_write: the decode kernel rotates q and the new key (fp32 math, rounded to the cache dtype), writes the new
    key / value into the cache at the row's cache length and attends over cache + new token: the same as rotating,
    writing and attending in three steps. Rows of different lengths; some splits hold no key, one owns the new token."""
    torch.manual_seed(8)
    batch, hq, hkv, s_max, dim = 2, 4, 2, 48, 16
    _, k_cache, v_cache = _decode_inputs(batch, hq, hkv, s_max, dim, dtype)
    q, k, v = (t[:, :, 0] for t in _packed_qkv(batch, 1, hq, hkv, dim, dtype))  # strided [B, H, D] views
    cache_len = torch.tensor([40, 13], dtype=torch.int64)
    kv_start = torch.tensor([0, 5], dtype=torch.int32)
    cos_all, sin_all = _rope_tables(batch, s_max, dim)
    cos = torch.stack([cos_all[b, int(n)] for b, n in enumerate(cache_len)]).to(dtype)
    sin = torch.stack([sin_all[b, int(n)] for b, n in enumerate(cache_len)]).to(dtype)
    # reference: the three steps, on copies of the caches
    rq = _rope_ref(q[:, :, None].float(), cos[:, None].float(), sin[:, None].float())[:, :, 0].to(dtype)
    rk = _rope_ref(k[:, :, None].float(), cos[:, None].float(), sin[:, None].float())[:, :, 0].to(dtype)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for b, n in enumerate(cache_len):
        want_k[b, :, n], want_v[b, :, n] = rk[b], v[b]
    want = _decode_reference(rq, want_k, want_v, (cache_len + 1).to(torch.int32), kv_start)

    spec = DecodeAttentionSpec("dec", has_kv_start=True, from_cache_len=True, rope_write=True,
                               out_dtype=str(dtype).removeprefix("torch."))
    out = torch.full((batch, hq, dim), float("nan"), dtype=dtype)
    launches = split_kv_decode(load_kernel_module(render_decode_attention(spec)), "dec", q, k_cache, v_cache, out,
                               cache_len, kv_start, dim ** -0.5, INTERPRETER, splits=num_splits,
                               from_cache_len=True, rope=(k, v, cos, sin))
    assert launches == (1 if num_splits == 1 else 2)
    _check(out, want)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)  # written once, nothing else touched


def test_rope_write_needs_the_cache_length():
    with pytest.raises(ValueError, match="from_cache_len"):
        DecodeAttentionSpec("dec", rope_write=True)


# ---------------------------------------------------------------------------------------------
# rendering and choosers


def test_render_signatures_follow_flags():
    plain = render_attention(AttentionSpec("attn_plain", causal=False), header="# generated\n# by test")
    assert plain.startswith("# generated\n# by test\nimport triton\n")
    full = render_attention(AttentionSpec("attn_full", rope=True, has_kv_start=True, input_precision="tf32"))
    for source in (plain, full):
        compile(source, "<attention>", "exec")
    assert "cos_ptr" not in plain and "kv_start_ptr" not in plain and "stride_cb" not in plain
    head = full[full.index("def attn_full(") :]
    assert head.index("cos_ptr, sin_ptr") < head.index("kv_start_ptr") < head.index("Sq, Skv")
    assert 'input_precision="tf32"' in full
    tree = render_attention(AttentionSpec("attn_tree", has_kv_start=True, tree_mask=True))
    compile(tree, "<attention>", "exec")
    head = tree[tree.index("def attn_tree(") :]
    tree_args = "tree_ptr, stride_tm_b, stride_tm_i, stride_tm_j, past_ptr"  # per-row trees and past lengths
    assert head.index("kv_start_ptr") < head.index(tree_args) < head.index("Sq, Skv")
    assert "tree_ptr" not in full
    dec = render_decode_attention(DecodeAttentionSpec("dec", has_kv_start=True, out_dtype="bfloat16"))
    compile(dec, "<decode>", "exec")
    assert "def dec_partial(" in dec and "def dec_combine(" in dec and "tl.bfloat16" in dec


def test_render_rejects_bad_input():
    with pytest.raises(ValueError, match="comments"):
        render_attention(AttentionSpec("a"), header="not a comment")
    with pytest.raises(ValueError, match="input_precision"):
        AttentionSpec("a", input_precision="tf32x3")
    with pytest.raises(ValueError, match="out_dtype"):
        DecodeAttentionSpec("a", out_dtype="int8")
    with pytest.raises(ValueError, match="identifier"):
        AttentionSpec("not-a-name")


def test_block_choosers():
    for device in (INTERPRETER, *TARGETS.values()):
        for dim in (16, 64, 80, 128, 256):
            blocks = attention_blocks(100, 100, dim, device)
            assert blocks.block_d >= dim and blocks.block_d & (blocks.block_d - 1) == 0
            assert min(blocks.block_m, blocks.block_n, blocks.block_d) >= 16
    assert decode_blocks(1, 80).block_g == 16 and decode_blocks(32, 128).block_g == 32
    # fp32 caches at head dim 128: 32-key tiles, 8 warps (64-key ones spilled up to 18 KB, make gpucheck)
    assert (decode_blocks(8, 128, 4).block_n, decode_blocks(8, 128, 4).num_warps) == (32, 8)
    assert (decode_blocks(8, 128, 2).block_n, decode_blocks(8, 64, 4).block_n) == (64, 64)
    # head dim 128 with the rotation in the flash kernel: 8 warps on a GPU (4 spilled on sm_80/86/89)
    assert attention_blocks(100, 100, 128, TARGETS["sm_86"], rope=True).num_warps == 8
    assert attention_blocks(100, 100, 128, TARGETS["sm_86"]).num_warps == 4
    h100 = TARGETS["sm_90"]
    assert decode_splits(8, 4096, h100) == 16  # few programs, long cache: split hard
    assert decode_splits(1, 100, h100) == 1  # too short to be worth splitting
    assert decode_splits(8, 4096, INTERPRETER) == 1  # the interpreter pays per program
    assert all(1 <= decode_splits(h, s, d) <= 64 for h in (1, 8) for s in (1, 300, 10**6) for d in TARGETS.values())
