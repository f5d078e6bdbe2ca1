"""The command line shared by the kernel microbenchmarks: a GPU timing table, or `--smoke` on a CPU."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch


def kernel_bench_main(script: str, doc: str, smoke: Callable[[], int], bench: Callable[[], None],
                      smoke_help: str) -> int:
    """Run `bench` on a CUDA GPU or `smoke` (an interpreter correctness check) with --smoke; say so otherwise."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help=smoke_help)
    args = parser.parse_args()
    if args.smoke:
        return smoke()
    if not torch.cuda.is_available():
        print(f"{Path(script).stem} benchmark: needs a CUDA GPU (interpreter timings are not performance); "
              "run with --smoke for a CPU correctness check. Nothing measured.")
        return 0
    bench()
    return 0
