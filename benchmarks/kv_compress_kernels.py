"""Cross-compile the KV-cache compression kernels (kernels/kv_compress.py) for every GPU target, no GPU needed.

For each policy and dtype (bf16: tensor-core logits; fp32: TF32x3), a model of Llama-3.2-1B's shape (1 layer; or
tiny Llama with --model tiny-llama) is compiled with kv_compression=<policy>; the prefill and decode plans run on
CPU under each target's launch configuration at the corners of their size ranges, recording the kv_compress
specializations (and R-KV's decode attention block, which records the queries); triton + ptxas compile them and
report registers, spills and shared memory per kernel. Usage:

    .venv/bin/python benchmarks/kv_compress_kernels.py [--model llama-3.2-1b-1layer] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from gpucheck import MODELS, build_model  # noqa: E402

import braze  # noqa: E402
from braze.compiler.targets import check_result, compile_specializations, enumerate_specializations  # noqa: E402
from braze.kernels import TARGETS  # noqa: E402
from braze.kvcompress.policy import POLICIES  # noqa: E402

MAX_BATCH, MAX_SEQ = 4, 2048


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.2-1b-1layer", choices=MODELS)
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--dtypes", default="bfloat16,float32")
    p.add_argument("--out", help="also write the table to this file")
    args = p.parse_args(argv)
    started = time.time()
    lines = [f"# kv_compress kernels cross-compiled ({time.strftime('%Y-%m-%d')}, triton + ptxas, no GPU)",
             f"model: {args.model}; max_batch {MAX_BATCH}, max_seq {MAX_SEQ}, kv_budget 0.25; prefill plan at "
             "the corners of batch x prompt length (decode: batch); targets " + ", ".join(TARGETS), "",
             f"{'dtype':<9} {'policy':<8} {'target':<6} {'kernel':<12} {'regs':>5} {'spills B':>8} {'smem B':>7} "
             "issues"]
    failures = 0
    for dtype, policy in [(d, p) for d in args.dtypes.split(",") for p in args.policies.split(",")]:
        model = build_model(args.model, getattr(torch, dtype))
        cm = braze.compile(model, max_batch=MAX_BATCH, max_seq=MAX_SEQ, kv_compression=policy, kv_budget=0.25)
        specs = [s for s in enumerate_specializations(cm, list(TARGETS), plans=["prefill", "decode"])
                 if s.family == "kv_compress" or (policy == "rkv" and s.family == "attention_block")]
        rows: dict[tuple[str, str], list] = {}
        for r in compile_specializations(specs):
            issues = [str(i.what) for i in check_result(r)]
            failures += bool(r.error) + sum(i.severity == "error" for i in check_result(r))
            kernel = r.spec.kernel.split("_", 3)[-1] if r.spec.family == "kv_compress" else "attn_block"
            row = rows.setdefault((r.spec.target, kernel), [0, 0, 0, set()])
            row[0], row[1], row[2] = max(row[0], r.regs), max(row[1], r.spills), max(row[2], r.smem)
            row[3].update(issues + ([r.error] if r.error else []))
        for (target, kernel), (regs, spills, smem, issues) in sorted(rows.items()):
            lines.append(f"{dtype:<9} {policy:<8} {target:<6} {kernel:<12} {regs:>5} {spills:>8} {smem:>7} "
                         f"{'; '.join(sorted(issues)) or '-'}")
    lines += ["", f"errors: {failures}; run time {time.time() - started:.0f} s"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
