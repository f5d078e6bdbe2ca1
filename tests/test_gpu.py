"""GPU checks (bf16 on CUDA, CUDA-graph decode). Skipped without a GPU; each has a CPU twin under the interpreter:
test_models_golden.py (forward), test_generate.py (greedy generation), test_speculation.py (speculation)."""

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
