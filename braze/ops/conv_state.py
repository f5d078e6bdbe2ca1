"""braze::cached_conv1d: a causal depthwise convolution over the sequence whose past lives in a runtime cache.

LFM2's short convs (and Mamba-style hybrids' causal convs) read the K - 1 positions before each token. Without
that state the KV-cache plans cannot decode such a model (passes/kv_cache.py refused it and generation recomputed
the whole prefix every token). The cache is laid out like one KV head whose head dim is the channel count,
[B, 1, max_seq, C], and indexed by cache slot like the KV cache: each call writes its tokens' inputs at
[cache_len, cache_len + S), reads earlier slots for the taps before the call, and masks slots below kv_start (left
padding reads as zero, as HF zeroes padded positions before the conv). The same rules serve prefill, decode, path
verify (a rejected draft's slot is overwritten before anything reads it) and draft trees (a node's taps follow its
ancestors; accepted nodes are compacted to consecutive slots with the KV cache, runtime/speculative.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from braze.ops.library import apply_activation


def tree_depths(tree_mask: Tensor) -> Tensor:
    """Depth of each verify node [B, S]: a node sees itself and its ancestors, so its depth is that count - 1."""
    return tree_mask.bool().sum(-1) - 1


def cached_conv1d_reference(x: Tensor, weight: Tensor, bias: Tensor | None, cache: Tensor, cache_len: Tensor,
                            kv_start: Tensor, tree_mask: Tensor | None = None, gate_in: Tensor | None = None,
                            gate_out: Tensor | None = None, activation: str = "none") -> Tensor:
    """out[b, c, s] = bias[c] + sum_j weight[c, 0, j] * h[b, c, slot(s) - (K - 1) + j] (fp32 sums, in order of j),
    where h is this call's x at its own slots and the cache before them, zero below kv_start[b]. Writes x into the
    cache at [cache_len, cache_len + S). With a tree mask [B, S, S], node s sits at depth d and its tap t back is
    its ancestor at depth d - t (or, past the root, cache slot cache_len + d - t). LFM2's gates: x is
    gate_in * x and the output gate_out * out, each rounded to x's dtype as the separate multiplies were.
    `activation` (ops/library.py ACTIVATIONS; Qwen3.5's silu) applies to the rounded output, before gate_out."""
    if gate_in is not None:
        x = x * gate_in
    out = apply_activation(_conv(x, weight, bias, cache, cache_len, kv_start, tree_mask), activation)
    return gate_out * out if gate_out is not None else out


def _conv(x: Tensor, weight: Tensor, bias: Tensor | None, cache: Tensor, cache_len: Tensor, kv_start: Tensor,
          tree_mask: Tensor | None) -> Tensor:
    bsz, channels, seq = x.shape
    taps = weight.shape[-1]
    lens = cache_len.reshape(-1).long().expand(bsz)
    starts = kv_start.reshape(bsz, -1)[:, 0].long()
    out = torch.empty(bsz, channels, seq, dtype=torch.float32, device=x.device)
    depths = tree_depths(tree_mask) if tree_mask is not None else None
    for b in range(bsz):
        length = int(lens[b])
        cache[b, 0, length:length + seq] = x[b].transpose(0, 1).to(cache.dtype)
        for s in range(seq):
            depth = int(depths[b, s]) if depths is not None else s
            acc = torch.zeros(channels, dtype=torch.float32, device=x.device)
            for j in range(taps):
                back = taps - 1 - j
                d = depth - back
                slot = length + d
                if slot < int(starts[b]) or slot < 0:
                    continue
                if d >= 0:  # this call's token at depth d: itself / its ancestor
                    src = s - back if depths is None else int(((depths[b] == d) & tree_mask[b, s].bool()).nonzero()[0])
                    v = x[b, :, src]
                else:
                    v = cache[b, 0, slot]
                acc = acc + weight[:, 0, j].float() * v.float()
            out[b, :, s] = acc + bias.float() if bias is not None else acc
    return out.to(x.dtype)


@torch.library.custom_op("braze::cached_conv1d", mutates_args=("cache",))
def cached_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None, cache: Tensor, cache_len: Tensor,
                  kv_start: Tensor, tree_mask: Tensor | None = None, gate_in: Tensor | None = None,
                  gate_out: Tensor | None = None, activation: str = "none") -> Tensor:
    """A causal depthwise conv1d (x [B, C, S], weight [C, 1, K]) over the runtime's conv cache [B, 1, T, C]."""
    return cached_conv1d_reference(x, weight, bias, cache, cache_len, kv_start, tree_mask, gate_in, gate_out,
                                   activation)


@cached_conv1d.register_fake
def _cached_conv1d_fake(x, weight, bias, cache, cache_len, kv_start, tree_mask=None, gate_in=None, gate_out=None,
                        activation="none"):
    return x.new_empty(x.shape)


CONV_STATE_OPS = {"cached_conv1d": torch.ops.braze.cached_conv1d.default}
