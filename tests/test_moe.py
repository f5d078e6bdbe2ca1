"""Mixture-of-experts layers beyond the tiny Mixtral of test_architectures.py: the routing rewrite
(passes/normalize.py: sort / histc + cumsum / inverse permutation -> braze::moe_sort + braze::moe_offsets) on the
shapes HF writes it in, and what it leaves eager.

Tolerance: fp32 on both sides, summation order only (the grouped matmul sums K in tiles), as in
test_architectures.py: 1e-4 on O(1) logits, while a wrong permutation or offset moves them by O(0.1).
"""

import pytest
import torch
import transformers

import braze

TOL = 1e-4


def _moe(experts: int, top_k: int, norm_topk_prob: bool = True):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=experts,
        num_experts_per_tok=top_k, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, norm_topk_prob=norm_topk_prob)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


def _assert_greedy_like_hf(model, cm, ids, row: int, pad: int):
    """5 greedy tokens of a batch whose `row` is left-padded by `pad` tokens: braze's equal HF's."""
    mask = torch.ones_like(ids)
    mask[row, :pad] = 0
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None, pad_token_id=0),
                       hf)


@pytest.mark.parametrize("experts, top_k", [(1, 1), (6, 3)], ids=["one-expert", "six-experts"])
def test_routing_runs_in_kernels(experts, top_k):
    """One expert (HF calls histc(x, 1): torch's default range, which the rewrite must read as [0, 0]) and six
    experts with top-3: forward logits within TOL of eager, greedy tokens of a left-padded batch equal to HF's,
    and every plan runs the router's top-k, the routing and the experts in kernels, with no eager step."""
    model = _moe(experts, top_k)
    cm = braze.compile(model, max_seq=32, max_batch=2)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    assert (cm(ids).logits - want).abs().max().item() < TOL
    for plan in (cm.plan, *cm.extra_plans.values()):
        eager = {s.target for s in plan.steps if s.kind == "eager" and s.target != "_operator.getitem"}
        assert not eager, (plan.name, eager)
        launchers = [s.launcher for s in plan.steps]
        assert (launchers.count("topk"), launchers.count("moe_routing"), launchers.count("grouped_matmul")) == (
            1, 1, 2), plan.name  # the routing's sort and offsets in one launch (braze::moe_route)
        topk = next(s for s in plan.steps if s.launcher == "topk")  # the router's softmax and norm in the top-k
        assert topk.params.get("softmax") and topk.params.get("renorm"), topk.params
        gate_up = next(s for s in plan.steps if s.launcher == "grouped_matmul")  # passes/moe.py: gather + SwiGLU in
        assert gate_up.params.get("glu") == "swiglu" and "rows" in gate_up.params["roles"], gate_up.params
    _assert_greedy_like_hf(model, cm, ids, row=0, pad=3)


def test_routing_rewrite_keeps_the_graph_runnable():
    """The rewritten graph (before lowering) still runs eagerly through the braze ops' references: the report
    notes the routing rewrite and the experts' fusion (gather and SwiGLU in the grouped matmul), and the reference
    executor's logits equal eager's. Without norm_topk_prob only the router's softmax joins the top-k."""
    model = _moe(4, 2, norm_topk_prob=False)
    cm = braze.compile(model, max_seq=32, max_batch=2, executor="reference")
    notes = " ".join(n for p in cm.report.passes for n in p.notes)
    assert "MoE routing -> braze::moe_sort + braze::moe_offsets" in notes
    assert "the experts' row gather read in place by the grouped matmul" in notes
    assert "SwiGLU in the grouped matmul's epilogue" in notes
    assert "MoE routing's sort and offsets in one launch (braze::moe_route)" in notes
    assert "MoE router's softmax in the top-k kernel" in notes and "renormalization" not in notes
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (cm(ids).logits - model(ids).logits).abs().max().item() < TOL


@pytest.mark.parametrize("quant", ["df11", "int6"])
def test_quantization_reports_the_experts_and_keeps_the_router(quant):
    """quant= on an MoE model: the report says the expert weights (here 40% of the weights, the vocabulary being
    large for the tiny layer) stay as stored, int6 keeps the router in the compute dtype (it feeds the top-k: a
    rounded logit can change a token's experts), and df11 (lossless) still generates HF's greedy tokens."""
    model = _moe(4, 2).to(torch.bfloat16)
    cm = braze.compile(model, max_seq=32, max_batch=2, quant=quant, **({"int6_method": "rtn"} if quant == "int6"
                                                                         else {}))
    notes = [n for p in cm.report.passes if p.name == f"quantize_{quant}" for n in p.notes]
    experts = next(n for n in notes if n.startswith("MoE experts kept as stored (bfloat16): 2 tensors"))
    assert int(experts.split("weights, ")[1].split("%")[0]) >= 25
    if quant == "int6":
        assert any(n.startswith("MoE routers kept") and "mlp_gate_weight" in n for n in notes), notes
        assert not any("mlp_gate_weight" in n and "W6A" in n for n in notes), notes
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    if quant == "df11":  # lossless: the same tokens
        assert torch.equal(cm.generate(ids, max_new_tokens=4, eos_token_id=None, pad_token_id=0), hf)


def test_swiglu_fold_reads_open_ended_slices():
    """The experts' SwiGLU fold matches `y[:, H:]` whether the slice's end is written out or left open (None: it
    raised a TypeError in the matcher before)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from braze.passes.moe import _swiglu_user

    x, w, offs = torch.randn(5, 8), torch.randn(2, 8, 6), torch.tensor([2, 5], dtype=torch.int32)

    def experts(x, w, offs):
        y = torch.ops.braze.grouped_mm(x, w, offs)
        return torch.nn.functional.silu(y[:, :3]) * y[:, 3:]

    gm = make_fx(experts, tracing_mode="fake")(x, w, offs)
    mm = next(n for n in gm.graph.nodes if n.target is torch.ops.braze.grouped_mm.default)
    mul = _swiglu_user(mm)
    assert mul is not None and mul.target is torch.ops.aten.mul.Tensor
    up = next(s for s in mm.users if s.args[2] == 3)
    up.args = (*up.args[:3], None)
    assert _swiglu_user(mm) is mul


def test_group_limited_routing_runs_in_kernels():
    """DeepSeek-V3-style routing (GLM-4.5's Glm4Moe: sigmoid scores plus a correction bias, the top-2 sum of each
    of 4 expert groups, the best 2 groups kept through a scatter mask, an unsorted top-4 over the kept experts,
    the weights gathered from the scores): the unsorted top-k's, the gather (indices proven in range) and the
    scatter of a constant (a comparison mask) run in kernels, with no eager step; logits within TOL of eager and a
    left-padded batch's greedy tokens equal to HF's. The bias is randomized so the kept groups differ by token."""
    cfg = transformers.Glm4MoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=16,
        num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=128, norm_topk_prob=True, routed_scaling_factor=1.5)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.Glm4MoeForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    cm = braze.compile(model, max_seq=32, max_batch=2)
    notes = " ".join(n for p in cm.report.passes for n in p.notes)
    assert "scatter of a constant -> a comparison mask (fused)" in notes
    for plan in (cm.plan, *cm.extra_plans.values()):
        eager = {s.target for s in plan.steps if s.kind == "eager" and s.target != "_operator.getitem"}
        assert not eager, (plan.name, eager)
        assert [s.launcher for s in plan.steps].count("topk") == 3, plan.name  # the groups', the groups, experts
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids).logits
    assert (cm(ids).logits - want).abs().max().item() < TOL
    _assert_greedy_like_hf(model, cm, ids, row=1, pad=2)


def test_sparsemixer_routing_runs_in_kernels():
    """PhiMoE's sparsemixer (a top-1, a mask from the row maximum clamped by tensors, a softmax, the pick's weight
    gathered, the pick scattered out, then again): max with indices as a top-1 kernel, clamp by tensors,
    gathers and the scatter into the scores fused; the one eager step left per plan is the rotary table's
    pow(base, tensor). Logits within TOL of eager and a left-padded batch's greedy tokens equal to HF's."""
    cfg = transformers.PhimoeConfig(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=None)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.PhimoeForCausalLM(cfg).eval()
    cm = braze.compile(model, max_seq=32, max_batch=2)
    for plan in (cm.plan, *cm.extra_plans.values()):
        eager = {s.target for s in plan.steps if s.kind == "eager" and s.target != "_operator.getitem"}
        assert eager <= {"aten.pow.Scalar"}, (plan.name, eager)
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(ids).logits
    assert (cm(ids).logits - want).abs().max().item() < TOL
    _assert_greedy_like_hf(model, cm, ids, row=0, pad=2)
