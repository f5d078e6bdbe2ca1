"""braze::gated_delta_rule and braze::cached_gated_delta_rule: gated DeltaNet linear attention as one op.

Qwen3-Next / Qwen3.5 / OLMo-hybrid layers carry a recurrent state S [Dk, Dv] per value head across positions:

    S = exp(g_t) * S;  S = S + k_t (beta_t (v_t - S^T k_t))^T;  o_t = S^T (q_t * Dk^-0.5)

(q_t, k_t L2-normalized when `l2norm`). Without beta it is decayed linear attention, S = exp(g_t) S + k_t v_t^T:
Mamba2's SSD scan (k = B, q = C, v = dt * x, g = dt * A). Kimi Delta Attention (Kimi-Linear, Bailing-hybrid) decays
each key channel by its own gate: S = diag(exp(g_t)) S with g_t [Dk]. HF computes it with a Python loop over chunks
whose count depends on the sequence length, which torch.export cannot capture with a dynamic sequence; braze
captures HF's function as this op instead (compiler/hf_functions.py). The cached form keeps S in a state cache [B,
H, Dk, Dv] (fp32) per layer, so the generation plans decode one token from it (passes/recurrent_state.py): a call
starts from zero when its row has no earlier tokens (cache_len <= kv_start), otherwise from the cache, skips the
left padding below kv_start (HF zeroes padded inputs, which leaves a zero state zero) and writes the state after its
last token back.

Value head h reads key head h // (H / Hk) (HF's repeat_interleave for more value than key heads). The math is in
fp32 in token order (the reference below; the kernel, kernels/gated_delta.py, sums in the same order up to the
in-register reductions), and the output is rounded once to q's dtype, as HF's is.
"""

from __future__ import annotations

import torch
from torch import Tensor

L2NORM_EPS = 1e-6  # HF's (and the FLA library's) l2norm epsilon


def _l2norm(x: Tensor) -> Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + L2NORM_EPS)


def gated_delta_scan(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None, scale: float, l2norm: bool,
                     state: Tensor, active: Tensor, decay_weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The recurrence over q, k [B, S, Hk, Dk], v [B, S, H, Dv], beta [B, S, H] (None: no delta, S += k v^T),
    g [B, S, H] (one decay per head) or [B, S, H, Dk] (one per key channel: Kimi Delta Attention) from `state`
    [B, H, Dk, Dv] (fp32); positions where `active` [B, S] is False leave the state alone and output zero. With
    `decay_weight` A [H, Dk, Dv], g is [B, S, H, Dv] and each state entry decays by exp(A[k, v] * g[v]) (Mamba's
    selective scan: channels as the value dim). Returns (out [B, S, H, Dv] fp32, final state)."""
    heads = v.shape[2]
    if k.shape[2] != heads:
        q, k = (t.repeat_interleave(heads // k.shape[2], dim=2) for t in (q, k))
    q, k, v, g = (t.float() for t in (q, k, v, g))
    if l2norm:
        q, k = _l2norm(q), _l2norm(k)
    q = q * scale
    s = state.float().clone()
    out = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for t in range(q.shape[1]):
        on = active[:, t].reshape(-1, 1, 1, 1)
        if decay_weight is not None:
            step = s * (decay_weight.float() * g[:, t, :, None, :]).exp()
        else:
            decay = g[:, t].exp()
            step = s * (decay[..., None] if g.dim() == 4 else decay[..., None, None])
        kt = k[:, t].unsqueeze(-1)
        delta = v[:, t] if beta is None else (v[:, t] - (step * kt).sum(-2)) * beta[:, t].float().unsqueeze(-1)
        step = step + kt * delta.unsqueeze(-2)
        s = torch.where(on, step, s)
        out[:, t] = torch.where(on[..., 0], (s * q[:, t].unsqueeze(-1)).sum(-2), 0.0)
    return out, s


@torch.library.custom_op("braze::gated_delta_rule", mutates_args=())
def gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None, scale: float,
                     l2norm: bool, decay_weight: Tensor | None = None) -> Tensor:
    """Gated DeltaNet over the whole sequence from a zero state (the forward plan); out [B, S, H, Dv] in q's
    dtype."""
    bsz, seq, heads, dv = v.shape
    state = torch.zeros(bsz, heads, k.shape[-1], dv, dtype=torch.float32, device=v.device)
    active = torch.ones(bsz, seq, dtype=torch.bool, device=v.device)
    return gated_delta_scan(q, k, v, g, beta, scale, l2norm, state, active, decay_weight)[0].to(q.dtype)


@gated_delta_rule.register_fake
def _gated_delta_rule_fake(q, k, v, g, beta, scale, l2norm, decay_weight=None):
    return v.new_empty(v.shape, dtype=q.dtype)


def cached_gated_delta_rule_reference(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None, state: Tensor,
                                      cache_len: Tensor, kv_start: Tensor, scale: float, l2norm: bool,
                                      decay_weight: Tensor | None = None) -> Tensor:
    """This call's tokens sit at slots [cache_len, cache_len + S) of each row; rows with tokens before them
    (cache_len > kv_start) start from `state`, others from zero; slots below kv_start are skipped. Writes the final
    state into `state`."""
    bsz, seq = v.shape[:2]
    lens = cache_len.reshape(-1).long().expand(bsz)
    starts = kv_start.reshape(bsz, -1)[:, 0].long()
    slots = lens[:, None] + torch.arange(seq, device=v.device)[None, :]
    active = slots >= starts[:, None]
    resume = (lens > starts).reshape(-1, 1, 1, 1)
    initial = torch.where(resume, state.float(), 0.0)
    out, final = gated_delta_scan(q, k, v, g, beta, scale, l2norm, initial, active, decay_weight)
    state.copy_(final.to(state.dtype))
    return out.to(q.dtype)


@torch.library.custom_op("braze::cached_gated_delta_rule", mutates_args=("state",))
def cached_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor | None, state: Tensor,
                            cache_len: Tensor, kv_start: Tensor, scale: float, l2norm: bool,
                            decay_weight: Tensor | None = None) -> Tensor:
    """Gated DeltaNet over the runtime's recurrent state [B, H, Dk, Dv] (the generation plans)."""
    return cached_gated_delta_rule_reference(q, k, v, g, beta, state, cache_len, kv_start, scale, l2norm,
                                             decay_weight)


@cached_gated_delta_rule.register_fake
def _cached_gated_delta_rule_fake(q, k, v, g, beta, state, cache_len, kv_start, scale, l2norm, decay_weight=None):
    return v.new_empty(v.shape, dtype=q.dtype)


RECURRENT_OPS = {"gated_delta_rule": torch.ops.braze.gated_delta_rule.default,
                 "cached_gated_delta_rule": torch.ops.braze.cached_gated_delta_rule.default}
