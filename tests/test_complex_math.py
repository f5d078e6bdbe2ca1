"""Complex arithmetic as real / imaginary pairs (passes/complex_math.py): Llama 4's and Meta's reference RoPE
(view_as_complex(x) * freqs_cis, view_as_real) run in generated kernels instead of eager steps; a graph whose
complex values reach an op without a rule keeps its eager steps and stays exact."""

import pytest
import torch

import braze

COMPLEX_OPS = {"aten.view_as_complex.default", "aten.view_as_real.default", "aten.polar.default"}


def _eager(plan):
    return [s.target for s in plan.steps if s.kind == "eager" and s.target != "_operator.getitem"]


class MetaRope(torch.nn.Module):
    """Meta's reference apply_rotary_emb over a precomputed complex freqs_cis buffer (a complex weight)."""

    def __init__(self, dim=16, seq=32):
        super().__init__()
        freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        angles = torch.outer(torch.arange(seq).float(), freqs)
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles))
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):  # x [B, S, H, D]
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        rot = torch.view_as_real(xc * self.freqs_cis[: x.shape[1], None, :]).flatten(3)
        return self.proj(rot.type_as(x))


class PolarRope(torch.nn.Module):
    """Llama 4's form: freqs_cis = polar(ones, angle) * scale computed in the forward."""

    def forward(self, x, angle):
        freqs = torch.polar(torch.ones_like(angle), angle) * 0.5
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs[:, :, None, :]).flatten(3) + 1.0


class ComplexAbs(torch.nn.Module):
    """A complex value read by abs (no rule): left as it is."""

    def forward(self, x):
        return torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)).abs() * 2.0


def test_a_complex_weight_becomes_two_real_ones():
    torch.manual_seed(0)
    model = MetaRope().eval()
    x = torch.randn(2, 32, 4, 16)
    cm = braze.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x), rtol=0, atol=1e-5)
    assert not COMPLEX_OPS & set(_eager(cm.compiled.plan)) and not _eager(cm.compiled.plan)
    assert not any(w.is_complex() for w in cm.compiled.weights.values())
    assert cm.compiled.report.pass_count("lower_complex") > 0


def test_polar_rope_runs_in_generated_kernels():
    torch.manual_seed(0)
    x, angle = torch.randn(2, 9, 4, 16), torch.randn(2, 9, 8)
    model = PolarRope().eval()
    cm = braze.compile(model)
    torch.testing.assert_close(cm(x, angle), model(x, angle), rtol=0, atol=1e-5)
    assert not _eager(cm.compiled.plan)


def test_complex_values_without_a_rule_stay_eager_and_exact():
    x = torch.randn(3, 8)
    cm = braze.compile(ComplexAbs().eval())
    torch.testing.assert_close(cm(x), ComplexAbs()(x))
    assert "aten.view_as_complex.default" in _eager(cm.compiled.plan)
    notes = [n for p in cm.compiled.report.passes if p.name == "lower_complex" for n in p.notes]
    assert notes == ["complex values reach an op without a real-pair rule: they run eagerly"]


@pytest.mark.parametrize("layers", [2])
def test_llama4_rope_leaves_the_eager_steps(layers):
    """A tiny Llama 4 (text): its complex RoPE no longer runs eagerly in any plan (nor, since passes/normalize.py
    lowers them, its experts' bmm, scatter and repeat: test_generate.py::test_llama4_decodes_at_any_batch_with_its_
    rope_as_real_ops); logits within 1e-5 of eager and 6 greedy tokens equal to HF's."""
    import transformers

    cfg = transformers.AutoConfig.for_model(
        "llama4_text", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, head_dim=16, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    cm = braze.compile(model, max_seq=64, max_batch=2)
    for plan in (cm.plan, *cm.extra_plans.values()):
        assert not COMPLEX_OPS & set(_eager(plan)), plan.name
        assert "aten.mul.Tensor" not in _eager(plan), plan.name  # (the complex products ran eagerly)
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(cm(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
        want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(ids, max_new_tokens=6), want)
