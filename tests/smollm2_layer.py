"""One SmolLM2-135M layer's real attention inputs for the KV-compression tests (the shipped text's first tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LayerKV:
    q: torch.Tensor  # [1, Hq, P, D] before RoPE
    keys: torch.Tensor  # [1, Hkv, P, D] as cached (after RoPE)
    values: torch.Tensor
    cos: torch.Tensor  # [1, P, D]
    sin: torch.Tensor
    config: object
    head_dim: int


def smollm2_layer_kv(layer: int = 3, tokens: int = 160) -> LayerKV:
    from braze.eval import eval_text
    from braze.models import load_smollm2

    model, tok = load_smollm2(torch.float32)
    ids = torch.tensor(tok(eval_text()).input_ids[:tokens])[None]
    seen = {}
    attn = model.model.layers[layer].self_attn
    hook = attn.q_proj.register_forward_hook(lambda m, i, o: seen.setdefault("q", o))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    hook.remove()
    entry = cache.layers[layer] if hasattr(cache, "layers") else None
    keys = entry.keys if entry is not None else cache.key_cache[layer]
    values = entry.values if entry is not None else cache.value_cache[layer]
    cfg, hd, p = model.config, attn.head_dim, ids.shape[1]
    q = seen["q"].view(1, p, cfg.num_attention_heads, hd).transpose(1, 2).contiguous()
    cos, sin = model.model.rotary_emb(q, torch.arange(p)[None])
    return LayerKV(q, keys, values, cos, sin, cfg, hd)
