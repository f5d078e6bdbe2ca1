"""A long-running generation process stays flat: host RSS and every runtime container (benchmarks/steady_state.py
runs 10,000 decode steps; this is the short version)."""

import torch

import braze
from braze.models import tiny_causal_lm
from braze.testing.steady_state import container_sizes, run_steady_state


def test_decode_steps_leave_host_memory_and_runtime_containers_flat():
    cm = braze.compile(tiny_causal_lm("llama", layers=1), max_seq=64, max_batch=2, executor="reference")
    report = run_steady_state(cm, steps=600, batch=2, new_tokens=40)
    assert report.steps >= 600 and report.requests >= 15
    assert report.grown == {}, str(report)
    assert 0 < report.rss_after_warmup and report.rss_growth < 0.01, str(report)


def test_the_container_walk_sees_a_growing_runtime_list():
    """The check can fail: a list hung off the generator that grows per call is reported by its path."""
    cm = braze.compile(tiny_causal_lm("llama", layers=1), max_seq=32, max_batch=1, executor="reference")
    cm.generator.leak = []
    before = container_sizes(cm)
    cm.generator.leak.append(torch.zeros(1))
    after = container_sizes(cm)
    grown = [k for k in after if after[k] > before.get(k, 0)]
    assert grown == ["model.generator.leak"]
