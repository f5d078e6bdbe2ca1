"""Attention families: flash attention forward, attention over a KV cache (prefill / split-KV decode), and
tree-verify attention over a KV cache.

Both kernels keep softmax statistics and accumulators in fp32 and work in the log2 domain
(scores are scaled by sm_scale * log2(e) and exponentiated with exp2). All tensors are passed with
explicit strides, so q/k/v may be strided views of one fused QKV projection.

Flash attention forward, `render_attention(AttentionSpec)`; kernel `<name>`::

    <name>(q_ptr, k_ptr, v_ptr, out_ptr, [cos_ptr, sin_ptr], [kv_start_ptr, stride_ksb, stride_ksh],
           [tree_ptr, stride_tm_b, stride_tm_i, stride_tm_j, past_ptr, stride_past] | [past_ptr, stride_past],
           Sq, Skv, Hq, GROUP, D,
           stride_qb, stride_qh, stride_qs, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
           stride_vb, stride_vh, stride_vs, stride_vd, stride_ob, stride_oh, stride_os, stride_od,
           [stride_cb, stride_cs, stride_cd], sm_scale, BLOCK_M, BLOCK_N, BLOCK_D)
    grid = (cdiv(Sq, BLOCK_M), B * Hq)

  q/out [B, Hq, Sq, D], k/v [B, Hkv, Skv, D], GROUP = Hq // Hkv (query head h reads kv head h // GROUP).
  Query row i sits at absolute position Skv - Sq + i; causal lets it see keys j <= that position.
  kv_start int32 [B]: keys j < kv_start[b] are left padding, or [B, Hkv]: kv head h's keys j < kv_start[b, h]
  (a compressed cache whose heads hold different lengths). A row with no visible key outputs 0.
  cos/sin [B, >=Skv, D] (same strides, batch stride may be 0) are indexed by absolute position:
  key j uses row j and query i uses row Skv - Sq + i (the same as i when Sq == Skv).
  tree_mask (needs causal; speculative tree verification): tree [B, Sq, Sq] (any integer/bool dtype; batch
  stride 0 shares one tree) replaces the causal test for the Sq newest keys of row b, which has past[b] cached
  keys (int, stride_past = 0 for one length): key j < past[b] is visible to every query, key j >= past[b] to
  query i iff tree[b, i, j - past[b]] != 0 (kv_start still applies); keys from past[b] + Sq on are not read.
  device_len (causal, no tree; prefill over a static cache): only past_ptr/stride_past are added, and row b sees
  Skv = past[b] + Sq keys, read on device (the Skv argument is then the cache capacity).
  A module also defines the helper `<name>_kv_loop`.

Split-KV decode, `render_decode_attention(DecodeAttentionSpec)`; kernels `<name>_partial`, `<name>_combine`::

    <name>_partial(q_ptr, k_ptr, v_ptr, mid_o_ptr, mid_lse_ptr, seq_lens_ptr, [stride_sl], [kv_start_ptr],
                   Hkv, GROUP, D, NUM_SPLITS,
                   stride_qb, stride_qh, stride_qd, stride_kb, stride_kh, stride_ks, stride_kd,
                   stride_vb, stride_vh, stride_vs, stride_vd, sm_scale, BLOCK_G, BLOCK_N, BLOCK_D)
    grid = (B * Hkv, NUM_SPLITS)
    <name>_combine(mid_o_ptr, mid_lse_ptr, out_ptr, Hq, D, NUM_SPLITS,
                   stride_ob, stride_oh, stride_od, BLOCK_S, BLOCK_D)
    grid = (B * Hq,)

  q/out [B, Hq, D], k_cache/v_cache [B, Hkv, S_max, D], seq_lens int32 [B] (valid positions, <= S_max),
  kv_start int32 [B] (positions below it are padding). from_cache_len: seq_lens_ptr[b * stride_sl] is the cache
  length before the new token (stride 0: one for the batch) and the row's length is that + 1. Scratch: mid_o fp32
  contiguous [B, Hq, NUM_SPLITS, D] (normalised partial outputs), mid_lse fp32 contiguous [B, Hq, NUM_SPLITS]
  (log2-sum-exp of the scaled scores, -inf for an empty split). Each row's valid range
  [kv_start, seq_len) is cut into NUM_SPLITS BLOCK_N-aligned chunks; BLOCK_G >= GROUP.

  rope_write (needs from_cache_len; the decode plans' form) adds, after seq_lens_ptr, ``k_new_ptr, v_new_ptr,
  cos_ptr, sin_ptr, stride_knb, stride_knh, stride_knd, stride_vnb, stride_vnh, stride_vnd, stride_cb, stride_cd``:
  q is read unrotated, q and the new key are rotated in the kernel (fp32 math, rounded to the cache dtype), the
  loop reads the cached keys [kv_lo, cache_len), the split owning position cache_len adds the new key / value
  from registers and writes them into the caches there (no other program reads that slot).

  tree (needs from_cache_len, not rope_write; the deterministic verify plans' form) adds, after stride_sl,
  ``tree_ptr, S, stride_tb, stride_ti, stride_tj, stride_qs`` and the constexpr BLOCK_S >= S: q [B, Hq, S, D] holds
  S draft nodes per row, already rotated, whose keys / values are in the caches at cache_len + node; the grid is
  (B * S * Hkv, NUM_SPLITS) and node i of row b attends exactly as decoding does at its position (the cache, then
  its ancestors under tree[b, i], the node itself added after the loop), into mid rows b * S + i. The combine adds
  ``S, stride_os`` (out [B, Hq, S, D]) and its grid is (B * S * Hq,). A padding node (tree[b, i, 0] == 0) outputs 0.

Logit features (both kernels; flags softcap / window / sinks / alibi, each adding one argument before sm_scale, in
this order): ``softcap`` (float: scores become softcap * tanh(scores / softcap), Gemma 2), ``WINDOW`` (int: the
query at position p sees keys p - WINDOW < j only, sliding-window layers), ``sinks_ptr`` ([Hq]: one more logit per
head in the softmax, attached to no value, gpt-oss), ``alibi_ptr`` ([Hq] fp32 slopes: slope_h * (j - p) added to
the logit of key j for the query at position p, after the softcap; Bloom, MPT). `AttentionExtras` carries their
values to the launchers.

Cached attention (braze::cached_attention, templates kv_cache.py.j2 + one of the two above): prefill runs
`<name>_rope_write` (rotates q and k, HF rotate_half, fp32 math; writes k/v into the caches at cache_len), then
flash attention over the cache; decode runs the rope_write form of split-KV decode alone (one launch, plus the
combine when split). Both read cache_len on device, so a step issues launches only (no host read, no torch op).
Tree-cached attention (braze::tree_cached_attention):
the same write, then flash attention in tree-mask mode; under deterministic=True the tree form of split-KV decode
(every node reduced in decode's order, so accepted positions' logits are bitwise plain decoding's) and its combine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import triton

from braze.kernels.device import DeviceSpec
from braze.kernels.family import FLOAT_NAMES, KernelFamily, device_op, launch_kernel
from braze.kernels.matmul import check_header, pow2_clamp
from braze.kernels.projection import Projection
from braze.kernels.render import render_template

if TYPE_CHECKING:
    import torch.fx as fx

    from braze.runtime.plan import Step

INPUT_PRECISIONS = ("ieee", "tf32")
OUT_DTYPES = ("float32", "float16", "bfloat16")


MASK_KINDS = ("", "bool", "add")  # AttentionSpec.mask: none, a bool mask (True: visible), an additive one


def _check_common(name: str, input_precision: str, out_dtype: str) -> None:
    if not name.isidentifier():
        raise ValueError(f"kernel name {name!r} is not a Python identifier")
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype!r}")


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
    device_len: bool = False
    softcap: bool = False
    window: bool = False
    sinks: bool = False
    alibi: bool = False
    mask: str = ""  # an explicit attention mask [B?, H?, Sq?, Skv] read per tile: "bool" (True: visible) or "add"

    def __post_init__(self) -> None:
        _check_common(self.name, self.input_precision, self.out_dtype)
        if self.mask not in MASK_KINDS:
            raise ValueError(f"mask must be one of {MASK_KINDS}, got {self.mask!r}")
        if self.mask and (self.tree_mask or self.device_len or self.has_kv_start):
            raise ValueError("an explicit mask is the forward kernel's: no tree mask, cache length or kv_start")
        if (self.window or self.alibi) and (self.tree_mask or not self.causal):
            raise ValueError("window and alibi count positions from the causal alignment; tree_mask's are not slots")
        if self.tree_mask and not self.causal:
            raise ValueError("tree_mask uses the causal query alignment: it needs causal=True")
        if self.device_len and (self.tree_mask or not self.causal):
            raise ValueError("device_len is the causal, tree-less form of the past length (tree_mask reads it too)")


@dataclass(frozen=True)
class DecodeAttentionSpec:
    """Compile-time choices of one split-KV decode kernel pair."""

    name: str
    has_kv_start: bool = False
    input_precision: str = "ieee"
    out_dtype: str = "float16"
    from_cache_len: bool = False
    head_start: bool = False  # kv_start is [B, Hkv] (a compressed cache whose heads hold different lengths)
    rope_write: bool = False  # RoPE on q and the new key, and the cache write, inside `_partial` (needs from_cache_len)
    tree: bool = False  # the draft nodes of a verify step, each as decode at its position (needs from_cache_len)
    o_proj: bool = False  # attention block: merge, o_proj and residual inside `_partial` (rope_write or tree)
    ring: bool = False  # R-KV: the rotated query also into the query ring (needs rope_write)
    qk_norm: bool = False  # q and the new key RMS-normed per head before the rotation (Qwen3; needs rope_write)
    qk_norm_whole: bool = False  # qk_norm over all heads of the row (OLMo 2's norms over the whole projection)
    qk_norm_rows: bool = False  # qk_norm weights (and biases) hold one row per head (whole, or Cohere's [H, D])
    qk_layer_norm: bool = False  # qk_norm is a LayerNorm over each head (Cohere, Persimmon), not an RMSNorm
    qk_norm_bias: bool = False  # the LayerNorm adds a bias (Persimmon): two more arguments after qk_norm_eps
    softcap: bool = False
    window: bool = False
    sinks: bool = False
    alibi: bool = False

    def __post_init__(self) -> None:
        _check_common(self.name, self.input_precision, self.out_dtype)
        if (self.sinks or ((self.window or self.softcap or self.alibi) and self.tree)) and self.o_proj:
            raise ValueError("sinks, and a window, softcap or ALiBi over a tree, are not part of the attention block "
                             "(o_proj)")
        if (self.rope_write or self.tree) and not self.from_cache_len:
            raise ValueError("rope_write and tree need from_cache_len (the new token sits at the cache length)")
        if self.rope_write and self.tree:
            raise ValueError("tree reads nodes the verify's rope_write kernel wrote: it excludes rope_write")
        if self.o_proj and not (self.rope_write or self.tree):
            raise ValueError("o_proj is the decode / verify plans' attention block: it needs rope_write or tree")
        if self.ring and not self.rope_write:
            raise ValueError("ring stores the query the kernel rotates: it needs rope_write")
        if self.qk_norm and not self.rope_write:
            raise ValueError("qk_norm normalizes the q and k the kernel rotates: it needs rope_write")
        if (self.qk_norm_whole or self.qk_norm_rows or self.qk_layer_norm) and not self.qk_norm:
            raise ValueError("qk_norm_whole, qk_norm_rows and qk_layer_norm are forms of qk_norm: they need qk_norm")
        if self.qk_norm_whole and (self.qk_layer_norm or not self.qk_norm_rows):
            raise ValueError("qk_norm_whole is an RMSNorm over the projection: its weights have a row per head")
        if self.qk_norm_bias and not self.qk_layer_norm:
            raise ValueError("qk_norm_bias is the LayerNorm's bias: it needs qk_layer_norm")


def render_attention(spec: AttentionSpec, header: str = "") -> str:
    """Python source of the flash attention forward module for `spec`."""
    return render_template(
        "attention.py.j2", header=check_header(header), name=spec.name, causal=spec.causal, rope=spec.rope,
        has_kv_start=spec.has_kv_start, tree_mask=spec.tree_mask, device_len=spec.device_len,
        input_precision=spec.input_precision, out_dtype=spec.out_dtype, softcap=spec.softcap, window=spec.window,
        sinks=spec.sinks, alibi=spec.alibi, mask=spec.mask)


def render_decode_attention(spec: DecodeAttentionSpec, header: str = "") -> str:
    """Python source of the decode module (`<name>_partial` and `<name>_combine`) for `spec`."""
    return render_template(
        "decode_attention.py.j2", header=check_header(header), name=spec.name, has_kv_start=spec.has_kv_start,
        from_cache_len=spec.from_cache_len, input_precision=spec.input_precision, out_dtype=spec.out_dtype,
        head_start=spec.head_start, rope_write=spec.rope_write, tree=spec.tree, o_proj=spec.o_proj,
        ring=spec.ring, qk_norm=spec.qk_norm, qk_norm_whole=spec.qk_norm_whole, qk_norm_rows=spec.qk_norm_rows,
        qk_layer_norm=spec.qk_layer_norm, qk_norm_bias=spec.qk_norm_bias, softcap=spec.softcap,
        window=spec.window, sinks=spec.sinks, alibi=spec.alibi)


def render_cache_write(name: str, qk_norm: bool = False) -> str:
    """Python source of `<name>_rope_write` (RoPE on q/k, k/v written into the caches); qk_norm: q and k are
    RMS-normed over each head first (three more arguments: q_norm_ptr, k_norm_ptr, qk_norm_eps)."""
    return render_template("kv_cache.py.j2", header="", name=name, qk_norm=qk_norm)


# ---- launch configurations --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionBlocks:
    block_m: int
    block_n: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2

    def meta(self, device: DeviceSpec) -> dict[str, int]:
        meta = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_D": self.block_d}
        if not device.interpret:
            meta.update(num_warps=self.num_warps, num_stages=self.num_stages)
        return meta


@dataclass(frozen=True)
class DecodeBlocks:
    block_g: int
    block_n: int
    block_d: int
    num_warps: int = 4
    num_stages: int = 2


def block_d_for(head_dim: int) -> int:
    """tl.dot needs every dimension >= 16; a head dim that is not a power of two is padded."""
    if head_dim < 1:
        raise ValueError(f"head_dim must be positive, got {head_dim}")
    return max(16, triton.next_power_of_2(head_dim))


def attention_blocks(sq: int, skv: int, head_dim: int, device: DeviceSpec, deterministic: bool = False, *,
                     elem_size: int = 2, tree: bool = False, rope: bool = False, mask: bool = False
                     ) -> AttentionBlocks:
    """Flash tiles: the interpreter takes the biggest tiles (it pays per program); a GPU keeps the q tile, the
    accumulator and a K/V tile in registers (64 x 64 at D <= 64, a narrower key tile above), 2 stages. fp32 inputs
    (elem_size 4: FMA dots, no tensor cores) take 32 x 32 tiles and 8 warps, tree-mask mode (the gathered mask
    tile on top of the scores; `mask`, an explicit mask's tile, the same) a key tile half as wide and 8 warps for
    64 query rows: both spilled at 64 x 64 (ptxas, sm_80-90; 255 registers), and fp32 64 x 64 needs 114,688 B of
    shared memory (> 101,376 on sm_86/89).
    deterministic: tiles fixed by the head dim alone (not by the query or key count)."""
    block_d = block_d_for(head_dim)
    if deterministic:  # (the dtype is fixed per compile: fp32 caches take the fp32 tiles below)
        if device.interpret:
            return AttentionBlocks(16, 16, block_d)
        if elem_size >= 4:
            return AttentionBlocks(32, 32 if block_d <= 64 else 16, block_d, num_warps=8, num_stages=2)
        if block_d >= 256:
            return AttentionBlocks(32, 16, block_d, num_warps=8, num_stages=2)
        return AttentionBlocks(64, 64 if block_d <= 64 else 32, block_d, num_warps=4, num_stages=2)
    if device.interpret:
        return AttentionBlocks(pow2_clamp(sq, 16, 64), pow2_clamp(skv, 16, 64), block_d)
    block_m, block_n, warps = pow2_clamp(sq, 16, 64), 64 if block_d <= 64 else 32, 4
    if block_d >= 256:  # head dim 256 (Gemma): 64 x 256 accumulators spilled, and K / V tiles 32 keys wide with
        # the RoPE'd key tiles took 106-131 KB of shared memory (> 101,376 B on sm_86/89): 32 x 16 tiles, 8 warps
        # (4 warps still spilled 4 B at 255 registers on sm_90)
        block_m, block_n, warps = min(block_m, 32), 16, 8
    elif block_d >= 128 and block_m >= 64 and rope:  # head dim 128 (Qwen3, Llama-3-8B) with the rotation in the
        # kernel: 64 x 128 tiles with 4 warps spilled 12-20 B at 255 registers on sm_80/86/89 (make gpucheck,
        # Qwen3-MoE shape); 8 warps: none. Without it (prefill over the cache) 8 warps spilled 4 B, 4 warps none.
        warps = 8
    if elem_size >= 4:
        block_m, block_n = min(block_m, 32), max(16, block_n // 2)  # (tl.dot: every dim >= 16)
        warps = 8 if block_m >= 32 else 4
    elif tree or mask:  # (an explicit mask at head dim 128: 12-84 B of spills on sm_80-89 before, none after)
        block_n = max(16, block_n // 2)
        warps = max(warps, 8 if block_m >= 64 else 4)
    if block_m == 16 and elem_size < 4:  # a 16-row query tile (a short prefill over the cache): 8 warps. With 4,
        # ptxas spilled 4-12 B at 80-96 registers (sm_80 sliding-window form, sm_86/89 at 3 stages, sm_90 at 1
        # stage); 8 warps x 2 stages spilled on no target (tiny Llama / Qwen2 / Mistral, the 1B and Gemma 2 shapes)
        warps = 8
    return AttentionBlocks(block_m, block_n, block_d, num_warps=warps, num_stages=2)


def decode_blocks(group: int, head_dim: int, elem_size: int = 2) -> DecodeBlocks:
    """Tile sizes for the decode partial kernel: all GROUP query heads in one (padded) tile. elem_size: the KV
    cache's. fp32 caches (deterministic compiles) at head dim 128 take 32-key tiles: 64 x 128 fp32 K / V tiles
    spilled 0.7-18 KB in the decode-layer attention block (make gpucheck, Qwen3-MoE shape, bf16-det). The tiles
    depend on the cache alone, so decode and the tree verify still reduce in one order."""
    if group < 1:
        raise ValueError(f"group must be positive, got {group}")
    block_d = block_d_for(head_dim)
    wide = block_d > (64 if elem_size >= 4 else 128)
    return DecodeBlocks(max(16, triton.next_power_of_2(group)), 32 if wide else 64, block_d,
                        num_warps=8 if wide and elem_size >= 4 else 4)


def decode_splits(heads_kv: int, s_max: int, device: DeviceSpec) -> int:
    """Split count of the KV axis for decode: about two waves of programs at batch 1, at least ~256 cache slots
    per split. It does not depend on the batch, so a row reduces in the same order whatever else is batched."""
    if heads_kv < 1 or s_max < 1:
        raise ValueError(f"heads_kv and s_max must be positive, got {heads_kv}, {s_max}")
    if device.interpret:
        return 1
    wanted = math.ceil(2 * device.sm_count / heads_kv)
    return max(1, min(wanted, max(1, s_max // 256), 64))


@dataclass(frozen=True)
class OutputProjection:
    """The attention block's tail (decode_attention.py.j2 with o_proj) over R rows (decode: the batch; tree verify:
    batch x draft nodes): the last split of each (row, kv head) (tickets in `group_sync`, int32 [R * Hkv], zeros
    before and after) merges the splits into the projection's scratch [R, Hq * D]; then `projection`
    (kernels/projection.py) computes residual + attention @ o_proj^T in programs of its own."""

    projection: Projection
    group_sync: torch.Tensor

    def launch(self, kernel: Any, attend: int, args: list[Any], device: DeviceSpec, **meta: Any) -> None:
        self.projection.launch(kernel, attend, [*args, self.group_sync], device, **meta)


# ---- launches ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionExtras:
    """Values of the logit features a kernel was rendered with (softcap > 0, window > 0, sinks [Hq], ALiBi slopes
    [Hq])."""

    softcap: float = 0.0
    window: int = 0
    sinks: torch.Tensor | None = None
    alibi: torch.Tensor | None = None

    def args(self) -> list[Any]:
        """The kernel arguments before sm_scale, in the template's order."""
        out: list[Any] = []
        if self.softcap:
            out.append(float(self.softcap))
        if self.window:
            out.append(int(self.window))
        if self.sinks is not None:
            out.append(self.sinks.contiguous())
        if self.alibi is not None:
            out.append(self.alibi.contiguous())
        return out


NO_EXTRAS = AttentionExtras()


def rope_pair(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin with one set of strides (the kernels take the strides once, for both)."""
    if cos.stride() != sin.stride():
        return cos.contiguous(), sin.contiguous()
    return cos, sin


def _row_stride(t: torch.Tensor) -> int:
    """Batch stride of a per-row argument given as one value for the batch ([1], stride 0) or one per row."""
    return 0 if t.numel() == 1 else t.stride(0)


def flash_attention(kernel: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    scale: float, device: DeviceSpec, *, cos: torch.Tensor | None = None,
                    sin: torch.Tensor | None = None, kv_start: torch.Tensor | None = None,
                    tree_mask: torch.Tensor | None = None, past: torch.Tensor | None = None,
                    deterministic: bool = False, extras: AttentionExtras = NO_EXTRAS,
                    mask: torch.Tensor | None = None) -> None:
    """One flash launch; the optional arguments must match the flags the kernel was rendered with. mask: an SDPA
    attn_mask (bool or additive) broadcastable to [B, Hq, Sq, Skv], read through broadcast strides."""
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    args: list[Any] = [q, k, v, out]
    if cos is not None:
        cos, sin = rope_pair(cos, sin)
        args += [cos, sin]
    if kv_start is not None:  # [B], or [B, Hkv] per kv head (kv_compression="adakv")
        args += [kv_start, _row_stride(kv_start), kv_start.stride(1) if kv_start.dim() == 2 else 0]
    if tree_mask is not None:  # tree [(B,) Sq, Sq] and past lengths after kv_start_ptr
        if tree_mask.dtype == torch.bool:
            tree_mask = tree_mask.view(torch.uint8)  # same bytes; avoids int1 pointers
        strides = tree_mask.stride() if tree_mask.dim() == 3 else (0, *tree_mask.stride())
        args += [tree_mask, *strides, past, _row_stride(past)]
    elif past is not None:  # device_len: row b attends over its first past[b] + Sq keys, read on device
        args += [past, _row_stride(past)]
    args += [Sq, Skv, Hq, Hq // Hkv, D]
    for t in (q, k, v, out):
        args += list(t.stride())
    if cos is not None:
        args += list(cos.stride())
    args += extras.args()
    if mask is not None:
        mask = mask.expand(B, Hq, Sq, Skv)
        args += [mask.view(torch.uint8) if mask.dtype == torch.bool else mask, *mask.stride()]
    args.append(float(scale))
    blocks = attention_blocks(Sq, Skv, D, device, deterministic, elem_size=q.element_size(),
                              tree=tree_mask is not None, rope=cos is not None, mask=mask is not None)
    launch_kernel(kernel, (triton.cdiv(Sq, blocks.block_m), B * Hq), *args, **blocks.meta(device))


def flash_per_row(kernel: Any, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                  scale: float, device: DeviceSpec, kv_start: torch.Tensor, cache_len: torch.Tensor,
                  device_len: bool, extras: AttentionExtras = NO_EXTRAS) -> None:
    """Deterministic prefill / path verify over the cache: one flash launch per batch row, over the row's keys from
    its kv_start on (and its queries from its first real token on), so query and key tiles start at the request's
    first token whatever its left padding: the request alone and left-padded in any batch runs the same tiles.
    Reads kv_start and cache_len on the host (not graph-capturable). Launches: a memset (padding queries output
    0), one small copy (per-row lengths), B flash kernels."""
    B, _, S, _ = q.shape
    starts = kv_start.reshape(-1).tolist()
    lens = cache_len.reshape(-1).tolist()
    rows = []
    for b in range(B):
        ks, c = int(starts[b if len(starts) > 1 else 0]), int(lens[b if len(lens) > 1 else 0])
        rows.append((ks, c, max(0, ks - c), max(0, c - ks)))  # (kv_start, cached, padding queries, past keys)
    out.zero_()
    device_op("memset")
    meta = torch.tensor([[0, past] for _, _, _, past in rows], dtype=torch.int32, device=q.device)
    device_op("copy")
    for b, (ks, c, cut, _) in enumerate(rows):
        total = c + S
        flash_attention(kernel, q[b:b + 1, :, cut:], k_cache[b:b + 1, :, ks:total], v_cache[b:b + 1, :, ks:total],
                        out[b:b + 1, :, cut:], scale, device, kv_start=meta[b, :1],
                        past=meta[b, 1:] if device_len else None, deterministic=True, extras=extras)


def tree_decode(module: Any, name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                out: torch.Tensor | None, cache_len: torch.Tensor, kv_start: torch.Tensor, tree_mask: torch.Tensor,
                scale: float, device: DeviceSpec, *, head_start: bool = False, splits: int | None = None,
                block: OutputProjection | None = None, extras: AttentionExtras = NO_EXTRAS) -> int:
    """Deterministic tree verify: every draft node of q [B, Hq, S, D] (rotated, its key and value written at
    cache_len + node) through the decode plan's split-KV kernel in its tree form: the same template, tiles and split
    count (decode_splits of the cache), over exactly the keys plain decoding reads at that node's position: the
    row's cache [kv_start, cache_len), then the node's ancestors in order, gathered by slot inside the kernel. So an
    accepted node's attention output (and, the other kernels being row-invariant, its logits) is bitwise what the
    decode plan computes there. Lengths and the tree are read on device: two launches, CUDA-graph capturable.
    head_start: kv_start is [B, Hkv] (kv_compression="adakv"). `splits` overrides decode_splits (tests).
    block (kernel rendered with o_proj): no combine; `out` is not written, the kernel writes block.out [B * S, N]
    (the deterministic verify's attention block, kernels/decode_layer.py): one launch."""
    B, Hq, S, D = q.shape
    Hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    splits = splits or decode_splits(Hkv, s_max, device)
    blocks = decode_blocks(group, D, k_cache.element_size())
    mid_o = torch.empty((B * S, Hq, splits, D), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((B * S, Hq, splits), dtype=torch.float32, device=q.device)
    tree = tree_mask.view(torch.uint8) if tree_mask.dtype == torch.bool else tree_mask
    tree = tree.expand(B, S, S)  # one tree for the batch: batch stride 0
    starts = [kv_start, kv_start.stride(0), kv_start.stride(1)] if head_start else [kv_start]
    args = [q, k_cache, v_cache, mid_o, mid_lse, cache_len, _row_stride(cache_len), tree, S, *tree.stride(),
            q.stride(2), *starts, Hkv, group, D, splits, q.stride(0), q.stride(1), q.stride(3), *k_cache.stride(),
            *v_cache.stride(), *extras.args(), float(scale)]
    opts = {} if device.interpret else {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}
    opts.update(BLOCK_G=blocks.block_g, BLOCK_N=blocks.block_n, BLOCK_D=blocks.block_d,
                BLOCK_S=triton.next_power_of_2(S))
    if block is not None:
        block.launch(getattr(module, f"{name}_partial"), B * S * Hkv * splits, args, device, **opts)
        return 1
    launch_kernel(getattr(module, f"{name}_partial"), (B * S * Hkv, splits), *args, **opts)
    opts = {} if device.interpret else {"num_warps": 4 if blocks.block_d >= 128 else 2}
    launch_kernel(getattr(module, f"{name}_combine"), (B * S * Hq,), mid_o, mid_lse, out, Hq, D, splits,
                  out.stride(0), out.stride(1), out.stride(3), S, out.stride(2),
                  BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=blocks.block_d, **opts)
    return 2


def rope_write(module: Any, name: str, tensors: dict[str, torch.Tensor], device: DeviceSpec,
               qk_norm_eps: float | None = None) -> torch.Tensor:
    """One launch of `<name>_rope_write`: returns roped q [B, Hq, S, D]; roped k and v go into the caches at
    cache_len + s (k rotated by cos/sin row s, i.e. at the position its position_ids gave it). qk_norm_eps (kernel
    rendered with qk_norm): q and k are RMS-normed per head by tensors' q_norm_weight / k_norm_weight first."""
    q, k, v = tensors["q"], tensors["k"], tensors["v"]
    cos, sin = tensors["cos"], tensors["sin"]
    cos, sin = rope_pair(cos, sin)
    kc, vc, cache_len = tensors["k_cache"], tensors["v_cache"], tensors["cache_len"]
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    # attention runs in the cache's dtype (kv_dtype): q is rotated in fp32 and stored like the keys
    qo = torch.empty((B, Hq, S, D), dtype=kc.dtype, device=q.device)
    rows = S * max(Hq, Hkv)
    block_r = pow2_clamp(rows, 1, 1024 if device.interpret else 32)
    args: list[Any] = [q, k, v, cos, sin, qo, kc, vc, cache_len, _row_stride(cache_len), S, Hq, Hkv, D]
    for t in (q, k, v, cos, qo, kc, vc):
        args += list(t.stride())
    if qk_norm_eps is not None:
        args += [tensors["q_norm_weight"], tensors["k_norm_weight"], float(qk_norm_eps)]
    launch_kernel(getattr(module, f"{name}_rope_write"), (B * triton.cdiv(rows, block_r), 2), *args,
                  BLOCK_R=block_r, BLOCK_D=triton.next_power_of_2(D))
    return qo


def split_kv_decode(module: Any, name: str, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    out: torch.Tensor | None, seq_lens: torch.Tensor, kv_start: torch.Tensor | None, scale: float,
                    device: DeviceSpec, splits: int | None = None, *, from_cache_len: bool = False,
                    head_start: bool = False, rope: tuple[torch.Tensor, ...] | None = None,
                    block: OutputProjection | None = None, ring: torch.Tensor | None = None,
                    qk_norm: tuple | None = None,
                    extras: AttentionExtras = NO_EXTRAS) -> int:
    """Decode attention of one query per row: q/out [B, Hq, D], caches [B, Hkv, S_max, D]. One split writes its
    normalised partial output straight into `out` (no combine launch). Returns the launches.
    from_cache_len (kernel rendered with it): `seq_lens` is the cache length before the new token, [1] for the
    batch or [B], any integer dtype; the kernel reads it and adds 1 (no torch op, no host read).
    head_start (kernel rendered with it): kv_start is [B, Hkv], one start per row and kv head.
    rope = (k_new, v_new, cos, sin) (kernel rendered with rope_write): q is not yet rotated; k_new/v_new [B, Hkv, D]
    are the new token's key and value, cos/sin [B or 1, D]; the kernel rotates q and k_new and writes k/v into
    the caches at the cache length (what `<name>_rope_write` would do, without its launch).
    block (kernel rendered with o_proj, needs rope): `out` is not written; the kernel merges the splits itself and
    writes block.out = block.residual + o_proj(attention) (kernels/decode_layer.py), one launch in all.
    ring [B, Hq, W, D] (kernel rendered with ring, needs rope): R-KV's query ring; the rotated q goes to slot
    cache_len % W.
    qk_norm = (q_norm_weight [D], k_norm_weight [D], eps) (kernel rendered with qk_norm, needs rope): q and k_new
    are RMS-normed per head before the rotation; weights [Hq * D] and [Hkv * D] with the kernel rendered with
    qk_norm_whole: over all heads of the row (OLMo 2); with qk_layer_norm a LayerNorm over each head, its weights
    [D] or one row per head (qk_norm_rows), and with qk_norm_bias two more entries: the q and k biases."""
    B, Hq, D = q.shape
    Hkv, s_max = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    splits = splits or decode_splits(Hkv, s_max, device)
    blocks = decode_blocks(group, D, k_cache.element_size())
    direct = block is None and splits == 1 and out.is_contiguous()
    mid_o = out if direct else torch.empty((B, Hq, splits, D), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((B, Hq, splits), dtype=torch.float32, device=q.device)
    fused = []
    if rope is not None:
        k_new, v_new, cos, sin = rope
        cos, sin = rope_pair(cos, sin)
        cos_b = 0 if cos.shape[0] == 1 else cos.stride(0)
        fused = [k_new, v_new, cos, sin, *k_new.stride(), *v_new.stride(), cos_b, cos.stride(-1)]
    if qk_norm is not None:
        fused += [qk_norm[0], qk_norm[1], float(qk_norm[2]), *qk_norm[3:]]
    if ring is not None:
        fused += [ring, ring.shape[2], *ring.stride()]
    lens = [seq_lens, _row_stride(seq_lens)] if from_cache_len else [seq_lens]
    starts = [kv_start] if kv_start is not None else []
    if head_start:
        starts += [kv_start.stride(0), kv_start.stride(1)]
    args = [q, k_cache, v_cache, mid_o, mid_lse, seq_lens, *fused, *lens[1:], *starts,
            Hkv, group, D, splits, *q.stride(), *k_cache.stride(), *v_cache.stride(), *extras.args(), float(scale)]
    opts = {} if device.interpret else {"num_warps": blocks.num_warps, "num_stages": blocks.num_stages}
    opts.update(BLOCK_G=blocks.block_g, BLOCK_N=blocks.block_n, BLOCK_D=blocks.block_d)
    if block is not None:
        block.launch(getattr(module, f"{name}_partial"), B * Hkv * splits, args, device, **opts)
        return 1
    launch_kernel(getattr(module, f"{name}_partial"), (B * Hkv, splits), *args, **opts)
    if direct:
        return 1
    opts = {} if device.interpret else {"num_warps": 4 if blocks.block_d >= 128 else 2}
    launch_kernel(getattr(module, f"{name}_combine"), (B * Hq,), mid_o, mid_lse, out, Hq, D, splits,
                  *out.stride(), BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=blocks.block_d, **opts)
    return 2


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _attention_mask_reason(node: fx.Node, explicit_mask: bool = False) -> str | None:
    """Why a node cannot use an attention kernel (None: it can). explicit_mask: the family reads an SDPA attn_mask
    (the forward flash kernel; the cached forms take masks as the causal flag, a window or ALiBi only)."""
    from braze.ops.schema import op_args

    a = op_args(node)
    if node.meta["val"].dtype not in FLOAT_NAMES:
        return f"{node.target} output dtype {node.meta['val'].dtype} has no kernel"
    mask = a.get("attn_mask")
    if mask is not None and not explicit_mask:
        return "attention with an explicit mask (not causal) runs eagerly"
    if mask is not None:
        m, q, k = mask.meta["val"], a["q"].meta["val"], a["k"].meta["val"]
        if m.dtype != torch.bool and m.dtype not in FLOAT_NAMES or m.dim() > 4:
            return f"an attention mask of {m.dtype} with {m.dim()} dims has no kernel"
        try:
            torch.broadcast_shapes(tuple(m.shape), (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            return f"an attention mask of shape {list(m.shape)} does not broadcast over the scores"
        if a.get("causal") or a.get("window") or a.get("alibi") is not None:
            return "an explicit mask with the causal flag, a window or ALiBi runs eagerly"
    if a["q"].meta["val"].shape[-1] > 256:
        return f"head dim {a['q'].meta['val'].shape[-1]} > 256"
    d_qk, d_v = a["q"].meta["val"].shape[-1], a["v"].meta["val"].shape[-1]
    if d_v != d_qk:  # the kernels tile q, k, v and the output with one BLOCK_D
        return f"value head dim {d_v} != query head dim {d_qk} runs eagerly"
    return None


def _extras_reason(a: dict[str, Any], causal: bool = True) -> str | None:
    """Why the kernels cannot take a general attention's logit features and positions (None: they can)."""
    cos, q = a.get("cos"), a["q"].meta["val"]
    if cos is not None and cos.meta["val"].shape[-1] != q.shape[-1]:
        return f"partial RoPE ({cos.meta['val'].shape[-1]} of {q.shape[-1]} dims) runs eagerly"
    if a.get("window") and not causal:
        return "a sliding window without the causal alignment runs eagerly"
    for role, what in (("sinks", "attention sinks"), ("alibi", "ALiBi slopes")):
        t = a.get(role)
        if t is not None and tuple(t.meta["val"].shape) != (q.shape[1],):
            return f"{what} of shape {list(t.meta['val'].shape)} (one per query head expected) run eagerly"
    if a.get("alibi") is not None and not causal:
        return "ALiBi without the causal alignment runs eagerly"
    return None


def _extras_params(a: dict[str, Any]) -> dict[str, Any]:
    """The Step params of a general attention's softcap and window (sinks and ALiBi slopes travel as input roles)."""
    return {"softcap": float(a.get("softcap") or 0.0), "window": int(a.get("window") or 0)}


def _extras_flags(a: dict[str, Any], extras: dict[str, Any]) -> dict[str, bool]:
    """The template flags (AttentionSpec / DecodeAttentionSpec) of those features."""
    return {"softcap": extras["softcap"] > 0, "window": extras["window"] > 0, "sinks": a.get("sinks") is not None,
            "alibi": a.get("alibi") is not None}


def _extras(tensors: dict[str, torch.Tensor], params: dict[str, Any]) -> AttentionExtras:
    return AttentionExtras(params.get("softcap", 0.0), params.get("window", 0), tensors.get("sinks"),
                           tensors.get("alibi"))


class AttentionFamily(KernelFamily):
    """braze::attention: flash attention forward, RoPE optionally fused into the q/k loads; braze::general_attention
    (softcap, sliding window, sinks, ALiBi) through the same kernel with those flags; an SDPA attn_mask (bool or
    additive, any broadcast shape: an encoder's padding mask) read per key tile, without the causal flag."""

    name = "attention"
    templates = ("attention.py.j2", "softcap.j2")

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401

        return (torch.ops.braze.attention.default, torch.ops.braze.general_attention.default)

    def supports(self, node: fx.Node) -> str | None:
        from braze.ops.schema import op_args

        a = op_args(node)
        return _attention_mask_reason(node, explicit_mask=True) or _extras_reason(a, bool(a["causal"]))

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.ops.schema import op_args
        from braze.runtime.plan import Step

        a = op_args(node)
        extras = _extras_params(a)
        mask = a.get("attn_mask")
        spec = AttentionSpec(name=name, causal=bool(a["causal"]), rope=a["cos"] is not None,
                             input_precision=_precision(a["q"].meta["val"].dtype),
                             out_dtype=FLOAT_NAMES[node.meta["val"].dtype], **_extras_flags(a, extras),
                             mask="" if mask is None else "bool" if mask.meta["val"].dtype == torch.bool else "add")
        roles = {k: a.get(k) for k in ("q", "k", "v", "cos", "sin", "sinks", "alibi", "attn_mask")
                 if a.get(k) is not None}
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[v.name for v in roles.values()],
                    params={"roles": list(roles), "scale": float(a["scale"]), "causal": bool(a["causal"]),
                            **{k: v for k, v in extras.items() if v}})
        return render_attention(spec), step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        flash_attention(getattr(module, name), tensors["q"], tensors["k"], tensors["v"], out, params["scale"],
                        device, cos=tensors.get("cos"), sin=tensors.get("sin"), extras=_extras(tensors, params),
                        mask=tensors.get("attn_mask"))


class CachedAttentionFamily(KernelFamily):
    """braze::cached_attention: prefill = RoPE + cache write, then flash over the cache; decode = one split-KV
    kernel that rotates, writes the new token into the cache and attends (+ the combine when split)."""

    name = "cached_attention"
    templates = ("kv_cache.py.j2", "attention.py.j2", "decode_attention.py.j2")

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401

        return (torch.ops.braze.cached_attention.default,)

    def supports(self, node: fx.Node) -> str | None:
        from braze.ops.schema import op_args

        a = op_args(node)
        q = a["q"].meta["val"]
        if a.get("q_norm_weight") is not None and isinstance(q.shape[2], int) and q.shape[2] == 1:
            return "q / k norms inside a one-token cached attention (the decode attention block takes them)"
        return _attention_mask_reason(node)

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.ops.schema import op_args
        from braze.runtime.plan import Step

        a = op_args(node)
        q = a["q"].meta["val"]
        decode = isinstance(q.shape[2], int) and q.shape[2] == 1
        qk_norm = a.get("q_norm_weight") is not None
        # the kernels read q (roped into the cache dtype), k and v in the cache's dtype (kv_dtype)
        precision, out_dtype = _precision(a["k_cache"].meta["val"].dtype), FLOAT_NAMES[node.meta["val"].dtype]
        # The cache length is read on device by the kernels (len_on_device): no host read, no torch op per call.
        head_start = a["kv_start"].meta["val"].dim() == 2  # kv_compression="adakv": per-head lengths
        if decode:  # RoPE and the cache write happen inside the decode kernel (fused_rope): one launch fewer
            attn = render_decode_attention(DecodeAttentionSpec(name, True, precision, out_dtype, from_cache_len=True,
                                                               head_start=head_start, rope_write=True))
        else:
            attn = render_attention(AttentionSpec(name, causal=True, rope=False, has_kv_start=True, device_len=True,
                                                  input_precision=precision, out_dtype=out_dtype))
        roles = ["q", "k", "v", "cos", "sin", "k_cache", "v_cache", "cache_len", "kv_start",
                 *(["q_norm_weight", "k_norm_weight"] if qk_norm else [])]
        k_cache = a["k_cache"].meta["val"]
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a[r].name for r in roles],
                    params={"roles": roles, "scale": float(a["scale"]), "decode": decode,
                            "heads_kv": int(k_cache.shape[1]), "s_max": int(k_cache.shape[2]), "len_on_device": True,
                            **({"head_start": True} if head_start else {}),
                            **({"fused_rope": True} if decode else {}),
                            **({"qk_norm_eps": float(a["qk_norm_eps"])} if qk_norm else {})})
        return attn if decode else attn + "\n\n" + render_cache_write(name, qk_norm), step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        kc, vc, cache_len, kv_start = tensors["k_cache"], tensors["v_cache"], tensors["cache_len"], tensors["kv_start"]
        if params.get("fused_rope"):  # decode: one kernel rotates, writes the cache and attends
            t = tensors
            split_kv_decode(module, name, t["q"][:, :, 0, :], kc, vc, out[:, :, 0, :], cache_len, kv_start,
                            params["scale"], device, from_cache_len=True, head_start=bool(params.get("head_start")),
                            rope=(t["k"][:, :, 0, :], t["v"][:, :, 0, :], t["cos"][:, 0, :], t["sin"][:, 0, :]))
            return
        qo = rope_write(module, name, tensors, device, params.get("qk_norm_eps"))
        if params.get("deterministic") and not params["decode"]:
            flash_per_row(getattr(module, name), qo, kc, vc, out, params["scale"], device, kv_start, cache_len,
                          bool(params.get("len_on_device")))
            return
        if params.get("len_on_device"):  # the kernels read cache_len: the whole step is launches only
            if params["decode"]:
                split_kv_decode(module, name, qo[:, :, 0, :], kc, vc, out[:, :, 0, :], cache_len, kv_start,
                                params["scale"], device, from_cache_len=True,
                                head_start=bool(params.get("head_start")))
            else:
                flash_attention(getattr(module, name), qo, kc, vc, out, params["scale"], device, kv_start=kv_start,
                                past=cache_len)
            return
        # plans saved before len_on_device: the kernels take the length from the host / a small torch op
        if not params["decode"]:
            total = int(cache_len.reshape(-1)[0]) + qo.shape[2]  # prefill is not graph-captured: a host read is fine
            flash_attention(getattr(module, name), qo, kc[:, :, :total], vc[:, :, :total], out, params["scale"],
                            device, kv_start=kv_start)
            return
        seq_lens = (cache_len.to(torch.int32) + 1).expand(qo.shape[0]).contiguous()
        split_kv_decode(module, name, qo[:, :, 0, :], kc, vc, out[:, :, 0, :], seq_lens, kv_start,
                        params["scale"], device)

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        if params.get("deterministic") and not params["decode"]:
            return 3 + int(out_shape[0])  # rope_write, memset, copy, one flash per row (flash_per_row)
        if not params["decode"]:
            return 2
        if "heads_kv" not in params:  # a plan saved before the count was recorded: the launcher decides per call
            return 2 if device.interpret else 3
        splits = decode_splits(params["heads_kv"], params["s_max"], device)
        return (1 if splits == 1 else 2) + (0 if params.get("fused_rope") else 1)


class TreeCachedAttentionFamily(KernelFamily):
    """braze::tree_cached_attention (tree verify): cache write, then flash over the cache in tree-mask mode. The
    cache length is read per row on device, so the step needs no host read and can be graph-captured."""

    name = "tree_cached_attention"
    templates = ("kv_cache.py.j2", "attention.py.j2")

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401

        return (torch.ops.braze.tree_cached_attention.default,)

    def supports(self, node: fx.Node) -> str | None:
        return _attention_mask_reason(node)

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.ops.schema import op_args
        from braze.runtime.plan import Step

        a = op_args(node)
        attn = render_attention(AttentionSpec(name, causal=True, rope=False, has_kv_start=True, tree_mask=True,
                                              input_precision=_precision(a["k_cache"].meta["val"].dtype),
                                              out_dtype=FLOAT_NAMES[node.meta["val"].dtype]))
        roles = ["q", "k", "v", "cos", "sin", "k_cache", "v_cache", "cache_len", "kv_start", "tree_mask"]
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a[r].name for r in roles],
                    params={"roles": roles, "scale": float(a["scale"])})
        return attn + "\n\n" + render_cache_write(name), step

    def lower_deterministic(self, node: fx.Node, name: str) -> tuple[str, Step]:
        """Deterministic verify: the decode plan's split-KV kernel in its tree form (tree_decode) instead of flash
        in tree-mask mode, so accepted positions' logits equal plain decoding's bitwise."""
        from braze.ops.schema import op_args

        body, step = self.lower(node, name)
        a = op_args(node)
        k_cache = a["k_cache"].meta["val"]
        head_start = a["kv_start"].meta["val"].dim() == 2  # kv_compression="adakv": per-head lengths
        attn = render_decode_attention(DecodeAttentionSpec(name, True, _precision(k_cache.dtype),
                                                           FLOAT_NAMES[node.meta["val"].dtype], from_cache_len=True,
                                                           head_start=head_start, tree=True))
        step.params.update(deterministic=True, heads_kv=int(k_cache.shape[1]), s_max=int(k_cache.shape[2]),
                           **({"head_start": True} if head_start else {}))
        return attn + "\n\n" + render_cache_write(name), step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        qo = rope_write(module, name, tensors, device)
        if params.get("deterministic"):
            tree_decode(module, name, qo, tensors["k_cache"], tensors["v_cache"], out, tensors["cache_len"],
                        tensors["kv_start"], tensors["tree_mask"], params["scale"], device,
                        head_start=bool(params.get("head_start")))
            return
        flash_attention(getattr(module, name), qo, tensors["k_cache"], tensors["v_cache"], out, params["scale"],
                        device, kv_start=tensors["kv_start"], tree_mask=tensors["tree_mask"],
                        past=tensors["cache_len"])

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        return 3 if params.get("deterministic") else 2  # rope_write, then tree_decode's two kernels / flash


class GeneralCachedAttentionFamily(KernelFamily):
    """braze::general_cached_attention whose features the kernels take (RoPE over the whole head; softcap, sliding
    window, sinks, ALiBi; no static bias): prefill = RoPE + cache write, then flash over the cache; decode =
    split-KV decode rotating and writing the new token itself; verify (a draft tree) = the tree form of split-KV
    decode, which counts window and ALiBi positions along the node's ancestors. Each with the logit-feature flags;
    what is left runs eagerly."""

    name = "general_cached_attention"
    templates = ("kv_cache.py.j2", "attention.py.j2", "decode_attention.py.j2", "softcap.j2")

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401

        return (torch.ops.braze.general_cached_attention.default,)

    def supports(self, node: fx.Node) -> str | None:
        from braze.ops.schema import op_args

        a = op_args(node)
        if a.get("attn_bias") is not None:
            return "a static attention bias (ALiBi, a dense mask) runs eagerly"
        if a.get("cos") is None:
            return "attention without RoPE to fuse runs eagerly"
        if a["kv_start"].meta["val"].dim() != 1:
            return "per-head cache starts (kv_compression) run eagerly"
        q = a["q"].meta["val"]
        one = isinstance(q.shape[2], int) and q.shape[2] == 1
        if a.get("q_norm_weight") is not None and (a.get("tree_mask") is not None or one):
            return "q / k norms inside a decode or verify general attention (the prefill's cache write takes them)"
        return _attention_mask_reason(node) or _extras_reason(a)

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.ops.schema import op_args
        from braze.runtime.plan import Step

        a = op_args(node)
        q = a["q"].meta["val"]
        k_cache = a["k_cache"].meta["val"]
        extras = _extras_params(a)
        flags = _extras_flags(a, extras)
        precision, out_dtype = _precision(k_cache.dtype), FLOAT_NAMES[node.meta["val"].dtype]
        tree = a.get("tree_mask") is not None
        decode = not tree and isinstance(q.shape[2], int) and q.shape[2] == 1
        if decode or tree:
            attn = render_decode_attention(DecodeAttentionSpec(name, True, precision, out_dtype, from_cache_len=True,
                                                               rope_write=decode, tree=tree, **flags))
        else:
            attn = render_attention(AttentionSpec(name, causal=True, rope=False, has_kv_start=True, device_len=True,
                                                  input_precision=precision, out_dtype=out_dtype, **flags))
        roles = ["q", "k", "v", "cos", "sin", "k_cache", "v_cache", "cache_len", "kv_start"]
        roles += [r for r in ("sinks", "alibi", "tree_mask", "q_norm_weight", "k_norm_weight") if a.get(r) is not None]
        qk_norm = a.get("q_norm_weight") is not None
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a[r].name for r in roles],
                    params={"roles": roles, "scale": float(a["scale"]), "decode": decode, "tree": tree,
                            "heads_kv": int(k_cache.shape[1]), "s_max": int(k_cache.shape[2]),
                            **{k: v for k, v in extras.items() if v},
                            **({"qk_norm_eps": float(a["qk_norm_eps"])} if qk_norm else {})})
        return attn if decode else attn + "\n\n" + render_cache_write(name, qk_norm), step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        t = tensors
        kc, vc, cache_len, kv_start = t["k_cache"], t["v_cache"], t["cache_len"], t["kv_start"]
        extras = _extras(t, params)
        if params["decode"]:
            split_kv_decode(module, name, t["q"][:, :, 0, :], kc, vc, out[:, :, 0, :], cache_len, kv_start,
                            params["scale"], device, from_cache_len=True, extras=extras,
                            rope=(t["k"][:, :, 0, :], t["v"][:, :, 0, :], t["cos"][:, 0, :], t["sin"][:, 0, :]))
            return
        qo = rope_write(module, name, t, device, params.get("qk_norm_eps"))
        if params["tree"]:
            tree_decode(module, name, qo, kc, vc, out, cache_len, kv_start, t["tree_mask"], params["scale"], device,
                        extras=extras)
        elif params.get("deterministic"):
            flash_per_row(getattr(module, name), qo, kc, vc, out, params["scale"], device, kv_start, cache_len, True,
                          extras=extras)
        else:
            flash_attention(getattr(module, name), qo, kc, vc, out, params["scale"], device, kv_start=kv_start,
                            past=cache_len, extras=extras)

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        if params["decode"]:
            return 1 if decode_splits(params["heads_kv"], params["s_max"], device) == 1 else 2
        if params["tree"]:
            return 3  # rope_write, the tree form's partial and combine
        if params.get("deterministic"):
            return 3 + int(out_shape[0])  # rope_write, memset, copy, one flash per row (flash_per_row)
        return 2


ATTENTION = AttentionFamily()
CACHED_ATTENTION = CachedAttentionFamily()
TREE_CACHED_ATTENTION = TreeCachedAttentionFamily()
GENERAL_CACHED_ATTENTION = GeneralCachedAttentionFamily()
