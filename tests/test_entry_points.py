"""The three ways in: braze.compile(module), the decorator (class and function), torch.compile(backend="braze")."""

import pytest
import torch

import braze


def test_decorator_on_module_class():
    @braze.compile()
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(16, 16)

        def forward(self, x):
            return torch.relu(self.lin(x)) * 2

    torch.manual_seed(0)
    blk = Block()
    x = torch.randn(4, 16)
    out = blk(x)
    ref = torch.relu(blk.lin(x)) * 2
    assert (out - ref).abs().max().item() < 1e-5
    assert blk.__dict__["_braze_compiled"].stats["launches"] >= 1


def test_decorator_on_function():
    @braze.compile
    def gelu_scale(x, y):
        return torch.nn.functional.gelu(x) * y.mean(-1, keepdim=True)

    x, y = torch.randn(3, 20), torch.randn(3, 20)
    ref = torch.nn.functional.gelu(x) * y.mean(-1, keepdim=True)
    assert (gelu_scale(x, y) - ref).abs().max().item() < 1e-5


def test_torch_compile_backend():
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.SiLU(), torch.nn.Linear(32, 8))
    compiled = torch.compile(model, backend="braze")
    x = torch.randn(5, 8)
    with torch.no_grad():
        assert (compiled(x) - model(x)).abs().max().item() < 1e-5


def test_torch_compile_backend_takes_braze_options():
    """torch.compile hands its options dict to the backend as one argument: braze's compile options."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.SiLU())
    x = torch.randn(3, 256)
    with torch.no_grad():
        int6 = torch.compile(model, backend="braze", options={"quant": "int6", "int6_method": "rtn"})(x)
        ref = model(x)
    err = (int6 - ref).abs().max().item()
    assert 0 < err < 0.05, err  # lossy (6-bit weights), so the option reached the compile
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(Exception, match="unknown option.*nope"):
        torch.compile(model, backend="braze", options={"nope": 1})(x)


def test_torch_compile_backend_keeps_gradients_by_running_eagerly():
    """braze plans compute without autograd; a graph that needs gradients runs eagerly (with a warning saying how
    to get braze kernels) instead of returning outputs a backward cannot go through."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, twin = torch.nn.Linear(8, 2), torch.nn.Linear(8, 2)
    twin.load_state_dict(model.state_dict())
    x = torch.randn(4, 8)
    with pytest.warns(UserWarning, match="runs eagerly: braze plans are inference plans"):
        torch.compile(model, backend="braze")(x).square().sum().backward()
    twin(x).square().sum().backward()
    assert torch.allclose(model.weight.grad, twin.weight.grad)


def test_dump_writes_passes_and_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAZE_DUMP", str(tmp_path))
    cm = braze.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()))
    cm(torch.randn(2, 8))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "00_captured.txt" in names and "plan.json" in names
    assert any(n.endswith("_normalize.txt") for n in names)
    kernels = list((tmp_path / "kernels").glob("*.py"))
    assert kernels and all(k.read_text().startswith("# braze generated kernel") for k in kernels)
