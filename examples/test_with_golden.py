"""Golden-output tests with braze's pytest plugin (installed with braze; nothing to configure).

    pytest examples/test_with_golden.py                        # first run records golden/test_with_golden/*.safetensors
    pytest examples/test_with_golden.py --braze-update-golden  # re-record after an intended change

`golden.check(name, compiled_output, eager_fn)` stores `eager_fn()`'s output the first time and checks the
compiled output against the stored one on every run, with per-dtype tolerances (fp32 1e-4, fp16 1e-2,
bf16 2e-2) or bit for bit with exact=True. Commit the golden/ directory next to your tests.
"""

import pytest
import torch

import braze

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # snapshots are stored on CPU either way


def make_block() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16)).eval().to(DEVICE)


@pytest.mark.parametrize("batch", [1, 4])
def test_block_matches_eager(golden, batch):
    model = make_block()
    x = torch.randn(batch, 16, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
    cm = braze.compile(model)
    golden.check(f"block_b{batch}", cm(x), eager_fn=lambda: model(x))  # one name per parametrization


def test_block_is_deterministic(golden):
    model = make_block()
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cm = braze.compile(model)
    first = cm(x)
    golden.check("block_bits", cm(x), eager_fn=lambda: first, exact=True)  # compares bit patterns
