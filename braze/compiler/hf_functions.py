"""HF functions braze captures as one braze op instead of tracing through them.

Gated DeltaNet layers (Qwen3-Next, Qwen3.5, OLMo-hybrid, ...) call `torch_chunk_gated_delta_rule` (Kimi Delta
Attention layers `chunk_kimi_delta_attention`, the same rule with a decay per key channel), a Python loop over
sequence chunks whose count depends on the sequence length: torch.export refuses a dynamic sequence through
it and the model fell back to Dynamo (a plan per prompt length, no package, no generation plans). While a model is
captured, each such function in the modules that define its layers is swapped for one that calls
braze::gated_delta_rule (ops/recurrent_state.py: the same recurrence, a plain-torch reference and a kernel). A
call the op does not cover (a recurrent state passed in or asked for: HF's own cache) runs HF's function.
Mamba2-style SSD scans (`mamba2_chunk_scan`) are the same op without the delta rule, and Mamba's selective scan
(`mamba_selective_scan`) that op with one head per channel.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

GATED_DELTA_FUNCTIONS = ("torch_chunk_gated_delta_rule", "torch_recurrent_gated_delta_rule",  # Qwen3.5 / Next
                         "chunk_kimi_delta_attention", "recurrent_kimi_delta_attention")  # Kimi-Linear, Bailing


def _as_gated_delta_op(original: Callable) -> Callable:
    def gated_delta_rule(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, g: torch.Tensor,
                         beta: torch.Tensor, *args: Any, initial_state: torch.Tensor | None = None,
                         output_final_state: bool = False, use_qk_l2norm_in_kernel: bool = False,
                         **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if args or initial_state is not None or output_final_state or kwargs.get("cu_seqlens") is not None:
            return original(query, key, value, g, beta, *args, initial_state=initial_state,
                            output_final_state=output_final_state,
                            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, **kwargs)
        import braze.ops  # noqa: F401  (registers braze::*)

        scale = float(query.shape[-1]) ** -0.5
        out = torch.ops.braze.gated_delta_rule(query, key, value, g, beta, scale, bool(use_qk_l2norm_in_kernel))
        return out, None

    gated_delta_rule.braze_substitute = True  # type: ignore[attr-defined]
    return gated_delta_rule


def _as_ssd_op(original: Callable) -> Callable:
    """Mamba2's SSD scan (`mamba2_chunk_scan`: Mamba2, Bamba, Falcon-H1, Granite-4 hybrids, Nemotron-H, Zamba2) is
    decayed linear attention: per head h, S = exp(dt A_h) S + B (dt x)^T, y = S^T C + D_h x. dt's bias, softplus
    and clamp and the D skip stay torch ops (they fuse); the scan is braze::gated_delta_rule without beta, in fp32
    as HF's (its output is fp32 too)."""
    def mamba2_chunk_scan(hidden_states: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                          C: torch.Tensor, chunk_size: int, D: torch.Tensor | None = None,
                          dt_bias: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
                          dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, float("inf")),
                          return_final_states: bool = False, **kwargs: Any) -> Any:
        if initial_states is not None or return_final_states or kwargs.get("seq_idx") is not None \
                or kwargs.get("cu_seqlens") is not None:
            return original(hidden_states, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias,
                            initial_states=initial_states, dt_softplus=dt_softplus, dt_limit=dt_limit,
                            return_final_states=return_final_states, **kwargs)
        import braze.ops  # noqa: F401  (registers braze::*)

        if dt_bias is not None:
            dt = dt + dt_bias.to(dt.dtype)
        if dt_softplus:
            dt = torch.nn.functional.softplus(dt)
        dt = torch.clamp(dt, min=dt_limit[0], max=dt_limit[1]).float()
        x = hidden_states.float()
        out = torch.ops.braze.gated_delta_rule(C.float(), B.float(), x * dt[..., None], A.float() * dt, None, 1.0,
                                               False)
        return out + D[..., None] * x if D is not None else out

    mamba2_chunk_scan.braze_substitute = True  # type: ignore[attr-defined]
    return mamba2_chunk_scan


def _as_selective_scan_op(original: Callable) -> Callable:
    """Mamba's selective scan (`mamba_selective_scan`: Mamba, Falcon-Mamba, Jamba, Zamba) keeps a state [N] per
    channel d with its own decay per state entry: h = exp(dt_d A_d) * h + B (dt_d x_d), y_d = C . h + D_d x_d. As
    the gated-delta op that is one head whose value dim is the channels (state [N, channels]), the decay of entry
    (n, d) exp(A[d, n] dt_d) from decay_weight A^T and g = dt; the skip and silu(z) gate stay torch ops (they
    fuse)."""
    def mamba_selective_scan(hidden_states: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                             C: torch.Tensor, D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                             delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                             return_last_state: bool = False, **kwargs: Any) -> Any:
        if return_last_state:
            return original(hidden_states, dt, A, B, C, D=D, z=z, delta_bias=delta_bias,
                            delta_softplus=delta_softplus, return_last_state=return_last_state, **kwargs)
        import braze.ops  # noqa: F401  (registers braze::*)

        if delta_bias is not None:
            dt = dt + delta_bias.to(dt.dtype)[..., None]
        if delta_softplus:
            dt = torch.nn.functional.softplus(dt)
        dt_t = dt.transpose(1, 2).float()  # [B, S, channels]
        x = hidden_states.transpose(1, 2).float()
        q, k = (t.transpose(1, 2).float().unsqueeze(2) for t in (C, B))  # [B, S, 1, N]
        y = torch.ops.braze.gated_delta_rule(q, k, (dt_t * x).unsqueeze(2), dt_t.unsqueeze(2), None, 1.0, False,
                                             A.float().t().unsqueeze(0))
        y = y.squeeze(2).transpose(1, 2)  # [B, channels, S] fp32
        if D is not None:
            y = y + hidden_states * D[None, :, None]
        return y * torch.nn.functional.silu(z) if z is not None else y

    mamba_selective_scan.braze_substitute = True  # type: ignore[attr-defined]
    return mamba_selective_scan


SUBSTITUTIONS: dict[str, Callable[[Callable], Callable]] = {
    **{name: _as_gated_delta_op for name in GATED_DELTA_FUNCTIONS}, "mamba2_chunk_scan": _as_ssd_op,
    "mamba_selective_scan": _as_selective_scan_op}


@contextlib.contextmanager
def braze_functions(model: torch.nn.Module) -> Iterator[list[str]]:
    """While active, the modules defining `model`'s layers call braze ops for the functions in SUBSTITUTIONS;
    yields the names swapped."""
    modules = {sys.modules.get(type(m).__module__) for m in model.modules()}
    swapped: list[tuple[Any, str, Callable]] = []
    try:
        for module in modules:
            for name, wrap in SUBSTITUTIONS.items():
                original = getattr(module, name, None) if module is not None else None
                if callable(original) and not getattr(original, "braze_substitute", False):
                    setattr(module, name, wrap(original))
                    swapped.append((module, name, original))
        yield sorted({name for _, name, _ in swapped})
    finally:
        for module, name, original in swapped:
            setattr(module, name, original)
