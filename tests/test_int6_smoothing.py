"""INT6 activation-aware smoothing (braze/quant/smoothing.py) and the A6/A8 sensitivity choice (braze/passes/int6.py).

Tolerances: kernels vs the reference executor use the same bounds as tests/test_quant_passes.py (fp32 rounding
of differently ordered sums, plus, with activation quantization, an occasional code that rounds across a tie).
"""

import re

import pytest
import torch

import braze
from braze.compiler.config import CompileConfig
from braze.quant.calibration import Calibration, collect
from braze.quant.int6 import fake_quant_weight
from braze.quant.smoothing import output_error, search_smoothing
from braze.runtime.errors import ConfigError


def _outlier_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 192, generator=g)
    x[:, [3, 77, 150]] *= 40  # a few outlier channels, as LLM activations have
    w = torch.randn(48, 192, generator=g) * 0.02
    return w, x


@pytest.mark.parametrize("bits", [16, 8, 6])
def test_smoothing_is_never_worse_than_rtn_and_helps_with_outliers(bits):
    w, x = _outlier_rows()
    rtn = search_smoothing(w, x, bits, smooth=False)
    best = search_smoothing(w, x, bits)
    assert rtn.alpha == 0.0 and torch.equal(rtn.scale, torch.ones(192))
    assert best.rel_error <= rtn.rel_error
    assert best.alpha > 0 and best.rel_error < 0.8 * rtn.rel_error, (best, rtn)
    # the reported error is the measured one
    assert best.rel_error == pytest.approx(output_error(w, x, bits, best.scale), rel=1e-6)


def test_smoothing_is_an_identity_before_rounding():
    w, x = _outlier_rows(1)
    s = search_smoothing(w, x, 16).scale
    exact = x @ w.T
    assert torch.allclose((x / s) @ (w * s).T, exact, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fake_quant_weight(w * s) / s, fake_quant_weight(w))  # rounding differs


def test_search_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="do not match weight"):
        search_smoothing(torch.zeros(4, 128), torch.zeros(8, 64))


# ---- the pass -----------------------------------------------------------------------------------------------
def _llama():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # activation outliers: a few large RMSNorm gains
        for layer in model.model.layers:
            layer.input_layernorm.weight[[5, 40]] = 12.0
            layer.post_attention_layernorm.weight[[9]] = 10.0
    return model


@pytest.fixture(scope="module")
def model_and_stats():
    model = _llama()
    ids = torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(3))
    return model, collect(model, ids=ids, window=128, sample_rows=128)


IDS = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(7))


def _notes(cm):
    return [n for p in cm.report.passes if p.name == "quantize_int6" for n in p.notes]


def _per_linear(cm):
    return [n for n in _notes(cm) if re.match(r"\S+: W6A", n)]


def _calib_errors(cm):
    return [float(m.group(1)) for n in _per_linear(cm) for m in [re.search(r"calib err ([\d.]+)%", n)] if m]


def test_collect_keeps_samples_shared_by_siblings(model_and_stats):
    model, stats = model_and_stats
    assert isinstance(stats, Calibration) and stats.tokens == 512
    attn = "model.layers.0.self_attn."
    assert stats.samples[attn + "q_proj.weight"] is stats.samples[attn + "v_proj.weight"]
    assert stats.samples[attn + "q_proj.weight"].shape == (128, 128)
    assert stats.samples["model.layers.1.mlp.down_proj.weight"].shape == (128, 256)
    assert stats.hessians[attn + "q_proj.weight"].shape == (128, 128)


def test_awq_lowers_calibration_error_without_extra_launches(model_and_stats):
    model, stats = model_and_stats
    opts = dict(max_seq=32, quant="int6", int6_calibration=stats, executor="reference")
    awq = braze.compile(model, int6_method="awq", **opts)
    rtn = braze.compile(model, int6_method="rtn", **opts)
    assert all(", awq alpha=" in n for n in _per_linear(awq)[:1])
    assert len(_calib_errors(awq)) == len(_calib_errors(rtn)) == 8
    assert sum(_calib_errors(awq)) < sum(_calib_errors(rtn))
    smoothed = [n for n in awq.weights if "inv_smooth" in n]
    assert len(smoothed) == 6 and not any("inv_smooth" in n for n in rtn.weights)  # qkv + gate/up + down, 2 layers
    # o_proj reads the attention output: nothing to fold 1/s into, so it rounds to nearest
    o_proj = [n for n in _per_linear(awq) if "o_proj" in n]
    assert o_proj and all("alpha=0.0" in n for n in o_proj)
    with torch.no_grad():
        eager = model(IDS).logits
    assert (awq(IDS).logits - eager).abs().max() < 0.1 * eager.abs().max()


def test_awq_kernels_match_reference_and_fuse_the_smoothing_multiply(model_and_stats):
    model, stats = model_and_stats
    opts = dict(max_seq=32, quant="int6", int6_calibration=stats, int6_act="mixed", int6_a6_tolerance=0.5)
    awq = braze.compile(model, int6_method="awq", **opts)
    ref = braze.compile(model, int6_method="awq", executor="reference", **opts)
    rtn = braze.compile(model, int6_method="rtn", **opts)
    assert (awq(IDS).logits - ref(IDS).logits).abs().max() < 2e-2
    rtn(IDS)
    assert awq.stats["launches"] == rtn.stats["launches"]  # x * (1/s) runs inside the RMSNorm / SwiGLU kernels
    assert awq.stats["eager_ops"] == 0


def test_sensitivity_picks_a6_or_a8_by_tolerance(model_and_stats):
    model, stats = model_and_stats
    opts = dict(max_seq=32, quant="int6", int6_calibration=stats, int6_act="mixed", executor="reference")
    strict = braze.compile(model, int6_a6_tolerance=0.0, **opts)
    loose = braze.compile(model, int6_a6_tolerance=0.9, **opts)
    assert [n.split(": ")[1].split(",")[0] for n in _per_linear(strict)] == ["W6A8"] * 8
    assert any("sensitivity: 8 linears kept A8" in n for n in _notes(strict))
    assert [n.split(": ")[1].split(",")[0] for n in _per_linear(loose)] == ["W6A6"] * 8
    errors = sorted(_calib_errors(loose))
    middle = (errors[3] + errors[4]) / 200  # a tolerance between the 4th and 5th smallest A6 error
    mid = braze.compile(model, int6_a6_tolerance=middle, **opts)
    tags = [n.split(": ")[1].split(",")[0] for n in _per_linear(mid)]
    assert tags.count("W6A6") == 4 and tags.count("W6A8") == 4


def test_explicit_a6_on_a_rejected_linear_warns_and_keeps_a8(model_and_stats):
    model, stats = model_and_stats
    with pytest.warns(UserWarning, match="W6A6 requested for .*down_proj.*keeping W6A8"):
        cm = braze.compile(model, max_seq=32, quant="int6", int6_calibration=stats, executor="reference",
                           int6_act="a16", int6_act_overrides={"down_proj": 6}, int6_a6_tolerance=0.0)
    tags = {n.split(": ")[1].split(",")[0] for n in _per_linear(cm) if "down_proj" in n}
    others = {n.split(": ")[1].split(",")[0] for n in _per_linear(cm) if "down_proj" not in n}
    assert tags == {"W6A8"} and others == {"W6A16"}


def test_overrides_and_tolerance_are_validated():
    with pytest.raises(ConfigError, match="activation bits must be one of 16, 8, 6"):
        CompileConfig(int6_act_overrides={"down_proj": 4})
    with pytest.raises(ConfigError, match="int6_act_overrides must be a dict"):
        CompileConfig(int6_act_overrides=["down_proj"])
    with pytest.raises(ConfigError, match="int6_a6_tolerance"):
        CompileConfig(int6_a6_tolerance=2.0)
    with pytest.raises(ConfigError, match="int6_calibration must be"):
        CompileConfig(int6_calibration="calib.pt")


def test_awq_without_calibration_is_a_config_error_and_auto_falls_back_to_rtn():
    model = _llama()
    with pytest.raises(ConfigError, match="int6_method='awq'.*int6_calibration"):
        braze.compile(model, max_seq=32, quant="int6", int6_method="awq", executor="reference")
    cm = braze.compile(model, max_seq=32, quant="int6", executor="reference")  # auto, no tokenizer
    assert any("no calibration data" in n for n in _notes(cm))
    assert all(", rtn" in n for n in _per_linear(cm))
