"""Matmul kernel family: C = epilogue(prologue(A) @ W^T), rendered from templates/matmul.py.j2.

One template covers every linear layer of a decoder block, so fusions (RMSNorm before the GEMM, a
gate/up pair with SwiGLU/GeGLU, bias, activation, residual add) save whole round trips through memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import triton

from braze.codegen.render import render_template
from braze.runtime.kernel_loader import load_kernel
from braze.runtime.launchers import matmul_blocks  # noqa: F401  (re-exported)
from braze.runtime.launchers import matmul_gpu_options as _gpu_launch_options

DUAL_KINDS = (None, "swiglu", "geglu")
ACTIVATIONS = (None, "silu", "gelu", "gelu_tanh", "relu")
INPUT_PRECISIONS = ("ieee", "tf32")
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MatmulSpec:
    """What one generated kernel computes; hashable so a spec can key a kernel cache."""

    name: str
    rmsnorm_prologue: bool = False
    dual: str | None = None
    has_bias: bool = False
    activation: str | None = None
    has_residual: bool = False
    input_precision: str = "ieee"
    out_dtype: str = "float32"

    def __post_init__(self) -> None:
        # Reject bad specs here: a wrong flag would otherwise surface as a confusing Triton compile error.
        if not self.name.isidentifier():
            raise ValueError(f"kernel name {self.name!r} is not a Python identifier")
        if self.dual not in DUAL_KINDS:
            raise ValueError(f"dual must be one of {DUAL_KINDS}, got {self.dual!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.dual is not None and (self.has_bias or self.activation is not None):
            raise ValueError("dual (gated) GEMM takes neither bias nor a separate activation")
        if self.input_precision not in INPUT_PRECISIONS:
            raise ValueError(
                f"input_precision must be one of {INPUT_PRECISIONS}, got {self.input_precision!r}"
            )
        if self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {tuple(OUT_DTYPES)}, got {self.out_dtype!r}")


def render_matmul(spec: MatmulSpec, header: str = "") -> str:
    """Return the Triton source of the kernel described by `spec`; `header` lines must start with '#'."""
    header = header.rstrip("\n")
    bad = [line for line in header.splitlines() if line.strip() and not line.startswith("#")]
    if bad:
        raise ValueError(f"header lines must be comments, got {bad[0]!r}")
    return render_template(
        "matmul.py.j2",
        header=header,
        name=spec.name,
        rmsnorm_prologue=spec.rmsnorm_prologue,
        dual=spec.dual,
        has_bias=spec.has_bias,
        activation=spec.activation,
        has_residual=spec.has_residual,
        input_precision=spec.input_precision,
        out_dtype=spec.out_dtype,
    )


@cache
def _kernel(spec: MatmulSpec) -> Any:
    return load_kernel(render_matmul(spec), spec.name)


def _check_operand(spec_flag: bool, tensor: torch.Tensor | None, what: str, feature: str) -> None:
    if spec_flag and tensor is None:
        raise ValueError(f"spec has {feature} but no {what} was given")
    if not spec_flag and tensor is not None:
        raise ValueError(f"{what} was given but the spec has no {feature}")


def run_matmul(
    spec: MatmulSpec,
    a: torch.Tensor,
    w: torch.Tensor,
    *,
    w2: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
    blocks: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """Render, load and launch the kernel for `spec`; also the reference for its calling convention.

    a: [M, K], w and w2: [N, K], bias: [N], norm_weight: [K], residual and out: [M, N]; any strides.
    `blocks` overrides matmul_blocks (tests use it to force several tiles per dimension).
    """
    _check_operand(spec.dual is not None, w2, "w2", "dual")
    _check_operand(spec.has_bias, bias, "bias", "has_bias")
    _check_operand(spec.rmsnorm_prologue, norm_weight, "norm_weight", "rmsnorm_prologue")
    _check_operand(spec.has_residual, residual, "residual", "has_residual")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"expected a [M, K] and w [N, K], got {tuple(a.shape)} and {tuple(w.shape)}")
    M, K = a.shape
    N = w.shape[0]
    if w2 is not None and w2.shape != w.shape:
        raise ValueError(f"w2 shape {tuple(w2.shape)} != w shape {tuple(w.shape)}")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    if norm_weight is not None and norm_weight.shape != (K,):
        raise ValueError(f"norm_weight must be [{K}], got {tuple(norm_weight.shape)}")
    if residual is not None and residual.shape != (M, N):
        raise ValueError(f"residual must be [{M}, {N}], got {tuple(residual.shape)}")
    out_dtype = OUT_DTYPES[spec.out_dtype]
    if out is None:
        out = torch.empty((M, N), dtype=out_dtype, device=a.device)
    elif out.shape != (M, N) or out.dtype != out_dtype:
        raise ValueError(f"out must be [{M}, {N}] {out_dtype}, got {tuple(out.shape)} {out.dtype}")

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    block_m, block_n, block_k = blocks or matmul_blocks(M, N, K, interpret, dual=spec.dual is not None)

    # Argument order must match the template's signature exactly.
    args: list[Any] = [a, w]
    args += [t for t in (w2, bias, norm_weight, residual) if t is not None]
    args += [out, M, N, K, a.stride(0), a.stride(1), w.stride(0), w.stride(1)]
    if w2 is not None:
        args += [w2.stride(0), w2.stride(1)]
    if residual is not None:
        args += [residual.stride(0), residual.stride(1)]
    args += [out.stride(0), out.stride(1)]
    if spec.rmsnorm_prologue:
        args.append(float(eps))

    launch: dict[str, int] = {}
    if not interpret:  # the interpreter ignores warps and stages
        elem_size = max(a.element_size(), w.element_size())
        launch = _gpu_launch_options(block_m, block_n, block_k, elem_size, spec.dual)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _kernel(spec)[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **launch)
    return out
