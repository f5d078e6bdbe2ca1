"""The pass pipeline, in order, in one place (MLC-LLM style: one readable, phased list).

A pass is `fn(gm, ctx) -> int` (rewrites made). Every pass leaves the graph runnable eagerly: the nodes it
introduces are braze::* ops with reference implementations, so any prefix of this list can be golden-checked.
Passes edit `gm.graph` only: `run_passes` regenerates the module's Python code once, after the last pass (a
recompile of a 30-layer graph costs ~0.2 s; per pass and per rewrite it was a quarter of a SmolLM2 compile).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.fx as fx

from braze.passes.attention import substitute_attention
from braze.passes.complex_math import lower_complex
from braze.passes.constants import fold_constants
from braze.passes.context import PassContext
from braze.passes.convolution import recognize_convolution
from braze.passes.decode_layer import fold_decode_layers
from braze.passes.fusion import (
    decompose_unfused,
    fuse_linear_epilogue,
    fuse_norm_prologue,
    fuse_rope_into_attention,
    merge_sibling_linears,
)
from braze.passes.int6 import quantize_int6
from braze.passes.int6_act import split_int6_act_quant
from braze.passes.interleaved_rope import fuse_interleaved_rope
from braze.passes.kv_cache import insert_kv_cache, insert_tree_verify
from braze.passes.moe import fuse_moe_experts
from braze.passes.normalize import normalize
from braze.passes.patterns import (
    recognize_batched_matmul,
    recognize_gelu_tanh,
    recognize_glu,
    recognize_layer_norm,
    recognize_linear,
    recognize_rms_norm,
    recognize_rope,
)
from braze.passes.prefill import fold_prefill_qk_norm
from braze.passes.quantize import quantize_df11
from braze.passes.tensor_parallel import shard_tensor_parallel


@dataclass(frozen=True)
class PassSpec:
    name: str
    phase: str
    fn: Callable[[fx.GraphModule, PassContext], int]
    enabled: Callable[[Any], bool] = lambda config: True


PASSES: list[PassSpec] = [
    PassSpec("normalize", "normalize", normalize),
    PassSpec("fold_constants", "normalize", fold_constants),
    # complex RoPE (Llama 4's view_as_complex * polar) as real / imaginary pairs (braze/passes/complex_math.py)
    PassSpec("lower_complex", "normalize", lower_complex),
    PassSpec("recognize_linear", "patterns", recognize_linear),
    PassSpec("recognize_rms_norm", "patterns", recognize_rms_norm),
    PassSpec("recognize_layer_norm", "patterns", recognize_layer_norm),
    PassSpec("recognize_rope", "patterns", recognize_rope),
    PassSpec("recognize_gelu_tanh", "patterns", recognize_gelu_tanh),
    PassSpec("recognize_glu", "patterns", recognize_glu),
    PassSpec("substitute_attention", "attention", substitute_attention),
    PassSpec("recognize_batched_matmul", "patterns", recognize_batched_matmul),
    PassSpec("recognize_convolution", "patterns", recognize_convolution),
    # tp > 1: this rank's shard of the weights, all-reduces after row-parallel linears (braze/passes/tensor_parallel.py)
    PassSpec("shard_tensor_parallel", "parallel", shard_tensor_parallel,
             enabled=lambda config: getattr(config, "tp", 1) > 1),
    # epilogues before merging: a linear with an activation (Phi / Falcon's fc1) stays apart from its QKV siblings,
    # so each keeps its own epilogue and the MLP folds into the decode MLP block
    PassSpec("fuse_linear_epilogue", "fusion", fuse_linear_epilogue),
    PassSpec("merge_sibling_linears", "fusion", merge_sibling_linears),
    PassSpec("fuse_norm_prologue", "fusion", fuse_norm_prologue),
    PassSpec("fuse_rope_into_attention", "fusion", fuse_rope_into_attention),
    # MoE experts: routing's row gather and the SwiGLU inside the grouped matmul (braze/passes/moe.py)
    PassSpec("fuse_moe_experts", "fusion", fuse_moe_experts),
    # GPT-J / Cohere rotate_every_two: the same kernels over permuted head dims (braze/passes/interleaved_rope.py)
    PassSpec("fuse_interleaved_rope", "fusion", fuse_interleaved_rope),
    # quantization runs after the linear fusions (not before them): see braze/passes/quantize.py
    PassSpec("quantize_df11", "quant", quantize_df11, enabled=lambda config: config.quant == "df11"),
    PassSpec("quantize_int6", "quant", quantize_int6, enabled=lambda config: config.quant == "int6"),
    # W6A8 / W6A6: quantize activations in the kernel that produces them (braze/passes/int6_act.py)
    PassSpec("split_int6_act_quant", "quant", split_int6_act_quant, enabled=lambda config: config.quant == "int6"),
    PassSpec("decompose_unfused", "fusion", decompose_unfused),
    # generation graphs only (run on a copy of the forward graph, see compiler/generation.py)
    PassSpec("insert_kv_cache", "cache", insert_kv_cache),
    # the speculative verify graph (on a copy of the cache graph)
    PassSpec("insert_tree_verify", "verify", insert_tree_verify),
    # the decode graph (one token per row): each layer's attention and MLP halves as one launch each
    PassSpec("fold_decode_layers", "decode", fold_decode_layers),
    # the prefill graph (after decode and verify were copied): q / k norms into the cache write
    PassSpec("fold_prefill_qk_norm", "prefill", fold_prefill_qk_norm),
]
