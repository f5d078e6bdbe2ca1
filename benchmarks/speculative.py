"""Speculative decoding on the shipped workloads (braze/data/spec_workloads.json): tokens per verify step and
tokens/s with and without speculation, SmolLM2-135M-Instruct, greedy, side by side in one run.

Plain and speculative generation run round-robin per workload, ``--repeats`` times each, and the fastest of each
is kept (the CPU is shared: the minimum is the least disturbed run). Besides wall time the ratio of process CPU time
is printed, which other processes disturb less. Each speculative run gets a fresh runner, so no workload is
helped by an earlier answer in the global suffix tree. ``--static`` also runs the old rule (speculate whenever
the draft score >= min_score) for comparison with the adaptive policy (runtime/spec_policy.py).

On a CPU this uses the reference executor (torch ops): its tokens/step figures are real, its tokens/s are not
kernel performance. On a GPU pass --executor cuda.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from typing import Any

import torch

import braze
from braze.models import load_smollm2
from braze.runtime.speculate import SpeculativeRunner


def prompt_ids(tok: Any, item: dict[str, Any], device: str) -> torch.Tensor:
    """Chat-templated prompt: a single user turn, or a multi-turn conversation (refinement workloads)."""
    messages = item.get("messages") or [{"role": "user", "content": item["prompt"]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt").input_ids.to(device)


def timed(fn: Any) -> tuple[torch.Tensor, float, float]:
    """(result, wall seconds, process CPU seconds)."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def run_workload(cm: Any, ids: torch.Tensor, args: argparse.Namespace, policies: list[str]) -> dict[str, Any]:
    """Round-robin plain and each speculative policy ``--repeats`` times; best wall/CPU time of each, stats of
    each policy's last run (all runs of one policy take the same steps: greedy and a fresh runner)."""
    best = {m: [float("inf")] * 2 for m in ["plain", *policies]}
    outs, stats, same = {}, {}, dict.fromkeys(policies, True)
    for _ in range(args.repeats):
        for mode in best:
            if mode != "plain":  # fresh drafter and policy, empty global tree
                cm.generator.spec = SpeculativeRunner(cm.generator, adaptive=mode == "adaptive")
            outs[mode], w, c = timed(lambda m=mode: cm.generate(ids, max_new_tokens=args.max_new_tokens,
                                                                speculate=m != "plain",
                                                                max_spec_tokens=args.max_spec_tokens))
            best[mode] = [min(best[mode][0], w), min(best[mode][1], c)]
            if mode != "plain":  # every run checked against this round's plain output
                stats[mode] = cm.generator.spec.stats
                same[mode] = same[mode] and torch.equal(outs["plain"], outs[mode])
    n = outs["plain"].shape[1] - ids.shape[1]
    rows = {}
    for mode in policies:
        st = stats[mode]
        rows[mode] = {"n": n, "verify": st.verify_steps, "plain_steps": st.plain_steps,
                      "tpv": st.accepted_per_verify, "plain_tps": n / best["plain"][0], "spec_tps": n / best[mode][0],
                      "speedup": best["plain"][0] / best[mode][0], "cpu_speedup": best["plain"][1] / best[mode][1],
                      "same": same[mode]}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--executor", default="reference", choices=["reference", "interpret", "cuda"])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-spec-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--static", action="store_true", help="also run the static min_score rule, for comparison")
    ap.add_argument("--only", default="", help="comma-separated workload names")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads; 1 by default: on a shared CPU a 2-thread team stalls whenever another "
                    "process holds a core, which swamped plain vs speculative differences")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if args.executor == "cuda" else "cpu"
    model, tok = load_smollm2(torch.float32)
    model.to(device)
    cm = braze.compile(model, max_seq=512, max_batch=1, executor=args.executor)
    work = json.loads(resources.files("braze").joinpath("data/spec_workloads.json").read_text())
    warm = prompt_ids(tok, work["chat"][0], device)
    cm.generate(warm, max_new_tokens=4)
    cm.generate(warm, max_new_tokens=4, speculate=True)
    print(f"executor: {args.executor}; greedy; {args.max_new_tokens} new tokens max; max_spec_tokens "
          f"{args.max_spec_tokens}; torch threads {torch.get_num_threads()}; best of {args.repeats} round-robin runs")
    print(f"{'set':11s} {'workload':20s} {'policy':8s} {'new':>4s} {'verify':>6s} {'plain':>5s} {'tok/verify':>10s} "
          f"{'plain tok/s':>11s} {'spec tok/s':>10s} {'speedup':>7s} {'cpu x':>6s} same")
    only = set(filter(None, args.only.split(",")))
    for kind, items in work.items():
        for item in items:
            if only and item["name"] not in only:
                continue
            ids = prompt_ids(tok, item, device)
            results = run_workload(cm, ids, args, ["adaptive", "static"] if args.static else ["adaptive"])
            for mode, r in results.items():
                print(f"{kind:11s} {item['name']:20s} {mode:8s} {r['n']:4d} "
                      f"{r['verify']:6d} {r['plain_steps']:5d} {r['tpv']:10.2f} {r['plain_tps']:11.1f} "
                      f"{r['spec_tps']:10.1f} {r['speedup']:7.2f} {r['cpu_speedup']:6.2f} {r['same']}", flush=True)


if __name__ == "__main__":
    main()
