"""Unit checks of individual rewrites and of the scheduler's rules (match counts, ops before/after, numerics)."""

import networkx as nx
import torch
import torch.nn.functional as F

import braze
from braze.codegen.schedule import _creates_cycle


class GeGLU(torch.nn.Module):
    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


def test_geglu_becomes_one_gated_matmul():
    torch.manual_seed(0)
    m = GeGLU().eval()
    cm = braze.compile(m)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert (cm(x) - m(x)).abs().max().item() < 1e-5
    report = cm.compiled.report
    assert report.pass_count("recognize_glu") == 1
    assert [k[1] for k in report.kernels] == ["matmul", "matmul"]  # gate/up/gelu/mul in one, down in the other
    ops = {n.target for n in cm.compiled.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.braze.linear_glu.default in ops and torch.ops.aten.gelu.default not in ops


class Diamond(torch.nn.Module):
    """y feeds a matmul and, beside it, the add that consumes the matmul: fusing y's kernel with the add's
    would put the matmul inside a cycle, so the scheduler must keep them apart."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        y = torch.sin(x) * 2.0
        return y * self.lin(y)


def test_merge_that_would_create_a_cycle_is_refused():
    torch.manual_seed(0)
    m = Diamond().eval()
    cm = braze.compile(m)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert (cm(x) - m(x)).abs().max().item() < 1e-5
    kernels = cm.compiled.report.kernels
    assert [k[1] for k in kernels] == ["fused", "matmul", "fused"]
    assert kernels[0][2] != kernels[2][2]  # y's kernel and the product's kernel stayed separate regions


def test_cycle_check_on_region_graph():
    g = nx.DiGraph([(0, "tmpl"), ("tmpl", 1), (0, 1)])
    assert _creates_cycle(g, 0, 1)  # 0 -> tmpl -> 1 goes through a third node
    g2 = nx.DiGraph([(0, 1), (1, 2)])
    assert not _creates_cycle(g2, 0, 1)
