"""Every registered kernel family, driven exactly as a compiled plan drives it, against its braze op's torch
reference: trace one op call to an FX node, `supports` -> `lower` (source + Step) -> `launch` with the Step's
roles and params (what PlanExecutor does), under the interpreter. The launches counted at the launch path must
equal the family's `launch_count`.

Tolerances: fp32 everywhere; the kernels accumulate in fp32 like the references and differ only in summation
order (products of O(1) values over K <= 256 terms: ~1e-6), so 1e-4 leaves margin while an indexing or masking
bug is O(0.1). DFloat11 decode is bit-exact (lossless by construction); int6 compares against the reference of
the same quantized weights (the kernel's only difference is again summation order).
"""

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import braze
import braze.ops  # noqa: F401  (registers braze::*)
from braze.kernels import FAMILIES, INTERPRETER, TARGETS, family_for_op, recording_launches
from braze.kernels.decode_layer import MlpBlockSpec
from braze.ops.library import layer_norm_reference
from braze.quant.df11 import encode_df11
from braze.quant.int6 import quantize_int6
from braze.runtime.kernel_loader import load_kernel_module

ops = torch.ops.braze
TOL = {"atol": 1e-4, "rtol": 1e-4}
EXERCISED: set[str] = set()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def launch_like_a_plan(fn, *inputs, device=INTERPRETER, deterministic=False):
    """Trace fn(*inputs) (one braze op call), lower its node with the op's family and launch it through the
    family's launcher with `device`'s configuration (kernels run under the interpreter whatever it is); returns
    (kernel output, family). A step that declares a workspace gets it zeroed, as the executor hands it over, and
    must leave it zeroed."""
    gm = make_fx(fn, tracing_mode="fake")(*inputs)
    node = next(n for n in gm.graph.nodes if n.op == "call_function" and family_for_op(n.target) is not None)
    family = family_for_op(node.target)
    assert family.supports(node) is None
    source, step = (family.lower_deterministic if deterministic else family.lower)(node, "kernel")
    assert step.launcher == family.name
    by_name = dict(zip((n.name for n in gm.graph.nodes if n.op == "placeholder"), inputs))
    tensors = {role: by_name[name] for role, name in zip(step.params["roles"], step.inputs)}
    val = node.meta["val"]
    out = torch.empty_strided(tuple(val.shape), tuple(val.stride()), dtype=val.dtype)
    workspace = {f"workspace_{key}": torch.zeros(numel, dtype=getattr(torch, key.removeprefix("scratch_")))
                 for key, numel in family.workspace(step.params, device, out.shape).items()}
    with recording_launches() as seen:
        family.launch(load_kernel_module(source), "kernel", {**tensors, **workspace}, out, step.params, device)
    assert len(seen) == family.launch_count(step.params, device, out.shape)
    assert all(not w.any() for k, w in workspace.items() if "scratch" not in k), "the launch left its workspace dirty"
    EXERCISED.add(family.name)
    return out, family


@pytest.mark.parametrize("variant", ["plain", "norm_silu_bias_residual", "glu", "glu_gelu"])
def test_matmul_family(variant):
    g = _gen(0)
    x = torch.randn(2, 5, 96, generator=g)
    w = torch.randn(80, 96, generator=g) / math.sqrt(96)
    w2 = torch.randn(80, 96, generator=g) / math.sqrt(96)
    nw, b, r = 1 + 0.1 * torch.randn(96, generator=g), torch.randn(80, generator=g), torch.randn(2, 5, 80, generator=g)
    fn = {"plain": lambda x, w: ops.linear(x, w),
          "norm_silu_bias_residual": lambda x, w, b, nw, r: ops.linear(x, w, b, nw, 1e-5, "silu", r),
          "glu": lambda x, w, w2, nw: ops.linear_glu(x, w, w2, nw, 1e-5, "silu"),
          "glu_gelu": lambda x, w, w2, nw: ops.linear_glu(x, w, w2, nw, 1e-5, "gelu")}[variant]  # exact (erf) gelu
    args = {"plain": (x, w), "norm_silu_bias_residual": (x, w, b, nw, r)}.get(variant, (x, w, w2, nw))
    out, _ = launch_like_a_plan(fn, *args)
    torch.testing.assert_close(out, fn(*args), **TOL)


def _rope(batch, seq, dim):
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    f = torch.arange(seq).float()[:, None] * inv
    emb = torch.cat((f, f), -1)[None].expand(batch, seq, dim)
    return emb.cos().contiguous(), emb.sin().contiguous()


@pytest.mark.parametrize("rope", [False, True])
def test_attention_family(rope):
    g = _gen(1)
    q, k, v = (torch.randn(2, h, 70, 32, generator=g) for h in (4, 2, 2))
    cos, sin = _rope(2, 70, 32)
    if rope:
        fn, args = (lambda q, k, v, c, s: ops.attention(q, k, v, 32**-0.5, True, c, s)), (q, k, v, cos, sin)
    else:
        fn, args = (lambda q, k, v: ops.attention(q, k, v, 32**-0.5, True)), (q, k, v)
    out, _ = launch_like_a_plan(fn, *args)
    torch.testing.assert_close(out, fn(*args), **TOL)


ATTENTION_MASKS = {  # an SDPA attn_mask as encoders pass it: [B, 1, 1, Skv] key padding, full, per head, 2-D
    "bool key padding": lambda g: torch.arange(70)[None, None, None, :] < torch.tensor([70, 50])[:, None, None, None],
    "bool full": lambda g: torch.rand(2, 1, 70, 70, generator=g) > 0.3,
    "additive HF padding": lambda g: torch.where(torch.arange(70) < 41, 0.0, torch.finfo(torch.float32).min)
    .expand(2, 1, 1, 70),
    "additive bias per head": lambda g: torch.randn(1, 4, 70, 70, generator=g),
    "2-D": lambda g: torch.rand(70, 70, generator=g) > 0.2,
}


@pytest.mark.parametrize("mask", list(ATTENTION_MASKS))
@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
def test_attention_family_reads_an_explicit_mask(mask, device):
    """The forward flash kernel reads an attn_mask tile per key block through broadcast strides (no expanded copy):
    bool masks select, additive ones add in the log2 domain (HF's finfo.min padding stays exact)."""
    g = _gen(16)
    q, k, v = (torch.randn(2, h, 70, 32, generator=g) for h in (4, 2, 2))
    m = ATTENTION_MASKS[mask](g)
    fn = lambda q, k, v, m: ops.attention(q, k, v, 32**-0.5, False, None, None, m)  # noqa: E731
    out, _ = launch_like_a_plan(fn, q, k, v, m, device=INTERPRETER if device == "interpreter" else TARGETS[device])
    torch.testing.assert_close(out, fn(q, k, v, m), **TOL)


def _cache_inputs(batch, s_new, past, s_max=96, hq=4, hkv=2, dim=32, seed=2):
    g = _gen(seed)
    q, k, v = (torch.randn(batch, h, s_new, dim, generator=g) for h in (hq, hkv, hkv))
    kc, vc = (torch.randn(batch, hkv, s_max, dim, generator=g) for _ in range(2))
    cos, sin = _rope(batch, s_max, dim)
    cos, sin = cos[:, past: past + s_new].contiguous(), sin[:, past: past + s_new].contiguous()
    cache_len = torch.tensor([past], dtype=torch.int64)
    kv_start = torch.tensor([0, 3][:batch], dtype=torch.int32)
    return q, k, v, cos, sin, kc, vc, cache_len, kv_start


@pytest.mark.parametrize("s_new,past", [(9, 0), (1, 40)], ids=["prefill", "decode"])
def test_cached_attention_family(s_new, past):
    args = _cache_inputs(2, s_new, past)
    fn = lambda *a: ops.cached_attention(*a, 32**-0.5)  # noqa: E731
    ref_args = [a.clone() for a in args]
    out, _ = launch_like_a_plan(fn, *args)
    ref = fn(*ref_args)
    torch.testing.assert_close(out, ref, **TOL)
    torch.testing.assert_close(args[5], ref_args[5], **TOL)  # the k cache written at cache_len, roped
    torch.testing.assert_close(args[6], ref_args[6], **TOL)


@pytest.mark.parametrize("dtype, w_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                            (torch.float16, torch.float32)])
def test_cached_attention_family_normalizes_q_and_k_in_the_cache_write(dtype, w_dtype):
    """Prefill with Qwen3's q_norm / k_norm inside the cache-write kernel (passes/prefill.py): equal to the op's
    reference (braze::rms_norm's rounding, then RoPE, then attention over the cache) in fp32, in fp16 with fp16 norm
    weights, and in fp16 with fp32 weights (Gemma 3's scale, one rounding); the cache holds the normed, rotated
    keys. fp32 within TOL; fp16 within 2 fp16 ulps at the outputs' scale. Without the norms the output moves by
    O(1): they are applied."""
    q, k, v, cos, sin, kc, vc, cache_len, kv_start = _cache_inputs(2, 9, 0, seed=23)
    q, k = 3 * q, 0.5 * k  # norms that matter
    g = _gen(24)
    w_q, w_k = 1 + 0.2 * torch.randn(32, generator=g), 1 + 0.2 * torch.randn(32, generator=g)
    args = [a.to(dtype) if a.is_floating_point() else a for a in (q, k, v, cos, sin, kc, vc, cache_len, kv_start)]
    args += [w_q.to(w_dtype), w_k.to(w_dtype)]
    fn = lambda *a: ops.cached_attention(*a[:9], 32**-0.5, a[9], a[10], 1e-6)  # noqa: E731
    ref_args = [a.clone() for a in args]
    plain_args = [a.clone() for a in args]
    out, _ = launch_like_a_plan(fn, *args)
    tol = TOL if dtype == torch.float32 else {"atol": 8e-3, "rtol": 2e-3}
    torch.testing.assert_close(out.float(), fn(*ref_args).float(), **tol)
    torch.testing.assert_close(args[5].float(), ref_args[5].float(), **tol)  # normed, rotated keys at 0..8
    plain = ops.cached_attention(*plain_args[:9], 32**-0.5)
    assert (out.float() - plain.float()).abs().max() > 0.1


def test_tree_cached_attention_family():
    args = _cache_inputs(2, 5, 30, seed=3)
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
                        dtype=torch.bool)[None].expand(2, 5, 5).contiguous()
    cache_len = torch.tensor([30, 30], dtype=torch.int64)
    args = (*args[:7], cache_len, args[8], tree)
    fn = lambda *a: ops.tree_cached_attention(*a, 32**-0.5)  # noqa: E731
    ref_args = [a.clone() for a in args]
    out, _ = launch_like_a_plan(fn, *args)
    torch.testing.assert_close(out, fn(*ref_args), **TOL)


def test_attention_family_general_features():
    """braze::general_attention (softcap, sliding window, sinks; RoPE fused) through the flash kernel."""
    g = _gen(11)
    q, k, v = (torch.randn(2, h, 70, 32, generator=g) for h in (4, 2, 2))
    cos, sin = _rope(2, 70, 32)
    sinks = torch.randn(4, generator=g)
    fn = lambda q, k, v, c, s, sk: ops.general_attention(q, k, v, 32**-0.5, True, 20.0, 24, c, s, None, sk)  # noqa: E731
    out, _ = launch_like_a_plan(fn, q, k, v, cos, sin, sinks)
    torch.testing.assert_close(out, fn(q, k, v, cos, sin, sinks), **TOL)


@pytest.mark.parametrize("form", ["prefill", "decode", "tree"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
def test_general_cached_attention_family(form, deterministic, device):
    """braze::general_cached_attention with softcap, a sliding window (24, shorter than the 40 cached tokens) and
    sinks: prefill (flash over the cache, per row under deterministic), decode (the split-KV kernel rotating and
    writing the new token; sm_90's configuration splits the cache, so the combine runs) and a draft tree (the tree
    form of split-KV decode), against the op's reference; the caches are written alike."""
    s_new, past = {"prefill": (9, 0), "decode": (1, 40), "tree": (5, 40)}[form]
    q, k, v, cos, sin, kc, vc, cache_len, kv_start = _cache_inputs(2, s_new, past, s_max=256, seed=12)
    sinks = torch.randn(4, generator=_gen(13))
    args = [q, k, v, kc, vc, cache_len, kv_start, cos, sin, sinks]
    if form == "tree":
        tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
                            dtype=torch.bool)[None].expand(2, 5, 5).contiguous()
        args[5] = torch.tensor([40, 33], dtype=torch.int64)
        args.append(tree)
        fn = lambda q, k, v, kc, vc, cl, ks, c, s, sk, t: ops.general_cached_attention(  # noqa: E731
            q, k, v, kc, vc, cl, ks, 32**-0.5, 20.0, 24, c, s, None, t, sk)
    else:
        fn = lambda q, k, v, kc, vc, cl, ks, c, s, sk: ops.general_cached_attention(  # noqa: E731
            q, k, v, kc, vc, cl, ks, 32**-0.5, 20.0, 24, c, s, None, None, sk)
    ref_args = [a.clone() for a in args]
    out, _ = launch_like_a_plan(fn, *args, device=INTERPRETER if device == "interpreter" else TARGETS[device],
                                deterministic=deterministic)
    ref = fn(*ref_args)
    rows = [0, 1] if form != "prefill" else [0]  # prefill row 1's first 3 queries are left padding (unused)
    torch.testing.assert_close(out[rows], ref[rows], **TOL)
    if form == "prefill":
        torch.testing.assert_close(out[1, :, 3:], ref[1, :, 3:], **TOL)
    torch.testing.assert_close(args[3], ref_args[3], **TOL)
    torch.testing.assert_close(args[4], ref_args[4], **TOL)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
@pytest.mark.parametrize("starts", ["row", "head"])
def test_attention_block_family(device, starts, deterministic):
    """The decode attention block: RoPE, cache write, attention, o_proj and the residual add in one launch. sm_90's
    configuration splits the 200-slot context in two, so the last split's merge of the other's partials runs
    (the interpreter's own configuration keeps one split), and projects in 16-row tl.dot tiles 16 columns wide
    (default) or one row at a time in 4-column GEMV tiles (deterministic), so the 72-wide output ends in a partial
    tile; `head` gives every (row, kv head) its own start (kv_compression="adakv"). Batch 3, GQA group 2."""
    q, k, v, cos, sin, kc, vc, _, _ = _cache_inputs(3, 1, 150, s_max=512, seed=5)
    cache_len = torch.tensor([150], dtype=torch.int64)
    kv_start = torch.tensor([0, 7, 140], dtype=torch.int32)
    if starts == "head":
        kv_start = torch.tensor([[0, 9], [7, 7], [149, 120]], dtype=torch.int32)
    g = _gen(6)
    w_o = torch.randn(72, 4 * 32, generator=g) / math.sqrt(128)
    residual = torch.randn(3, 1, 72, generator=g)
    args = (q, k, v, cos, sin, kc, vc, cache_len, kv_start)
    fn = lambda *a: ops.attention_block(*a[:9], 32**-0.5, a[9], a[10])  # noqa: E731
    ref_args = [a.clone() for a in (*args, w_o, residual)]
    target = INTERPRETER if device == "interpreter" else TARGETS[device]
    from braze.kernels.attention import decode_splits

    assert decode_splits(2, 512, target) == (1 if device == "interpreter" else 2)
    with recording_launches() as seen:
        out, _ = launch_like_a_plan(fn, *args, w_o, residual, device=target, deterministic=deterministic)
    tile = {k: seen[0].meta[k] for k in ("BLOCK_R", "BLOCK_O", "ROW_DOT")}
    if device == "sm_90":
        assert tile == ({"BLOCK_R": 1, "BLOCK_O": 4, "ROW_DOT": True} if deterministic
                        else {"BLOCK_R": 16, "BLOCK_O": 16, "ROW_DOT": False})
        assert seen[0].grid == (3 * 2 * 2 + math.ceil(72 / tile["BLOCK_O"]),)  # attending, then projecting
    torch.testing.assert_close(out, fn(*ref_args), **TOL)
    torch.testing.assert_close(kc, ref_args[5], **TOL)  # the new key, roped, at slot 150 of every row
    torch.testing.assert_close(vc, ref_args[6], **TOL)
    # the same block through its parts: attention, then the flattened heads through o_proj
    attn = ops.cached_attention(*[a.clone() for a in args], 32**-0.5)
    torch.testing.assert_close(out, residual + attn.transpose(1, 2).reshape(3, 1, 128) @ w_o.T, **TOL)
    if deterministic:  # fixed order: row 1 alone is bitwise row 1 of the batch, and a rerun is bitwise the same
        row = [a[1:2].clone() if a.dim() > 1 or a.numel() == 3 else a.clone() for a in ref_args[:5]]
        caches = [ref_args[5][1:2].clone(), ref_args[6][1:2].clone()]
        alone, _ = launch_like_a_plan(fn, *row, *caches, cache_len, kv_start[1:2], w_o, residual[1:2],
                                      device=target, deterministic=True)
        assert torch.equal(alone[0], out[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
def test_attention_block_family_normalizes_q_and_k(device, dtype):
    """Qwen3's q_norm / k_norm inside the block (q and the new key RMS-normed per head, then rotated): equal to
    normalizing with braze::rms_norm's reference first and running the plain block, and to the block's reference;
    the new key in the cache is the normed, rotated one. fp32 within TOL; fp16 within 2 fp16 ulps at the outputs'
    scale (the norms round where the reference's do, the sums run in another order)."""
    q, k, v, cos, sin, kc, vc, _, _ = _cache_inputs(2, 1, 30, s_max=64, seed=15)
    q, k = 3 * q, 0.5 * k  # norms that matter
    g = _gen(16)
    w_o, residual = torch.randn(40, 4 * 32, generator=g) / math.sqrt(128), torch.randn(2, 1, 40, generator=g)
    w_q, w_k = 1 + 0.2 * torch.randn(32, generator=g), 1 + 0.2 * torch.randn(32, generator=g)
    cache_len, kv_start = torch.tensor([30], dtype=torch.int64), torch.tensor([0, 4], dtype=torch.int32)
    args = [a.to(dtype) if a.is_floating_point() else a
            for a in (q, k, v, cos, sin, kc, vc, cache_len, kv_start, w_o, residual, w_q, w_k)]
    _check_normed_block(args, device, dtype, lambda x, w, b: ops.rms_norm(x, w, 1e-6))


def _check_normed_block(args: list, device: str, dtype: torch.dtype, pre_norm,
                        layer: bool = False) -> tuple[torch.Tensor, list, dict]:
    """braze::attention_block with q / k norms (args: its 9 inputs, w_o, residual, w_q, w_k[, b_q, b_k]; eps 1e-6;
    layer: LayerNorms) launched as a plan launches it: equal to its reference (and the new key in the cache: normed,
    rotated, at slot 30), and to the plain block after pre_norm(x, w, b) normalizes q and k. Returns the output,
    pristine args and the tolerance."""
    def fn(*a):
        biases = {"q_norm_bias": a[13], "k_norm_bias": a[14]} if len(a) > 13 else {}
        return ops.attention_block(*a[:9], 32**-0.5, a[9], a[10], a[11], a[12], 1e-6, **biases,
                                   **({"qk_layer_norm": True} if layer else {}))

    pristine, ref_args = [a.clone() for a in args], [a.clone() for a in args]
    out, _ = launch_like_a_plan(fn, *args, device=INTERPRETER if device == "interpreter" else TARGETS[device])
    tol = TOL if dtype == torch.float32 else {"atol": 8e-3, "rtol": 2e-3}
    torch.testing.assert_close(out.float(), fn(*ref_args).float(), **tol)
    torch.testing.assert_close(args[5].float(), ref_args[5].float(), **tol)
    split = [a.clone() for a in pristine]
    b_q, b_k = (split[13], split[14]) if len(split) > 13 else (None, None)
    split[0], split[1] = pre_norm(split[0], split[11], b_q), pre_norm(split[1], split[12], b_k)
    torch.testing.assert_close(out.float(), ops.attention_block(*split[:9], 32**-0.5, split[9], split[10]).float(),
                               **tol)
    return out, pristine, tol


@pytest.mark.parametrize("weights", ["fp32", "fp16", "fp16-fp32 weights"])
@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
def test_attention_block_family_normalizes_q_and_k_over_the_whole_projection(device, weights):
    """OLMo 2's q_norm / k_norm inside the block: q and the new key RMS-normed over all heads of the row (weights
    [Hq * D], [Hkv * D]) before the rotation. 20 heads (MHA) take two 16-head chunks of the statistics loop for q
    and for k. Equal to the block's reference and to normalizing the flattened projections with braze::rms_norm
    first; with per-head statistics instead the result moves by O(1e-1), so the whole row's are used. fp16 (and
    OLMo 2's 16-bit form, an fp32 weight: the scale in fp32, one rounding) within 2 fp16 ulps at the outputs' scale."""
    dtype = torch.float32 if weights == "fp32" else torch.float16
    heads = 20
    q, k, v, cos, sin, kc, vc, _, _ = _cache_inputs(2, 1, 30, s_max=64, hq=heads, hkv=heads, seed=41)
    q = q * torch.linspace(0.2, 4.0, heads)[None, :, None, None]  # heads of different scales: whole != per head
    k = k * torch.linspace(3.0, 0.1, heads)[None, :, None, None]
    g = _gen(42)
    w_o, residual = torch.randn(40, heads * 32, generator=g) / math.sqrt(heads * 32), torch.randn(2, 1, 40, generator=g)
    w_q, w_k = (1 + 0.2 * torch.randn(heads * 32, generator=g) for _ in range(2))
    cache_len, kv_start = torch.tensor([30], dtype=torch.int64), torch.tensor([0, 4], dtype=torch.int32)
    args = [a.to(dtype) if a.is_floating_point() else a
            for a in (q, k, v, cos, sin, kc, vc, cache_len, kv_start, w_o, residual)]
    args += [w.to(torch.float32 if weights.endswith("fp32 weights") else dtype) for w in (w_q, w_k)]

    def whole_norm(x, w, _):  # [B, H, 1, D] -> the projection [B, 1, H * D] normed -> back
        flat = ops.rms_norm(x.transpose(1, 2).reshape(2, 1, heads * 32), w, 1e-6)
        return flat.reshape(2, 1, heads, 32).transpose(1, 2)

    out, per_head, _ = _check_normed_block(args, device, dtype, whole_norm)
    for i, w in ((0, per_head[11]), (1, per_head[12])):  # the same weights, each head's own statistics
        x = per_head[i].float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float().view(1, heads, 1, 32)
        per_head[i] = x.to(dtype)
    other = ops.attention_block(*per_head[:9], 32**-0.5, per_head[9], per_head[10])
    assert (out.float() - other.float()).abs().max() > 1e-1


@pytest.mark.parametrize("form", ["fp32 [D] + bias", "fp16 [D] + bias", "fp16 [H, D]", "fp32 [H, D]"])
@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
def test_attention_block_family_layer_norms_q_and_k(device, form):
    """Persimmon's q / k LayerNorms (weight and bias [D]) and Cohere's (a weight row per head [H, D], no bias)
    inside the block: each head centred and scaled by its own statistics, weight and bias in fp32, one rounding,
    then rotated. Equal to braze::layer_norm's reference before the plain block and to the block's reference;
    fp16 within 2 fp16 ulps at the outputs' scale. Heads get means far from 0, so an RMSNorm in their place would
    move the result by O(1e-1)."""
    dtype = torch.float16 if form.startswith("fp16") else torch.float32
    rows, bias = "[H, D]" in form, "bias" in form
    q, k, v, cos, sin, kc, vc, _, _ = _cache_inputs(2, 1, 30, s_max=64, seed=43)
    q, k = 2 * q + torch.linspace(-3, 3, 4)[None, :, None, None], k - 1.5  # heads with their own offsets
    g = _gen(44)
    w_o, residual = torch.randn(40, 4 * 32, generator=g) / math.sqrt(128), torch.randn(2, 1, 40, generator=g)
    w_q, w_k = (1 + 0.2 * torch.randn(*((h, 32) if rows else (32,)), generator=g) for h in (4, 2))
    extra = [0.3 * torch.randn(32, generator=g) for _ in range(2)] if bias else []
    cache_len, kv_start = torch.tensor([30], dtype=torch.int64), torch.tensor([0, 4], dtype=torch.int32)
    args = [a.to(dtype) if a.is_floating_point() else a
            for a in (q, k, v, cos, sin, kc, vc, cache_len, kv_start, w_o, residual, w_q, w_k, *extra)]

    def layer_norm(x, w, b):  # [B, H, 1, D] with a weight [D] (braze::layer_norm) or a row per head
        return layer_norm_reference(x, w[:, None, :], None, 1e-6) if w.dim() == 2 else ops.layer_norm(x, w, b, 1e-6)

    out, pristine, tol = _check_normed_block(args, device, dtype, layer_norm, layer=True)
    rms = [a.clone() for a in pristine[:13]]
    rms_out = ops.attention_block(*rms[:9], 32**-0.5, rms[9], rms[10], rms[11], rms[12], 1e-6)
    assert (out.float() - rms_out.float()).abs().max() > 1e-1


@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
def test_attention_block_family_slides_its_window(device):
    """A sliding window inside the block (Mistral, Phi-3): the new token at position 40 sees positions 33..40
    only (window 8, row 1's left padding ends at 4, inside what the window drops), equal to the general cached
    attention's reference followed by o_proj and the residual, and to the block's reference; sm_90's
    configuration splits the cache, so splits wholly outside the window are empty and merge as such."""
    q, k, v, cos, sin, kc, vc, _, _ = _cache_inputs(2, 1, 40, s_max=256, seed=17)
    g = _gen(18)
    w_o, residual = torch.randn(40, 4 * 32, generator=g) / math.sqrt(128), torch.randn(2, 1, 40, generator=g)
    cache_len, kv_start = torch.tensor([40], dtype=torch.int64), torch.tensor([0, 4], dtype=torch.int32)
    args = (q, k, v, cos, sin, kc, vc, cache_len, kv_start)
    fn = lambda *a: ops.attention_block(*a[:9], 32**-0.5, a[9], a[10], None, None, 0.0, 8)  # noqa: E731
    ref_args = [a.clone() for a in (*args, w_o, residual)]
    out, _ = launch_like_a_plan(fn, *args, w_o, residual,
                                device=INTERPRETER if device == "interpreter" else TARGETS[device])
    torch.testing.assert_close(out, fn(*ref_args), **TOL)
    torch.testing.assert_close(kc, ref_args[5], **TOL)
    parts = [a.clone() for a in ref_args]
    attn = ops.general_cached_attention(parts[0], parts[1], parts[2], parts[5], parts[6], cache_len, kv_start,
                                        32**-0.5, 0.0, 8, parts[3], parts[4])
    torch.testing.assert_close(out, residual + attn.transpose(1, 2).reshape(2, 1, 128) @ w_o.T, **TOL)
    unwindowed = ops.attention_block(*[a.clone() for a in ref_args[:9]], 32**-0.5, w_o, residual)
    assert (out - unwindowed).abs().max() > 1e-2  # the window changed what the token sees


@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
def test_attention_block_family_adds_alibi(device):
    """Bloom / MPT's ALiBi inside the block, over RoPE at angle 0 (cos 1, sin 0: the graph has no rotary): each
    head's logits get slope_h * (key position - 40), rows left-padded differently. Equal to the general cached
    attention's reference -> o_proj + residual and to the block's reference; sm_90's configuration splits the
    cache. Without the slopes the result moves by O(1e-1): they are applied."""
    q, k, v, _, _, kc, vc, _, _ = _cache_inputs(2, 1, 40, s_max=256, seed=21)
    cos, sin = torch.ones(2, 1, 32), torch.zeros(2, 1, 32)
    g = _gen(22)
    w_o, residual = torch.randn(40, 4 * 32, generator=g) / math.sqrt(128), torch.randn(2, 1, 40, generator=g)
    slopes = torch.tensor([0.5, 0.25, 0.125, -0.0625])
    cache_len, kv_start = torch.tensor([40], dtype=torch.int64), torch.tensor([0, 7], dtype=torch.int32)
    args = (q, k, v, cos, sin, kc, vc, cache_len, kv_start)

    def fn(*a):
        return ops.attention_block(*a[:9], 32**-0.5, a[9], a[10], alibi=a[11])

    pristine = [a.clone() for a in (*args, w_o, residual, slopes)]
    ref_args = [a.clone() for a in pristine]
    out, _ = launch_like_a_plan(fn, *args, w_o, residual, slopes,
                                device=INTERPRETER if device == "interpreter" else TARGETS[device])
    torch.testing.assert_close(out, fn(*ref_args), **TOL)
    torch.testing.assert_close(kc, ref_args[5], **TOL)
    parts = [a.clone() for a in pristine]
    attn = ops.general_cached_attention(parts[0], parts[1], parts[2], parts[5], parts[6], cache_len, kv_start,
                                        32**-0.5, cos=parts[3], sin=parts[4], alibi=slopes)
    torch.testing.assert_close(out, residual + attn.transpose(1, 2).reshape(2, 1, 128) @ w_o.T, **TOL)
    plain = [a.clone() for a in pristine]
    without = ops.attention_block(*plain[:9], 32**-0.5, plain[9], plain[10])
    assert (out - without).abs().max() > 1e-1


@pytest.mark.parametrize("rows", [2, 18])
@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
def test_attention_block_family_gemma2_softcap_window_post_norm(device, rows):
    """Gemma 2's attention half in the block: softcapped logits (cap 5, so the cap bites on logits ~3-8), a
    sliding window of 8 and the post-attention RMSNorm before the residual add (the last projecting program
    normalizes every row once all of o_proj's tiles are stored). Equal to the general cached attention's
    reference -> o_proj -> braze::rms_norm -> + residual, and to the block's reference; 18 rows take two 16-row
    tiles on sm_90. Without the post-norm or the softcap the result moves by O(1): each is applied."""
    q, k, v, cos, sin, kc, vc, _, _ = _cache_inputs(rows, 1, 40, s_max=256, seed=19)
    q = 4 * q
    g = _gen(20)
    w_o, residual = torch.randn(40, 4 * 32, generator=g) / math.sqrt(128), torch.randn(rows, 1, 40, generator=g)
    w_post = 1 + 0.3 * torch.randn(40, generator=g)
    cache_len = torch.tensor([40], dtype=torch.int64)
    kv_start = (torch.arange(rows, dtype=torch.int32) * 3) % 30
    args = (q, k, v, cos, sin, kc, vc, cache_len, kv_start)

    def fn(*a):
        return ops.attention_block(*a[:9], 32**-0.5, a[9], a[10], window=8, softcap=5.0, post_norm_weight=a[11],
                                   post_norm_eps=1e-6)

    pristine = [a.clone() for a in (*args, w_o, residual, w_post)]
    ref_args = [a.clone() for a in pristine]
    out, _ = launch_like_a_plan(fn, *args, w_o, residual, w_post,
                                device=INTERPRETER if device == "interpreter" else TARGETS[device])
    torch.testing.assert_close(out, fn(*ref_args), **TOL)
    torch.testing.assert_close(kc, ref_args[5], **TOL)
    parts = [a.clone() for a in pristine]
    attn = ops.general_cached_attention(parts[0], parts[1], parts[2], parts[5], parts[6], cache_len, kv_start,
                                        32**-0.5, 5.0, 8, parts[3], parts[4])
    o = attn.transpose(1, 2).reshape(rows, 1, 128) @ w_o.T
    torch.testing.assert_close(out, residual + ops.rms_norm(o, w_post, 1e-6), **TOL)
    assert (out - (residual + o)).abs().max() > 0.5  # the post-norm is applied
    plain = [a.clone() for a in pristine]
    uncapped = ops.attention_block(*plain[:9], 32**-0.5, plain[9], plain[10], window=8, post_norm_weight=plain[11],
                                   post_norm_eps=1e-6)
    assert (out - uncapped).abs().max() > 1e-1  # the softcap is applied


@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
def test_attention_block_family_projects_row_tiles(device):
    """18 decode rows: the projecting programs take the rows in two 16-row tiles (the second one 2 rows deep), and
    every row's result matches attention followed by o_proj."""
    q, k, v, cos, sin, kc, vc, _, _ = _cache_inputs(18, 1, 40, s_max=64, seed=11)
    cache_len = torch.tensor([40], dtype=torch.int64)
    kv_start = torch.arange(18, dtype=torch.int32)
    g = _gen(12)
    w_o, residual = torch.randn(48, 4 * 32, generator=g) / math.sqrt(128), torch.randn(18, 1, 48, generator=g)
    args = (q, k, v, cos, sin, kc, vc, cache_len, kv_start)
    fn = lambda *a: ops.attention_block(*a[:9], 32**-0.5, a[9], a[10])  # noqa: E731
    ref_args = [a.clone() for a in (*args, w_o, residual)]
    target = INTERPRETER if device == "interpreter" else TARGETS[device]
    with recording_launches() as seen:
        out, _ = launch_like_a_plan(fn, *args, w_o, residual, device=target)
    assert seen[0].meta["BLOCK_R"] == 16 and not seen[0].meta["ROW_DOT"]
    torch.testing.assert_close(out, fn(*ref_args), **TOL)
    attn = ops.cached_attention(*[a.clone() for a in args], 32**-0.5)
    torch.testing.assert_close(out, residual + attn.transpose(1, 2).reshape(18, 1, 128) @ w_o.T, **TOL)


@pytest.mark.parametrize("device, dtype", [("interpreter", torch.float32), ("sm_90", torch.float32),
                                           ("interpreter", torch.float16)])
def test_attention_block_family_records_rkv_queries(device, dtype):
    """braze::attention_block_recording (R-KV decode): the attention block plus the rotated query of every head in
    ring slot cache_len % W, equal to attention_block followed by kv_record_query's reference. fp16: an fp16 model
    with fp32 caches (kv_dtype="float32"): the ring holds the query rounded to fp16 as kv_record_query records it,
    not the fp32 value the attention uses (the output then matches to fp16 rounding, atol 2e-3)."""
    q, k, v, cos, sin, kc, vc, _, _ = _cache_inputs(3, 1, 150, s_max=512, seed=5)
    q, k, v, cos, sin = (t.to(dtype) for t in (q, k, v, cos, sin))
    cache_len = torch.tensor([150], dtype=torch.int64)
    kv_start = torch.tensor([0, 7, 140], dtype=torch.int32)
    g = _gen(9)
    w_o, residual = torch.randn(72, 4 * 32, generator=g) / math.sqrt(128), torch.randn(3, 1, 72, generator=g)
    w_o, residual = w_o.to(dtype), residual.to(dtype)
    ring = torch.zeros(3, 4, 8, 32)
    args = (q, k, v, cos, sin, kc, vc, cache_len, kv_start)
    fn = lambda *a: ops.attention_block_recording(*a[:9], 32**-0.5, a[9], a[10], a[11])  # noqa: E731
    ref_args = [a.clone() for a in (*args, w_o, residual, ring)]
    target = INTERPRETER if device == "interpreter" else TARGETS[device]
    out, _ = launch_like_a_plan(fn, *args, w_o, residual, ring, device=target)
    want = fn(*ref_args)
    torch.testing.assert_close(out, want, **(TOL if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}))
    torch.testing.assert_close(ring, ref_args[11], atol=1e-6, rtol=1e-6)  # fp32 RoPE, rounded once to q's dtype
    if dtype == torch.float16:
        assert torch.equal(ring, ring.half().float())  # fp16 values in the fp32 ring
    assert ring[:, :, 150 % 8].abs().sum() > 0 and not ring[:, :, 150 % 8 - 1].any()


def test_attention_block_family_tree_verify():
    """The deterministic verify's attention block: the verify's rope_write, then every draft node of a branching
    tree (and a padding node) as decode at its position, through o_proj with a fixed-order sum over kv heads."""
    args = _cache_inputs(2, 5, 30, seed=3)
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [0, 0, 0, 0, 0]],
                        dtype=torch.bool)[None].expand(2, 5, 5).contiguous()
    args = (*args[:7], torch.tensor([30, 30], dtype=torch.int64), args[8], tree)
    g = _gen(8)
    w_o, residual = torch.randn(40, 128, generator=g) / math.sqrt(128), torch.randn(2, 5, 40, generator=g)
    fn = lambda *a: ops.tree_attention_block(*a[:10], 32**-0.5, a[10], a[11])  # noqa: E731
    ref_args = [a.clone() for a in (*args, w_o, residual)]
    out, _ = launch_like_a_plan(fn, *args, w_o, residual, device=TARGETS["sm_90"], deterministic=True)
    torch.testing.assert_close(out[:, :4], fn(*ref_args)[:, :4], **TOL)
    # a padding node (no ancestor, never accepted) attends to nothing in the tree decode kernel, as without the block
    torch.testing.assert_close(out[:, 4], residual[:, 4], **TOL)


@pytest.mark.parametrize("device", ["interpreter", "sm_80"])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("rows", [3, 1])
def test_mlp_block_family(device, activation, rows):
    """The decode MLP block: norm, gate/up, SwiGLU / GeGLU, down and the residual add in one launch; sizes that are
    no tile's multiple (K = N = 72, I = 200: sm_80 splits I into 13 up programs of 16 columns, then the down
    projection's programs: 16-row tl.dot tiles for 3 rows, the 4-column GEMV form for one)."""
    g = _gen(7)
    x = torch.randn(rows, 1, 72, generator=g)
    nw = 1 + 0.1 * torch.randn(72, generator=g)
    wg, wu = (torch.randn(200, 72, generator=g) / math.sqrt(72) for _ in range(2))
    wd = torch.randn(72, 200, generator=g) / math.sqrt(200)
    residual = torch.randn(rows, 1, 72, generator=g)
    fn = lambda *a: ops.mlp_block(*a, 1e-5, activation)  # noqa: E731
    target = INTERPRETER if device == "interpreter" else TARGETS[device]
    with recording_launches() as seen:
        out, _ = launch_like_a_plan(fn, x, nw, wg, wu, wd, residual, device=target)
    if device == "sm_80":
        block_o = 4 if rows == 1 else 16
        assert (seen[0].meta["BLOCK_I"], seen[0].meta["BLOCK_O"], seen[0].meta["ROW_DOT"]) == (16, block_o, rows == 1)
        assert seen[0].grid == (13 + math.ceil(72 / block_o),)  # up programs, then down programs
    torch.testing.assert_close(out, fn(x, nw, wg, wu, wd, residual), **TOL)
    h = ops.linear_glu(x, wg, wu, nw, 1e-5, activation)
    torch.testing.assert_close(out, residual + h @ wd.T, **TOL)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("rows, width", [(1, 72), (3, 72), (2, 1100)])
@pytest.mark.parametrize("device", ["interpreter", "sm_80"])
def test_mlp_block_family_post_norm(device, rows, width, deterministic):
    """Gemma 2/3's MLP half: GeGLU, then the post-feedforward RMSNorm of down's output before the residual add,
    in the same launch (its last projecting program normalizes the rows; N = 72 in one masked 128-wide chunk,
    N = 1100 in 1024-wide chunks under the interpreter, 512-wide on a GPU: the last one masked). Equal to
    linear_glu -> down -> braze::rms_norm -> + residual; deterministic: a row alone is bitwise the row in the
    batch."""
    g = _gen(21)
    x = torch.randn(rows, 1, 72, generator=g)
    nw, pw = 1 + 0.1 * torch.randn(72, generator=g), 1 + 0.1 * torch.randn(width, generator=g)
    wg, wu = (torch.randn(200, 72, generator=g) / math.sqrt(72) for _ in range(2))
    wd = torch.randn(width, 200, generator=g) / math.sqrt(200)
    residual = torch.randn(rows, 1, width, generator=g)
    fn = lambda *a: ops.mlp_block(*a[:6], 1e-5, "gelu_tanh", a[6], 1e-6)  # noqa: E731
    target = INTERPRETER if device == "interpreter" else TARGETS[device]
    with recording_launches() as seen:
        out, _ = launch_like_a_plan(fn, x, nw, wg, wu, wd, residual, pw, device=target, deterministic=deterministic)
    assert seen[0].meta["POST_NORM"] and len(seen) == 1
    assert seen[0].meta["BLOCK_PN"] == (128 if width == 72 else 1024 if device == "interpreter" else 512)
    h = ops.linear_glu(x, wg, wu, nw, 1e-5, "gelu_tanh") @ wd.T
    torch.testing.assert_close(out, residual + ops.rms_norm(h, pw, 1e-6), **TOL)
    assert (out - (residual + h)).abs().max() > 0.5
    if deterministic and rows > 1:
        alone, _ = launch_like_a_plan(fn, x[1:2], nw, wg, wu, wd, residual[1:2], pw, device=target,
                                      deterministic=True)
        assert torch.equal(alone[0], out[1])


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
@pytest.mark.parametrize("device", ["interpreter", "sm_80"])
@pytest.mark.parametrize("rows", [1, 3])
def test_mlp_block_family_plain_mlp_with_layer_norm(rows, device, activation, deterministic):
    """GPT-2 / OPT's MLP half in one launch: LayerNorm (weight and shift) of x, up + its bias, the activation,
    down + its bias, the residual (gate_weight None). x's rows have a large mean (+5), so a missing centring is
    O(1); equal to the matmul family's op, linear(layer_norm prologue, bias, activation) -> linear(bias,
    residual). Deterministic: a row alone is bitwise the row of the batch."""
    g = _gen(23)
    x = torch.randn(rows, 1, 72, generator=g) + 5.0
    nw, nb = 1 + 0.1 * torch.randn(72, generator=g), 0.3 * torch.randn(72, generator=g)
    wu = torch.randn(200, 72, generator=g) / math.sqrt(72)
    ub, db = 0.2 * torch.randn(200, generator=g), 0.2 * torch.randn(72, generator=g)
    wd = torch.randn(72, 200, generator=g) / math.sqrt(200)
    residual = torch.randn(rows, 1, 72, generator=g)
    fn = lambda x, nw, nb, wu, ub, wd, db, r: ops.mlp_block(  # noqa: E731
        x, nw, None, wu, wd, r, 1e-5, activation, layer_norm=True, norm_bias=nb, up_bias=ub, down_bias=db)
    target = INTERPRETER if device == "interpreter" else TARGETS[device]
    inputs = (x, nw, nb, wu, ub, wd, db, residual)
    with recording_launches() as seen:
        out, _ = launch_like_a_plan(fn, *inputs, device=target, deterministic=deterministic)
    assert len(seen) == 1 and seen[0].meta["HAS_BIAS"]
    h = ops.linear(x, wu, ub, nw, 1e-5, activation, layer_norm=True, norm_bias=nb)
    torch.testing.assert_close(out, ops.linear(h, wd, db, residual=residual), **TOL)
    ln = torch.nn.functional.layer_norm(x, (72,), nw, nb, 1e-5)
    act = {"gelu_tanh": lambda t: torch.nn.functional.gelu(t, approximate="tanh"), "relu": torch.relu}[activation]
    torch.testing.assert_close(out, residual + act(ln @ wu.T + ub) @ wd.T + db, **TOL)
    rms = ops.linear(ops.linear(x, wu, ub, nw, 1e-5, activation), wd, db, residual=residual)
    assert (out - rms).abs().max() > 0.5
    if deterministic and rows > 1:
        alone, _ = launch_like_a_plan(fn, x[1:2], *inputs[1:7], residual[1:2], device=target, deterministic=True)
        assert torch.equal(alone[0], out[1])


@pytest.mark.parametrize("device", ["interpreter", "sm_80"])
def test_mlp_block_family_gated_with_layer_norm(device):
    """StableLM's MLP half: a LayerNorm (weight and shift) before a SwiGLU, in one launch; equal to
    linear_glu(layer_norm prologue) -> down + residual."""
    g = _gen(24)
    x = torch.randn(3, 1, 72, generator=g) - 4.0
    nw, nb = 1 + 0.1 * torch.randn(72, generator=g), 0.3 * torch.randn(72, generator=g)
    wg, wu = (torch.randn(200, 72, generator=g) / math.sqrt(72) for _ in range(2))
    wd = torch.randn(72, 200, generator=g) / math.sqrt(200)
    residual = torch.randn(3, 1, 72, generator=g)
    fn = lambda x, nw, nb, wg, wu, wd, r: ops.mlp_block(  # noqa: E731
        x, nw, wg, wu, wd, r, 1e-5, "silu", layer_norm=True, norm_bias=nb)
    target = INTERPRETER if device == "interpreter" else TARGETS[device]
    out, _ = launch_like_a_plan(fn, x, nw, nb, wg, wu, wd, residual, device=target)
    h = ops.linear_glu(x, wg, wu, nw, 1e-5, "silu", layer_norm=True, norm_bias=nb)
    torch.testing.assert_close(out, residual + h @ wd.T, **TOL)
    ln = torch.nn.functional.layer_norm(x, (72,), nw, nb, 1e-5)
    torch.testing.assert_close(out, residual + (torch.nn.functional.silu(ln @ wg.T) * (ln @ wu.T)) @ wd.T, **TOL)


def test_mlp_block_spec_rejects_mixed_forms():
    with pytest.raises(ValueError, match="plain MLP"):
        MlpBlockSpec("k", glu="swiglu", activation="gelu")
    with pytest.raises(ValueError, match="plain MLP"):
        MlpBlockSpec("k", glu=None)
    with pytest.raises(ValueError, match="needs norm='layer'"):
        MlpBlockSpec("k", norm="rms", has_norm_bias=True)
    with pytest.raises(ValueError, match="up bias|has_up_bias"):
        MlpBlockSpec("k", has_up_bias=True)


@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
def test_attention_block_family_o_proj_bias(device):
    """GPT-2 / OPT / Phi's o_proj has a bias: the block's projecting programs add it once per output element,
    before the residual; equal to attention -> o_proj(bias) + residual and 0.5 away from it without the bias."""
    q, k, v, cos, sin, kc, vc, _, _ = _cache_inputs(3, 1, 150, s_max=512, seed=7)
    cache_len = torch.tensor([150], dtype=torch.int64)
    kv_start = torch.tensor([0, 7, 140], dtype=torch.int32)
    g = _gen(25)
    w_o = torch.randn(72, 4 * 32, generator=g) / math.sqrt(128)
    b_o = torch.randn(72, generator=g)
    residual = torch.randn(3, 1, 72, generator=g)
    args = (q, k, v, cos, sin, kc, vc, cache_len, kv_start)
    fn = lambda *a: ops.attention_block(*a[:9], 32**-0.5, a[9], a[10], o_bias=a[11])  # noqa: E731
    target = INTERPRETER if device == "interpreter" else TARGETS[device]
    attn = ops.cached_attention(*[a.clone() for a in args], 32**-0.5)
    with recording_launches() as seen:
        out, _ = launch_like_a_plan(fn, *args, w_o, residual, b_o, device=target)
    assert seen[0].meta["HAS_BIAS"]
    want = residual + attn.transpose(1, 2).reshape(3, 1, 128) @ w_o.T + b_o
    torch.testing.assert_close(out, want, **TOL)
    assert (out - (want - b_o)).abs().max() > 0.5


@pytest.mark.parametrize("device", ["interpreter", "sm_80"])
def test_mlp_block_family_without_a_pre_norm(device):
    """OLMo 2's MLP half: no norm before gate/up (norm_weight None: the kernel reads x as it is), the
    post-feedforward norm after down, in one launch; equal to linear_glu(x) -> down -> braze::rms_norm -> + residual,
    and far from the same block with a pre-norm of ones (x's rows are not unit-RMS: scaled by 3)."""
    g = _gen(22)
    x = 3 * torch.randn(3, 1, 72, generator=g)
    pw = 1 + 0.1 * torch.randn(72, generator=g)
    wg, wu = (torch.randn(200, 72, generator=g) / math.sqrt(72) for _ in range(2))
    wd = torch.randn(72, 200, generator=g) / math.sqrt(200)
    residual = torch.randn(3, 1, 72, generator=g)
    fn = lambda *a: ops.mlp_block(a[0], None, *a[1:5], 1e-5, "silu", a[5], 1e-6)  # noqa: E731
    target = INTERPRETER if device == "interpreter" else TARGETS[device]
    out, _ = launch_like_a_plan(fn, x, wg, wu, wd, residual, pw, device=target)
    h = ops.linear_glu(x, wg, wu, None, 0.0, "silu") @ wd.T
    torch.testing.assert_close(out, residual + ops.rms_norm(h, pw, 1e-6), **TOL)
    prenormed = ops.mlp_block(x, torch.ones(72), wg, wu, wd, residual, 1e-5, "silu", pw, 1e-6)
    assert (out - prenormed).abs().max() > 1e-1


@pytest.mark.parametrize("device", ["interpreter", "sm_80"])
def test_mlp_block_family_deterministic(device):
    """deterministic=True: LayerCast gate/up (fp16 weights upcast, fp32 math) and tiles that do not depend on the
    rows, so row 1 alone is bitwise row 1 of a batch of 5 (and of 1 + 2), and a rerun is bitwise the same; the
    result matches the fp32 reference of the same fp16 weights (tolerance: the fp16 rounding of the intermediate
    and the output, as the unfused kernels round them)."""
    g = _gen(13)
    x = torch.randn(5, 1, 72, generator=g).half()
    nw = (1 + 0.1 * torch.randn(72, generator=g)).half()
    wg, wu = ((torch.randn(200, 72, generator=g) / math.sqrt(72)).half() for _ in range(2))
    wd = (torch.randn(72, 200, generator=g) / math.sqrt(200)).half()
    residual = torch.randn(5, 1, 72, generator=g).half()
    fn = lambda *a: ops.mlp_block(*a, 1e-5, "silu")  # noqa: E731
    target = INTERPRETER if device == "interpreter" else TARGETS[device]
    with recording_launches() as seen:
        out, _ = launch_like_a_plan(fn, x, nw, wg, wu, wd, residual, device=target, deterministic=True)
    assert seen[0].meta["BLOCK_R"] == 1 and seen[0].meta["ROW_DOT"]
    again, _ = launch_like_a_plan(fn, x, nw, wg, wu, wd, residual, device=target, deterministic=True)
    assert torch.equal(again, out)
    for rows in (slice(1, 2), slice(0, 3)):
        part, _ = launch_like_a_plan(fn, x[rows], nw, wg, wu, wd, residual[rows], device=target, deterministic=True)
        assert torch.equal(part.view(torch.int16), out[rows].view(torch.int16))
    ref = fn(*(t.float() for t in (x, nw, wg, wu, wd, residual)))
    torch.testing.assert_close(out.float(), ref, atol=1e-2, rtol=1e-2)


def _df11_unit():
    w = (torch.randn(48, 128, generator=_gen(4)) * 0.02).to(torch.bfloat16)
    return w, encode_df11({"w": w}, threads_per_block=32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_df11_decode_family(dtype):
    w, u = _df11_unit()
    stream = (u.encoded, u.sign_mantissa, u.gaps, u.output_positions, u.luts, u.code_lengths)
    consts = (u.threads_per_block, u.max_codes_per_window, u.lut_levels)  # read outside the fake trace
    fn = lambda *s: ops.df11_decode(*s, *consts, list(w.shape), dtype)  # noqa: E731
    out, _ = launch_like_a_plan(fn, *stream)
    want = w.to(dtype)
    view = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(out.view(view), want.view(view)) and torch.equal(fn(*stream).view(view), want.view(view))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_df11_embedding_family(dtype):
    from braze.kernels.df11 import df11_row_blocks

    w, u = _df11_unit()
    rows, dim = w.shape
    row_blocks, per_row = df11_row_blocks(u.output_positions, rows, dim)
    stream = (u.encoded, u.sign_mantissa, u.gaps, u.output_positions, u.luts, u.code_lengths, row_blocks)
    consts = (u.threads_per_block, u.max_codes_per_window, u.lut_levels, dim, per_row)
    ids = torch.tensor([[0, rows - 1, 7], [7, 3, rows // 2]])
    fn = lambda ids, *s: ops.df11_embedding(ids, *s, *consts, dtype)  # noqa: E731
    out, _ = launch_like_a_plan(fn, ids, *stream)
    want = torch.nn.functional.embedding(ids, w).to(dtype)
    view = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(out.view(view), want.view(view)) and torch.equal(fn(ids, *stream).view(view), want.view(view))


def test_df11_gemv_family():
    from braze.kernels.df11 import df11_gemv_params

    w, u = _df11_unit()
    p = df11_gemv_params(u, 0, *w.shape)
    x, b = torch.randn(3, 128, generator=_gen(5)), torch.randn(48, generator=_gen(6))
    stream = (u.encoded, u.sign_mantissa, u.gaps, u.output_positions, u.luts, u.code_lengths)
    keys = ("start", "out_features", "in_features", "threads_per_block", "max_codes", "lut_levels", "block_first",
            "block_count")
    fn = lambda x, b, *s: ops.df11_linear(x, *s, b, *(p[k] for k in keys))  # noqa: E731
    out, _ = launch_like_a_plan(fn, x, b, *stream)
    torch.testing.assert_close(out, fn(x, b, *stream), **TOL)


@pytest.mark.parametrize("act_bits", [16, 8])
def test_int6_matmul_family(act_bits):
    g = _gen(7)
    x, w, b = torch.randn(3, 256, generator=g), torch.randn(64, 256, generator=g) * 0.05, torch.randn(64, generator=g)
    qw = quantize_int6(w)
    fn = lambda x, p, s, b: ops.int6_linear(x, p, s, b, 256, qw.group_size, act_bits)  # noqa: E731
    out, _ = launch_like_a_plan(fn, x, qw.packed, qw.scales, b)
    torch.testing.assert_close(out, fn(x, qw.packed, qw.scales, b), **TOL)


def _experts(counts, sentinels, k=96, n=80, dtype=torch.float32, seed=11):
    """Rows sorted by expert (counts[e] rows each, then `sentinels` rows past the last expert's end), experts as
    HF passes them: an [E, N, K] parameter seen transposed, [E, K, N]."""
    g = _gen(seed)
    x = torch.randn(sum(counts) + sentinels, k, generator=g).to(dtype)
    w = (torch.randn(len(counts), n, k, generator=g) / math.sqrt(k)).to(dtype).transpose(1, 2)
    offs = torch.cumsum(torch.tensor(counts), 0, dtype=torch.int32)
    return x, w, offs


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
def test_grouped_matmul_family(device, deterministic):
    """Empty experts, a tile spanning several experts, sentinel rows (zeros, as the reference writes them) and
    transposed expert weights; fp32 within TOL, fp16 within 2 fp16 ulps at the outputs' scale (one rounding of an
    fp32 sum of fp16 products, eager's own fp16 matmul rounds the same way)."""
    spec = INTERPRETER if device == "interpreter" else TARGETS[device]
    for dtype, tol in ((torch.float32, TOL), (torch.float16, {"atol": 4e-3, "rtol": 2e-3})):
        x, w, offs = _experts([3, 0, 4, 0, 2, 9], sentinels=2, dtype=dtype)
        out, _ = launch_like_a_plan(ops.grouped_mm, x, w, offs, device=spec, deterministic=deterministic)
        ref = ops.grouped_mm(x.float(), w.float(), offs)
        torch.testing.assert_close(out.float(), ref, **tol)
        assert not out[-2:].any()


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
def test_grouped_matmul_family_gathers_rows_and_applies_swiglu(device, deterministic):
    """The fused experts' form (passes/moe.py): operand rows read in place as x[rows // row_div] (each (token,
    slot) pair's token, in expert order) and silu(gate) * up stored from the fp32 accumulators of the [gate | up]
    columns; against the op's reference, fp32 within TOL, fp16 within 2 fp16 ulps of the output scale."""
    spec = INTERPRETER if device == "interpreter" else TARGETS[device]
    counts, top_k, tokens = [3, 0, 4, 0, 2, 9], 2, 9
    for dtype, tol in ((torch.float32, TOL), (torch.float16, {"atol": 4e-3, "rtol": 2e-3})):
        x, w, offs = _experts(counts, sentinels=0, n=2 * 40, dtype=dtype)
        hidden = x[:tokens].clone()
        perm = torch.randperm(sum(counts), generator=_gen(13))
        for fn, args in ((lambda h, w, o, p: ops.grouped_mm(h, w, o, p, top_k), (hidden, w, offs, perm)),
                         (lambda x, w, o: ops.grouped_mm(x, w, o, glu="swiglu"), (x, w, offs)),
                         (lambda h, w, o, p: ops.grouped_mm(h, w, o, p, top_k, "swiglu"), (hidden, w, offs, perm))):
            out, _ = launch_like_a_plan(fn, *args, device=spec, deterministic=deterministic)
            ref = fn(*(a.float() if a.is_floating_point() else a for a in args))
            torch.testing.assert_close(out.float(), ref, **tol)
    gathered = ops.grouped_mm(hidden.float(), w.float(), offs, perm, top_k)
    assert torch.equal(gathered, ops.grouped_mm(hidden.float()[perm // top_k], w.float(), offs))
    gate, up = ops.grouped_mm(x.float(), w.float(), offs).chunk(2, dim=-1)
    torch.testing.assert_close(ops.grouped_mm(x.float(), w.float(), offs, glu="swiglu"),
                               torch.nn.functional.silu(gate) * up, rtol=0, atol=0)


def test_grouped_matmul_family_rows_do_not_see_their_tile():
    """Deterministic compiles: a row's output is bitwise the same alone and in a tile of other experts' rows (what
    makes MoE layers batch-invariant: the sort puts a request's rows next to any companions')."""
    x, w, offs = _experts([2, 3, 1, 4], sentinels=0)
    batch, _ = launch_like_a_plan(ops.grouped_mm, x, w, offs, deterministic=True)
    for row, expert in ((0, 0), (4, 1), (5, 2), (9, 3)):
        alone_offs = torch.tensor([0] * expert + [1] * (4 - expert), dtype=torch.int32)
        alone, _ = launch_like_a_plan(ops.grouped_mm, x[row:row + 1].clone(), w, alone_offs, deterministic=True)
        assert torch.equal(alone[0].view(torch.int32), batch[row].view(torch.int32))


@pytest.mark.parametrize("pairs", [1, 13, 150])
def test_moe_routing_family(pairs):
    """The stable sort permutation and its inverse, and the cumulative expert counts, over expert ids with
    repeats, experts nobody chose and (offsets) an expert-parallel sentinel id past the last expert, at 1 pair,
    one tile and three tiles of pairs: exactly the references' integers."""
    ids = torch.randint(0, 6, (pairs,), generator=_gen(12))
    ids[ids == 2] = 4  # an expert nobody chose
    sorted_pairs, _ = launch_like_a_plan(ops.moe_sort, ids)
    assert torch.equal(sorted_pairs, ops.moe_sort(ids))
    perm, inverse = sorted_pairs
    assert torch.equal(ids[perm], torch.sort(ids).values) and torch.equal(perm[inverse], torch.arange(pairs))
    ids[-1] = 7  # a sentinel: counts for no expert of 7
    offs, _ = launch_like_a_plan(lambda x: ops.moe_offsets(x, 7), ids)
    assert torch.equal(offs, ops.moe_offsets(ids, 7))
    assert offs[-1].item() == pairs - 1 and offs.dtype == torch.int32
    route, _ = launch_like_a_plan(lambda x: ops.moe_route(x, 7), ids)  # both in one launch: [offs | perm | inverse]
    assert torch.equal(route, ops.moe_route(ids, 7)) and route.dtype == torch.int64
    assert torch.equal(route[:7], offs.long()) and torch.equal(route[7:].view(2, -1), ops.moe_sort(ids))


BMM_CASES = {  # a, b as the kernel reads them: broadcast batch dims, transposed views, 1-D operands, odd sizes
    "batched": lambda g: (torch.randn(2, 3, 33, 40, generator=g), torch.randn(2, 3, 40, 17, generator=g)),
    "broadcast": lambda g: (torch.randn(2, 1, 5, 24, generator=g), torch.randn(3, 24, 70, generator=g)),
    "transposed": lambda g: (torch.randn(4, 40, 9, generator=g).transpose(-1, -2),
                             torch.randn(4, 18, 40, generator=g).transpose(-1, -2)),
    "row vector": lambda g: (torch.randn(40, generator=g), torch.randn(3, 40, 20, generator=g)),
    "column vector": lambda g: (torch.randn(3, 7, 40, generator=g), torch.randn(40, generator=g)),
    "dot": lambda g: (torch.randn(130, generator=g), torch.randn(130, generator=g)),
    "three batch dims": lambda g: (torch.randn(2, 3, 1, 6, 16, generator=g), torch.randn(3, 4, 16, 5, generator=g)),
}


@pytest.mark.parametrize("case", list(BMM_CASES))
@pytest.mark.parametrize("device, deterministic", [("interpreter", False), ("sm_90", False), ("sm_80", True)])
def test_bmm_family(case, device, deterministic):
    """torch.matmul between activations at every shape form it takes, read through the operands' strides (no
    copies), with each device's tiles and the deterministic ones: fp32, the reference's values up to summation
    order."""
    a, b = BMM_CASES[case](_gen(14))
    out, _ = launch_like_a_plan(ops.bmm, a, b, device=INTERPRETER if device == "interpreter" else TARGETS[device],
                                deterministic=deterministic)
    torch.testing.assert_close(out, torch.matmul(a, b), **TOL)


def test_bmm_family_fp16():
    """16-bit operands: fp32 accumulation, one rounding at the store (the fp32 product of the same fp16 values,
    rounded once; a summation-order difference can move the rounding by one fp16 ulp, 2**-10 relative)."""
    g = _gen(15)
    a, b = (torch.randn(2, 50, 64, generator=g) / 8).half(), (torch.randn(2, 64, 30, generator=g) / 8).half()
    out, _ = launch_like_a_plan(ops.bmm, a, b, device=TARGETS["sm_90"])
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, torch.matmul(a.float(), b.float()).half(), atol=1e-3, rtol=2 ** -10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_family(dtype):
    """Top-k of each row against torch.topk: the same values, each index pointing at its value (fp32's distinct
    values: torch's indices), 3-D input, k = 1 and k = the whole row; ties take the lowest index first; -inf
    entries are ranked, not skipped."""
    x = torch.randn(2, 5, 37, generator=_gen(13)).to(dtype)
    for k in (1, 4, 37):
        packed, _ = launch_like_a_plan(lambda t: ops.topk_packed(t, k), x)  # noqa: B023
        values, indices = torch.topk(x.float(), k)
        assert torch.equal(packed[0], values), k
        if dtype == torch.float32:  # distinct values: the same indices (bf16 rounding makes ties, checked below)
            assert torch.equal(packed[1], indices.float()), k
        assert torch.equal(x.float().gather(-1, packed[1].long()), values), k
    ties = torch.tensor([[1.0, 3.0, 3.0, float("-inf"), 3.0, float("-inf")]])
    packed, _ = launch_like_a_plan(lambda t: ops.topk_packed(t, 5), ties)
    assert packed[1].tolist() == [[1.0, 2.0, 4.0, 0.0, 3.0]]
    assert packed[0].tolist() == [[3.0, 3.0, 3.0, 1.0, float("-inf")]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_family_folds_the_router(dtype):
    """softmax -> top-k -> renormalize (an MoE router, HF's norm_topk_prob) in the top-k launch, against torch's
    composition (the op's reference): the experts are a top-k of torch's probabilities (without softmax, torch's
    very indices; with it, two close logits may swap at equal-within-an-ulp probabilities) and the weights within
    4 fp32 ulps (the kernel's exp, two sums in another order and two divisions against torch's), for k = 1
    (weight exactly 1 when renormalized), 2 and 8 of 60 experts."""
    x = torch.randn(3, 4, 60, generator=_gen(14)).to(dtype)
    ulps = {"rtol": 4.8e-7, "atol": 0}
    for k in (1, 2, 8):
        for softmax, renorm in ((True, False), (True, True), (False, True)):
            packed, _ = launch_like_a_plan(lambda t: ops.topk_packed(t, k, softmax, renorm), x)  # noqa: B023
            probs = torch.softmax(x.float(), dim=-1) if softmax else x.float()
            values, indices = torch.topk(probs, k)
            torch.testing.assert_close(probs.gather(-1, packed[1].long()), values, **ulps)
            if not softmax and dtype == torch.float32:  # (bf16 ties: either order is a top-k, checked above)
                assert torch.equal(packed[1], indices.float()), (k, renorm)
            if renorm:
                values = values / values.sum(dim=-1, keepdim=True)
            torch.testing.assert_close(packed[0], values, **ulps)
            torch.testing.assert_close(packed[0], ops.topk_packed(x, k, softmax, renorm)[0], **ulps)
            if k == 1 and renorm:
                assert torch.equal(packed[0], torch.ones_like(packed[0]))


def test_fused_family_through_a_compiled_plan():
    """The generated pointwise/reduction family has no fixed op: a compiled function's plan launches it."""
    def f(x, y):
        return torch.softmax(x * 2 + y, dim=-1).sum(-1, keepdim=True) + x.amax(-1, keepdim=True)

    x, y = torch.randn(6, 50, generator=_gen(8)), torch.randn(6, 50, generator=_gen(9))
    cm = braze.compile(f)
    with recording_launches() as seen:
        out = cm(x, y)
    torch.testing.assert_close(out, f(x, y), **TOL)
    plan = cm.plan
    assert {s.launcher for s in plan.steps if s.kind == "fused"} == {"fused"}
    assert len(seen) == plan.launches > 0
    EXERCISED.add("fused")


@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
@pytest.mark.parametrize("policy", ["keydiff", "snapkv", "adakv", "chunkkv", "rkv"])
def test_kv_compress_family(policy, device):
    """One prefill layer's compression (scores, top-k, compaction kernels) = the reference: the compressed caches,
    starts and (rkv) the query ring bit for bit, the attention output passed through. sm_90: the GPU tiles."""
    from braze.ops.kv_compress import kv_compress_reference

    g = _gen(11)
    b, hq, hkv, p, d, window = 2, 4, 2, 40, 16, 4
    q, attn = torch.randn(b, hq, p, d, generator=g), torch.randn(b, hq, p, d, generator=g)
    kc, vc = torch.randn(b, hkv, 48, d, generator=g), torch.randn(b, hkv, 48, d, generator=g)
    kc[:, :, 5:9] = kc[:, :, 20:24]  # exact score ties
    cos, sin = _rope(b, p, d)
    kv_start = torch.tensor([0, 6], dtype=torch.int32)
    keep = torch.tensor([12, 20 if policy == "adakv" else 12])

    def state():
        return (torch.full((b, hkv, 24, d), 5.0), torch.full((b, hkv, 24, d), 5.0),
                torch.full((b, hkv), -1, dtype=torch.int32), torch.zeros(b, hq, window, d))

    ck, cv, start, ring = state()
    if policy == "rkv":
        fn = lambda a, q, kc, vc, ks, ck, cv, keep, st, ring, cos, sin: ops.kv_compress_recording(  # noqa: E731
            a, q, kc, vc, ks, ck, cv, keep, st, ring, 0.25, policy, window, cos, sin)
        args = (attn, q, kc, vc, kv_start, ck, cv, keep, start, ring, cos, sin)
    else:
        fn = lambda a, q, kc, vc, ks, ck, cv, keep, st, cos, sin: ops.kv_compress(  # noqa: E731
            a, q, kc, vc, ks, ck, cv, keep, st, 0.25, policy, window, cos, sin)
        args = (attn, q, kc, vc, kv_start, ck, cv, keep, start, cos, sin)
    out, _ = launch_like_a_plan(fn, *args, device=INTERPRETER if device == "interpreter" else TARGETS[device])
    want = state()
    kv_compress_reference(q, kc, vc, kv_start, want[0], want[1], keep, want[2], 0.25, policy, window, cos, sin,
                          want[3] if policy == "rkv" else None)
    assert torch.equal(out, attn)
    assert torch.equal(ck, want[0]) and torch.equal(cv, want[1]) and torch.equal(start, want[2])
    assert torch.equal(ring, want[3])


def test_kv_compress_family_records_queries():
    """braze::kv_record_query (R-KV decode / verify): the step's RoPE'd queries land in ring slots
    (cache_len + s) % window, one cache_len for the batch or one per row; the attention output passes through."""
    from braze.ops.kv_compress import record_query_reference

    g = _gen(12)
    b, hq, s, d, window = 2, 4, 3, 16, 4
    q, attn = torch.randn(b, hq, s, d, generator=g), torch.randn(b, hq, s, d, generator=g)
    cos, sin = _rope(b, s, d)
    for cache_len in (torch.tensor([6]), torch.tensor([2, 7])):
        ring, want = torch.zeros(b, hq, window, d), torch.zeros(b, hq, window, d)
        fn = lambda a, q, ring, cl, cos, sin: ops.kv_record_query(a, q, ring, cl, cos, sin)  # noqa: E731
        out, _ = launch_like_a_plan(fn, attn, q, ring, cache_len, cos, sin)
        record_query_reference(q, want, cache_len, cos, sin)
        assert torch.equal(out, attn)
        torch.testing.assert_close(ring, want, atol=1e-6, rtol=1e-6)  # fp32 RoPE: summation order only
        assert ring.abs().sum() > 0


def test_every_registered_family_is_exercised():
    """A family added to the registry without a test here fails: each has its `test_<family>_family...` (found by
    name: under pytest-xdist the tests of this module may run on different workers, so the set of families this
    worker launched, EXERCISED, is only a subset); what did run here was launched through the registry."""
    tested = {name.removeprefix("test_").split("_family")[0] for name in globals()
              if name.startswith("test_") and "_family" in name and name != "test_every_registered_family_is_exercised"}
    assert tested == set(FAMILIES) and EXERCISED <= set(FAMILIES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cached_conv_family(dtype):
    """A causal depthwise conv over the conv cache (LFM2's short conv in the generation plans) = the reference,
    output and cache bit for bit (both sum the taps in fp32 in the same order): a left-padded prefill (slots below
    kv_start read 0), a decode step reading the cache, and a draft tree whose nodes' taps follow their ancestors
    (per-row cache lengths); a strided input (the transposed projection), with and without a bias; LFM2's input
    and output gates folded in, bit for bit the separate multiplies; Qwen3.5's silu epilogue (an ulp of silu's
    formula from torch's)."""
    from braze.ops.conv_state import cached_conv1d_reference
    from braze.runtime.speculate import _row_layout
    from braze.runtime.suffix_tree import Draft

    g = _gen(15)
    b, c, taps, slots = 2, 40, 3, 24
    w = torch.randn(c, 1, taps, generator=g).to(dtype)
    bias = torch.randn(c, generator=g).to(dtype)
    kv_start = torch.tensor([0, 2], dtype=torch.int32)
    cache, want = torch.zeros(b, 1, slots, c, dtype=dtype), torch.zeros(b, 1, slots, c, dtype=dtype)

    def check(x, cache_len, mask=None, with_bias=True, gates=None, activation="none"):
        gin, gout = gates or (None, None)
        fn = (lambda x, w, bias, cache, cl, ks, m, gi, go: ops.cached_conv1d(  # noqa: E731
            x, w, bias if with_bias else None, cache, cl, ks, m, gi, go, activation))
        out, family = launch_like_a_plan(fn, x, w, bias, cache, cache_len, kv_start, mask, gin, gout)
        ref = cached_conv1d_reference(x, w, bias if with_bias else None, want, cache_len, kv_start, mask, gin, gout,
                                      activation)
        assert family.name == "cached_conv" and torch.equal(cache, want)
        if activation == "none":
            assert torch.equal(out, ref)
        else:  # Triton's x * sigmoid(x) against torch's silu: an ulp apart
            torch.testing.assert_close(out, ref, rtol=1e-6 if dtype == torch.float32 else 1e-3, atol=1e-6)
            plain = cached_conv1d_reference(x, w, bias if with_bias else None, want.clone(), cache_len, kv_start)
            assert torch.equal(torch.nn.functional.silu(plain), ref)
        if gates is not None:  # the gates as separate torch multiplies, each rounded to the dtype
            plain = cached_conv1d_reference(x * gin, w, bias if with_bias else None, want.clone(), cache_len,
                                            kv_start, mask)
            assert torch.equal(out, gout * plain)
        return out

    prompt = torch.randn(b, 6, c, generator=g).to(dtype).transpose(1, 2)  # [B, C, S] with channel stride 1
    out = check(prompt, torch.tensor([0]))
    # row 1's first two slots are padding: its first real position sums only its own tap and the bias
    torch.testing.assert_close(out[1, :, 2].float(), (w[:, 0, -1].float() * prompt[1, :, 2].float()
                                                      + bias.float()).to(dtype).float())
    check(torch.randn(b, c, 1, generator=g).to(dtype), torch.tensor([6]), with_bias=False)
    draft = Draft(tokens=[5, 6, 7, 8], parents=[-1, 0, 0, 2])
    _, _, _, tree = _row_layout(draft, 4)
    mask = torch.stack([tree, torch.eye(5, dtype=torch.bool)])  # row 1: padding nodes (each sees itself)
    check(torch.randn(b, c, 5, generator=g).to(dtype), torch.tensor([7, 9]), mask)
    assert cache[:, :, 10:].abs().sum() > 0  # the tree's nodes were written at their slots
    # LFM2's gates (B * x in, C * out): views of one projection, as the plans pass them
    bcx = torch.randn(b, 3, 3 * c, generator=g).to(dtype).transpose(1, 2)
    gin, x, gout = bcx.chunk(3, dim=1)
    check(x, torch.tensor([12]), gates=(gin, gout))
    check(x[:, :, :1], torch.tensor([15]), gates=(gin[:, :, :1], gout[:, :, :1]), with_bias=False)
    # Qwen3.5's silu(conv(...)) in the kernel's epilogue: prefill, then a decode step
    check(torch.randn(b, c, 4, generator=g).to(dtype), torch.tensor([16]), activation="silu")
    check(torch.randn(b, c, 1, generator=g).to(dtype), torch.tensor([20]), activation="silu", with_bias=False)


def _conv_input(g, shape, layout="contiguous"):
    """x in the layout a plan may hand the kernel: contiguous, channels-last (a permuted view of NHWC storage), or
    a conv1d input read as the transpose of a [N, L, C] sequence (a transformer's activations)."""
    if layout == "channels_last":
        return torch.randn(*shape, generator=g).to(memory_format=torch.channels_last)
    if layout == "sequence":
        return torch.randn(shape[0], shape[2], shape[1], generator=g).transpose(1, 2)
    return torch.randn(*shape, generator=g)


CONV_CASES = {  # x shape, weight shape, stride, padding, dilation, groups, bias, x layout
    "3x3 over 64 channels": ((2, 64, 8, 8), (32, 64, 3, 3), 1, 1, 1, 1, True, "contiguous"),
    "stride 2": ((2, 64, 9, 9), (48, 64, 3, 3), 2, 1, 1, 1, True, "contiguous"),
    "dilation 2": ((2, 32, 8, 7), (16, 32, 3, 3), 1, 2, 2, 1, True, "contiguous"),
    "groups 2": ((2, 64, 6, 6), (32, 32, 3, 3), 1, 1, 1, 2, True, "contiguous"),
    "1x1 over 128 channels": ((2, 128, 5, 5), (40, 128, 1, 1), 1, 0, 1, 1, True, "contiguous"),
    "conv1d over 256 channels": ((2, 256, 11), (24, 256, 3), 1, 1, 1, 1, True, "sequence"),
    "no bias, odd size": ((2, 48, 7, 9), (20, 48, 3, 3), 1, 0, 1, 1, False, "contiguous"),
    "channels-last input": ((2, 64, 7, 7), (64, 64, 3, 3), 1, 1, 1, 1, False, "channels_last"),
    "3-channel 7x7 stem (flat K)": ((2, 3, 13, 11), (16, 3, 7, 7), 2, 3, 1, 1, True, "contiguous"),
    "4 channels a group (flat K)": ((2, 32, 6, 6), (32, 4, 3, 3), 1, 1, 1, 8, True, "contiguous"),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("device, deterministic", [("interpreter", False), ("sm_90", False), ("sm_80", True)])
def test_conv_family(case, dtype, device, deterministic):
    """A convolution too wide to unroll as an implicit GEMM (braze::conv), with the interpreter's tiles, a GPU's and
    the deterministic ones (ROW_DOT under the interpreter), against torch's convolution of the same values in fp32.
    fp32: the kernel's products are torch's and only the summation order differs (outputs O(1), K <= 768 terms:
    ~1e-6), so TOL. fp16: products exact in fp32, fp32 sums, one rounding at the store, so the fp32 result rounded
    to fp16 up to one fp16 ulp (2**-10 relative) where the summation order moves the rounding. The output keeps
    torch's layout (channels-last in, channels-last out)."""
    xs, ws, stride, padding, dilation, groups, has_bias, layout = CONV_CASES[case]
    g = _gen(16)
    spatial = len(ws) - 2
    x = _conv_input(g, xs, layout).to(dtype)
    w = (torch.randn(*ws, generator=g) / math.sqrt(math.prod(ws[1:]))).to(dtype)
    b = torch.randn(ws[0], generator=g).to(dtype) if has_bias else None
    params = ([stride] * spatial, [padding] * spatial, [dilation] * spatial, groups)
    fn = (lambda x, w, b: ops.conv(x, w, b, *params)) if has_bias else (lambda x, w: ops.conv(x, w, None, *params))
    out, family = launch_like_a_plan(fn, *((x, w, b) if has_bias else (x, w)), deterministic=deterministic,
                                     device=INTERPRETER if device == "interpreter" else TARGETS[device])
    want = torch.ops.aten.convolution(x.float(), w.float(), None if b is None else b.float(), *params[:3], False,
                                      [0] * spatial, groups)
    assert family.name == "conv" and out.dtype == dtype and out.stride() == want.stride()
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, **TOL)
    else:
        torch.testing.assert_close(out, want.to(dtype), atol=1e-3, rtol=2 ** -10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_delta_family(dtype):
    """Gated DeltaNet (Qwen3.5's linear attention) = the reference and HF's own functions: the forward op from a
    zero state (more value heads than key heads, L2-normalized q / k); the cached op over a state cache in a
    left-padded prefill (padding leaves the state at zero), then a decode step per row resuming from the state, and
    a row whose cache holds nothing before the call starting from zero. fp32: the state's reductions in another
    order than torch's (1e-5); fp16 inputs, fp32 math, the output rounded once (2 fp16 ulps)."""
    from transformers.models.qwen3_5.modeling_qwen3_5 import (
        torch_chunk_gated_delta_rule,
        torch_recurrent_gated_delta_rule,
    )

    from braze.ops.recurrent_state import cached_gated_delta_rule_reference

    g = _gen(16)
    b, s, hk, h, dk, dv = 2, 9, 2, 4, 16, 24
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)

    def inputs(seq):
        q, k = (torch.randn(b, seq, hk, dk, generator=g).to(dtype) for _ in range(2))
        v = torch.randn(b, seq, h, dv, generator=g).to(dtype)
        decay = -torch.rand(b, seq, h, generator=g).to(dtype)  # log decays <= 0, as HF's g
        beta = torch.rand(b, seq, h, generator=g).to(dtype)
        return q, k, v, decay, beta

    scale = dk ** -0.5
    q, k, v, decay, beta = inputs(s)
    out, family = launch_like_a_plan(lambda *t: ops.gated_delta_rule(*t, scale, True), q, k, v, decay, beta)
    assert family.name == "gated_delta" and out.dtype == dtype
    want = ops.gated_delta_rule(q, k, v, decay, beta, scale, True)
    torch.testing.assert_close(out, want, **tol)
    for hf in (torch_chunk_gated_delta_rule, torch_recurrent_gated_delta_rule):
        torch.testing.assert_close(out, hf(q, k, v, decay, beta, use_qk_l2norm_in_kernel=True)[0], **tol)

    kv_start = torch.tensor([0, 3], dtype=torch.int32)
    # a previous request's state: a row with nothing before the call starts from zero
    state, ref_state = torch.full((b, h, dk, dv), 7.0), torch.full((b, h, dk, dv), 7.0)

    def cached(q, k, v, decay, beta, cache_len):
        fn = lambda q, k, v, d, bt, st, cl, ks: ops.cached_gated_delta_rule(q, k, v, d, bt, st, cl, ks, scale, True)  # noqa: E731
        got, _ = launch_like_a_plan(fn, q, k, v, decay, beta, state, cache_len, kv_start)
        ref = cached_gated_delta_rule_reference(q, k, v, decay, beta, ref_state, cache_len, kv_start, scale, True)
        torch.testing.assert_close(got, ref, **tol)
        torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-5)
        return got

    got = cached(q, k, v, decay, beta, torch.tensor([0]))
    assert not got[1, :3].any()  # padding slots output zero
    # row 1 is row 0's prompt without its first 3 tokens: HF runs the unpadded suffix from a zero state
    solo = torch_chunk_gated_delta_rule(*(t[1:, 3:] for t in (q, k, v, decay, beta)), use_qk_l2norm_in_kernel=True,
                                        output_final_state=True)
    torch.testing.assert_close(got[1:, 3:], solo[0], **tol)
    torch.testing.assert_close(state[1:], solo[1], rtol=1e-5, atol=1e-5)
    step = inputs(1)
    got = cached(*step, torch.tensor([s]))
    hf_step = torch_recurrent_gated_delta_rule(*step, initial_state=solo[1].expand(b, -1, -1, -1).clone(),
                                               output_final_state=True, use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(got[1:], hf_step[0][1:], **tol)
    cached(*inputs(2), torch.tensor([s + 1, 3]))  # per-row lengths: row 1 has nothing before slot 3 -> zero state


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_delta_family_per_channel_decay(dtype):
    """Kimi Delta Attention (Kimi-Linear, Bailing-hybrid): the same rule with one decay per key channel, g
    [B, S, H, Dk]: the kernel = the reference = HF's chunked and recurrent functions (tolerances as above)."""
    from transformers.models.kimi_linear.modeling_kimi_linear import (
        chunk_kimi_delta_attention,
        recurrent_kimi_delta_attention,
    )

    g = _gen(17)
    b, s, h, dk, dv = 2, 7, 3, 16, 16
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-3)
    q, k = (torch.randn(b, s, h, dk, generator=g).to(dtype) for _ in range(2))
    v = torch.randn(b, s, h, dv, generator=g).to(dtype)
    decay = -torch.rand(b, s, h, dk, generator=g)  # fp32, as Kimi's forget gate hands it over
    beta = torch.rand(b, s, h, generator=g).to(dtype)
    scale = dk ** -0.5
    out, family = launch_like_a_plan(lambda *t: ops.gated_delta_rule(*t, scale, True), q, k, v, decay, beta)
    assert family.name == "gated_delta"
    torch.testing.assert_close(out, ops.gated_delta_rule(q, k, v, decay, beta, scale, True), **tol)
    for hf in (chunk_kimi_delta_attention, recurrent_kimi_delta_attention):
        want = hf(q, k, v, g=decay, beta=beta, initial_state=None, output_final_state=False,
                  use_qk_l2norm_in_kernel=True)[0]
        torch.testing.assert_close(out, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gated_delta_family_without_delta_is_mamba2_ssd(dtype):
    """Without beta the family is decayed linear attention, Mamba2's SSD scan: the kernel = the reference (fp32
    inputs as HF casts them: 1e-5), over the state cache too (a left-padded prefill, then a decode step resuming
    from the state); and the substitute braze captures for HF's `mamba2_chunk_scan` (dt's bias / softplus / clamp,
    the scan, the D skip) = HF's chunked function within 1e-5 (summation order), at 9 tokens (HF pads to its chunk
    of 4) with 2 groups of B / C over 4 heads."""
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

    from braze.compiler.hf_functions import SUBSTITUTIONS
    from braze.ops.recurrent_state import cached_gated_delta_rule_reference

    g = _gen(18)
    b, s, heads, groups, p, n = 2, 9, 4, 2, 8, 16
    x = torch.randn(b, s, heads, p, generator=g).to(dtype)
    dt = torch.randn(b, s, heads, generator=g).to(dtype)
    a_log = -torch.rand(heads, generator=g) - 0.5
    bm, cm = (torch.randn(b, s, groups, n, generator=g).to(dtype) for _ in range(2))
    d, dt_bias = torch.randn(heads, generator=g), torch.randn(heads, generator=g)
    ours = SUBSTITUTIONS["mamba2_chunk_scan"](mamba2_chunk_scan)
    want = mamba2_chunk_scan(x, dt, a_log, bm, cm, 4, D=d, dt_bias=dt_bias, dt_softplus=True)
    got = ours(x, dt, a_log, bm, cm, 4, D=d, dt_bias=dt_bias, dt_softplus=True)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    q, k = cm.float(), bm.float()
    v, decay = x.float() * dt.float()[..., None].sigmoid(), dt.float().sigmoid() * a_log  # any dt > 0
    out, family = launch_like_a_plan(lambda *t: ops.gated_delta_rule(*t, None, 1.0, False), q, k, v, decay)
    assert family.name == "gated_delta"
    torch.testing.assert_close(out, ops.gated_delta_rule(q, k, v, decay, None, 1.0, False), rtol=1e-5, atol=1e-5)
    kv_start = torch.tensor([0, 2], dtype=torch.int32)
    state, ref_state = torch.zeros(b, heads, n, p), torch.zeros(b, heads, n, p)
    for inputs, cache_len in (((q, k, v, decay), torch.tensor([0])),
                              (tuple(t[:, :1] for t in (q, k, v, decay)), torch.tensor([s]))):
        fn = lambda q, k, v, dc, st, cl, ks: ops.cached_gated_delta_rule(q, k, v, dc, None, st, cl, ks, 1.0, False)  # noqa: E731
        got, _ = launch_like_a_plan(fn, *inputs, state, cache_len, kv_start)
        ref = cached_gated_delta_rule_reference(*inputs, None, ref_state, cache_len, kv_start, 1.0, False)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-5)


def test_gated_delta_family_as_mamba_selective_scan():
    """Mamba's selective scan as the gated-delta op (one head whose value dim is the channels, each state entry
    decaying by exp(A[d, n] dt_d) from decay_weight): the substitute braze captures for HF's
    `mamba_selective_scan` (dt's bias and softplus, the scan, the D skip, the silu(z) gate) = HF's sequential
    function within 1e-5 (fp32: the same products in another association), and its kernel launch = the op's
    reference, over the state cache too."""
    from transformers.models.mamba.modeling_mamba import mamba_selective_scan

    from braze.compiler.hf_functions import SUBSTITUTIONS

    g = _gen(19)
    b, channels, s, n = 2, 24, 7, 16
    x, dt, z = (torch.randn(b, channels, s, generator=g) for _ in range(3))
    a = -torch.rand(channels, n, generator=g) - 0.1
    bm, cm = (torch.randn(b, n, s, generator=g) for _ in range(2))
    d, bias = torch.randn(channels, generator=g), torch.randn(channels, generator=g)
    want = mamba_selective_scan(x, dt, a, bm, cm, D=d, z=z, delta_bias=bias, delta_softplus=True)
    got = SUBSTITUTIONS["mamba_selective_scan"](mamba_selective_scan)(x, dt, a, bm, cm, D=d, z=z, delta_bias=bias,
                                                                      delta_softplus=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    q, k = (t.transpose(1, 2).unsqueeze(2).contiguous() for t in (cm, bm))
    step = torch.nn.functional.softplus(dt + bias[:, None]).transpose(1, 2).unsqueeze(2)  # [B, S, 1, channels]
    v, weight = step * x.transpose(1, 2).unsqueeze(2), a.t().unsqueeze(0)
    fn = lambda q, k, v, dt, w: ops.gated_delta_rule(q, k, v, dt, None, 1.0, False, w)  # noqa: E731
    out, family = launch_like_a_plan(fn, q, k, v, step, weight)
    assert family.name == "gated_delta" and out.shape == (b, s, 1, channels)
    torch.testing.assert_close(out, ops.gated_delta_rule(q, k, v, step, None, 1.0, False, weight), rtol=1e-5,
                               atol=1e-5)
    # over the state cache [B, 1, N, channels]: a left-padded prefill, then a decode step resuming from it
    from braze.ops.recurrent_state import cached_gated_delta_rule_reference

    kv_start = torch.tensor([0, 2], dtype=torch.int32)
    state, ref_state = torch.zeros(b, 1, n, channels), torch.zeros(b, 1, n, channels)
    for inputs, cache_len in (((q, k, v, step), torch.tensor([0])),
                              (tuple(t[:, :1] for t in (q, k, v, step)), torch.tensor([s]))):
        fn = lambda q, k, v, dt, st, cl, ks, w: ops.cached_gated_delta_rule(  # noqa: E731
            q, k, v, dt, None, st, cl, ks, 1.0, False, w)
        got, _ = launch_like_a_plan(fn, *inputs, state, cache_len, kv_start, weight)
        ref = cached_gated_delta_rule_reference(*inputs, None, ref_state, cache_len, kv_start, 1.0, False, weight)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(state, ref_state, rtol=1e-5, atol=1e-5)
