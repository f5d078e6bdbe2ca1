"""Attention kernel family: flash attention forward (prefill) and split-KV decode attention.

Both kernels keep softmax statistics and accumulators in fp32 and work in the log2 domain
(scores are scaled by sm_scale * log2(e) and exponentiated with exp2). All tensors are passed with
explicit strides, so q/k/v may be strided views of one fused QKV projection.

Flash attention forward, `render_attention(AttentionSpec)`; kernel `<name>`::

    <name>(q_ptr, k_ptr, v_ptr, out_ptr, [cos_ptr, sin_ptr], [kv_start_ptr],
           [tree_ptr, stride_tm_b, stride_tm_i, stride_tm_j, past_ptr, stride_past], Sq, Skv, Hq, GROUP, D,
           stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
           stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
           [stride_cb, stride_cs, stride_cd], sm_scale, BLOCK_M, BLOCK_N, BLOCK_D)
    grid = (cdiv(Sq, BLOCK_M), B * Hq)

  q/out [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], GROUP = Hq // Hkv (query head h reads kv head h // GROUP).
  Query row i sits at absolute position Skv - Sq + i; causal lets it see keys j <= that position.
  kv_start int32 [B]: keys j < kv_start[b] are left padding. A row with no visible key outputs 0.
  cos/sin [B, >=Skv, D] (same strides, batch stride may be 0) are indexed by absolute position:
  key j uses row j and query i uses row Skv - Sq + i (the same as i when Sq == Skv).
  tree_mask (needs causal; speculative tree verification): tree [B, Sq, Sq] (any integer/bool dtype; batch
  stride 0 shares one tree) replaces the causal test for the Sq newest keys of row b, which has past[b] cached
  keys (int, stride_past = 0 for one length): key j < past[b] is visible to every query, key j >= past[b] to
  query i iff tree[b, i, j - past[b]] != 0 (kv_start still applies); keys from past[b] + Sq on are not read.
  A module also defines the helper `<name>_kv_loop`.

Split-KV decode, `render_decode_attention(DecodeAttentionSpec)`; kernels `<name>_partial`, `<name>_combine`::

    <name>_partial(q_ptr, k_ptr, v_ptr, mid_o_ptr, mid_lse_ptr, seq_lens_ptr, [kv_start_ptr],
                   Hkv, GROUP, D, NUM_SPLITS,
                   stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                   stride_vb, stride_vh, stride_vs, stride_vd, sm_scale, BLOCK_G, BLOCK_N, BLOCK_D)
    grid = (B * Hkv, NUM_SPLITS)
    <name>_combine(mid_o_ptr, mid_lse_ptr, out_ptr, Hq, D, NUM_SPLITS,
                   stride_ob, stride_oh, stride_od, BLOCK_S, BLOCK_D)
    grid = (B * Hq,)

  q/out [B, Hq, D], k_cache/v_cache [B, Hkv, S_max, D], seq_lens int32 [B] (valid positions, <= S_max),
  kv_start int32 [B] (positions below it are padding). Scratch: mid_o fp32 contiguous
  [B, Hq, NUM_SPLITS, D] (normalised partial outputs), mid_lse fp32 contiguous [B, Hq, NUM_SPLITS]
  (log2-sum-exp of the scaled scores, -inf for an empty split). Each row's valid range
  [kv_start, seq_len) is cut into NUM_SPLITS BLOCK_N-aligned chunks; BLOCK_G >= GROUP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import triton

from braze.codegen.render import render_template
from braze.runtime.attention_blocks import (  # noqa: F401  (re-exported: the block choosers live in the runtime)
    AttentionBlocks,
    DecodeBlocks,
    attention_blocks,
    decode_blocks,
    decode_splits,
)
from braze.runtime.kernel_loader import load_kernel

INPUT_PRECISIONS = ("ieee", "tf32")
OUT_DTYPES = ("float32", "float16", "bfloat16")
_TORCH_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NUM_SMS = 132  # H100 SXM; only used to size the decode split count


def _check_common(name: str, input_precision: str, out_dtype: str) -> None:
    if not name.isidentifier():
        raise ValueError(f"kernel name {name!r} is not a Python identifier")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")


def _check_header(header: str) -> str:
    # The header is pasted verbatim at the top of a Python module; anything but comments breaks it.
    bad = [line for line in header.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if bad:
        raise ValueError(f"header lines must be comments starting with '#': {bad[0]!r}")
    return header


@dataclass(frozen=True)
class AttentionSpec:
    """Compile-time choices of one flash attention forward kernel (each flag changes the signature)."""

    name: str
    causal: bool = True
    rope: bool = False
    has_kv_start: bool = False
    input_precision: str = "ieee"
    out_dtype: str = "float16"
    tree_mask: bool = False

    def __post_init__(self) -> None:
        _check_common(self.name, self.input_precision, self.out_dtype)
        if self.tree_mask and not self.causal:
            raise ValueError("tree_mask uses the causal query alignment: it needs causal=True")


@dataclass(frozen=True)
class DecodeAttentionSpec:
    """Compile-time choices of one split-KV decode kernel pair."""

    name: str
    has_kv_start: bool = False
    input_precision: str = "ieee"
    out_dtype: str = "float16"

    def __post_init__(self) -> None:
        _check_common(self.name, self.input_precision, self.out_dtype)


def render_attention(spec: AttentionSpec, header: str = "") -> str:
    """Python source of the flash attention forward module for `spec`."""
    return render_template(
        "attention.py.j2",
        header=_check_header(header),
        name=spec.name,
        causal=spec.causal,
        rope=spec.rope,
        has_kv_start=spec.has_kv_start,
        tree_mask=spec.tree_mask,
        input_precision=spec.input_precision,
        out_dtype=spec.out_dtype,
    )


def render_decode_attention(spec: DecodeAttentionSpec, header: str = "") -> str:
    """Python source of the decode module (`<name>_partial` and `<name>_combine`) for `spec`."""
    return render_template(
        "decode_attention.py.j2",
        header=_check_header(header),
        name=spec.name,
        has_kv_start=spec.has_kv_start,
        input_precision=spec.input_precision,
        out_dtype=spec.out_dtype,
    )


# ---------------------------------------------------------------------------------------------
# Launchers: render + load + launch. They fix the calling convention the compiler wires up.


@cache
def _attention_kernel(spec: AttentionSpec) -> Any:
    return load_kernel(render_attention(spec), spec.name)


@cache
def _decode_kernels(spec: DecodeAttentionSpec) -> tuple[Any, Any]:
    source = render_decode_attention(spec)
    return load_kernel(source, f"{spec.name}_partial"), load_kernel(source, f"{spec.name}_combine")


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _TORCH_DTYPE_NAMES:
        raise ValueError(f"unsupported dtype {dtype}")
    return _TORCH_DTYPE_NAMES[dtype]


def run_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    kv_start: torch.Tensor | None = None,
    tree_mask: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    input_precision: str = "ieee",
    blocks: AttentionBlocks | None = None,
    name: str = "braze_attention",
) -> torch.Tensor:
    """Flash attention forward. q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], any strides; returns out.

    cos/sin [B, >=Skv, D] enable rope (indexed by absolute position); kv_start int32 [B] masks
    left padding; tree_mask [Sq, Sq] or [B, Sq, Sq] (with causal) says which of the Sq newest keys each query
    sees.
    `out` (any strides) defaults to a new tensor of q's dtype.
    """
    batch, hq, sq, head_dim = q.shape
    hkv, skv = k.shape[1], k.shape[2]
    if k.shape != (batch, hkv, skv, head_dim) or v.shape != k.shape:
        raise ValueError(f"k/v shapes {tuple(k.shape)}/{tuple(v.shape)} do not match q {tuple(q.shape)}")
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
    rope = cos is not None
    if rope:
        if sin is None or cos.stride() != sin.stride() or cos.shape != sin.shape:
            raise ValueError("cos and sin must both be given, with equal shapes and strides")
        if head_dim % 2:
            raise ValueError(f"rope needs an even head_dim, got {head_dim}")
        if cos.shape[0] != batch or cos.shape[1] < skv or cos.shape[2] != head_dim:
            raise ValueError(f"cos/sin shape {tuple(cos.shape)} must be [B, >=Skv, D]")
    if tree_mask is not None:
        if tuple(tree_mask.shape[-2:]) != (sq, sq) or tree_mask.dim() not in (2, 3):
            raise ValueError(f"tree_mask shape {tuple(tree_mask.shape)} must be [(B,) Sq, Sq] = [{sq}, {sq}]")
        if tree_mask.dtype == torch.bool:
            tree_mask = tree_mask.view(torch.uint8)  # same bytes; avoids int1 pointers
    if out is None:
        out = torch.empty((batch, hq, sq, head_dim), dtype=q.dtype, device=q.device)
    spec = AttentionSpec(
        name=name,
        causal=causal,
        rope=rope,
        has_kv_start=kv_start is not None,
        tree_mask=tree_mask is not None,
        input_precision=input_precision,
        out_dtype=_dtype_name(out.dtype),
    )
    blocks = blocks or attention_blocks(head_dim, rope)
    extra: list[Any] = []
    if rope:
        extra += [cos, sin]
    if kv_start is not None:
        extra.append(kv_start)
    if tree_mask is not None:
        strides = tree_mask.stride() if tree_mask.dim() == 3 else (0, *tree_mask.stride())
        past = torch.full((1,), skv - sq, dtype=torch.int64, device=q.device)
        extra += [tree_mask, *strides, past, 0]
    rope_strides = list(cos.stride()) if rope else []
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    grid = (triton.cdiv(sq, blocks.block_m), batch * hq)
    _attention_kernel(spec)[grid](
        q, k, v, out, *extra,
        sq, skv, hq, hq // hkv, head_dim,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *rope_strides,
        scale,
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_D=blocks.block_d,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    return out


def run_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    sm_scale: float | None = None,
    kv_start: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    input_precision: str = "ieee",
    blocks: DecodeBlocks | None = None,
    name: str = "braze_decode_attention",
) -> torch.Tensor:
    """Decode attention of one query token per row. q [B, Hq, D], caches [B, Hkv, S_max, D].

    seq_lens int32 [B] counts valid cache positions (must be <= S_max; not checked, to avoid a
    device sync); kv_start int32 [B] masks left padding. Returns out [B, Hq, D].
    """
    batch, hq, head_dim = q.shape
    hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape != (batch, hkv, s_max, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not match q")
    if hq % hkv:
        raise ValueError(f"query heads {hq} not a multiple of kv heads {hkv}")
    group = hq // hkv
    if out is None:
        out = torch.empty((batch, hq, head_dim), dtype=q.dtype, device=q.device)
    spec = DecodeAttentionSpec(
        name=name,
        has_kv_start=kv_start is not None,
        input_precision=input_precision,
        out_dtype=_dtype_name(out.dtype),
    )
    blocks = blocks or decode_blocks(group, head_dim)
    if blocks.block_g < group:
        raise ValueError(f"block_g {blocks.block_g} smaller than the query group {group}")
    splits = num_splits or decode_splits(batch, hkv, s_max)
    mid_o = torch.empty((batch, hq, splits, head_dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((batch, hq, splits), dtype=torch.float32, device=q.device)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    partial, combine = _decode_kernels(spec)
    extra = [kv_start] if kv_start is not None else []
    partial[(batch * hkv, splits)](
        q, k_cache, v_cache, mid_o, mid_lse, seq_lens, *extra,
        hkv, group, head_dim, splits,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        scale,
        BLOCK_G=blocks.block_g, BLOCK_N=blocks.block_n, BLOCK_D=blocks.block_d,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
    combine[(batch * hq,)](
        mid_o, mid_lse, out, hq, head_dim, splits,
        *out.stride(),
        BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=blocks.block_d,
        num_warps=4 if blocks.block_d >= 128 else 2,
    )  # fmt: skip
    return out
