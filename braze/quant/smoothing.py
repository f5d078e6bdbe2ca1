"""Activation-aware smoothing and A6/A8 sensitivity for INT6 linears, measured on calibration samples.

Smoothing (AWQ, Lin et al. 2023; SmoothQuant's migration for the activation side): for an input-channel scale
s [K], ``x @ W^T == (x / s) @ (W * s)^T`` exactly, but quantizing ``W * s`` instead of ``W`` gives the channels
that carry large activations finer weight steps, and dividing x by s flattens activation outliers before
per-group activation quantization. The stored format is unchanged (6-bit codes, fp16 group scales); the only
runtime cost is one multiply by 1/s, which the compiler fuses into the kernel that produces x (RMSNorm or the
SwiGLU product).

The search is AWQ's: s = d**alpha / sqrt(max * min) with d = mean |x| per channel, alpha on a grid in [0, 1],
keeping the alpha with the smallest output error ||X W^T - fq_a(X / s) fq_w(W * s)^T|| / ||X W^T|| on the
calibration rows X (fq_a = identity for W6A16). alpha = 0 is plain round-to-nearest, so smoothing never does
worse than RTN on the calibration data.

Sensitivity: the same relative output error, measured with A6 activations, decides whether a linear may run
W6A6; a linear above the tolerance runs W6A8 instead (FlexQ's per-layer choice; down_proj is the usual one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from braze.quant.int6 import fake_quant_activation, fake_quant_weight

ALPHAS = tuple(i / 10 for i in range(11))
A16 = 16


@dataclass
class Smoothing:
    scale: Tensor  # s [K] fp32: quantize W * s, feed x / s
    alpha: float
    rel_error: float  # on the calibration rows, with the activation precision it was searched for

    @property
    def is_identity(self) -> bool:
        return self.alpha == 0.0


def _scale(d: Tensor, alpha: float) -> Tensor:
    if alpha == 0.0:
        return torch.ones_like(d)
    s = d.pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def output_error(w: Tensor, x: Tensor, act_bits: int, s: Tensor, group_size: int = 128,
                 reference: Tensor | None = None, quantized_weight: Tensor | None = None) -> float:
    """||X W^T - fq_a(X / s) fq_w(W * s)^T|| / ||X W^T|| in fp32 (act_bits 16: activations unquantized).
    reference / quantized_weight: X W^T and fq_w(W * s) when the caller has them already."""
    w, x = w.float(), x.float()
    y = x @ w.T if reference is None else reference
    xs = x / s
    if act_bits != A16:
        xs = fake_quant_activation(xs, act_bits, group_size)
    wq = fake_quant_weight(w * s, group_size) if quantized_weight is None else quantized_weight
    err = xs @ wq.T - y
    return float(err.norm() / y.norm().clamp_min(1e-30))


@torch.no_grad()
def search_smoothing(w: Tensor, x: Tensor, act_bits: int = A16, group_size: int = 128,
                     alphas: tuple[float, ...] = ALPHAS, smooth: bool = True,
                     shared: dict | None = None) -> Smoothing:
    """The smoothing of weight w [N, K] that minimises the output error on calibration rows x [R, K].

    smooth=False measures plain round-to-nearest only (alpha 0): for a linear whose input cannot absorb a
    multiply for free. shared: a dict the caller passes to every search of the same (w, x) (W6A6, then W6A8 when
    A6 is rejected): X W^T and each alpha's fake-quantized weight are computed once for all of them.
    """
    if x.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"calibration rows {tuple(x.shape)} do not match weight {tuple(w.shape)}")
    w, x = w.detach().float(), x.detach().float()
    shared = {} if shared is None else shared
    if "reference" not in shared:
        shared["reference"] = x @ w.T
    y = shared["reference"]
    d = x.abs().mean(0).clamp_min(1e-8)
    best: Smoothing | None = None
    for alpha in alphas if smooth else (0.0,):
        s = _scale(d, alpha)
        if alpha not in shared:
            shared[alpha] = fake_quant_weight(w * s, group_size)
        e = output_error(w, x, act_bits, s, group_size, reference=y, quantized_weight=shared[alpha])
        if best is None or e < best.rel_error:
            best = Smoothing(scale=s, alpha=float(alpha), rel_error=e)
    assert best is not None
    return best
