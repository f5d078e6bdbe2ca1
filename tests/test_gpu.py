"""GPU checks (bf16 on CUDA, CUDA-graph decode). Skipped without a GPU; each has a CPU twin under the interpreter:
test_models_golden.py (forward), test_generate.py (greedy generation), test_speculation.py (speculation; the
bucketed verify graphs' twin is test_bucketed_speculation_matches_plain)."""

import pytest
import torch

import braze
from braze.models import tiny_causal_lm

pytestmark = pytest.mark.gpu

# bf16 kernels vs bf16 eager: both round activations to bf16 (8 bits of mantissa) but in different places
# (fp32 accumulation inside fused kernels), so logits differ by a few bf16 ulps at logit scale ~1.
BF16_ATOL = 5e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_bf16_forward_on_cuda(arch):
    model = tiny_causal_lm(arch, dtype=torch.bfloat16).cuda()
    cm = braze.compile(model, max_seq=128)
    assert cm.executor_name == "cuda"
    for shape in ((1, 1), (2, 17), (4, 64)):
        ids = torch.randint(0, 256, shape, device="cuda")
        with torch.no_grad():
            err = (cm(ids).logits.float() - model(ids).logits.float()).abs().max().item()
        assert err < BF16_ATOL, err


def test_fp32_generation_on_cuda_matches_hf_with_cuda_graphs():
    model = tiny_causal_lm("llama").cuda()
    cm = braze.compile(model, max_seq=128, max_batch=4)
    ids = torch.randint(3, 256, (1, 7), device="cuda")
    out = cm.generate(ids, max_new_tokens=64)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref)
    assert cm.generator.graphs is not None and cm.generator.graphs.graphs  # decode replayed from a CUDA graph


def test_speculation_on_cuda_is_exact():
    model = tiny_causal_lm("llama").cuda()
    cm = braze.compile(model, max_seq=128)
    base = torch.randint(3, 256, (10,), device="cuda")
    ids = torch.cat([base, base, base])[None]
    assert torch.equal(cm.generate(ids, max_new_tokens=32), cm.generate(ids, max_new_tokens=32, speculate=True))


def test_batched_speculation_replays_verify_graphs_on_cuda():
    """Batch 3 (bucket 4) of prompts of different lengths: verify steps padded to k in K_BUCKETS and replayed from
    one CUDA graph per (batch bucket, k bucket); output token-identical to plain greedy decoding."""
    from braze.runtime.speculate import K_BUCKETS, SpeculativeRunner

    model = tiny_causal_lm("llama").cuda()
    cm = braze.compile(model, max_seq=128, max_batch=4)
    gen = torch.Generator().manual_seed(0)
    bases = [torch.randint(3, 256, (n,), generator=gen).cuda() for n in (10, 7, 9)]
    prompts = [torch.cat([b, b, b]) for b in bases]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    plain = cm.generate(ids, attention_mask=mask, max_new_tokens=32)
    cm.generator.spec = SpeculativeRunner(cm.generator, adaptive=False)  # verify whatever the suffix tree drafts
    for tree in (False, True):
        spec = cm.generate(ids, attention_mask=mask, max_new_tokens=32, speculate=True, spec_tree=tree)
        assert torch.equal(plain, spec)
    runner = cm.generator.spec
    assert runner.stats.verify_steps > 0 and runner.verify_graphs.graphs
    ids_at = [i.name for i in cm.generator.verify.user_inputs].index("input_ids")
    for key in runner.verify_graphs.graphs:  # a key holds each input's (shape, dtype)
        batch, seq = key[ids_at][0]  # input_ids: [batch bucket, 1 + k bucket]
        assert batch == 4 and seq - 1 in K_BUCKETS
