"""Gated DeltaNet hybrids (Qwen3.5 / Qwen3-Next: linear-attention layers with a recurrent state beside softmax
attention) compile through torch.export and generate over the KV-cache plans, each linear layer's state in a
recurrent-state cache (compiler/hf_functions.py, ops/recurrent_state.py, passes/recurrent_state.py,
kernels/gated_delta.py). They compiled only through the Dynamo fallback before: a plan per prompt length, no
package, HF's generate loop."""

from __future__ import annotations

import pytest
import torch

import braze
from braze.runtime.compiled import CompiledModel
from braze.runtime.errors import InputMismatchError

LINEAR = dict(layer_types=["linear_attention", "full_attention"], linear_key_head_dim=16, linear_value_head_dim=16,
              linear_num_key_heads=2, linear_num_value_heads=4)


def _tiny(arch: str, linear: bool = True, **overrides) -> torch.nn.Module:
    """A tiny seeded HF model; `linear`: Qwen3.5-style linear-attention dims and layer pattern."""
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, head_dim=16, pad_token_id=0,
                  **(LINEAR if linear else {}))
    common.update(overrides)
    cfg = transformers.AutoConfig.for_model(arch, **common)
    for k, v in common.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _tiny_ssd(arch: str, **overrides) -> torch.nn.Module:
    return _tiny(arch, linear=False, initializer_range=0.2, **overrides)


def _exported_with_hf_tokens(model: torch.nn.Module, rules: int) -> CompiledModel:
    """Compiled through torch.export with generation plans, `rules` gated-delta launches and no eager step in every
    plan, and greedy tokens (8 new) equal to HF's generate."""
    cm = braze.compile(model, max_seq=32, max_batch=2)
    assert isinstance(cm, CompiledModel) and cm.generation_missing is None
    for name, plan in {"forward": cm.plan, **cm.extra_plans}.items():
        assert not [s.target for s in plan.steps if s.kind == "eager" and s.target != "_operator.getitem"], name
        assert [s.launcher for s in plan.steps].count("gated_delta") == rules, name
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(cm.generate(ids, max_new_tokens=8, eos_token_id=None, pad_token_id=0), want)
    return cm


def _left_padded_tokens_match(model: torch.nn.Module, cm, pad: int, new: int, varied: int) -> tuple:
    """A 2-row batch of 9-token prompts, row 1 left-padded by `pad`: greedy tokens (`new`, more than `varied`
    distinct in row 0, so a state mix-up would show) equal HF's generate; returns them with the batch."""
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    ids[mask == 0] = 0
    kw = dict(attention_mask=mask, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, do_sample=False, **kw)
    assert len(set(want[0, 9:].tolist())) > varied
    assert torch.equal(cm.generate(ids, **kw), want)
    return ids, want


@pytest.fixture(scope="module")
def qwen35():
    model = _tiny("qwen3_5_text")
    return model, braze.compile(model, max_seq=32, max_batch=2)


def test_qwen35_compiles_through_export_with_a_state_cache(qwen35):
    """One capture (not a plan per prompt length): the linear layer's chunked scan is braze::gated_delta_rule,
    which the cache phase puts over a recurrent-state cache; every plan runs it as the gated-delta kernel (no
    eager step anywhere), prefill and decode included; the forward matches HF's within fp32 reassociation."""
    model, cm = qwen35
    assert isinstance(cm, CompiledModel) and cm.generation_missing is None
    assert "1 recurrent layers (1 gated delta) read and write a state cache (fp32)" in str(cm.report)
    assert "1 causal convolutions (4 taps) read and write a conv cache of 32 positions; 1 activations in their " \
           "kernels" in str(cm.report)  # silu(conv(...)) in the conv's launch
    for name, plan in {"forward": cm.plan, **cm.extra_plans}.items():
        assert not [s.target for s in plan.steps if s.kind == "eager" and s.target != "_operator.getitem"], name
        steps = [s for s in plan.steps if s.launcher == "gated_delta"]
        assert len(steps) == 1 and steps[0].params["cached"] == (name != "forward"), name
        if name != "forward":
            (conv,) = [s for s in plan.steps if s.launcher == "cached_conv"]
            assert conv.params["activation"] == "silu", name
    assert "verify" not in cm.extra_plans  # drafts cannot be verified over one state (refused below)
    names = [n for n, _, _ in cm.generator.kv_inputs]
    assert "scan_state_0" in names and "conv_cache_0" in names
    for seq in (3, 11):  # one plan, any length
        ids = torch.randint(3, 256, (2, seq), generator=torch.Generator().manual_seed(seq))
        with torch.no_grad():
            torch.testing.assert_close(cm(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_qwen35_generates_hf_tokens_left_padded(qwen35):
    """Greedy tokens of a left-padded batch equal HF's generate (its cache: chunked prefill, recurrent decode):
    padding leaves the state at zero, decode resumes each row from its state. 14 new tokens, varied."""
    model, cm = qwen35
    ids, want = _left_padded_tokens_match(model, cm, pad=4, new=14, varied=3)
    again = cm.generate(ids[1:, 4:], max_new_tokens=14, eos_token_id=None, pad_token_id=0)
    assert torch.equal(again[0, 5:], want[1, 9:])  # the padded row alone, unpadded: the same tokens


def test_qwen35_refuses_what_a_recurrent_state_cannot_do(qwen35):
    """Verifying drafts would advance the state past rejected tokens, and KV-cache compression evicts slots the
    state has already absorbed: each refused in one line naming the reason, at generate and at compile."""
    model, cm = qwen35
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    with pytest.raises(InputMismatchError, match="recurrent layers .* keep one recurrent state"):
        cm.generate(ids, max_new_tokens=3, speculate=True)
    with pytest.raises(braze.ConfigError, match="speculate='suffix'.*recurrent state"):
        braze.compile(model, max_seq=32, max_batch=2, speculate="suffix")
    with pytest.raises(braze.ConfigError, match="hold the whole past in a recurrent state"):
        braze.compile(model, max_seq=32, max_batch=2, kv_compression="snapkv", kv_budget=0.5, kv_window=4)


def test_qwen35_package_round_trip(qwen35, tmp_path):
    """The saved package carries the state caches' layout: loaded, it generates the same tokens."""
    _, cm = qwen35
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    want = cm.generate(ids, max_new_tokens=8)
    loaded = braze.load(cm.save(tmp_path / "pkg"))
    assert torch.equal(loaded.generate(ids, max_new_tokens=8), want)


def test_qwen3_next_moe_hybrid_generates_hf_tokens():
    """Qwen3-Next (gated DeltaNet + gated attention, sparse MoE MLPs): exported, no eager step in the decode
    plan, greedy tokens equal HF's."""
    model = _tiny("qwen3_next", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                  shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])
    _exported_with_hf_tokens(model, rules=1)


@pytest.mark.parametrize("arch", ["kimi_linear", "bailing_hybrid"])
def test_kimi_delta_attention_hybrids_generate_hf_tokens(arch):
    """Kimi Delta Attention (a decay per key channel) beside MLA attention: Kimi-Linear and Bailing-hybrid timed
    out (> 15 min) in the Dynamo fallback; exported now, no eager step in any plan, greedy tokens equal HF's."""
    mla = dict(head_dim=8, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, kv_lora_rank=32, q_lora_rank=32,
               num_key_value_heads=4, linear_num_heads=4, linear_head_dim=16,
               mlp_layer_types=["dense", "dense"])
    _exported_with_hf_tokens(_tiny(arch, **mla), rules=1)


def test_mamba2_decodes_over_a_state_cache_left_padded():
    """Mamba2 (SSD scan layers only): HF's `mamba2_chunk_scan` captured as the gated-delta op without beta, so the
    model exports (it compiled per prompt length through Dynamo before) and decodes over a conv cache (its causal
    conv, silu in the launch) and a state cache [B, heads, state, head_dim]; a left-padded batch's greedy tokens
    (12 new, varied) equal HF's generate; forward within 1e-5 of HF's chunked fp32 scan (summation order)."""
    model = _tiny_ssd("mamba2", num_heads=8, state_size=16, n_groups=2)
    cm = braze.compile(model, max_seq=32, max_batch=2)
    assert isinstance(cm, CompiledModel) and cm.generation_missing is None
    for name, plan in {"forward": cm.plan, **cm.extra_plans}.items():
        assert not [s.target for s in plan.steps if s.kind == "eager" and s.target != "_operator.getitem"], name
        steps = [s for s in plan.steps if s.launcher == "gated_delta"]
        assert len(steps) == 2 and all("beta" not in s.params["roles"] for s in steps), name
    assert "2 recurrent layers (2 SSD scan) read and write a state cache (fp32)" in str(cm.report)
    assert [(n, shape) for n, shape, _ in cm.generator.kv_inputs if n.startswith("scan_state_")] == [
        ("scan_state_0", [8, 16, 16]), ("scan_state_1", [8, 16, 16])]
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(cm(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    _left_padded_tokens_match(model, cm, pad=3, new=12, varied=3)


@pytest.mark.parametrize("arch, overrides", [
    ("bamba", dict(attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1)),
    ("granitemoehybrid", dict(layer_types=["linear_attention", "full_attention"], mamba_n_heads=8, mamba_d_head=16)),
])
def test_mamba2_attention_hybrids_generate_hf_tokens(arch, overrides):
    """Bamba and Granite-4 hybrids (an SSD layer, then attention): exported, no eager step in any plan, greedy
    tokens equal HF's."""
    _exported_with_hf_tokens(_tiny_ssd(arch, **overrides), rules=1)


def test_mamba_selective_scan_decodes_over_a_state_cache_left_padded():
    """Mamba (selective-scan layers only): HF's `mamba_selective_scan` captured as the gated-delta op (one head
    whose value dim is the channels), so the model exports (it compiled per prompt length through Dynamo before) and
    decodes over a conv cache and a state cache [B, 1, state, channels]; a left-padded batch's greedy tokens (12
    new) equal HF's."""
    model = _tiny_ssd("mamba", state_size=8, tie_word_embeddings=False, intermediate_size=64)
    cm = braze.compile(model, max_seq=32, max_batch=2)
    assert isinstance(cm, CompiledModel) and cm.generation_missing is None
    assert "2 recurrent layers (2 SSD scan) read and write a state cache (fp32)" in str(cm.report)
    assert [shape for n, shape, _ in cm.generator.kv_inputs if n.startswith("scan_state_")] == [[1, 8, 64]] * 2
    _left_padded_tokens_match(model, cm, pad=3, new=12, varied=2)


def test_jamba_selective_scan_hybrid_generates_hf_tokens():
    """Jamba (a Mamba layer, then attention with MoE): exported, no eager step, greedy tokens equal HF's."""
    _exported_with_hf_tokens(_tiny_ssd("jamba", attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                       expert_layer_offset=1), rules=1)
