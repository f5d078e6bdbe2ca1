"""10,000 decode steps in one process (tiny Llama, batch 2, reference executor, the cache reset by each request):
host RSS growth and any runtime container that keeps growing (braze/testing/steady_state.py).

    .venv/bin/python benchmarks/steady_state.py [--steps 10000] [--executor reference] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import braze  # noqa: E402
from braze.models import tiny_causal_lm  # noqa: E402
from braze.testing.steady_state import run_steady_state  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--executor", default="reference", choices=("reference", "interpret"))
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    cm = braze.compile(tiny_causal_lm("llama", layers=2), max_seq=96, max_batch=2, executor=args.executor)
    t0 = time.perf_counter()
    report = run_steady_state(cm, steps=args.steps, batch=2, new_tokens=64)
    line = (f"{time.strftime('%Y-%m-%d')} {os.cpu_count()}-core CPU, executor {args.executor}, tiny Llama 2 layers, "
            f"batch 2: {report} in {time.perf_counter() - t0:.0f} s")
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0 if not report.grown and report.rss_growth < 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
