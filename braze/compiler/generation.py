"""Generation plans from the one capture: prefill (B x S tokens) and decode (B x 1) over a static KV cache.

The rewritten forward graph is copied, the "cache" phase (insert_kv_cache) turns its attention into cached
attention, and that graph is lowered twice: as is (prefill, dynamic S; after the "prefill" phase, which rewrites
it alone) and re-specialized to S = 1 by propagating fake tensors of the decode shapes through it (decode, then the
"decode" phase). The verify graph is a third copy ("verify" phase). All plans share the weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import (
    DimDynamic,
    ShapeEnv,
    StatelessSymbolicContext,
    free_unbacked_symbols,
)

from braze.codegen.lower import lower_graph
from braze.codegen.symbolic import to_sympy
from braze.compiler.capture import Captured, lazy_module
from braze.compiler.config import CompileConfig
from braze.compiler.pipeline import run_passes
from braze.compiler.report import CompileReport
from braze.kvcompress.policy import DURING_DECODE, Budget
from braze.ops.schema import op_args
from braze.passes.fake_memo import MemoFakeTensorProp
from braze.passes.kv_compression import compress_decode_graph, compress_verify_graph, insert_kv_compression
from braze.passes.quantize import fuse_df11_decode_plan
from braze.runtime.errors import ConfigError, KVCacheUnsupportedError, first_line
from braze.runtime.kv_compression import CompressionSpec
from braze.runtime.plan import Plan, SymbolSpec


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copied graph; node metas are shallow-copied (fake values shared). Lazy: its Python
    code is generated only if something runs it (braze/compiler/capture.py: lazy_module)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    return lazy_module(gm, graph)


def _respecialize_decode(gm: fx.GraphModule, weights: dict[str, torch.Tensor], max_batch: int
                         ) -> list[SymbolSpec]:
    """Propagate decode-shaped fake inputs (batch dynamic, S = 1) through a cached-attention graph. A graph whose
    ops pin the batch when re-traced at one token (Llama 4's complex RoPE: torch.polar's decomposition guards the
    batch against its example value) is propagated again with the batch fixed at max_batch: the decode plan then
    takes max_batch rows and the generator pads a smaller batch up to it (Generator.static_decode_batch)."""
    old_ids = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == "input_ids").meta["val"]
    if isinstance(old_ids.shape[0], int):  # compiled with max_batch=1: the batch dim is static
        _propagate_decode(gm, weights, old_ids.shape[0])
        return []
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=False)
    ctx = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC, DimDynamic.STATIC])
    batch = mode.from_tensor(torch.zeros(2, 1, dtype=torch.int64), symbolic_context=ctx).shape[0]
    _propagate_decode(gm, weights, batch, mode)
    if to_sympy(batch).is_number:  # the graph specialized the batch: a static plan at max_batch instead
        _propagate_decode(gm, weights, max_batch)
        return []
    return [SymbolSpec(str(to_sympy(batch)), "batch", 1, max_batch)]


def _propagate_decode(gm: fx.GraphModule, weights: dict[str, torch.Tensor], batch: Any,
                      mode: FakeTensorMode | None = None) -> None:
    mode = mode or FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=False)
    args = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        if n.name in weights:
            args.append(mode.from_tensor(weights[n.name], static_shapes=True))
            continue
        old = n.meta["val"]
        shape = [batch if i == 0 and not isinstance(s, int) else s for i, s in enumerate(old.shape)]
        if n.name in ("input_ids", "position_ids"):
            shape = [batch, 1]
        elif n.name == "cache_len":
            shape = [1]
        shape = [int(s) if isinstance(s, torch.SymInt) and s is not batch and s.node.is_constant() else s
                 for s in shape]
        with mode:
            args.append(torch.empty(shape, dtype=old.dtype, device=old.device))
    try:
        MemoFakeTensorProp(gm, mode).propagate_dont_convert_inputs(*args)
    except Exception as exc:  # e.g. data-dependent sizes (unbacked symbols) that fake propagation cannot redo
        if not any(free_unbacked_symbols(n.meta.get("val")) for n in gm.graph.nodes):
            raise
        raise KVCacheUnsupportedError(f"the decode graph has data-dependent sizes (e.g. MoE token routing) that "
                                      f"could not be re-traced at one token ({first_line(exc)[:120]}); the forward "
                                      "plan runs them eagerly") from exc


@dataclasses.dataclass
class GenerationPlans:
    prefill: Plan
    decode: Plan
    kv_inputs: list[tuple[str, list[int], str]]  # (placeholder, shape without batch, dtype)
    prefill_graph: fx.GraphModule
    decode_graph: fx.GraphModule
    verify: Plan | None  # None: the model cannot speculate (a recurrent state)
    verify_graph: fx.GraphModule
    compression: Any = None  # braze.runtime.kv_compression.CompressionSpec (kv_compression=...)


def compile_generation(cap: Captured, config: CompileConfig, report: CompileReport) -> GenerationPlans:
    if cap.mutations:  # the Generator feeds plans token ids, positions and caches, not the model's own state
        raise KVCacheUnsupportedError(f"the forward writes {', '.join(n for _, n in cap.mutations)} in place, "
                                      "which the KV-cache plans do not carry")
    gm = copy_graph_module(cap.gm)
    gen_cap = dataclasses.replace(cap, gm=gm)
    run_passes(gen_cap, config, report, phases=("cache",))
    weights = set(cap.weights)
    prefill_gm, compression = gm, None
    convs = [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("conv_cache_")]
    scans = [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("scan_state_")]
    if config.kv_compression and scans:
        raise ConfigError(f"kv_compression={config.kv_compression!r}: this model's {len(scans)} recurrent layers "
                          "(gated DeltaNet / SSD scans) hold the whole past in a recurrent state that evicting "
                          "KV-cache slots does not match; compile without kv_compression")
    if config.kv_compression and convs:
        raise ConfigError(f"kv_compression={config.kv_compression!r}: this model's {len(convs)} causal convolutions "
                          "read their inputs by cache slot, which compacting the KV cache would misalign; compile "
                          "without kv_compression")
    if config.speculate and scans:
        raise ConfigError(f"speculate={config.speculate!r}: this model's {len(scans)} recurrent layers (gated "
                          "DeltaNet / SSD scans) keep one recurrent state, which verifying drafts would advance "
                          "past rejected tokens; compile without speculate")
    if config.kv_compression:
        prefill_gm = copy_graph_module(gm)
        compression = _compress(prefill_gm, config, report)
    decode_gm, verify_gm = copy_graph_module(gm), copy_graph_module(gm)  # before the prefill-only rewrites
    run_passes(dataclasses.replace(cap, gm=prefill_gm), config, report, phases=("prefill",))
    prefill, _ = lower_graph(prefill_gm, "prefill", cap.symbols, weights, config.deterministic)
    if compression is not None:
        compress_decode_graph(decode_gm, compression.policy, compression.capacity, compression.window)
    symbols = _respecialize_decode(decode_gm, cap.weights, config.max_batch)
    if not symbols and config.max_batch > 1:
        report.extra["decode batch"] = (f"fixed at max_batch={config.max_batch}: the graph pins the batch when "
                                        "re-traced at one token; smaller batches are padded up to it")
    fuse_df11_decode_plan(decode_gm, cap.weights, config, report)  # quant="df11", df11_strategy="auto" only
    decode_fake = next(n.meta["val"] for n in decode_gm.graph.nodes if n.op == "placeholder" and n.name not in weights)
    run_passes(dataclasses.replace(cap, gm=decode_gm, fake_mode=decode_fake.fake_mode), config, report,
               phases=("decode",))
    decode, decode_record = lower_graph(decode_gm, "decode", symbols, weights, config.deterministic)
    if decode_record.fallbacks:  # what generation runs eagerly, with the passes' reasons (general attention, ...)
        report.extra["decode eager steps"] = _fallback_summary(decode_gm, decode_record.fallbacks)
    verify = None
    if not scans:  # (a recurrent state cannot verify drafts: generate refuses speculation, so no verify plan)
        run_passes(dataclasses.replace(cap, gm=verify_gm), config, report, phases=("verify",))
        if compression is not None:  # verify over the compacted cache
            compress_verify_graph(verify_gm, compression.policy, compression.capacity, compression.window)
        # then fold_decode_layers (after compression rewrote the tree attention's caches and starts): MLP blocks,
        # and under deterministic=True the tree attention blocks
        run_passes(dataclasses.replace(cap, gm=verify_gm), config, report, phases=("decode",))
        verify, _ = lower_graph(verify_gm, "verify", cap.symbols, weights, config.deterministic)
    kv = _kv_inputs(gm)
    if config.deterministic:
        report.extra["deterministic"] = _deterministic_summary(decode, cap.weights, kv)
    if compression is not None:
        compression.kv_inputs = _kv_inputs(decode_gm)
        compression.query_inputs = _kv_inputs(decode_gm, "kvq_")
    return GenerationPlans(prefill, decode, kv, prefill_gm, decode_gm, verify, verify_gm, compression)


def _kv_inputs(gm: fx.GraphModule, prefix: str | tuple[str, ...] = ("kv_cache_", "conv_cache_", "scan_state_")
               ) -> list[tuple[str, list[int], str]]:
    """(name, shape without batch, dtype) of the plan inputs the generator allocates per batch (the KV caches and
    the conv caches of cached convolutions, the recurrent states of gated DeltaNet / SSD layers)."""
    kv = []
    for n in gm.graph.nodes:
        if n.op == "placeholder" and n.name.startswith(prefix):
            v = n.meta["val"]
            kv.append((n.name, [int(s) for s in v.shape[1:]], str(v.dtype).removeprefix("torch.")))
    return kv


def _compress(prefill_gm: fx.GraphModule, config: CompileConfig, report: CompileReport) -> CompressionSpec:
    """kv_compression: the prefill graph compacts each layer's cache after its attention (passes/kv_compression)."""
    policy = config.kv_compression
    budget = Budget(config.kv_budget)
    capacity = budget.capacity(config.max_seq, policy, config.kv_window)
    layers = insert_kv_compression(prefill_gm, policy, capacity, config.kv_window)
    heads = {int(n.name.split("_")[2]): int(n.meta["val"].shape[1]) for n in prefill_gm.graph.nodes
             if n.op == "placeholder" and n.name.startswith("kvc_cache_") and n.name.endswith("_k")}
    again = ""
    if policy in DURING_DECODE:
        again = (f" and, whenever decode has filled the {capacity} slots, back to the budget of "
                 f"{budget.base(config.max_seq)} (every {budget.interval(config.max_seq, config.kv_window)} tokens)")
    report.extra["kv compression"] = (f"{policy}, budget {config.kv_budget} -> {capacity} of {config.max_seq} cache "
                                      f"slots per row and head, recent {config.kv_window} tokens kept; {layers} "
                                      f"caches compacted on device after prefill{again}")
    scale = next((float(op_args(n)["scale"]) for n in prefill_gm.graph.nodes
                  if n.target is torch.ops.braze.cached_attention.default), 1.0)
    return CompressionSpec(policy, config.kv_budget, config.kv_window, capacity, [], heads, policy == "adakv",
                           scale=scale, budget_slots=budget.base(config.max_seq))


def _fallback_summary(gm: fx.GraphModule, fallbacks: list[tuple[str, str]]) -> str:
    nodes = {n.name: n for n in gm.graph.nodes}
    parts = [f"{name} ({nodes[name].meta.get('braze_eager_reason') or reason})" if name in nodes else
             f"{name} ({reason})" for name, reason in fallbacks if not name.startswith("getitem")]
    return f"{len(parts)}: " + "; ".join(parts)


def _deterministic_summary(decode: Plan, weights: dict[str, torch.Tensor], kv: list) -> str:
    """The report line of a deterministic compile: what the mode does here and what it costs."""
    layercast = sum(1 for s in decode.steps
                    if s.launcher in ("matmul", "mlp_block") and "LayerCast" in decode.kernels[s.kernel])
    blocks = sum(1 for s in decode.steps if s.launcher in ("attention_block", "mlp_block"))
    dtypes = sorted({str(w.dtype).removeprefix("torch.") for w in weights.values()
                     if w.dtype in (torch.float16, torch.bfloat16)}) or ["16-bit"]
    kv_dtypes = "/".join(sorted({dtype for _, _, dtype in kv})) or "none"
    return (f"on: the prefill and decode plans are batch-invariant (fixed matmul tiles, BLOCK_M 16, no split-K "
            f"or float atomics; prefill attention launched per row; {blocks} decode attention / MLP blocks sum their "
            f"partials in a fixed order); {layercast} matmul / MLP-block kernels compute "
            f"{'/'.join(dtypes)} weights in fp32 (LayerCast); KV cache {kv_dtypes} (kv_dtype; RoPE and attention "
            f"scores in the cache's dtype), activations between kernels keep the model dtype; seeded sampling keyed "
            f"by (seed, position). The verify plan (speculative decoding) runs each query node through the decode "
            f"attention kernel (its tree form, on device, with the same o_proj tail), so accepted tokens' logits "
            f"equal plain decoding's bitwise. Cost: 3 + batch prefill attention launches per layer instead of 2, "
            f"small matmul tiles"
            f"{', fp32 dots instead of 16-bit tensor-core dots' if layercast else ''}. The forward plan is not "
            f"batch-invariant")


def attach_compression(compiled: Any, gen: GenerationPlans) -> None:
    """Hand the compression spec to the generator; the report's bytes come from allocated batch-1 caches."""
    spec = gen.compression
    if spec is None:
        return
    from braze.runtime.executor import zeros_for

    compiled.generator.compression = spec
    full = compiled.generator.new_caches(1)
    small = zeros_for(spec.kv_inputs, 1, compiled.device)
    full_bytes = sum(t.numel() * t.element_size() for t in full.values())
    small_bytes = sum(t.numel() * t.element_size() for t in small.values())
    compiled.report.extra["kv compression"] += (
        f"; decode KV cache {small_bytes} bytes per row vs {full_bytes} uncompressed "
        f"({full_bytes - small_bytes} saved, {small_bytes / full_bytes:.1%} kept)")
