"""A DFloat11 (lossless) and an INT6 (FlexQ-style, weight-only) kernel package of the same model.

DFloat11 keeps BF16 weights bit for bit in ~11 bits/weight, so its logits equal the uncompressed compile's;
INT6 stores 6.125 bits/weight (+ padding for K not a multiple of 128) and is close, not equal.

    python examples/quantized_packages.py
"""

import tempfile
from pathlib import Path

import torch

import braze
from braze.models import tiny_causal_lm


def main() -> None:
    model = tiny_causal_lm("llama")
    with torch.no_grad():  # give it BF16-representable weights, as a BF16 checkpoint has
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = braze.compile(model, max_seq=32)(ids).logits
    with tempfile.TemporaryDirectory() as tmp:
        for quant, options in (("df11", {"cast_bf16": True}), ("int6", {})):
            compiled = braze.compile(model, max_seq=32, quant=quant, **options)
            notes = next(p.notes for p in compiled.report.passes if p.name == f"quantize_{quant}")
            compiled.save(Path(tmp) / quant)
            logits = braze.load(Path(tmp) / quant)(ids).logits
            err = (logits - plain).abs().max().item()
            size = sum(f.stat().st_size for f in (Path(tmp) / quant).glob("weights.safetensors"))
            print(f"{quant}: {notes[0] if notes else ''}; weights file {size / 1024:.0f} KiB; "
                  f"max |braze - eager| = {err:.2e} vs the uncompressed compile")
            if quant == "df11":
                assert torch.equal(logits, plain), "DFloat11 must be lossless"


if __name__ == "__main__":
    main()
