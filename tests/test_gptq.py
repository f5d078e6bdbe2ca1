"""GPTQ (braze/quant/gptq.py): Hessian-aware INT6 rounding in the layout braze.quant.int6 packs."""

import pytest
import torch

from braze.compiler.config import CompileConfig
from braze.models import tiny_causal_lm
from braze.quant.gptq import calibrate, gptq_int6, gptq_quantize, layer_error
from braze.quant.int6 import fake_quant_weight, unpack_int6
from braze.runtime.errors import ConfigError


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_causal_lm("llama", seed=0, layers=2)
    ids = torch.randint(0, model.config.vocab_size, (768,), generator=torch.Generator().manual_seed(0))
    return model, calibrate(model, ids=ids, window=128)


def test_calibration_shares_hessians_of_siblings(calibrated):
    model, hess = calibrated
    linears = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(hess) == set(linears)
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert hess[attn + "q_proj.weight"] is hess[attn + "k_proj.weight"] is hess[attn + "v_proj.weight"]
    assert hess[mlp + "gate_proj.weight"] is hess[mlp + "up_proj.weight"]
    assert hess[mlp + "down_proj.weight"].shape == (128, 128)
    for h in hess.values():
        assert torch.allclose(h, h.T) and torch.linalg.eigvalsh(h.double()).min() > -1e-6


@pytest.mark.parametrize("group_size", [128, 32])
def test_gptq_beats_rtn_on_calibration_data(calibrated, group_size):
    model, hess = calibrated
    params = dict(model.named_parameters())
    for name, h in hess.items():
        if name == "lm_head.weight":
            continue
        w = params[name].detach()
        qw = gptq_int6(w, h, group_size)
        q = unpack_int6(qw.packed, w.shape[1], group_size)
        assert int(q.min()) >= -32 and int(q.max()) <= 31
        assert qw.scales.dtype == torch.float16 and qw.scales.shape == (w.shape[0], -(-w.shape[1] // group_size))
        err_gptq = layer_error(w, qw.dequantize(), h)
        err_rtn = layer_error(w, fake_quant_weight(w, group_size), h)
        assert err_gptq < err_rtn, (name, err_gptq, err_rtn)


def test_layer_error_is_output_error():
    torch.manual_seed(0)
    x, w = torch.randn(200, 48), torch.randn(16, 48)
    wq = fake_quant_weight(w, 16)
    h = 2 * x.T @ x / x.shape[0]
    direct = torch.linalg.norm(x @ w.T - x @ wq.T) * (2 / x.shape[0]) ** 0.5
    assert layer_error(w, wq, h) == pytest.approx(float(direct), rel=1e-4)


def test_act_order_and_identity_hessian():
    torch.manual_seed(1)
    w = torch.randn(8, 64)
    # H = I: no cross-column information, GPTQ reduces to round-to-nearest with the same scales
    q, s = gptq_quantize(w, torch.eye(64), group_size=32)
    from braze.quant.int6 import quantize_weight_groups

    q_rtn, s_rtn = quantize_weight_groups(w, 32)
    assert torch.equal(s, s_rtn) and torch.equal(q, q_rtn)
    x = torch.randn(256, 64) * torch.linspace(0.1, 3, 64)
    h = 2 * x.T @ x / 256
    qa, sa = gptq_quantize(w, h, group_size=32, act_order=True)
    assert torch.equal(sa, s_rtn)  # static groups
    assert int(qa.min()) >= -32 and int(qa.max()) <= 31


def test_config_validates_method():
    with pytest.raises(ConfigError, match="'auto', 'rtn', 'awq', 'gptq'"):
        CompileConfig(int6_method="round")
    with pytest.raises(ConfigError, match="int6_calibration"):
        CompileConfig(int6_method="gptq", int6_calibration=[1])


def _llama_k128():
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_compile_option_wires_gptq_into_the_int6_pass():
    import braze

    model = _llama_k128()
    ids = torch.randint(0, 256, (512,), generator=torch.Generator().manual_seed(1))
    hess = calibrate(model, ids=ids, window=128)
    cm = braze.compile(model, max_seq=32, quant="int6", int6_method="gptq", int6_calibration=hess,
                       executor="reference")
    notes = [n for p in cm.report.passes if p.name == "quantize_int6" for n in p.notes]
    per_linear = [n for n in notes if ": W6A16" in n]
    assert len(per_linear) == 4 and all(", gptq" in n for n in per_linear), notes  # qkv, o, gate+up, down
    assert not any("rounded to nearest" in n for n in notes)
    assert cm.config.int6_calibration is hess  # given by the caller: kept as given
    x = ids[:32].unsqueeze(0)
    rtn = braze.compile(model, max_seq=32, quant="int6", executor="reference")
    with torch.no_grad():
        eager = model(x).logits
    assert torch.isfinite(cm(x).logits).all()
    assert not torch.equal(cm(x).logits, rtn(x).logits)
    assert (cm(x).logits - eager).abs().max() < 0.1


def test_gptq_without_calibration_or_tokenizer_is_a_config_error():
    import braze

    with pytest.raises(ConfigError, match="int6_calibration"):
        braze.compile(_llama_k128(), max_seq=32, quant="int6", int6_method="gptq", executor="reference")
