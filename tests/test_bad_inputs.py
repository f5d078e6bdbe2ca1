"""Bad input gets a clear error naming the problem; an unsupported op falls back to eager and is reported."""

import pytest
import torch

import braze
from braze.models import tiny_causal_lm


@pytest.fixture(scope="module")
def lm():
    model = tiny_causal_lm("llama", layers=1)
    return model, braze.compile(model, max_seq=16, max_batch=2)


def test_sequence_outside_compiled_range(lm):
    _, cm = lm
    with pytest.raises(braze.ShapeOutOfRangeError, match=r"dim 1 \(seq\) = 17 is outside the compiled range \[1, 16\]"):
        cm(torch.zeros(1, 17, dtype=torch.long))


def test_batch_outside_compiled_range(lm):
    _, cm = lm
    with pytest.raises(braze.ShapeOutOfRangeError, match=r"\(batch\) = 3 .*\[1, 2\]"):
        cm(torch.zeros(3, 4, dtype=torch.long))


def test_wrong_dtype_names_input(lm):
    _, cm = lm
    with pytest.raises(braze.InputMismatchError, match="input 'input_ids' has dtype float32, expected int64"):
        cm(torch.zeros(1, 4))


def test_wrong_device_names_input(lm):
    _, cm = lm
    with pytest.raises(braze.InputMismatchError, match="input 'input_ids' is on meta"):
        cm(torch.zeros(1, 4, dtype=torch.long, device="meta"))


def test_static_dim_mismatch_names_dim():
    m = torch.nn.Linear(8, 4)
    cm = braze.compile(m)
    cm(torch.randn(2, 8))
    with pytest.raises(braze.InputMismatchError, match="input 'input' dim 1 is 9, expected 8"):
        cm(torch.randn(2, 9))


@pytest.mark.parametrize("options,pattern", [
    ({"executor": "gpu"}, r"executor='gpu' is not valid; choose one of 'auto', 'cuda', 'interpret', 'reference'"),
    ({"quant": "int4"}, r"quant='int4' is not valid; choose one of None, 'df11', 'int6'"),
    ({"max_seq": 0}, r"max_seq must be a positive integer"),
    ({"warp_speed": 9}, r"unknown option\(s\) warp_speed; valid options: .*executor"),
])
def test_bad_option_names_valid_ones(options, pattern):
    with pytest.raises(braze.ConfigError, match=pattern):
        braze.compile(torch.nn.Linear(2, 2), **options)


def test_cuda_executor_on_cpu_model_is_refused():
    with pytest.raises(braze.ConfigError, match="executor='cuda' needs the model on a CUDA device"):
        braze.compile(torch.nn.Linear(2, 2), executor="cuda")(torch.randn(1, 2))


class WithCumsum(torch.nn.Module):
    def forward(self, x):
        return torch.cumsum(x * 2.0, dim=-1).sin()


def test_unsupported_op_falls_back_and_is_reported():
    cm = braze.compile(WithCumsum())
    x = torch.randn(3, 10)
    assert torch.allclose(cm(x), WithCumsum()(x), atol=1e-6)
    report = cm.compiled.report
    assert [r for _, r in report.fallbacks] == ["no lowering for aten.cumsum.default"]
    assert "eager fallbacks: 1" in str(report)
    assert cm.compiled.stats["launches"] == 2  # x*2 before, sin after: both still generated kernels


def test_capture_failure_is_a_clear_error():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be exported
                return x + 1
            return x - 1

    with pytest.raises(braze.CaptureError, match="torch.export could not capture DataDependent"):
        braze.compile(DataDependent())(torch.randn(2, 3))
