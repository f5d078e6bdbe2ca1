"""Time the vectorized DFloat11 encoder on N(0, 0.02) BF16 weights and print weights/s.

Why: encoding a whole checkpoint must stay cheap (target: a 1B-parameter model in < 40 s, i.e. >= 26 M
weights/s, 10x the reference encoder's ~2.6 M weights/s).

    .venv/bin/python benchmarks/df11_encode_speed.py --weights 4e6 16e6 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from braze.quant.df11 import decode_df11_reference, encode_df11  # noqa: E402


def bench(n: int, repeats: int, check: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16)
    encode_df11([x])  # warm-up: allocator, thread pool
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        unit = encode_df11([x])
        best = min(best, time.perf_counter() - start)
    line = (
        f"{n / 1e6:8.1f} M weights: best {best * 1e3:8.1f} ms  {n / best / 1e6:7.1f} M weights/s  "
        f"{unit.bits_per_weight:.3f} bits/weight  (1B weights: {1e9 / (n / best):.1f} s)"
    )
    if check:
        ok = torch.equal(decode_df11_reference(unit)["0"].view(torch.int16), x.view(torch.int16))
        line += f"  reference decode {'bit-exact' if ok else 'MISMATCH'}"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[1e6, 4e6, 16e6])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave default)")
    parser.add_argument("--check", action="store_true", help="also verify with the reference decoder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads")
    for n in args.weights:
        bench(int(n), args.repeats, args.check)


if __name__ == "__main__":
    main()
