"""Matmuls no linear or attention pattern takes run as kernels (passes/patterns.py: recognize_batched_matmul ->
braze::bmm -> kernels/bmm.py), and `x @ W` with an untransposed [K, N] weight is a linear: through braze.compile
and torch.compile(backend="braze"), across shapes of one compiled object.

Tolerances: fp32 against eager fp32 (summation order only: 1e-5); fp16 against eager fp16 (one rounding of an
fp32 accumulation vs torch's own: a few fp16 ulps of O(1) values, 2e-3)."""

import pytest
import torch

import braze
from braze.kernels import recording_launches


class TokenMixer(torch.nn.Module):
    """Attention-shaped products without a softmax (no attention op takes them) and a weight read as x @ W."""

    def __init__(self, dim=32):
        super().__init__()
        self.proj = torch.nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)  # [K, N]: used as x @ W, not W^T

    def forward(self, x):
        h = x @ self.proj
        scores = torch.matmul(h, h.transpose(-1, -2)) / h.shape[-1] ** 0.5
        return torch.bmm(scores.relu(), h) + x


class Contraction(torch.nn.Module):
    def forward(self, a, b):
        return torch.einsum("bhqd,bhkd->bhqk", a, b)


def _launch_families(compiled, *args):
    with recording_launches() as seen:
        out = compiled(*args)
    return out, [e.name for e in seen]


def test_activation_matmuls_and_untransposed_weights_run_as_kernels():
    torch.manual_seed(0)
    model = TokenMixer().eval()
    compiled = braze.compile(model)
    for batch, seq in ((2, 7), (5, 7)):  # one compiled object, dynamic batch
        x = torch.randn(batch, seq, 32)
        out, launched = _launch_families(compiled, x)
        torch.testing.assert_close(out, model(x), atol=1e-5, rtol=1e-5)
    assert compiled.report.fallbacks == []
    kernels = {family for _, family, _ in compiled.report.kernels}
    assert {"bmm", "matmul"} <= kernels  # two activation products, and x @ W as a linear


def test_einsum_contraction_runs_as_one_bmm_launch():
    a, b = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 11, 16)
    compiled = braze.compile(Contraction())
    out, launched = _launch_families(compiled, a, b)
    torch.testing.assert_close(out, Contraction()(a, b), atol=1e-5, rtol=1e-5)
    assert compiled.report.fallbacks == [] and len(launched) == 1


def test_torch_compile_backend_takes_activation_matmuls():
    torch.manual_seed(0)
    model = TokenMixer().eval()
    compiled = torch.compile(model, backend="braze")
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)


def test_fp16_activation_matmuls():
    torch.manual_seed(0)
    model = TokenMixer().half().eval()
    x = torch.randn(2, 9, 32).half()
    out = braze.compile(model)(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, model(x), atol=2e-3, rtol=2e-3)


def test_four_batch_dims_run_eagerly_and_the_report_says_why():
    a, b = torch.randn(2, 2, 3, 1, 5, 4), torch.randn(3, 7, 4, 6)
    compiled = braze.compile(lambda_module())
    torch.testing.assert_close(compiled(a, b), torch.matmul(a, b))
    (node, why), = compiled.report.fallbacks
    assert why == "matmul over 4 batch dims has no kernel (at most 3)"


def lambda_module():
    class MatMul(torch.nn.Module):
        def forward(self, a, b):
            return a @ b

    return MatMul()


@pytest.mark.parametrize("shapes", [((5,), (5,)), ((5,), (3, 5, 4)), ((2, 3, 5), (5,))], ids=["dot", "row", "col"])
def test_vector_operands(shapes):
    a, b = (torch.randn(*s) for s in shapes)
    compiled = braze.compile(lambda_module())
    out, launched = _launch_families(compiled, a, b)
    torch.testing.assert_close(out, a @ b, atol=1e-5, rtol=1e-5)
    assert compiled.report.fallbacks == [] and len(launched) == 1
