"""A loaded package speculates exactly like the compile it was saved from: path, tree and batched drafts give the
same tokens and the same speculation counters, and the compile's speculation settings travel in the package."""

import torch

import braze
from braze.models import tiny_causal_lm
from braze.runtime.speculate import SpeculativeRunner

COUNTERS = ("verify_steps", "tree_steps", "plain_steps", "accepted_drafts", "forward_steps", "rows", "tokens")


def _counters(model):
    stats = model.generator.spec.stats
    return {k: getattr(stats, k) for k in COUNTERS}


def _fresh_runner(model):
    """Fresh suffix trees and counters that verify every draft (no adaptive policy deciding by timing)."""
    model.generator.spec = SpeculativeRunner(model.generator, adaptive=False)


def _prompts():
    g = torch.Generator().manual_seed(0)
    base = torch.randint(3, 256, (12,), generator=g)
    branching = torch.cat([base, base[:5], base, base[3:]])[None]
    rows = [torch.cat([torch.randint(3, 256, (n,), generator=g)] * 3) for n in (9, 6)]
    ids = torch.zeros(2, 27, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, 27 - len(r):], mask[i, 27 - len(r):] = r, 1
    return branching, ids, mask


def test_package_speculates_like_the_compile(tmp_path):
    cm = braze.compile(tiny_causal_lm("llama"), max_seq=128, max_batch=2, speculate="suffix")
    cm.save(tmp_path / "pkg")
    loaded = braze.load(tmp_path / "pkg")
    assert loaded.generator.speculate_default and cm.generator.speculate_default  # the compile's setting travels
    assert set(loaded.extra_plans) == set(cm.extra_plans)
    branching, ids, mask = _prompts()
    plain = cm.generate(branching, max_new_tokens=24, speculate=False)
    for model in (cm, loaded):
        _fresh_runner(model)
    runs = [dict(input_ids=branching, max_new_tokens=24, spec_tree=True, max_spec_tokens=8),
            dict(input_ids=branching, max_new_tokens=24, spec_tree=False, max_spec_tokens=8),
            dict(input_ids=ids, attention_mask=mask, max_new_tokens=20)]
    for kwargs in runs:
        outs = [m.generate(speculate=True, **kwargs) for m in (cm, loaded)]
        assert torch.equal(outs[0], outs[1]), kwargs
        assert _counters(cm) == _counters(loaded), kwargs
        if kwargs.get("spec_tree"):
            assert _counters(cm)["tree_steps"] > 0, _counters(cm)
    assert torch.equal(outs[0][:, :27], ids)
    assert _counters(cm)["accepted_drafts"] > 0
    assert torch.equal(cm.generate(branching, max_new_tokens=24, speculate=True, spec_tree=True), plain)


class RecordingStreamer:
    """The HF streamer protocol (put/end), recording what it was given."""

    def __init__(self):
        self.puts: list[list[int]] = []
        self.ended = 0

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended += 1


def test_streaming_with_speculation_matches_the_output(tmp_path):
    """A streamer sees the prompt, then every token as it is emitted (an accepted draft run arrives in one put),
    for the compile (batched verify plan) and for its package alike; the concatenation is the returned sequence."""
    cm = braze.compile(tiny_causal_lm("llama"), max_seq=128, max_batch=2)
    cm.save(tmp_path / "pkg")
    loaded = braze.load(tmp_path / "pkg")
    branching, _, _ = _prompts()
    for model in (cm, loaded):
        _fresh_runner(model)
        streamer = RecordingStreamer()
        out = model.generate(branching, max_new_tokens=24, speculate=True, streamer=streamer)
        assert streamer.ended == 1
        assert streamer.puts[0] == branching[0].tolist()
        assert sum(streamer.puts[1:], []) == out[0, branching.shape[1]:].tolist()
        assert _counters(model)["accepted_drafts"] > 0 and max(len(p) for p in streamer.puts[1:]) > 1
        assert model.generator.spec.streamer is None  # not kept for the next request
