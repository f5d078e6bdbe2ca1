"""Decode under CUDA-graph bookkeeping (CPU twin: ReplayRunner replays the plan over the buffers captured first).

A captured graph reads its state inputs (KV caches, kv_start, compressed caches and starts) through the pointers it
was captured with, so the generator must hand every request of a batch bucket the same tensors, and every input the
plan mutates must be one of them. These tests run several requests through one runner and compare with plain runs.
"""

import pytest
import torch

import braze
from braze.models import tiny_causal_lm
from braze.runtime.cuda_graphs import ReplayRunner


def _replaying(cm):
    gen = cm.generator
    gen.graphs = ReplayRunner(gen.decode, static_prefixes=gen.STATE_PREFIXES)
    gen.bucket_batches = True
    return cm


def _requests():
    g = torch.Generator().manual_seed(5)
    first = torch.randint(3, 256, (3, 9), generator=g)
    mask = torch.ones_like(first)
    mask[0, :3] = 0
    first[mask == 0] = 0
    second = torch.randint(3, 256, (1, 6), generator=g)
    return [(first, mask), (second, None), (first.flip(0), mask.flip(0))]  # bucket 4, bucket 1, bucket 4 again


@pytest.mark.parametrize("options", [{}, {"kv_compression": "keydiff", "kv_budget": 24, "kv_window": 4},
                                     {"kv_compression": "adakv", "kv_budget": 24, "kv_window": 4},
                                     {"kv_compression": "rkv", "kv_budget": 8, "kv_window": 4}],
                         ids=["full-cache", "keydiff", "adakv", "rkv"])
def test_requests_through_one_graph_runner_match_plain_decode(options):
    model = tiny_causal_lm("llama")
    plain = braze.compile(model, max_seq=48, max_batch=4, **options)
    replayed = _replaying(braze.compile(model, max_seq=48, max_batch=4, **options))
    for ids, mask in _requests():
        want = plain.generate(ids, attention_mask=mask, max_new_tokens=6)
        got = replayed.generate(ids, attention_mask=mask, max_new_tokens=6)
        assert torch.equal(got, want)
    runner = replayed.generator.graphs
    assert sorted(k[0][0][0] for k in runner.graphs) == [1, 4]  # one "graph" per bucket, reused across requests


def test_state_that_changes_identity_is_refused():
    cm = _replaying(braze.compile(tiny_causal_lm("llama"), max_seq=32, max_batch=2))
    ids = torch.randint(3, 256, (1, 5))
    cm.generate(ids, max_new_tokens=3)
    cm.generator._state.clear()  # a generator that allocated new state per request
    with pytest.raises(RuntimeError, match="changed identity"):
        cm.generate(ids, max_new_tokens=3)
