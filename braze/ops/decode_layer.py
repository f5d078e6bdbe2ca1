"""braze::attention_block and braze::mlp_block: a decode layer's two halves as single ops (passes/decode_layer.py).

Each is the composition of ops braze already has, so the references are those ops' references chained; the
kernels (kernels/decode_layer.py) compute each half in one launch and reduce across programs with atomics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from braze.ops.kv_compress import record_query_reference
from braze.ops.library import (
    cached_attention_reference,
    general_cached_attention_reference,
    linear,
    linear_glu,
    qk_norm_reference,
    rms_norm_reference,
    tree_cached_attention_reference,
)


def _project_heads(attn: Tensor, o_weight: Tensor, residual: Tensor, post_norm_weight: Tensor | None = None,
                   post_norm_eps: float = 0.0, bias: Tensor | None = None) -> Tensor:
    """residual + o_proj(attention [B, Hq, S, D] with its heads flattened in order to [B, S, Hq * D]); with a
    post-norm, residual + rms_norm(o_proj(...))."""
    return _project(attn.transpose(1, 2).reshape(*residual.shape[:-1], -1), o_weight, residual, post_norm_weight,
                    post_norm_eps, bias)


def _project(x: Tensor, weight: Tensor, residual: Tensor, post_norm_weight: Tensor | None,
             post_norm_eps: float, bias: Tensor | None = None) -> Tensor:
    """residual + x @ weight^T (+ bias), or residual + rms_norm(x @ weight^T) (Gemma 2/3's post-attention and
    post-feedforward norms, OLMo 2's post-norms)."""
    if post_norm_weight is None:
        return linear(x, weight, bias, residual=residual)
    return residual + rms_norm_reference(linear(x, weight, bias), post_norm_weight, post_norm_eps)


@torch.library.custom_op("braze::attention_block", mutates_args=("k_cache", "v_cache"))
def attention_block(
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
    o_weight: Tensor,
    residual: Tensor,
    q_norm_weight: Tensor | None = None,
    k_norm_weight: Tensor | None = None,
    qk_norm_eps: float = 0.0,
    window: int = 0,
    softcap: float = 0.0,
    post_norm_weight: Tensor | None = None,
    post_norm_eps: float = 0.0,
    o_bias: Tensor | None = None,
    alibi: Tensor | None = None,
    q_norm_bias: Tensor | None = None,
    k_norm_bias: Tensor | None = None,
    qk_layer_norm: bool = False,
) -> Tensor:
    """residual + o_proj(cached attention of one new token per row): RoPE, the cache write, attention over the
    cache, the heads flattened in order ([B, 1, Hq * D]) and the output projection with its residual add.
    q_norm_weight / k_norm_weight: q and k are RMS-normed first, over each head (a weight of D: Qwen3's q_norm /
    k_norm; [H, D]: a row per head) or over all heads together (a weight of Hq * D / Hkv * D: OLMo 2's, over the
    whole projection); qk_layer_norm: LayerNorms over each head instead, with q_norm_bias / k_norm_bias (Cohere,
    Persimmon).
    window > 0: a sliding window (the token sees the last `window` positions: Mistral, Phi-3, Gemma 2/3);
    softcap > 0: logits softcapped (Gemma 2); post_norm_weight: residual + rms_norm(o_proj(...)) (Gemma 2/3);
    o_bias: o_proj's bias (GPT-2, OPT, Phi, GPT-NeoX); alibi [Hq]: ALiBi slopes (Bloom, MPT)."""
    q, k = qk_norm_reference(q, k, q_norm_weight, k_norm_weight, qk_norm_eps, q_norm_bias, k_norm_bias,
                             qk_layer_norm)
    if window or softcap or alibi is not None:
        attn = general_cached_attention_reference(q, k, v, k_cache, v_cache, cache_len, kv_start, scale,
                                                  softcap=softcap, window=window, cos=cos, sin=sin, alibi=alibi)
    else:
        attn = cached_attention_reference(q, k, v, cos, sin, k_cache, v_cache, cache_len, kv_start, scale)
    return _project_heads(attn, o_weight, residual, post_norm_weight, post_norm_eps, o_bias)


@attention_block.register_fake
def _attention_block_fake(q, k, v, cos, sin, k_cache, v_cache, cache_len, kv_start, scale, o_weight, residual,
                          q_norm_weight=None, k_norm_weight=None, qk_norm_eps=0.0, window=0, softcap=0.0,
                          post_norm_weight=None, post_norm_eps=0.0, o_bias=None, alibi=None, q_norm_bias=None,
                          k_norm_bias=None, qk_layer_norm=False):
    return torch.empty_like(residual, dtype=torch.promote_types(q.dtype, residual.dtype))


@torch.library.custom_op("braze::attention_block_recording", mutates_args=("k_cache", "v_cache", "q_ring"))
def attention_block_recording(
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
    o_weight: Tensor,
    residual: Tensor,
    q_ring: Tensor,
) -> Tensor:
    """attention_block that also records the rotated query in R-KV's ring (braze::kv_record_query folded in)."""
    attn = cached_attention_reference(q, k, v, cos, sin, k_cache, v_cache, cache_len, kv_start, scale)
    record_query_reference(q, q_ring, cache_len, cos, sin)
    return _project_heads(attn, o_weight, residual)


@attention_block_recording.register_fake
def _attention_block_recording_fake(q, k, v, cos, sin, k_cache, v_cache, cache_len, kv_start, scale, o_weight,
                                    residual, q_ring):
    return torch.empty_like(residual, dtype=torch.promote_types(q.dtype, residual.dtype))


@torch.library.custom_op("braze::tree_attention_block", mutates_args=("k_cache", "v_cache"))
def tree_attention_block(
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
    o_weight: Tensor,
    residual: Tensor,
    post_norm_weight: Tensor | None = None,
    post_norm_eps: float = 0.0,
    o_bias: Tensor | None = None,
) -> Tensor:
    """attention_block for the speculative verify (deterministic mode): tree attention over the cache for every
    draft node, then the heads flattened in order and o_proj with its residual add (and post-norm, as decode's)."""
    attn = tree_cached_attention_reference(q, k, v, cos, sin, k_cache, v_cache, cache_len, kv_start, tree_mask, scale)
    return _project_heads(attn, o_weight, residual, post_norm_weight, post_norm_eps, o_bias)


@tree_attention_block.register_fake
def _tree_attention_block_fake(q, k, v, cos, sin, k_cache, v_cache, cache_len, kv_start, tree_mask, scale, o_weight,
                               residual, post_norm_weight=None, post_norm_eps=0.0, o_bias=None):
    return torch.empty_like(residual, dtype=torch.promote_types(q.dtype, residual.dtype))


@torch.library.custom_op("braze::mlp_block", mutates_args=())
def mlp_block(
    x: Tensor,
    norm_weight: Tensor | None,
    gate_weight: Tensor | None,
    up_weight: Tensor,
    down_weight: Tensor,
    residual: Tensor,
    eps: float,
    activation: str = "silu",
    post_norm_weight: Tensor | None = None,
    post_norm_eps: float = 0.0,
    layer_norm: bool = False,
    norm_bias: Tensor | None = None,
    up_bias: Tensor | None = None,
    down_bias: Tensor | None = None,
) -> Tensor:
    """residual + down(act(gate(rmsnorm(x))) * up(rmsnorm(x))): a gated MLP with its norm and residual add;
    norm_weight None: no norm before gate/up (OLMo 2); post_norm_weight: residual + rms_norm(down(...)) (Gemma 2/3's
    and OLMo 2's post-feedforward norm). gate_weight None: a plain MLP, residual + down(act(up(norm(x)) + up_bias))
    + down_bias (GPT-2, OPT); layer_norm: the norm is a LayerNorm (with norm_bias), as the linear's prologue."""
    if gate_weight is None:
        h = linear(x, up_weight, up_bias, norm_weight, eps, activation, layer_norm=layer_norm, norm_bias=norm_bias)
    else:
        h = linear_glu(x, gate_weight, up_weight, norm_weight, eps, activation, layer_norm=layer_norm,
                       norm_bias=norm_bias)
    return _project(h, down_weight, residual, post_norm_weight, post_norm_eps, down_bias)


@mlp_block.register_fake
def _mlp_block_fake(x, norm_weight, gate_weight, up_weight, down_weight, residual, eps, activation="silu",
                    post_norm_weight=None, post_norm_eps=0.0, layer_norm=False, norm_bias=None, up_bias=None,
                    down_bias=None):
    return torch.empty_like(residual)


DECODE_LAYER_OPS = {
    "attention_block": torch.ops.braze.attention_block.default,
    "tree_attention_block": torch.ops.braze.tree_attention_block.default,
    "mlp_block": torch.ops.braze.mlp_block.default,
}
