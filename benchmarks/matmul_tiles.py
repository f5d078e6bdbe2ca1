"""Decode-size GEMMs: the matmul template's GEMV form (ROW_DOT) vs its tensor-core form (tl.dot) vs cuBLAS.

    python benchmarks/matmul_tiles.py            # on a GPU: the timing table that sets GEMV_MAX_M
    python benchmarks/matmul_tiles.py --smoke    # on a CPU: both forms under the interpreter match torch

Shapes are a Llama-3.2-1B decoder block's projections (merged QKV [3072, 2048], O [2048, 2048], the gate/up pair
as one dual SwiGLU launch [8192, 2048] x 2, down [2048, 8192]) and its lm_head [128256, 2048], bf16, N(0, 0.02).
Per row count M (batch x draft tokens) every shape is launched through the shipped kernel source (render_matmul)
with each form's configuration (gemv_config / mma_config); cuBLAS (F.linear, the gate/up pair as two calls)
times the same work. GB/s = weight bytes / time: at these M a GEMM is bound by streaming its weights.
"""

from __future__ import annotations

import os
import sys

import torch
from kernel_bench_cli import kernel_bench_main

SHAPES = {"qkv": (3072, 2048, False), "o": (2048, 2048, False), "gate_up": (8192, 2048, True),
          "down": (2048, 8192, False), "lm_head": (128256, 2048, False)}
ROWS = (1, 2, 4, 8, 16)


def _kernels(dtype: torch.dtype):
    from braze.kernels.family import FLOAT_NAMES
    from braze.kernels.matmul import MatmulSpec, render_matmul
    from braze.runtime.kernel_loader import load_kernel_module

    out = FLOAT_NAMES[dtype]
    plain = load_kernel_module(render_matmul(MatmulSpec(name="mm", input_precision="tf32", out_dtype=out)))
    dual = load_kernel_module(render_matmul(MatmulSpec(name="mm", dual="swiglu", input_precision="tf32",
                                                       out_dtype=out)))
    return plain.mm, dual.mm


def _runner(kernel, cfg, spec, a, w, w2, out):
    """A zero-argument launch of `kernel` with the tile configuration `cfg` (the launcher's argument order)."""
    import triton

    from braze.kernels.family import launch_kernel
    from braze.kernels.matmul import matmul_args

    args = matmul_args(a, w, out, w2=w2)
    grid = (triton.cdiv(a.shape[0], cfg.block_m), triton.cdiv(w.shape[0], cfg.block_n))
    return lambda: launch_kernel(kernel, grid, *args, **cfg.meta(spec))


def _case(name: str, M: int, scale: int, device: str, dtype: torch.dtype = torch.bfloat16):
    N, K, is_dual = SHAPES[name]
    N, K = N // scale, K // scale
    g = torch.Generator().manual_seed(M)
    w = (torch.randn(N, K, generator=g) * 0.02).to(dtype).to(device)
    w2 = (torch.randn(N, K, generator=g) * 0.02).to(dtype).to(device) if is_dual else None
    a = torch.randn(M, K, generator=g).to(dtype).to(device)
    return a, w, w2, torch.empty(M, N, dtype=dtype, device=device)


def _forms(M: int, w: torch.Tensor, w2: torch.Tensor | None, spec):
    from braze.kernels.matmul import gemv_config, mma_config

    N, K = w.shape
    dual = w2 is not None
    return {"gemv": gemv_config(M, N, K, spec, dual=dual), "mma": mma_config(M, N, K, spec, dual=dual)}


def _reference(a, w, w2):
    if w2 is None:
        return a.float() @ w.float().T
    return torch.nn.functional.silu(a.float() @ w.float().T) * (a.float() @ w2.float().T)


def smoke() -> int:
    """Both forms' configurations on the shipped kernels, 1/64-scale shapes, under the interpreter: fp16 (the
    interpreter runs it natively; the GPU run times bf16)."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from braze.kernels.device import DeviceSpec

    plain, dual = _kernels(torch.float16)
    # a GPU-like description (not interpreted) so gemv_config/mma_config take their GPU branches
    spec = DeviceSpec("smoke", capability=90, sm_count=8, smem_per_block=99 * 1024)
    ok = True
    for name in ("qkv", "gate_up"):
        for M in (1, 16):
            a, w, w2, out = _case(name, M, 64, "cpu", torch.float16)
            for form, cfg in _forms(M, w, w2, spec).items():
                out.zero_()
                _runner(dual if w2 is not None else plain, cfg, spec, a, w, w2, out)()
                err = (out.float() - _reference(a, w, w2)).abs().max().item()
                good = err <= 5e-3
                ok &= good
                print(f"{name:8s} M={M:2d} {form}: max |err| {err:.2e} {'ok' if good else 'FAIL'}")
    return 0 if ok else 1


def bench() -> None:
    import triton.testing

    from braze.kernels import device_spec

    plain, dual = _kernels(torch.bfloat16)
    spec = device_spec("cuda")
    print(f"{torch.cuda.get_device_name()}: bf16, us per launch (GB/s of weights); the fastest in the last column")
    print(f"{'shape':8s} {'M':>3s} {'gemv':>16s} {'mma':>16s} {'cuBLAS':>16s}  best")
    for name in SHAPES:
        for M in ROWS:
            a, w, w2, out = _case(name, M, 1, "cuda")
            wbytes = w.numel() * 2 * (2 if w2 is not None else 1)
            runs = {form: _runner(dual if w2 is not None else plain, cfg, spec, a, w, w2, out)
                    for form, cfg in _forms(M, w, w2, spec).items()}
            if w2 is None:
                runs["cuBLAS"] = lambda a=a, w=w: torch.nn.functional.linear(a, w)
            else:
                runs["cuBLAS"] = lambda a=a, w=w, w2=w2: (torch.nn.functional.linear(a, w),
                                                         torch.nn.functional.linear(a, w2))
            us = {k: triton.testing.do_bench(fn, warmup=10, rep=40) * 1e3 for k, fn in runs.items()}
            cells = " ".join(f"{t:8.1f} ({wbytes / t / 1e3:5.0f})" for t in us.values())
            print(f"{name:8s} {M:3d} {cells}  {min(us, key=us.get)}", flush=True)


def main() -> int:
    return kernel_bench_main(__file__, __doc__, smoke, bench,
                             smoke_help="CPU: both forms under the interpreter match torch")


if __name__ == "__main__":
    sys.exit(main())
