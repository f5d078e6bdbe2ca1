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


def test_decode_blocks_on_cuda_split_merge_and_graph_replay():
    """The 3-launch decode layer on a GPU (start tickets, the last split's merge, the projecting programs' wait,
    CUDA-graph replay over the executor's workspace): max_seq 1024 gives the attention block several splits; a
    left-padded batch of 3 greedy decodes as HF does, twice (the second replays the captured graphs), and the
    counters are zero after each. CPU twins: test_kernel_families.py::test_attention_block_family (sm_90's split
    configuration under the interpreter), test_mlp_block_family and test_decode_layer.py."""
    from braze.kernels import device_spec
    from braze.kernels.attention import decode_splits

    model = tiny_causal_lm("llama", layers=2).cuda()
    cm = braze.compile(model, max_seq=1024, max_batch=4)
    assert decode_splits(2, 1024, device_spec(torch.device("cuda"))) > 1
    assert {"attention_block", "mlp_block"} <= {s.launcher for s in cm.generator.decode.plan.steps}
    ids = torch.randint(3, 256, (3, 9), device="cuda")
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    for _ in range(2):
        assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=48), ref)
        assert all(not w.any() for k, w in cm.generator.decode.workspace.items() if not k.startswith("scratch"))
    assert cm.generator.graphs is not None and cm.generator.graphs.graphs


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


# ---- deterministic mode, KV-cache compression, quantized plans on CUDA (issues #16, #17; CPU twins: ----------------
# test_deterministic.py, test_kv_compression.py, test_df11_models.py, test_int6.py under the interpreter)
def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long, device="cuda")
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], mask[b, width - len(p):] = p, 1
    return ids, mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_deterministic_request_logits_bitwise_equal_across_batches_on_cuda(dtype):
    """A request's logits at every generated position are bitwise the same alone and at any row of batches 2..8
    of random companions (so: different padding, batch buckets and CUDA graphs), and run after run."""
    model = tiny_causal_lm("llama", layers=2, dtype=dtype).cuda()
    cm = braze.compile(model, max_seq=64, max_batch=8, deterministic=True)
    assert cm.executor_name == "cuda"
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(3, 256, (11,), generator=g).cuda()

    def request(batch, row):
        prompts = [torch.randint(3, 256, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).cuda()
                   for _ in range(batch)]
        prompts[row] = prompt
        ids, mask = _left_padded(prompts)
        out = cm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, output_logits=True)
        return out.sequences[row, ids.shape[1]:], out.logits[row].float().view(torch.int32)

    tokens1, logits1 = request(1, 0)
    for batch, row in ((1, 0), (2, 1), (3, 0), (5, 4), (8, 6)):
        tokens, logits = request(batch, row)
        assert torch.equal(tokens, tokens1), (batch, row)
        assert int((logits != logits1).sum()) == 0, (batch, row)


def test_deterministic_speculation_replays_verify_graphs_bitwise_on_cuda():
    """deterministic=True speculation on CUDA: the verify plan (the decode kernel's tree form, lengths and tree read
    on device) is replayed from CUDA graphs per (batch, k) bucket, and a left-padded batch emits plain decoding's
    tokens from bitwise plain decoding's logits, path and tree drafts of the right continuation (CPU twin:
    test_deterministic.py::test_speculative_verify_logits_bitwise_equal_plain_decoding)."""
    from braze.runtime.speculate import SpeculativeRunner
    from tests.test_deterministic import _OracleTreeDrafter

    model = tiny_causal_lm("llama", layers=2, dtype=torch.bfloat16).cuda()
    cm = braze.compile(model, max_seq=64, max_batch=4, deterministic=True)
    g = torch.Generator().manual_seed(5)
    ids, mask = _left_padded([torch.randint(3, 256, (n,), generator=g).cuda() for n in (12, 7, 9)])
    kw = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=None, output_logits=True)
    plain = cm.generate(ids, **kw)
    cont = {tuple(ids[b][mask[b].bool()].tolist()): plain.sequences[b, ids.shape[1]:].tolist() for b in range(3)}
    for tree in (False, True):
        runner = cm.generator.spec = SpeculativeRunner(cm.generator, adaptive=False)
        runner.drafter = _OracleTreeDrafter(cont, 256, branching=tree)
        out = cm.generate(ids, **kw, speculate=True, spec_tree=tree, max_spec_tokens=4)
        assert torch.equal(out.sequences, plain.sequences), tree
        assert int((out.logits.float().view(torch.int32) != plain.logits.float().view(torch.int32)).sum()) == 0
        assert runner.stats.accepted_drafts > 0 and runner.verify_graphs.graphs, tree


def test_df11_logits_bitwise_equal_bf16_on_cuda():
    """DFloat11 is lossless: the df11 plan's logits are bitwise the bf16 plan's (same tiles, decoded weights)."""
    model = tiny_causal_lm("llama", layers=2, dtype=torch.bfloat16).cuda()
    ids = torch.randint(3, 256, (2, 13), device="cuda")
    base, df11 = braze.compile(model, max_seq=64), braze.compile(model, max_seq=64, quant="df11")
    with torch.no_grad():
        a, b = base(ids).logits, df11(ids).logits
    assert int((a.view(torch.int16) != b.view(torch.int16)).sum()) == 0


@pytest.mark.parametrize("act", ["a16", "a8"])
def test_int6_plans_on_cuda_match_the_reference_executor(act):
    """INT6 kernels on the GPU vs the same quantized graph run by torch ops (fp32 model: the two differ by
    accumulation order only; A8 quantizes activations identically in both)."""
    model = tiny_causal_lm("llama", layers=2).cuda()
    opts = dict(max_seq=64, quant="int6", int6_method="rtn", int6_act=act)
    ids = torch.randint(3, 256, (2, 13), device="cuda")
    with torch.no_grad():
        got = braze.compile(model, **opts)(ids).logits
        want = braze.compile(model, executor="reference", **opts)(ids).logits
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("policy", ["keydiff", "snapkv", "adakv", "chunkkv"])
def test_kv_compression_on_cuda_matches_the_reference_executor(policy):
    model = tiny_causal_lm("llama", layers=1).cuda()
    ids = torch.randint(3, 200, (2, 30), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    opts = dict(max_seq=48, max_batch=2, kv_compression=policy, kv_budget=0.5)
    want = braze.compile(model, executor="reference", **opts).generate(ids, attention_mask=mask, max_new_tokens=6)
    cm = braze.compile(model, **opts)
    assert cm.executor_name == "cuda"
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=6), want)


def test_rkv_compression_on_cuda_recompresses_with_kernels_like_the_reference():
    """R-KV on a GPU: prefill compression, the decode plan's query-recording kernel inside replayed CUDA graphs, and
    two decode-time re-compressions by the kv_compress kernels (in place, between replays) = the reference."""
    model = tiny_causal_lm("llama", layers=1).cuda()
    ids = torch.randint(3, 200, (2, 30), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    opts = dict(max_seq=48, max_batch=2, kv_compression="rkv", kv_budget=16, kv_window=4)
    want = braze.compile(model, executor="reference", **opts).generate(ids, attention_mask=mask, max_new_tokens=18)
    cm = braze.compile(model, **opts)
    assert cm.executor_name == "cuda"
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=18), want)
    assert cm.generator.stats.extra["kv_recompressions"] == 2


@pytest.mark.parametrize("policy", ["keydiff", "snapkv", "adakv", "chunkkv", "rkv"])
def test_kv_compress_kernels_bf16_on_cuda_equal_the_reference(policy):
    """tests/test_kv_compress_kernels.py's bf16 case on CUDA: scores from tensor-core dots of bf16 values (exact
    products, fp32 sums) and RoPE in fp32 rounded once, as the reference computes them, so the kept tokens and the
    compressed caches are equal; random data keeps the k-th and (k+1)-th scores far apart compared with the
    summation-order difference (~1e-6)."""
    from braze.kernels import device_spec
    from braze.kernels.kv_compress import LayerTensors, compress_layer, new_scratch, render_kv_compress
    from braze.ops.kv_compress import kv_compress_reference
    from braze.runtime.kernel_loader import load_kernel_module

    g = torch.Generator().manual_seed(1)
    b, hq, hkv, p, d, window = 2, 8, 2, 300, 64, 16
    q, cos, sin = (torch.randn(*s, generator=g).bfloat16().cuda() for s in ((b, hq, p, d), (b, p, d), (b, p, d)))
    k, v = (torch.randn(b, hkv, 320, d, generator=g).bfloat16().cuda() for _ in range(2))
    kv_start = torch.tensor([0, 13], dtype=torch.int32, device="cuda")
    keep = torch.tensor([80, 160 if policy == "adakv" else 80], device="cuda")
    module = load_kernel_module(render_kv_compress("kvc"))
    results = []
    for kernels in (False, True):
        ck, cv = (torch.zeros(b, hkv, int(keep[1]), d, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        start = torch.zeros(b, hkv, dtype=torch.int32, device="cuda")
        ring = torch.zeros(b, hq, window, d, dtype=torch.bfloat16, device="cuda") if policy == "rkv" else None
        if kernels:
            scratch = new_scratch(b, p, hq, hkv, "cuda")
            layer = LayerTensors(q, p - window, k, v, ck, cv, kv_start, keep[0:1], keep[1:2], start, p, cos, sin, ring)
            compress_layer(module, "kvc", layer, policy, d ** -0.5, window, scratch, device_spec(q.device))
        else:
            kv_compress_reference(q, k, v, kv_start, ck, cv, keep, start, d ** -0.5, policy, window, cos, sin, ring)
        results.append((ck, cv, start, ring))
    for want, got in zip(*results):
        if want is not None:
            assert torch.equal(got, want), policy
