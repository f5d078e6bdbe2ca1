"""DFloat11 at model scale: Llama-3.2-1B-shaped N(0, 0.02) weights and every weight of SmolLM2, bit-exact.

Encoding is vectorized (~1e8 weights/s here); decoding at this scale uses the torch reference decoder (the Triton
decoder is checked bit-exact under the interpreter in test_df11.py and in the model tests, on smaller units).
"""

import pytest
import torch

from braze.quant.df11 import decode_df11_reference, encode_df11


def _bits_equal(decoded, originals):
    for name, t in originals.items():
        assert torch.equal(decoded[name].view(torch.int16), t.view(torch.int16)), name


def test_llama_3_2_1b_layer_shapes_under_11_bits():
    """One decoder block of Llama-3.2-1B (hidden 2048, 8 KV heads of 64, MLP 8192): 60.8M weights in one unit."""
    g = torch.Generator().manual_seed(0)
    shapes = {"q": (2048, 2048), "k": (512, 2048), "v": (512, 2048), "o": (2048, 2048),
              "gate": (8192, 2048), "up": (8192, 2048), "down": (2048, 8192)}
    tensors = {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    unit = encode_df11(tensors)
    assert unit.bits_per_weight <= 11.0, f"{unit.bits_per_weight:.3f} bits/weight"  # measured 10.80
    _bits_equal(decode_df11_reference(unit), tensors)


@pytest.mark.slow
def test_every_smollm2_weight_roundtrips_bit_exact():
    """All 135M weights (BF16-rounded: the GGUF holds dequantized Q4_1, not a BF16 checkpoint), one unit per
    decoder block and one per other tensor, as the df11 pass groups them. Reports bits/weight (measured ~10.9)."""
    from braze.models import load_smollm2

    model, _ = load_smollm2()
    units: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in model.state_dict().items():
        parts = name.split(".")
        key = ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else name
        units.setdefault(key, {})[name] = p.detach().to(torch.bfloat16)
    total_bits = total = 0
    for tensors in units.values():
        unit = encode_df11(tensors, warn=False)
        _bits_equal(decode_df11_reference(unit), tensors)
        n = sum(t.numel() for t in tensors.values())
        total_bits += unit.bits_per_weight * n
        total += n
    assert total > 130e6
    assert total_bits / total < 12.0
