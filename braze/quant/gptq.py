"""GPTQ for braze's INT6 layout: Hessian-aware rounding with column-by-column error compensation.

The codes and scales have exactly the layout `braze.quant.int6` packs (per output row, groups of `group_size`
along K, symmetric q in [-32, 31], fp16 scale = absmax / 31 of the group *as it stands when the group starts*),
so the INT6 kernels run unchanged; only which integers are chosen differs from round-to-nearest.

    H = calibrate(model, tokenizer)              # {"model.layers.0.self_attn.q_proj.weight": H [K, K], ...}
    q, scales = gptq_quantize(w, H[name])        # int8 [N, K], fp16 [N, n_groups]

Algorithm (Frantar et al., GPTQ, 2022): H = 2 X^T X / n over calibration inputs X [n, K] of the linear;
dampen H += 1% mean(diag H) * I; U = upper Cholesky factor of H^-1. Columns are quantized left to right; the
error of column i, (w_i - q_i) / U_ii, is spread over the not-yet-quantized columns j > i with U_ij, which
minimises ||X W^T - X Q^T||^2 greedily. Updates inside a block of `block_size` columns are applied eagerly, to
later blocks in one matmul (lazy batch updates). act_order (off by default) quantizes columns by decreasing
diag(H); its group scales are then fixed up front from the original weight ("static groups"), so the layout
stays per contiguous K-group.

Calibration runs the eager HF model in fp32 on CPU over braze/data/calib_text.txt (never the evaluation text)
with forward pre-hooks on every nn.Linear; linears that read the same input tensor (q/k/v, gate/up) share one
H tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from braze.quant.calibration import collect
from braze.quant.int6 import WEIGHT_QMAX, WEIGHT_QMIN, Int6Weight, _check_group_size, pack_int6


def _group_scales(wg: Tensor) -> Tensor:
    """fp16 scales [N] for one group's columns wg [N, g] (absmax / 31, rounded to fp16)."""
    return (wg.abs().amax(dim=1) / WEIGHT_QMAX).to(torch.float16)


def _quant_col(w: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """(q, q * s) for one column w [N] with fp32 scales s [N] (0 -> the group reconstructs as 0)."""
    pos = s > 0
    q = torch.round(w / torch.where(pos, s, torch.ones_like(s))).clamp_(WEIGHT_QMIN, WEIGHT_QMAX)
    q = torch.where(pos, q, torch.zeros_like(q))
    return q, q * s


@torch.no_grad()
def gptq_quantize(w: Tensor, H: Tensor, group_size: int = 128, damp: float = 0.01, block_size: int | None = None,
                  act_order: bool = False) -> tuple[Tensor, Tensor]:
    """GPTQ-quantize a weight [N, K] given its input Hessian H [K, K].

    Returns (q int8 [N, K] in [-32, 31], scales fp16 [N, n_groups]), the layout of `quantize_weight_groups`.
    """
    if w.dim() != 2 or H.shape != (w.shape[1], w.shape[1]):
        raise ValueError(f"expected w [N, K] and H [K, K], got {tuple(w.shape)} and {tuple(H.shape)}")
    _check_group_size(group_size)
    block_size = block_size or group_size
    if not act_order and block_size % group_size:
        raise ValueError("block_size must be a multiple of group_size (a group's scales come from its block)")
    n, k = w.shape
    n_groups = -(-k // group_size)
    W = w.detach().float().clone()
    if not torch.isfinite(W).all():
        raise ValueError("weight has non-finite values")
    H = H.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    scales = torch.zeros(n, n_groups, dtype=torch.float16)
    perm = None
    if act_order:
        for g in range(n_groups):  # static groups: fixed from the original weight
            scales[:, g] = _group_scales(W[:, g * group_size:(g + 1) * group_size])
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True).float()
    Q = torch.zeros_like(W)
    if not torch.isfinite(scales.float()).all():
        raise ValueError("a group scale overflows fp16")
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            orig = int(perm[col]) if perm is not None else col
            g = orig // group_size
            if perm is None and col % group_size == 0:
                s16 = _group_scales(W1[:, i:i + group_size])
                if not torch.isfinite(s16.float()).all():
                    raise ValueError("a group scale overflows fp16")
                scales[:, g] = s16
            q, deq = _quant_col(W1[:, i], scales[:, g].float())
            Q[:, col] = q
            err = (W1[:, i] - deq) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int8), scales


def gptq_int6(w: Tensor, H: Tensor, group_size: int = 128, **kwargs: Any) -> Int6Weight:
    """`quantize_int6` with GPTQ rounding: a packed Int6Weight the existing kernels consume."""
    q, scales = gptq_quantize(w, H, group_size, **kwargs)
    return Int6Weight(packed=pack_int6(q, group_size), scales=scales, shape=(w.shape[0], w.shape[1]),
                      group_size=group_size)


def calibrate(model: torch.nn.Module, tokenizer: Any = None, ids: Tensor | None = None, max_tokens: int = 1024,
              window: int = 256) -> dict[str, Tensor]:
    """H = 2 X^T X / n for every nn.Linear of an eager HF causal LM, keyed by the linear's weight name
    (braze.quant.calibration.collect; siblings reading one input share one H tensor)."""
    return collect(model, tokenizer, ids, max_tokens, window).hessians


def layer_error(w: Tensor, wq: Tensor, H: Tensor) -> float:
    """sqrt(tr((W - Wq) H (W - Wq)^T)): with H = 2 X^T X / n, sqrt(2/n) * ||X W^T - X Wq^T||_F."""
    d = (w.float() - wq.float()).double()
    return math.sqrt(max(0.0, float(torch.einsum("ik,kl,il->", d, H.double(), d))))
