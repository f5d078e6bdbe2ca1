"""The prefill plan's own rewrites (passes/prefill.py): Qwen3's and Gemma 3's per-head q_norm / k_norm inside the
cache-write kernel. The kernel against its reference is test_kernel_families.py
(test_cached_attention_family_normalizes_q_and_k_in_the_cache_write); here: the launch budget per layer, what the
pass leaves alone, and generation through the kernels against HF."""

import pytest
import torch

import braze
from braze.models import tiny_causal_lm


def _prefill_per_layer(arch, **kw):
    counts = []
    for layers in (1, 2):
        cm = braze.compile(tiny_causal_lm(arch, layers=layers, vocab=128), max_seq=32, max_batch=2, **kw)
        counts.append(cm.extra_plans["prefill"].launches)
    return counts[1] - counts[0], cm


def _notes(cm):
    return [n for p in cm.report.passes if p.name == "fold_prefill_qk_norm" for n in p.notes]


@pytest.mark.parametrize("arch, like, launches", [("qwen3", "llama", 6), ("gemma3_text", "gemma2", 8)])
def test_prefill_takes_q_k_norms_in_the_cache_write(arch, like, launches):
    """Qwen3's layer prefills in Llama's launches and Gemma 3's (sliding window: the general cached attention) in
    Gemma 2's: the two norm kernels are gone. The verify plan keeps its own form."""
    per_layer, cm = _prefill_per_layer(arch)
    assert per_layer == _prefill_per_layer(like)[0] == launches
    assert _notes(cm) == ["2 layers: q / k norms inside the cache-write kernel"]
    steps = [s for s in cm.extra_plans["prefill"].steps if s.kind == "template"]
    attention = [s for s in steps if "cached_attention" in s.launcher]
    assert len(attention) == 2 and all(s.params.get("qk_norm_eps") for s in attention)
    assert not any(s.params.get("qk_norm_eps") for s in cm.extra_plans["verify"].steps)


@pytest.mark.parametrize("arch, dtype", [("qwen3", torch.float32), ("qwen3", torch.float16),
                                         ("gemma3_text", torch.float32)])
def test_generation_through_the_folded_prefill_matches_hf(arch, dtype):
    """Greedy tokens of a left-padded batch through the kernels equal HF's (prompt 12, past Gemma 3's window of
    8); the first token's logits (the prefill plan's) within 1e-5 of the reference executor in fp32
    (reassociation only), 2 fp16 ulps in fp16."""
    model = tiny_causal_lm(arch, layers=2, vocab=128, dtype=dtype)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[mask == 0] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    cm = braze.compile(model, max_seq=32, max_batch=2, executor="interpret")
    ref = braze.compile(model, max_seq=32, max_batch=2, executor="reference")
    assert _notes(cm) and _notes(ref)
    got, want = cm.generate(ids, **kw, output_logits=True), ref.generate(ids, **kw, output_logits=True)
    first, first_ref = got.logits[:, 0].float(), want.logits[:, 0].float()
    tol = 1e-5 if dtype == torch.float32 else 2 * 2.0 ** (torch.log2(first_ref.abs().max()).floor().item() - 10)
    assert (first - first_ref).abs().max().item() <= tol
    if dtype == torch.float32:
        with torch.no_grad():
            hf = model.generate(ids, **kw, do_sample=False)
        assert torch.equal(got.sequences, hf)


def test_the_fold_leaves_compressed_caches_alone():
    """kv_compression scores the prefill's queries where the norms leave them: the norms stay apart."""
    cm = braze.compile(tiny_causal_lm("qwen3", layers=1, vocab=128), max_seq=32, max_batch=2,
                       kv_compression="snapkv", kv_budget=0.5, kv_window=4, executor="reference")
    assert _notes(cm) == []
