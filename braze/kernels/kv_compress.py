"""KV-cache compression family: one layer's scoring, top-k selection and compaction as Triton kernels.

braze::kv_compress (and kv_compress_recording, R-KV's) runs after a prefill layer's cached attention: it scores the
prompt's cached tokens, selects the kept ones per row and head (Ada-KV: jointly over a row's heads) and compacts them
into the layer's compressed cache, all on device with counts read by the kernels (no host sync). The kernels are
kv_compress.py.j2's; braze/kvcompress is the torch reference they are tested against. The runtime's R-KV
re-compression during decoding launches the same kernels (`compress_layer`) on the full decode cache, in place.

Selection is a radix select (32 counting passes over a row, then one tie-breaking pass), not a sort: it equals a
stable descending sort's top-k (ties keep the earlier token) in O(32 P) per row and needs no shared memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import triton

from braze.kernels.attention import rope_pair
from braze.kernels.device import DeviceSpec
from braze.kernels.family import KernelFamily, launch_kernel, workspace_tensors
from braze.kernels.matmul import pow2_clamp
from braze.kernels.render import render_template

if TYPE_CHECKING:
    import torch.fx as fx

    from braze.runtime.plan import Step

# the kernels one layer's compression launches, per policy (kv_compress.py.j2)
POLICY_KERNELS = {
    "keydiff": ("keydiff", "select", "compact"),
    "snapkv": ("window", "pool", "select", "compact"),
    "adakv": ("window", "pool", "select", "select", "compact"),  # per-head caps, then the joint top-k
    "chunkkv": ("window", "pool", "chunk", "select", "compact"),
    "rkv": ("window", "last_dup", "redundancy", "pool", "select", "compact"),
}


def render_kv_compress(name: str) -> str:
    return render_template("kv_compress.py.j2", header="", name=name)


def scratch_sizes(batch: int, prompt: int, heads_q: int, heads_kv: int) -> dict[str, int]:
    """Elements of scratch one layer needs: fp32 scores + per-query-head (or R-KV importance and redundancy)
    scores; int32 keep mask + R-KV's near-duplicate index."""
    rows = batch * prompt
    return {"scratch_float32": rows * (heads_kv + max(heads_q, 2 * heads_kv)), "scratch_int32": rows * 2 * heads_kv}


def new_scratch(batch: int, prompt: int, heads_q: int, heads_kv: int,
                device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Uninitialized scratch of scratch_sizes for one compress_layer call outside a plan (R-KV's re-compression
    between decode steps; tests): the kernels write every element they read."""
    return {key: torch.empty(n, dtype=getattr(torch, key.removeprefix("scratch_")), device=device)
            for key, n in scratch_sizes(batch, prompt, heads_q, heads_kv).items()}


@dataclass
class LayerTensors:
    """One layer's compression. queries [B, Hq, n, D] holds the observation window at rows [q0, q0 + W) (prefill:
    the prompt's queries, RoPE from cos/sin; re-compression: the ring of recorded ones, already rotated). The
    first `prompt` slots of k/v_cache are scored; kept ones go to ck/cv_cache slots [end - count, end) and
    start_out [B, Hkv] (int32) gets end - count. keep / end: one-element int tensors on device. ring: R-KV's query
    ring written from the prefill window (slots (end - W + w) % window). attn: the prefill step's attention output
    and its pass-through copy, which the compaction kernel writes."""

    queries: torch.Tensor
    q0: int
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    ck_cache: torch.Tensor
    cv_cache: torch.Tensor
    kv_start: torch.Tensor
    keep: torch.Tensor
    end: torch.Tensor
    start_out: torch.Tensor
    prompt: int
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None
    ring: torch.Tensor | None = None
    attn: tuple[torch.Tensor, torch.Tensor] | None = None  # (attention output, the op's copy of it): prefill


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def _rope_tables(cos: torch.Tensor | None, sin: torch.Tensor | None, like: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """cos / sin [B or 1, S, D] with one set of strides for both (batch stride 0 when shared by the rows), or
    `like` as a placeholder pointer when there is no RoPE."""
    if cos is None or sin is None:
        return like, like, (0, 0, 0)
    cos, sin = rope_pair(cos, sin)
    return cos, sin, (0 if cos.shape[0] == 1 else cos.stride(0), cos.stride(1), cos.stride(2))


def compress_layer(module: Any, name: str, t: LayerTensors, policy: str, scale: float, window: int,
                   scratch: dict[str, torch.Tensor], device: DeviceSpec) -> None:
    """Launch one layer's compression (POLICY_KERNELS[policy]) from `module` (render_kv_compress(name));
    `scratch` holds scratch_float32 / scratch_int32 of at least scratch_sizes elements."""
    from braze.kvcompress.policy import ADAKV_SAFEGUARD, CHUNK, POOL_KERNEL, RKV_KERNEL, RKV_MIX

    kernels = {k: getattr(module, f"{name}_{k}") for k in set(POLICY_KERNELS[policy])}
    B, Hkv, _, D = t.k_cache.shape
    Hq, P = t.queries.shape[1], t.prompt
    W = min(window, P)
    rkv = policy == "rkv"
    f32, i32 = scratch["scratch_float32"], scratch["scratch_int32"]
    n = B * Hkv * P
    raw_len = B * (Hkv if rkv else Hq) * P  # R-KV's importance per kv head, SnapKV's scores per query head
    scores, raw, red = f32[:n], f32[n:n + raw_len], f32[n + raw_len:2 * n + raw_len]
    mask, dup = i32[:n], i32[n:2 * n]
    kv_start = t.kv_start.reshape(-1)
    k_strides = tuple(t.k_cache.stride())
    interp = device.interpret
    # logits / similarities: tl.dot on the cache's dtype; fp32 caches: three TF32 passes (near-fp32) on a GPU
    precision = "ieee" if interp or t.k_cache.dtype != torch.float32 else "tf32x3"
    block_d = triton.next_power_of_2(D)
    if "keydiff" in kernels:
        launch_kernel(kernels["keydiff"], (B * Hkv,), t.k_cache, kv_start, scores, P, Hkv, D, *k_strides,
                      BLOCK_P=pow2_clamp(P, 16, 256 if interp else 64), BLOCK_D=block_d)
    if "window" in kernels:
        q = t.queries
        ring = t.ring if t.ring is not None else q
        cos, sin, cos_strides = _rope_tables(t.cos, t.sin, q)
        launch_kernel(kernels["window"], (B * (Hkv if rkv else Hq),), q, cos, sin, ring, t.k_cache, kv_start, t.end,
                      raw, P, W, t.q0, P - window, ring.shape[2], Hq, Hkv, D, float(scale),
                      *q.stride(), *cos_strides,
                      *_strides(t.ring, 4), *k_strides,
                      GROUP=Hq // Hkv, RKV=rkv, ROPE=t.cos is not None, RING=t.ring is not None, PRECISION=precision,
                      BLOCK_W=max(16, triton.next_power_of_2(W)),
                      BLOCK_P=pow2_clamp(P, 16, 128 if interp else (32 if block_d * W > 4096 else 64)),
                      BLOCK_D=block_d)
    if rkv:
        block_ij = pow2_clamp(P, 16, 128 if interp else 32)
        grid = (B * Hkv, triton.cdiv(P, block_ij))
        warps = {"num_warps": 8} if precision == "tf32x3" else {}  # three operand splits per tile: more registers
        launch_kernel(kernels["last_dup"], grid, t.k_cache, kv_start, dup, P, Hkv, D, 0.5, *k_strides, **warps,
                      PRECISION=precision, BLOCK_I=block_ij, BLOCK_J=block_ij,
                      BLOCK_D=block_d)
        launch_kernel(kernels["redundancy"], grid, t.k_cache, kv_start, dup, red, P, Hkv, D, *k_strides, **warps,
                      PRECISION=precision, BLOCK_I=block_ij, BLOCK_J=block_ij,
                      BLOCK_D=block_d)
    block_row = pow2_clamp(P, 16, 4096 if interp else 512)
    if "pool" in kernels:
        launch_kernel(kernels["pool"], (B * Hkv,), raw, red if rkv else raw, kv_start, scores, P, W, Hkv,
                      float(RKV_MIX), GROUP=1 if rkv else Hq // Hkv, KERNEL=RKV_KERNEL if rkv else POOL_KERNEL,
                      RKV=rkv, BLOCK_P=block_row)
    if "chunk" in kernels:
        launch_kernel(kernels["chunk"], (B, triton.cdiv(P, CHUNK)), scores, kv_start, P, Hkv, CHUNK,
                      BLOCK_C=triton.next_power_of_2(CHUNK))
    select = (scores, kv_start, t.keep, t.end, mask, P, Hkv, window, float(ADAKV_SAFEGUARD))
    if policy == "adakv":  # each head's safeguard and cap, then the joint top-k over the row's heads
        launch_kernel(kernels["select"], (B * Hkv,), *select, MODE=1, BLOCK=block_row)
        launch_kernel(kernels["select"], (B,), *select, MODE=2, BLOCK=block_row)
    else:
        launch_kernel(kernels["select"], (B * Hkv,), *select, MODE=0, BLOCK=block_row)
    attn, attn_out = t.attn if t.attn is not None else (t.ck_cache, t.ck_cache)
    launch_kernel(kernels["compact"], (B * Hkv,), mask, t.k_cache, t.v_cache, t.ck_cache, t.cv_cache, t.start_out,
                  t.end, P, t.ck_cache.shape[2], Hkv, D, t.v_cache.shape[3], *k_strides, *t.v_cache.stride(),
                  *t.ck_cache.stride(), *t.cv_cache.stride(), attn, attn_out, Hq // Hkv, attn.shape[-1],
                  *attn.stride(), *attn_out.stride(), COPY=t.attn is not None,
                  BLOCK_P=pow2_clamp(P, 16, 128 if interp else 32), BLOCK_DK=block_d,
                  BLOCK_DV=triton.next_power_of_2(t.v_cache.shape[3]),
                  BLOCK_DA=triton.next_power_of_2(attn.shape[-1]) if t.attn is not None else 16)


def record_queries(kernel: Any, q: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                   ring: torch.Tensor, cache_len: torch.Tensor, attn_out: torch.Tensor, out: torch.Tensor) -> None:
    """R-KV decode / verify (braze::kv_record_query): each step's queries into the ring, attn_out copied to out."""
    B, Hq, S, D = q.shape
    da = attn_out.shape[-1]
    cos_t, sin_t, cos_strides = _rope_tables(cos, sin, q)
    launch_kernel(kernel, (B * Hq * S,), q, cos_t, sin_t, ring,
                  cache_len, 0 if cache_len.numel() == 1 else cache_len.stride(0), attn_out, out, S, Hq, D, da,
                  ring.shape[2], *q.stride(), *cos_strides, *ring.stride(), *attn_out.stride(), *out.stride(),
                  ROPE=cos is not None, BLOCK_D=triton.next_power_of_2(D), BLOCK_DA=triton.next_power_of_2(da))


class KvCompressFamily(KernelFamily):
    """braze::kv_compress / kv_compress_recording: a prefill layer's cache compressed into its decode cache;
    braze::kv_record_query: R-KV's per-step query recording in the decode and verify plans."""

    name = "kv_compress"
    templates = ("kv_compress.py.j2",)
    abi = 2  # 2: the compaction kernel writes the attention output's copy

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401

        return (torch.ops.braze.kv_compress.default, torch.ops.braze.kv_compress_recording.default,
                torch.ops.braze.kv_record_query.default)

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.ops.schema import op_args
        from braze.runtime.plan import Step

        a = op_args(node)
        rope = ["cos", "sin"] if a["cos"] is not None else []
        if node.target is torch.ops.braze.kv_record_query.default:
            roles, params = ["attn_out", "q", "q_ring", "cache_len", *rope], {"record": True}
        else:
            recording = node.target is torch.ops.braze.kv_compress_recording.default
            roles = ["attn_out", "q", "k_cache", "v_cache", "kv_start", "ck_cache", "cv_cache", "kv_keep",
                     "start_out", *(["q_ring"] if recording else []), *rope]
            params = {"scale": float(a["scale"]), "policy": str(a["policy"]), "window": int(a["window"]),
                      "heads_q": int(a["q"].meta["val"].shape[1]), "heads_kv": int(a["k_cache"].meta["val"].shape[1])}
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a[r].name for r in roles],
                    params={"roles": roles, **params})
        return render_kv_compress(name), step

    def workspace(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> dict[str, int]:
        if params.get("record"):
            return {}
        return scratch_sizes(int(out_shape[0]), int(out_shape[2]), int(params["heads_q"]), int(params["heads_kv"]))

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        t = tensors
        if params.get("record"):
            record_queries(getattr(module, f"{name}_record"), t["q"], t.get("cos"), t.get("sin"), t["q_ring"],
                           t["cache_len"], t["attn_out"], out)
            return
        q = t["q"]
        keep = t["kv_keep"]
        layer = LayerTensors(q, q.shape[2] - min(int(params["window"]), q.shape[2]), t["k_cache"], t["v_cache"],
                             t["ck_cache"], t["cv_cache"], t["kv_start"], keep[0:1], keep[1:2], t["start_out"],
                             q.shape[2], t.get("cos"), t.get("sin"), t.get("q_ring"), (t["attn_out"], out))
        compress_layer(module, name, layer, params["policy"], params["scale"], int(params["window"]),
                       workspace_tensors(t), device)

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        if params.get("record"):
            return 1
        return len(POLICY_KERNELS[params["policy"]])


KV_COMPRESS = KvCompressFamily()


__all__ = ["KV_COMPRESS", "POLICY_KERNELS", "LayerTensors", "compress_layer", "new_scratch", "record_queries",
           "render_kv_compress", "scratch_sizes"]
