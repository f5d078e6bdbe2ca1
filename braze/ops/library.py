"""The braze::* custom ops.

Every op that a pass introduces lives here, registered once with torch.library: a plain-torch reference
implementation (what the `reference` executor and every per-pass golden check run) and a fake
implementation (so `node.meta["val"]` stays correct). Kernels are lowerings of these ops, never the
other way round.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("none", "silu", "gelu", "gelu_tanh", "relu", "relu2")  # relu2: relu(x)^2 (Nemotron, Persimmon)


def apply_activation(y: Tensor, activation: str) -> Tensor:
    if activation == "none":
        return y
    if activation == "silu":
        return F.silu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if activation == "relu":
        return F.relu(y)
    if activation == "relu2":
        return F.relu(y).square()
    raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")


def scales_in_fp32(x_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """Whether an RMSNorm of x_dtype with a weight of weight_dtype scales in fp32 and rounds once (Gemma's
    `(x * rstd * (1 + w.float())).type_as(x)`: an fp32 weight on a 16-bit input) rather than rounding the normed
    value to x's dtype before the scale (Llama's `w * (x * rstd).to(dtype)`)."""
    return weight_dtype == torch.float32 and x_dtype != torch.float32


def rms_norm_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype an RMSNorm (or a linear with its norm prologue) returns: x's, or the promotion of x's and the
    weight's in Llama's form (its scale multiplies in the weight's dtype)."""
    if weight_dtype is None or scales_in_fp32(x_dtype, weight_dtype):
        return x_dtype
    return torch.promote_types(weight_dtype, x_dtype)


def layer_norm_reference(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """HF LayerNorm in any dtype: statistics, centring, scale and shift in fp32, one rounding to x's dtype (what
    nn.LayerNorm does on 16-bit input, and what HF's hand-written ones (Cohere's) spell out)."""
    h = x.to(torch.float32)
    h = (h - h.mean(-1, keepdim=True)) * torch.rsqrt(h.var(-1, correction=0, keepdim=True) + eps)
    h = h * weight.to(torch.float32)
    if bias is not None:
        h = h + bias.to(torch.float32)
    return h.to(x.dtype)


def norm_reference(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float, layer_norm: bool) -> Tensor:
    """The norm a matmul prologue applies: LayerNorm (layer_norm) or RMSNorm."""
    return layer_norm_reference(x, weight, bias, eps) if layer_norm else rms_norm_reference(x, weight, eps)


def norm_dtype(x_dtype: torch.dtype, weight_dtype: torch.dtype | None, layer_norm: bool) -> torch.dtype:
    """What a norm prologue returns: a LayerNorm rounds to x's dtype; an RMSNorm as rms_norm_dtype says."""
    return x_dtype if layer_norm else rms_norm_dtype(x_dtype, weight_dtype)


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """HF Llama RMSNorm: fp32 statistics, cast back to the input dtype, then scale by the weight. An fp32 weight
    on a 16-bit x is Gemma's form (scales_in_fp32): the scale in fp32, one rounding to x's dtype."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if scales_in_fp32(x.dtype, weight.dtype):
        return (h * weight).to(x.dtype)
    return weight * h.to(x.dtype)


def qk_norm_reference(q: Tensor, k: Tensor, q_norm_weight: Tensor | None, k_norm_weight: Tensor | None,
                      eps: float, q_norm_bias: Tensor | None = None, k_norm_bias: Tensor | None = None,
                      layer_norm: bool = False) -> tuple[Tensor, Tensor]:
    """q and k [B, H, S, D] normed before attention, each by its weight: a weight of D normalizes each head (Qwen3,
    Gemma 3); [H, D] each head with its own row (Cohere); a weight of H * D normalizes all heads of a position
    together (OLMo 2's norms over the whole projection, which HF applies before splitting the heads). RMSNorms, or
    with layer_norm LayerNorms with the biases (laid out as the weights: Persimmon's [D], Cohere's none)."""
    return (_norm_heads(q, q_norm_weight, q_norm_bias, eps, layer_norm),
            _norm_heads(k, k_norm_weight, k_norm_bias, eps, layer_norm))


def qk_norm_form(weight_shape: Sequence[int], head_dim: int) -> str:
    """How a q / k norm's weight is laid out: "head" ([D], every head alike), "rows" ([H, D], a row per head) or
    "whole" ([H * D]: one norm over all heads of a position)."""
    if len(weight_shape) == 2:
        return "rows"
    return "head" if weight_shape[0] == head_dim else "whole"


def _norm_heads(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, layer_norm: bool) -> Tensor:
    if weight is None:
        return x
    form = qk_norm_form(weight.shape, x.shape[-1])
    if form == "rows":  # broadcast over the positions
        weight, bias = weight[:, None, :], (bias[:, None, :] if bias is not None else None)
    if form != "whole":
        return norm_reference(x, weight, bias, eps, layer_norm)
    b, h, s, d = x.shape
    flat = norm_reference(x.transpose(1, 2).reshape(b, s, h * d), weight, bias, eps, layer_norm)
    return flat.reshape(b, s, h, d).transpose(1, 2)


@torch.library.custom_op("braze::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_fake
def _rms_norm_fake(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x, dtype=rms_norm_dtype(x.dtype, weight.dtype))


@torch.library.custom_op("braze::layer_norm", mutates_args=())
def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    return layer_norm_reference(x, weight, bias, eps)


@layer_norm.register_fake
def _layer_norm_fake(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("braze::linear", mutates_args=())
def linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    norm_weight: Tensor | None = None,
    eps: float = 0.0,
    activation: str = "none",
    residual: Tensor | None = None,
    layer_norm: bool = False,
    norm_bias: Tensor | None = None,
) -> Tensor:
    """y = residual + act(F.linear(norm?(x), weight, bias)): one matmul with its prologue and epilogue. The norm
    (norm_weight set) is an RMSNorm, or a LayerNorm with norm_bias when layer_norm."""
    if norm_weight is not None:
        x = norm_reference(x, norm_weight, norm_bias, eps, layer_norm)
    y = apply_activation(F.linear(x, weight, bias), activation)
    if residual is not None:
        y = residual + y
    return y


@linear.register_fake
def _linear_fake(x, weight, bias=None, norm_weight=None, eps=0.0, activation="none", residual=None,
                 layer_norm=False, norm_bias=None):
    dtype = norm_dtype(x.dtype, None if norm_weight is None else norm_weight.dtype, layer_norm)
    out = x.new_empty(*x.shape[:-1], weight.shape[0], dtype=dtype)
    if residual is not None:
        out = torch.empty_like(
            torch.broadcast_tensors(out, residual)[0], dtype=torch.promote_types(dtype, residual.dtype)
        )
    return out


@torch.library.custom_op("braze::linear_glu", mutates_args=())
def linear_glu(
    x: Tensor,
    gate_weight: Tensor,
    up_weight: Tensor,
    norm_weight: Tensor | None = None,
    eps: float = 0.0,
    activation: str = "silu",
    layer_norm: bool = False,
    norm_bias: Tensor | None = None,
) -> Tensor:
    """act(x @ Wg^T) * (x @ Wu^T): gate and up projections merged into one matmul (SwiGLU / GeGLU)."""
    if norm_weight is not None:
        x = norm_reference(x, norm_weight, norm_bias, eps, layer_norm)
    return apply_activation(F.linear(x, gate_weight), activation) * F.linear(x, up_weight)


@linear_glu.register_fake
def _linear_glu_fake(x, gate_weight, up_weight, norm_weight=None, eps=0.0, activation="silu", layer_norm=False,
                     norm_bias=None):
    dtype = norm_dtype(x.dtype, None if norm_weight is None else norm_weight.dtype, layer_norm)
    return x.new_empty(*x.shape[:-1], gate_weight.shape[0], dtype=dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, S, D]; cos/sin [B, S, D] (HF rotate_half convention). fp32 cos / sin on a 16-bit x (OLMo 2's
    rotary table stays fp32): the rotation in fp32, one rounding to x's dtype, as HF's `.to(q_type)` after it."""
    out = x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)
    return out.to(x.dtype) if scales_in_fp32(x.dtype, cos.dtype) else out


def interleaved_rope_reference(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-J / Cohere rotary (rotate_every_two: pairs (2j, 2j + 1)); x [B, H, S, D], cos/sin [B, S, D]. Equal to
    rope_reference over head dims permuted [0, 2, .., 1, 3, ..] (braze/passes/interleaved_rope.py relies on it)."""
    rot = torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)
    return x * cos.unsqueeze(1) + rot * sin.unsqueeze(1)


@torch.library.custom_op("braze::rope", mutates_args=())
def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return rope_reference(x, cos, sin)


@rope.register_fake
def _rope_fake(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    dtype = x.dtype if scales_in_fp32(x.dtype, cos.dtype) else torch.promote_types(x.dtype, cos.dtype)
    return torch.empty_like(x, dtype=dtype, memory_format=torch.contiguous_format)


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    causal: bool,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Softmax attention with native GQA (k/v may have fewer heads) and optional RoPE on q and k.

    Causal alignment is bottom-right: query i sits at position Skv - Sq + i, as when prefill continues a cache.
    """
    if cos is not None:
        q = rope_reference(q, cos[:, -q.shape[2] :], sin[:, -q.shape[2] :])
        k = rope_reference(k, cos, sin)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    mask = attn_mask
    if causal:
        sq, skv = q.shape[2], k.shape[2]
        keep = torch.ones(sq, skv, dtype=torch.bool, device=q.device).tril(diagonal=skv - sq)
        mask = (
            keep if mask is None else (mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, -math.inf))
        )
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@torch.library.custom_op("braze::attention", mutates_args=())
def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    causal: bool,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
    attn_mask: Tensor | None = None,
) -> Tensor:
    """Flash attention [B, Hq, Sq, D] over k/v [B, Hkv, Skv, D]; the output is laid out [B, Sq, Hq, D]."""
    out = attention_reference(q, k, v, scale, causal, cos, sin, attn_mask)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@attention.register_fake
def _attention_fake(q, k, v, scale, causal, cos=None, sin=None, attn_mask=None):
    b, h, s, _ = q.shape
    return q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)


def _write_and_read_cache(q, k, v, cos, sin, k_cache, v_cache, cache_len):
    """RoPE q and k, write k/v into the cache at [cache_len, cache_len + S); return roped q, the cached keys and
    values up to the last new slot (GQA-expanded) and cache_len. Attention runs in the wider of q's and the
    cache's dtype (kv_dtype="float32" on a 16-bit model: RoPE, the cache and the scores in fp32), as the kernels
    do; callers cast the output back to q's dtype."""
    start = int(cache_len.reshape(-1)[0])
    s = q.shape[2]
    work = torch.promote_types(q.dtype, k_cache.dtype)
    q = rope_reference(q.to(work), cos, sin)
    k_cache[:, :, start:start + s] = rope_reference(k.to(work), cos, sin).to(k_cache.dtype)
    v_cache[:, :, start:start + s] = v.to(v_cache.dtype)
    keys = k_cache[:, :, :start + s].to(work)
    values = v_cache[:, :, :start + s].to(work)
    group = q.shape[1] // keys.shape[1]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    return q, keys, values, start


def _masked_attention(q, keys, values, visible, kv_start, scale):
    """Softmax attention where `visible` [Sq, Skv] is and keys >= kv_start[b] ([B]) or kv_start[b, h] ([B, Hkv]:
    a compressed cache whose heads hold different lengths); a query seeing nothing gives 0."""
    b = q.shape[0]
    kpos = torch.arange(keys.shape[2], device=q.device)
    start = kv_start.reshape(b, -1).to(kpos.dtype)
    if start.shape[1] > 1:
        start = start.repeat_interleave(q.shape[1] // start.shape[1], dim=1)
    visible = visible[None, None] & (kpos[None, None, None, :] >= start[:, :, None, None])
    scores = (q.float() @ keys.float().transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~visible, -math.inf), dim=-1).nan_to_num(0.0)
    return (probs @ values.float()).to(q.dtype)


def cached_attention_reference(q, k, v, cos, sin, k_cache, v_cache, cache_len, kv_start, scale):
    """RoPE q and k, write k/v into the cache at [cache_len, cache_len + S), attend causally over the cache.

    Row b's keys below kv_start[b] are left padding and masked; a query with no visible key outputs 0.
    """
    dtype = q.dtype
    q, keys, values, start = _write_and_read_cache(q, k, v, cos, sin, k_cache, v_cache, cache_len)
    qpos = torch.arange(start, start + q.shape[2], device=q.device)[:, None]
    kpos = torch.arange(keys.shape[2], device=q.device)[None, :]
    return _masked_attention(q, keys, values, kpos <= qpos, kv_start, scale).to(dtype)


@torch.library.custom_op("braze::cached_attention", mutates_args=("k_cache", "v_cache"))
def cached_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_len: Tensor,
    kv_start: Tensor,
    scale: float,
    q_norm_weight: Tensor | None = None,
    k_norm_weight: Tensor | None = None,
    qk_norm_eps: float = 0.0,
) -> Tensor:
    """Attention over a static KV cache owned by the runtime; output laid out [B, S, Hq, D] like attention.
    q_norm_weight / k_norm_weight: q and k RMS-normed over each head first (Qwen3's q_norm / k_norm, folded into
    the prefill plan's cache write, passes/prefill.py)."""
    q, k = qk_norm_reference(q, k, q_norm_weight, k_norm_weight, qk_norm_eps)
    out = cached_attention_reference(q, k, v, cos, sin, k_cache, v_cache, cache_len, kv_start, scale)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@cached_attention.register_fake
def _cached_attention_fake(q, k, v, cos, sin, k_cache, v_cache, cache_len, kv_start, scale, q_norm_weight=None,
                           k_norm_weight=None, qk_norm_eps=0.0):
    b, h, s, _ = q.shape
    return q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)


def tree_cached_attention_reference(q, k, v, cos, sin, k_cache, v_cache, cache_len, kv_start, tree_mask, scale):
    """Verify attention for a draft tree: like cached_attention, but new token i sees new token j only where
    tree_mask[(b,) i, j] (itself and its ancestors); every cached slot in [kv_start, cache_len) stays visible.
    cache_len is [1] (one length) or [B] (rows of a batched verify step hold different lengths)."""
    bsz = q.shape[0]
    lens = cache_len.reshape(-1).expand(bsz)
    masks = tree_mask.bool().expand(bsz, *tree_mask.shape[-2:])
    outs = []
    for b in range(bsz):  # one row at a time: each has its own write offset and tree
        rows = slice(b, b + 1)
        qb, keys, values, start = _write_and_read_cache(q[rows], k[rows], v[rows], cos[rows], sin[rows],
                                                        k_cache[rows], v_cache[rows], lens[b])
        visible = torch.zeros(qb.shape[2], keys.shape[2], dtype=torch.bool, device=q.device)
        visible[:, :start] = True
        visible[:, start:] = masks[b]
        start = kv_start[rows] if kv_start.dim() == 2 else kv_start.reshape(-1)[rows]  # [B, Hkv]: per kv head
        outs.append(_masked_attention(qb, keys, values, visible, start, scale).to(q.dtype))
    return torch.cat(outs)


@torch.library.custom_op("braze::tree_cached_attention", mutates_args=("k_cache", "v_cache"))
def tree_cached_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_len: Tensor,
    kv_start: Tensor,
    tree_mask: Tensor,
    scale: float,
) -> Tensor:
    """Tree-verify attention over the static KV cache; output laid out [B, S, Hq, D] like attention."""
    out = tree_cached_attention_reference(q, k, v, cos, sin, k_cache, v_cache, cache_len, kv_start, tree_mask, scale)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@tree_cached_attention.register_fake
def _tree_cached_attention_fake(q, k, v, cos, sin, k_cache, v_cache, cache_len, kv_start, tree_mask, scale):
    b, h, s, _ = q.shape
    return q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)


# ---- the general path: attention that the flash / cached-attention kernels do not cover ------------------------
# Partial or no rotary (q and k arrive position-encoded), learned or absolute positions, logit softcapping, sliding
# windows and arbitrary static masks (an additive bias indexed by position): every decoder-only attention HF runs
# eagerly fits here, so a compile never refuses one. These ops run their references eagerly (listed in the report).
def _expand_kv(keys: Tensor, values: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    group = heads // keys.shape[1]
    if group > 1:
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
    return keys, values


def _general_softmax(q: Tensor, keys: Tensor, values: Tensor, visible: Tensor, scale: float, softcap: float,
                     bias: Tensor | None, sinks: Tensor | None = None) -> Tensor:
    """HF eager attention order: scores * scale, softcap (tanh(s / c) * c), + bias, masked fp32 softmax, @ v.
    `visible` and `bias` broadcast against [B, H, Sq, Skv]; a query that sees nothing outputs 0. `sinks` [H]
    (gpt-oss): one more logit per head in the softmax, attached to no value (it only takes probability mass)."""
    keys, values = _expand_kv(keys, values, q.shape[1])
    scores = (q.float() @ keys.float().transpose(-1, -2)) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias.float()
    scores = scores.masked_fill(~visible, -math.inf)
    if sinks is not None:
        sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ values.float()).to(q.dtype)


def alibi_bias(slopes: Tensor, qpos: Tensor, kpos: Tensor) -> Tensor:
    """ALiBi's logit bias [1, H, Sq, Skv]: slope_h * (key position - query position), in fp32. HF adds slope_h *
    (key position) (Bloom) or slope_h * (key position - last position) (MPT); the softmax drops the difference, a
    constant per query row."""
    dist = (kpos[None, :] - qpos[:, None]).float()
    return slopes.float().reshape(1, -1, 1, 1) * dist[None, None]


def _split_mask(attn_mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """(visible, additive bias) of an SDPA-style mask (bool: where to attend; float: added to the scores)."""
    if attn_mask is None:
        return None, None
    if attn_mask.dtype == torch.bool:
        return attn_mask, None
    return attn_mask > torch.finfo(attn_mask.dtype).min / 2, attn_mask


def general_attention_reference(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, softcap: float = 0.0,
                                window: int = 0, cos: Tensor | None = None, sin: Tensor | None = None,
                                attn_mask: Tensor | None = None, sinks: Tensor | None = None,
                                alibi: Tensor | None = None) -> Tensor:
    """Attention with optional RoPE, causal (bottom-right aligned) with an optional sliding window (query at
    position p sees keys p - window < j <= p), logit softcapping, an SDPA-style mask, attention sinks and ALiBi
    (`alibi` [Hq]: slope_h * (j - p) added to the logits, Bloom / MPT)."""
    if cos is not None:
        q = rope_reference(q, cos[:, -q.shape[2]:], sin[:, -q.shape[2]:])
        k = rope_reference(k, cos, sin)
    sq, skv = q.shape[2], k.shape[2]
    qpos = torch.arange(skv - sq, skv, device=q.device)[:, None]
    kpos = torch.arange(skv, device=q.device)[None, :]
    visible = torch.ones(sq, skv, dtype=torch.bool, device=q.device)
    if causal:
        visible = kpos <= qpos
    if window:
        visible = visible & (qpos - kpos < window)
    mask_visible, bias = _split_mask(attn_mask)
    if mask_visible is not None:
        visible = visible & mask_visible
    if alibi is not None:
        linear = alibi_bias(alibi, qpos[:, 0], kpos[0])
        bias = linear if bias is None else bias.float() + linear
    return _general_softmax(q, k, v, visible, scale, softcap, None if bias is None else bias.masked_fill(~visible, 0),
                            sinks)


@torch.library.custom_op("braze::general_attention", mutates_args=())
def general_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float,
    causal: bool,
    softcap: float = 0.0,
    window: int = 0,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
    attn_mask: Tensor | None = None,
    sinks: Tensor | None = None,
    alibi: Tensor | None = None,
) -> Tensor:
    """braze::attention plus softcapping, sliding windows, sinks and ALiBi; output laid out [B, Sq, Hq, D] like
    attention."""
    out = general_attention_reference(q, k, v, scale, causal, softcap, window, cos, sin, attn_mask, sinks, alibi)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@general_attention.register_fake
def _general_attention_fake(q, k, v, scale, causal, softcap=0.0, window=0, cos=None, sin=None, attn_mask=None,
                            sinks=None, alibi=None):
    b, h, s, _ = q.shape
    return q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)


def _general_cached_rows(q, k, v, k_cache, v_cache, start, kv_start, scale, softcap, window, cos, sin, attn_bias,
                         tree, sinks=None, alibi=None):
    """Rows sharing one write offset `start`: (RoPE,) write k/v at [start, start + S), attend over the cache."""
    s = q.shape[2]
    if cos is not None:
        q, k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    k_cache[:, :, start:start + s] = k.to(k_cache.dtype)
    v_cache[:, :, start:start + s] = v.to(v_cache.dtype)
    keys = k_cache[:, :, :start + s].to(q.dtype)
    values = v_cache[:, :, :start + s].to(q.dtype)
    dev = q.device
    # positions: slot index, except draft-tree tokens, which sit at start + their depth
    depth = torch.arange(s, device=dev) if tree is None else tree.long().sum(-1) - 1
    qpos = start + depth
    kpos = torch.cat([torch.arange(start, device=dev), qpos])
    if tree is None:
        visible = kpos[None, :] <= qpos[:, None]
    else:
        visible = torch.cat([torch.ones(s, start, dtype=torch.bool, device=dev), tree.bool()], dim=1)
    if window:
        visible = visible & (qpos[:, None] - kpos[None, :] < window)
    b = q.shape[0]
    slots = torch.arange(start + s, device=dev)
    visible = visible[None, None] & (slots[None, None, None, :] >= kv_start.reshape(b, 1, 1, 1).to(slots.dtype))
    bias = None
    if attn_bias is not None:  # [Hb, N, N] indexed by (query position, key position)
        n = attn_bias.shape[-1]
        bias = attn_bias[:, qpos.clamp(max=n - 1)[:, None], kpos.clamp(max=n - 1)[None, :]][None]
        visible = visible & (bias > -math.inf)
        bias = bias.masked_fill(~visible, 0)
    if alibi is not None:  # by position, as the bias above (draft-tree tokens at start + depth)
        linear = alibi_bias(alibi, qpos, kpos)
        bias = linear.masked_fill(~visible, 0) if bias is None else bias.float() + linear.masked_fill(~visible, 0)
    return _general_softmax(q, keys, values, visible, scale, softcap, bias, sinks)


def general_cached_attention_reference(q, k, v, k_cache, v_cache, cache_len, kv_start, scale, softcap=0.0, window=0,
                                       cos=None, sin=None, attn_bias=None, tree_mask=None, sinks=None, alibi=None):
    """Attention over the static KV cache for whatever cached_attention does not cover: q and k arrive
    position-encoded (or cos/sin RoPE them), causal with an optional sliding window, softcap, a static additive
    bias [Hb, N, N] by (query, key) position, and optionally a draft-tree mask [B, S, S] (verify). Row b's keys
    below kv_start[b] are left padding. cache_len is [1] or, in verify, [B]. `sinks` [H]: attention sinks.
    `alibi` [H]: ALiBi slopes (slope_h * (key position - query position) added to the logits)."""
    lens = cache_len.reshape(-1)
    if lens.numel() == 1 and tree_mask is None:
        return _general_cached_rows(q, k, v, k_cache, v_cache, int(lens[0]), kv_start, scale, softcap, window, cos,
                                    sin, attn_bias, None, sinks, alibi)
    bsz = q.shape[0]
    lens = lens.expand(bsz)
    outs = []
    for b in range(bsz):  # one row at a time: each has its own write offset and tree
        r = slice(b, b + 1)
        tree = None if tree_mask is None else tree_mask.expand(bsz, *tree_mask.shape[-2:])[b]
        outs.append(_general_cached_rows(q[r], k[r], v[r], k_cache[r], v_cache[r], int(lens[b]),
                                         kv_start.reshape(-1)[r], scale, softcap, window,
                                         None if cos is None else cos[r], None if sin is None else sin[r],
                                         attn_bias, tree, sinks, alibi))
    return torch.cat(outs)


@torch.library.custom_op("braze::general_cached_attention", mutates_args=("k_cache", "v_cache"))
def general_cached_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_len: Tensor,
    kv_start: Tensor,
    scale: float,
    softcap: float = 0.0,
    window: int = 0,
    cos: Tensor | None = None,
    sin: Tensor | None = None,
    attn_bias: Tensor | None = None,
    tree_mask: Tensor | None = None,
    sinks: Tensor | None = None,
    alibi: Tensor | None = None,
    q_norm_weight: Tensor | None = None,
    k_norm_weight: Tensor | None = None,
    qk_norm_eps: float = 0.0,
) -> Tensor:
    """The general cached attention (see general_cached_attention_reference); output laid out [B, S, Hq, D].
    q_norm_weight / k_norm_weight: q and k RMS-normed over each head first (Gemma 3's q_norm / k_norm in the
    prefill plan's cache write, passes/prefill.py)."""
    q, k = qk_norm_reference(q, k, q_norm_weight, k_norm_weight, qk_norm_eps)
    out = general_cached_attention_reference(q, k, v, k_cache, v_cache, cache_len, kv_start, scale, softcap, window,
                                             cos, sin, attn_bias, tree_mask, sinks, alibi)
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@general_cached_attention.register_fake
def _general_cached_attention_fake(q, k, v, k_cache, v_cache, cache_len, kv_start, scale, softcap=0.0, window=0,
                                   cos=None, sin=None, attn_bias=None, tree_mask=None, sinks=None, alibi=None,
                                   q_norm_weight=None, k_norm_weight=None, qk_norm_eps=0.0):
    b, h, s, _ = q.shape
    return q.new_empty(b, s, h, v.shape[-1]).transpose(1, 2)


# ---- mixture of experts ------------------------------------------------------------------------------------------
@torch.library.custom_op("braze::grouped_mm", mutates_args=())
def grouped_mm(x: Tensor, weight: Tensor, offs: Tensor, rows: Tensor | None = None, row_div: int = 1,
               glu: str = "none") -> Tensor:
    """Rows of x sorted by expert: rows [offs[e-1], offs[e]) times weight[e] ([E, K, N]); HF's MoE grouped matmul.

    rows: the operand's row r is x[rows[r] // row_div] (MoE routing's gather of each (token, slot) pair's hidden
    state, read by the kernel instead of a gathered copy). glu="swiglu": weight holds [gate | up] columns (N = 2H)
    and the output is silu(gate) * up, [.., H], from fp32 products rounded once (HF's experts' activation)."""
    if glu not in ("none", "swiglu"):
        raise ValueError(f"braze::grouped_mm: unknown glu {glu!r} (expected 'none' or 'swiglu')")
    if rows is not None:
        x = x[torch.div(rows, row_div, rounding_mode="floor")]
    compute = x.dtype if glu == "none" else torch.float32
    out = x.new_zeros(x.shape[0], weight.shape[2], dtype=compute)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            out[start:end] = x[start:end].to(compute) @ weight[e].to(compute)
        start = end
    if glu == "swiglu":
        gate, up = out.chunk(2, dim=-1)
        out = (torch.nn.functional.silu(gate) * up).to(x.dtype)
    return out


@grouped_mm.register_fake
def _grouped_mm_fake(x: Tensor, weight: Tensor, offs: Tensor, rows: Tensor | None = None, row_div: int = 1,
                     glu: str = "none") -> Tensor:
    n_rows = x.shape[0] if rows is None else rows.shape[0]
    return x.new_empty(n_rows, weight.shape[2] // 2 if glu != "none" else weight.shape[2])


@torch.library.custom_op("braze::moe_sort", mutates_args=())
def moe_sort(expert_ids: Tensor) -> Tensor:
    """MoE routing: [2, S] int64, row 0 the permutation that sorts the (token, slot) pairs' expert ids (stable),
    row 1 its inverse (HF's `perm` and `inv_perm`). The ids: an integer tensor, or the fp32 top-k indices of
    braze::topk_packed (exact integers)."""
    perm = torch.sort(expert_ids, stable=True).indices
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return torch.stack([perm, inverse])


@moe_sort.register_fake
def _moe_sort_fake(expert_ids: Tensor) -> Tensor:
    return expert_ids.new_empty((2, expert_ids.shape[0]), dtype=torch.int64)


@torch.library.custom_op("braze::moe_offsets", mutates_args=())
def moe_offsets(expert_ids: Tensor, num_experts: int) -> Tensor:
    """MoE routing: [E] int32, offs[e] = #{pairs routed to experts <= e}: the cumulative row ends of the sorted
    pairs (HF's cumsum(histc(...)); ids outside [0, E), expert-parallel sentinels, count for no expert)."""
    ids = expert_ids[(expert_ids >= 0) & (expert_ids < num_experts)].long()  # (fp32 top-k ids are exact)
    counts = torch.bincount(ids, minlength=num_experts)
    return torch.cumsum(counts, 0).to(torch.int32)


@moe_offsets.register_fake
def _moe_offsets_fake(expert_ids: Tensor, num_experts: int) -> Tensor:
    return expert_ids.new_empty((num_experts,), dtype=torch.int32)


@torch.library.custom_op("braze::moe_route", mutates_args=())
def moe_route(expert_ids: Tensor, num_experts: int) -> Tensor:
    """MoE routing in one tensor: int64 [E + 2S], braze::moe_offsets's [E] cumulative ends first, then
    braze::moe_sort's [2, S] permutation and inverse (one launch where both are read)."""
    return torch.cat([moe_offsets(expert_ids, num_experts).long(), moe_sort(expert_ids).reshape(-1)])


@moe_route.register_fake
def _moe_route_fake(expert_ids: Tensor, num_experts: int) -> Tensor:
    return expert_ids.new_empty((num_experts + 2 * expert_ids.shape[0],), dtype=torch.int64)


@torch.library.custom_op("braze::topk_packed", mutates_args=())
def topk_packed(x: Tensor, k: int, softmax: bool = False, renorm: bool = False) -> Tensor:
    """torch.topk(x, k) over the last dim (largest, sorted) as one fp32 tensor [2, ..., k]: the values, then the
    indices (exact in fp32 for dims below 2**24), each half contiguous. One output, so a kernel family can lower
    it (an MoE router's top-k; passes/normalize.py rewrites topk into it and reads the halves back with casts).

    The router around it, folded in: softmax (the top-k of softmax(x) in fp32) and renorm (the k values divided
    by their sum, HF's norm_topk_prob)."""
    y = torch.softmax(x.float(), dim=-1) if softmax else x.float()
    values, indices = torch.topk(y, k)
    if renorm:
        values = values / values.sum(dim=-1, keepdim=True)
    return torch.stack([values, indices.float()])


@topk_packed.register_fake
def _topk_packed_fake(x: Tensor, k: int, softmax: bool = False, renorm: bool = False) -> Tensor:
    return x.new_empty((2, *x.shape[:-1], k), dtype=torch.float32)


@torch.library.custom_op("braze::bmm", mutates_args=())
def bmm(a: Tensor, b: Tensor) -> Tensor:
    """a [*, M, K] @ b [*, K, N] between activations, batch dims broadcast, 1-D operands as torch.matmul reads
    them (torch.matmul, torch.bmm, torch.mm): a matmul no linear (a weight operand) or attention op took."""
    return torch.matmul(a, b)


@bmm.register_fake
def _bmm_fake(a: Tensor, b: Tensor) -> Tensor:
    return torch.matmul(a, b)


BRAZE_OPS = {
    "rms_norm": torch.ops.braze.rms_norm.default,
    "linear": torch.ops.braze.linear.default,
    "linear_glu": torch.ops.braze.linear_glu.default,
    "rope": torch.ops.braze.rope.default,
    "attention": torch.ops.braze.attention.default,
    "cached_attention": torch.ops.braze.cached_attention.default,
    "tree_cached_attention": torch.ops.braze.tree_cached_attention.default,
    "general_attention": torch.ops.braze.general_attention.default,
    "general_cached_attention": torch.ops.braze.general_cached_attention.default,
    "grouped_mm": torch.ops.braze.grouped_mm.default,
    "moe_sort": torch.ops.braze.moe_sort.default,
    "moe_offsets": torch.ops.braze.moe_offsets.default,
    "topk_packed": torch.ops.braze.topk_packed.default,
    "bmm": torch.ops.braze.bmm.default,
}
