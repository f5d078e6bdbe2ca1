"""What an evaluated attention mask means (braze/passes/masks.py): causal, a sliding window, ALiBi (a bias linear in
the key position with one slope per head, which the attention kernels add themselves), or a dense bias that stays
a bias. The ALiBi fit must take HF's two forms (Bloom: slope * j; MPT: slope * (j - N + 1)) and Bloom's bias
rounded to bf16, and must refuse anything that is not linear in the key position."""

from __future__ import annotations

import math

import pytest
import torch

from braze.passes.masks import _classify

N = 32


def _causal(n: int = N, window: int = 0) -> torch.Tensor:
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    ok = j <= i
    return ok & (i - j < window) if window else ok


def _bloom_slopes(heads: int) -> torch.Tensor:
    """HF's build_alibi_tensor slopes (also for a head count that is not a power of two)."""
    closest = 2 ** math.floor(math.log2(heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** p for p in range(1, 1 + 2 * min(closest, heads - closest), 2)]
    return torch.tensor(slopes)


def _with_mask(bias: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    return bias.masked_fill(~allowed, torch.finfo(bias.dtype).min)


@pytest.mark.parametrize("heads", [4, 12])
def test_bloom_and_mpt_biases_are_alibi(heads):
    slopes = _bloom_slopes(heads)
    j = torch.arange(N).float()
    for name, bias in (("bloom", slopes[:, None, None] * j[None, None, :]),
                       ("mpt", slopes[:, None, None] * (j - (N - 1))[None, None, :])):
        info = _classify(_with_mask(bias.expand(heads, N, N), _causal()), N)
        assert info.kind == "alibi", name
        assert info.window == 0
        torch.testing.assert_close(info.slopes, slopes, rtol=1e-6, atol=0)
        assert f"ALiBi ({heads} slopes)" in info.describe()


@pytest.mark.parametrize("n", [N, 512])
def test_bloom_bias_rounded_to_bf16_is_alibi(n):
    """Bloom builds the bias in the model's dtype: with 12 heads the slopes are not powers of two, so slope * j
    rounds in bf16. The fit allows each entry its own rounding; the least-squares slopes come out within 1e-3 of
    the true ones (one endpoint pair would inherit that pair's bf16 error)."""
    slopes = _bloom_slopes(12)
    bias = (slopes[:, None, None] * torch.arange(n).float()[None, None, :]).to(torch.bfloat16)
    info = _classify(_with_mask(bias.expand(12, n, n), _causal(n)), n)
    assert info.kind == "alibi"
    torch.testing.assert_close(info.slopes, slopes, rtol=1e-3, atol=0)
    assert info.bias.shape == (12, n, n)  # the dense form kept for an attention that cannot take slopes


def test_one_non_linear_head_among_linear_ones_stays_dense_in_bf16():
    """Each head is checked to its own entries' rounding: a small non-linear head beside a steep ALiBi head is not
    hidden by the steep head's magnitudes."""
    n = 512
    i, j = torch.arange(n).float()[:, None], torch.arange(n).float()[None, :]
    bias = torch.stack([0.5 * j.expand(n, n), 4 * torch.sin((i - j) / 7)]).to(torch.bfloat16)
    assert _classify(_with_mask(bias, _causal(n)), n).kind == "dense"


def test_one_slope_for_every_head_and_a_window():
    bias = 0.5 * torch.arange(N).float()[None, None, :].expand(1, N, N)
    info = _classify(_with_mask(bias, _causal(window=8)), N)
    assert (info.kind, info.window) == ("alibi", 8)
    assert info.slopes.tolist() == [0.5]


@pytest.mark.parametrize("what", ["random", "quadratic", "noisy", "relative buckets"])
def test_biases_that_are_not_linear_in_the_key_stay_dense(what):
    g = torch.Generator().manual_seed(0)
    i, j = torch.arange(N).float()[:, None], torch.arange(N).float()[None, :]
    slopes = _bloom_slopes(4)[:, None, None]
    bias = {"random": torch.randn(4, N, N, generator=g),
            "quadratic": slopes * (j - i) ** 2,
            "noisy": slopes * j + 1e-3 * torch.randn(4, N, N, generator=g),
            "relative buckets": slopes * torch.clamp(j - i, min=-4)}[what]
    info = _classify(_with_mask(bias.expand(4, N, N), _causal()), N)
    assert info.kind == "dense", what
    assert info.slopes is None and info.bias.shape == (4, N, N)


def test_plain_masks_keep_their_kinds():
    assert _classify(_causal()[None], N).kind == "causal"
    info = _classify(_causal(window=5)[None], N)
    assert (info.kind, info.window) == ("window", 5)
    full = torch.ones(1, N, N, dtype=torch.bool)  # bidirectional: no causal alignment, no slopes to fit
    assert _classify(full, N).kind == "dense"
    linear_but_bidirectional = _with_mask(0.25 * torch.arange(N).float()[None, None, :].expand(1, N, N), full[0])
    assert _classify(linear_but_bidirectional, N).kind == "dense"
