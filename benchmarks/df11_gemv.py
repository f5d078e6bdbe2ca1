"""DFloat11 GEMV strategies on one Llama-3.2-1B-shaped decoder block: BF16 matmul vs df11 scratch vs df11 fused.

    python benchmarks/df11_gemv.py            # on a GPU: the timing table
    python benchmarks/df11_gemv.py --smoke    # on a CPU: a tiny interpreter correctness check, no timings

Block: hidden 2048, intermediate 8192, 32 heads, 8 KV heads, head dim 64 -> merged QKV [3072, 2048], O [2048, 2048],
gate and up [8192, 2048] each, down [2048, 8192]: 60.8M weights in one DF11 unit, N(0, 0.02) BF16 (random weights:
a real checkpoint's exponent statistics differ slightly). Per batch size (1 and 16) it times all seven
projections of the block:

* bf16:    F.linear with the BF16 weights (cuBLAS);
* scratch: strategy (a), one df11_decode launch for the whole unit into a BF16 buffer, then the same F.linear calls;
* fused:   strategy (b), one df11_gemv launch per projection (decode inside the GEMV, fp32 accumulation).

GB/s = weight bytes read / time: 2 bytes per weight for bf16, the unit's stored bytes (stream, sign/mantissa,
gaps, positions, LUTs) for the df11 variants (the scratch variant additionally writes and re-reads a BF16 copy,
which is the traffic the fused kernel removes). Ratios are time / bf16 time, taken side by side in one run.
"""

from __future__ import annotations

import os
import sys

import torch
from kernel_bench_cli import kernel_bench_main

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate": (8192, 2048), "up": (8192, 2048), "down": (2048, 8192)}
STREAM = ("encoded", "sign_mantissa", "gaps", "output_positions", "luts", "code_lengths")


def _weights(scale: int, device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: (torch.randn(r // scale, c // scale, generator=g) * 0.02).to(torch.bfloat16).to(device)
            for n, (r, c) in SHAPES.items()}


def _stored_bytes(unit) -> int:
    return sum(getattr(unit, r).numel() * getattr(unit, r).element_size() for r in STREAM)


def _runners(unit, weights: dict[str, torch.Tensor], batch: int):
    """(name -> zero-argument callable) for the three variants, buffers allocated once."""
    from braze.kernels import device_spec
    from braze.kernels.df11 import DF11_GEMV, GEMV_KERNEL_NAME, decode_df11_triton, df11_gemv_params, render_df11_gemv
    from braze.runtime.kernel_loader import load_kernel_module

    dev = next(iter(weights.values())).device
    xs = {n: torch.randn(batch, w.shape[1], device=dev).to(torch.bfloat16) for n, w in weights.items()}
    scratch = torch.empty(unit.num_weights, dtype=torch.bfloat16, device=dev)
    views = unit.split(scratch)
    params = {n: df11_gemv_params(unit, unit.offsets[n], *w.shape) for n, w in weights.items()}
    accs = {n: torch.empty(batch, w.shape[0], device=dev) for n, w in weights.items()}
    stream = {r: getattr(unit, r) for r in STREAM}
    module, spec = load_kernel_module(render_df11_gemv()), device_spec(dev)

    def bf16() -> None:
        for n, w in weights.items():
            torch.nn.functional.linear(xs[n], w)

    def df11_scratch() -> None:
        decode_df11_triton(unit, out=scratch)
        for n in weights:
            torch.nn.functional.linear(xs[n], views[n])

    def df11_fused() -> None:
        for n in weights:  # the plan's launcher: fills the fp32 accumulator, then the fused kernel adds into it
            DF11_GEMV.launch(module, GEMV_KERNEL_NAME, {"x": xs[n], **stream}, accs[n], params[n], spec)

    return {"bf16": bf16, "df11 scratch": df11_scratch, "df11 fused": df11_fused}, xs, accs, views


def smoke() -> int:
    """Interpreter check on a 1/32-scale block: fused == decode -> matmul up to fp32 reassociation."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from braze.quant.df11 import encode_df11

    weights = _weights(32, "cpu")
    unit = encode_df11(weights, threads_per_block=64)
    runs, xs, accs, views = _runners(unit, weights, batch=2)
    runs["df11 fused"]()
    runs["df11 scratch"]()  # fills `views` (the decoded scratch buffer)
    for n, w in weights.items():
        want = xs[n].float() @ views[n].float().T
        bound = w.shape[1] * 2.0**-24 * (xs[n].float().abs() @ w.float().abs().T)
        ok = bool(((accs[n] - want).abs() <= bound + 1e-30).all())
        print(f"{n:5s} {tuple(w.shape)}: fused vs decode -> matmul within fp32 reassociation: {ok}")
        if not ok:
            return 1
    return 0


def bench() -> None:
    import triton.testing

    from braze.quant.df11 import encode_df11

    weights = _weights(1, "cuda")
    unit = encode_df11(weights)
    n_weights = unit.num_weights
    byte_counts = {"bf16": 2 * n_weights, "df11 scratch": _stored_bytes(unit), "df11 fused": _stored_bytes(unit)}
    print(f"{torch.cuda.get_device_name()}: Llama-3.2-1B block, {n_weights / 1e6:.1f}M weights, "
          f"DF11 {unit.bits_per_weight:.2f} bits/weight (N(0, 0.02) random weights)")
    print(f"{'batch':>5s} {'variant':14s} {'time (us)':>10s} {'x bf16':>7s} {'GB/s':>8s}")
    for batch in (1, 16):
        runs, *_ = _runners(unit, weights, batch)
        times = {name: triton.testing.do_bench(fn, warmup=25, rep=200) * 1e3 for name, fn in runs.items()}
        for name, us in times.items():
            gbs = byte_counts[name] / (us * 1e-6) / 1e9
            print(f"{batch:5d} {name:14s} {us:10.1f} {us / times['bf16']:7.2f} {gbs:8.1f}")


def main() -> int:
    return kernel_bench_main(__file__, __doc__, smoke, bench, smoke_help="CPU: tiny interpreter correctness check")


if __name__ == "__main__":
    sys.exit(main())
