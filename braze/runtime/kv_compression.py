"""The generator's side of KV-cache compression: per-call counts, the compressed caches and their starts.

The prefill plan fills the compressed caches (braze::kv_compress); this object allocates them, gives the prefill
its extra inputs, and gives decode its caches, per-row start (or per-layer, per-head starts for adakv) and the
slot where generated tokens go. R-KV (policy "rkv") also compresses during decoding: the plans record each layer's
last `window` queries in a ring (kvq_<i>), and when decode has filled the cache, `next_slot` compacts every layer
back to the budget on device before the step, between two decode replays, with no host sync: with the prefill
plan's kv_compress kernels (kernels/kv_compress.py) when it runs kernels, else the torch reference. Prefill leaves
every row's prompt ending at the budget slot (`plan_call`), so the batch re-compresses every interval of decode
steps from the first, whatever its prompts' lengths: a row's schedule, like its kept set (scored over its own
tokens and queries), does not depend on the rest of the batch or its padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from braze.kvcompress.policy import DURING_DECODE, Budget, select_keep
from braze.kvcompress.select import compact
from braze.runtime.errors import ShapeOutOfRangeError
from braze.runtime.executor import zeros_for


@dataclass
class CompressionSpec:
    policy: str
    budget: float | int
    window: int
    capacity: int  # slots per row and head of the decode cache
    kv_inputs: list  # (name, shape without batch, dtype) of the decode caches (at capacity)
    heads: dict  # cache index -> kv heads (the kvc_start_<i> inputs are [B, heads])
    per_head: bool  # adakv: decode masks each layer with its own per-head start
    query_inputs: list = field(default_factory=list)  # rkv: (name, shape without batch, dtype) of the query rings
    scale: float = 1.0  # rkv: the attention scale of the importance logits
    budget_slots: int = 0  # rkv: slots kept when decode re-compresses (the budget; capacity - budget = interval)


@dataclass
class CompressionKernels:
    """The prefill plan's kv_compress kernels, which R-KV's decode-time re-compression launches too, and their
    scratch (grown once to the largest batch re-compressed)."""

    module: Any
    name: str
    device: Any  # braze.kernels.DeviceSpec
    scratch: dict[str, torch.Tensor] = field(default_factory=dict)

    def scratch_for(self, batch: int, slots: int, heads_q: int, heads_kv: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
        from braze.kernels.kv_compress import new_scratch, scratch_sizes

        need = scratch_sizes(batch, slots, heads_q, heads_kv)
        if any(key not in self.scratch or self.scratch[key].numel() < n for key, n in need.items()):
            self.scratch = new_scratch(batch, slots, heads_q, heads_kv, device)
        return self.scratch


def records_queries(step: Any) -> bool:
    """A plan step that launches kv_record_query's kernel (the kv_compress family's `record` form)."""
    params = getattr(step, "params", None) or {}
    return getattr(step, "launcher", None) == "kv_compress" and bool(params.get("record"))


def compression_kernels(executor: Any) -> CompressionKernels | None:
    """The kv_compress kernels of a prefill PlanExecutor (None: the reference executor, or no compression step)."""
    from braze.runtime.executor import PlanExecutor

    if not isinstance(executor, PlanExecutor):
        return None
    for step in executor.plan.steps:
        if step.launcher == "kv_compress" and not records_queries(step):
            return CompressionKernels(executor.module(step.kernel), step.kernel, executor.spec)
    return None


@dataclass
class CompressedCall:
    keep: int  # mean prompt tokens kept per row and head
    end: int  # decode writes from this slot on (rkv: the budget, for every prompt length)
    caches: dict  # kv_cache_<i>_k/v at capacity
    starts: dict  # kvc_start_<i> [B, Hkv] int32
    queries: dict = field(default_factory=dict)  # kvq_<i> [B, Hq, window, D]: rkv's rings of recent queries
    recompressions: int = 0
    kernels: CompressionKernels | None = None  # rkv re-compresses with these (None: the torch reference)


def compressed_buffers(spec: CompressionSpec, batch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The decode caches at the compressed capacity (kv_cache_<i>_k/v) and their starts (kvc_start_<i>)."""
    starts = {f"kvc_start_{i}": torch.zeros(batch, h, dtype=torch.int32, device=device) for i, h in spec.heads.items()}
    return {**zeros_for(spec.kv_inputs, batch, device), **starts, **zeros_for(spec.query_inputs, batch, device)}


def max_new_tokens_for(spec: CompressionSpec, prompt_len: int, max_seq: int, wanted: int) -> int:
    """The most new tokens, up to `wanted`, that leave the prompt its kv_window in the compressed cache (0: none);
    what `braze run` clamps --max-new-tokens to, as plan_call would refuse more."""
    budget = Budget(spec.budget)
    for n in range(wanted, 0, -1):
        if budget.keep(prompt_len, n, max_seq, spec.policy) >= min(spec.window, prompt_len):
            return n
    return 0


def plan_call(spec: CompressionSpec, prompt_len: int, max_new_tokens: int, max_seq: int,
              buffers: dict[str, torch.Tensor], kernels: CompressionKernels | None = None) -> CompressedCall:
    """Counts for one generate call (host integers from shapes: no device read) over `buffers`
    (compressed_buffers: reused across calls when decode replays CUDA graphs); `kernels` re-compress (rkv)."""
    keep = Budget(spec.budget).keep(prompt_len, max_new_tokens, max_seq, spec.policy)
    if keep < min(spec.window, prompt_len):
        raise ShapeOutOfRangeError(
            f"max_new_tokens={max_new_tokens} leaves {max(keep, 0)} slots of the compressed KV cache (capacity "
            f"{spec.capacity}) for the prompt, fewer than kv_window={spec.window}; raise kv_budget or generate fewer "
            "tokens")
    end = min(prompt_len, spec.capacity - max_new_tokens) if spec.per_head else keep
    if spec.policy in DURING_DECODE and keep <= spec.budget_slots < spec.capacity:
        # rkv: every row's kept prompt ends at the budget, however long the (padded) prompt is, so decode fills the
        # interval and re-compresses every `capacity - budget` steps from the first: a schedule of the step alone,
        # the same for a row alone or left-padded in any batch (ending at `keep`, a prompt padded to the budget
        # would fill its row's interval earlier than the row's own length does alone, and be compacted sooner)
        end = spec.budget_slots
    caches = {name: t for name, t in buffers.items() if name.startswith("kv_cache_")}
    starts = {name: t for name, t in buffers.items() if name.startswith("kvc_start_")}
    queries = {name: t for name, t in buffers.items() if name.startswith("kvq_")}
    return CompressedCall(keep, end, caches, starts, queries, kernels=kernels)


def prefill_inputs(call: CompressedCall, device: torch.device) -> dict[str, torch.Tensor]:
    """The prefill plan's compression inputs: kv_keep = (keep, end), the compressed caches, the starts."""
    out = {"kv_keep": torch.tensor([call.keep, call.end], dtype=torch.int64, device=device), **call.starts,
           **call.queries}
    out.update({"kvc_" + name.removeprefix("kv_"): t for name, t in call.caches.items()})
    return out


def decode_state(spec: CompressionSpec, call: CompressedCall, kv_start: torch.Tensor
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(kv_start, overwritten with the per-row start of uniform policies; extra decode inputs: the per-head starts
    for adakv)."""
    return _row_start(call, kv_start), {**(call.starts if spec.per_head else {}), **call.queries}


def _row_start(call: CompressedCall, kv_start: torch.Tensor) -> torch.Tensor:
    """kv_start <- each row's start in the compressed cache (uniform policies: every head of every cache alike)."""
    return kv_start.copy_(next(iter(call.starts.values()))[:, 0])


def next_slot(spec: CompressionSpec, call: CompressedCall, slot: int, kv_start: torch.Tensor) -> int:
    """The cache slot the next decode step writes: `slot`, or, for rkv when the cache is full, the budget, after
    every layer's cache has been compacted back to it (kv_start and the starts updated in place)."""
    if spec.policy not in DURING_DECODE or slot < spec.capacity:
        return slot
    return recompress(spec, call, kv_start)


def recompress(spec: CompressionSpec, call: CompressedCall, kv_start: torch.Tensor, row: int | None = None) -> int:
    """rkv: compact every layer's full cache (capacity slots) back to the budget, scored with the ring of recent
    queries, for the batch or one `row` (speculation: rows fill their caches at different steps; a row's selection
    reads only its own cache and queries, so it is the one the whole batch's would make for it). kv_start and the
    starts are updated in place; returns the slot the next token goes to (the budget)."""
    rows = slice(None) if row is None else slice(row, row + 1)
    slot, budget = spec.capacity, spec.budget_slots
    keep = torch.full((1,), budget, dtype=torch.int64, device=kv_start.device)
    valid = torch.arange(slot, device=kv_start.device)[None] >= kv_start[rows].reshape(-1, 1).long()
    for i in spec.heads:
        k_cache, v_cache = call.caches[f"kv_cache_{i}_k"][rows], call.caches[f"kv_cache_{i}_v"][rows]
        ring = call.queries[f"kvq_{i}"][rows]
        if call.kernels is not None:
            _recompress_with_kernels(spec, call.kernels, ring, k_cache, v_cache, kv_start[rows], keep,
                                     call.starts[f"kvc_start_{i}"][rows])
            continue
        queries = ring.to(torch.promote_types(ring.dtype, k_cache.dtype))
        mask = select_keep(spec.policy, k_cache[:, :, :slot], valid, keep, keep, spec.window, queries, spec.scale)
        compact(k_cache, mask, k_cache, keep)
        start = compact(v_cache, mask, v_cache, keep)
        call.starts[f"kvc_start_{i}"][rows].copy_(start)
    _row_start(call, kv_start)
    call.recompressions += 1
    return budget


def _recompress_with_kernels(spec: CompressionSpec, kernels: CompressionKernels, ring: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor, kv_start: torch.Tensor, keep: torch.Tensor,
                             start_out: torch.Tensor) -> None:
    """One layer re-compressed in place by the kv_compress kernels: the ring's queries score the full cache."""
    from braze.kernels.kv_compress import LayerTensors, compress_layer

    batch, heads_kv, slots = k_cache.shape[0], k_cache.shape[1], spec.capacity
    scratch = kernels.scratch_for(batch, slots, ring.shape[1], heads_kv, k_cache.device)
    layer = LayerTensors(ring, 0, k_cache, v_cache, k_cache, v_cache, kv_start, keep, keep, start_out, slots)
    compress_layer(kernels.module, kernels.name, layer, spec.policy, spec.scale, spec.window, scratch,
                   kernels.device)
