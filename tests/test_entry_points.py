"""The three ways in: braze.compile(module), the decorator (class and function), torch.compile(backend="braze")."""

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


def test_dump_writes_passes_and_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("BRAZE_DUMP", str(tmp_path))
    cm = braze.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh()))
    cm(torch.randn(2, 8))
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "00_captured.txt" in names and "plan.json" in names
    assert any(n.endswith("_normalize.txt") for n in names)
    kernels = list((tmp_path / "kernels").glob("*.py"))
    assert kernels and all(k.read_text().startswith("# braze generated kernel") for k in kernels)
