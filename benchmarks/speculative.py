"""Speculative decoding on the shipped workloads (braze/data/spec_workloads.json): tokens per verify step and
tokens/s with and without speculation, SmolLM2-135M-Instruct, greedy, one run side by side.

On a CPU this uses the reference executor (torch ops): its tokens/step figures are real, its tokens/s are not
kernel performance. On a GPU pass --executor cuda.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources

import torch

import braze
from braze.models import load_smollm2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--executor", default="reference", choices=["reference", "interpret", "cuda"])
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--max-spec-tokens", type=int, default=16)
    ap.add_argument("--tree", action="store_true", help="draft trees, verified with tree attention")
    args = ap.parse_args()
    device = "cuda" if args.executor == "cuda" else "cpu"
    model, tok = load_smollm2(torch.float32)
    model.to(device)
    cm = braze.compile(model, max_seq=512, max_batch=1, executor=args.executor)
    work = json.loads(resources.files("braze").joinpath("data/spec_workloads.json").read_text())
    print(f"executor: {args.executor}; greedy; {args.max_new_tokens} new tokens")
    print(
        f"{'set':11s} {'workload':22s} {'tok/verify':>10s} {'plain tok/s':>12s} "
        f"{'spec tok/s':>11s} {'speedup':>8s} same"
    )
    for kind, items in work.items():
        for item in items:
            text = tok.apply_chat_template(
                [{"role": "user", "content": item["prompt"]}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(text, return_tensors="pt").input_ids.to(device)
            t0 = time.perf_counter()
            plain = cm.generate(ids, max_new_tokens=args.max_new_tokens)
            t_plain = time.perf_counter() - t0
            cm.generator.spec = None  # fresh drafter per workload: no help from earlier answers
            t0 = time.perf_counter()
            spec = cm.generate(
                ids, max_new_tokens=args.max_new_tokens, speculate=True, max_spec_tokens=args.max_spec_tokens
            )
            t_spec = time.perf_counter() - t0
            st = cm.generator.spec.stats
            n = plain.shape[1] - ids.shape[1]
            print(
                f"{kind:11s} {item['name']:22s} {st.accepted_per_verify:10.2f} {n / t_plain:12.1f} "
                f"{n / t_spec:11.1f} {t_plain / t_spec:8.2f} {torch.equal(plain, spec)}"
            )


if __name__ == "__main__":
    main()
