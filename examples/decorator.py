"""`@braze.compile` as a decorator, on an nn.Module class and on a plain function.

Both compile on their first call, from that call's arguments (like torch.compile), then reuse the plan.

    python examples/decorator.py
"""

import torch
import torch.nn.functional as F

import braze


@braze.compile(max_batch=16)  # options go to the decorator; plain @braze.compile works too
class GatedMLP(torch.nn.Module):
    def __init__(self, dim: int = 32, hidden: int = 64):
        super().__init__()
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


@braze.compile
def scaled_gelu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.gelu(x) * y.mean(-1, keepdim=True)


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: kernels run under the Triton interpreter
    torch.manual_seed(0)
    mlp = GatedMLP().eval().to(device)
    x = torch.randn(4, 32, device=device)
    out = mlp(x)  # first call: capture + compile; later calls run the plan
    with torch.no_grad():
        ref = mlp.down(F.silu(mlp.gate(x)) * mlp.up(x))
    print(f"GatedMLP: out {tuple(out.shape)}, max |braze - eager| = {(out - ref).abs().max().item():.2e}")

    a, b = torch.randn(3, 20, device=device), torch.randn(3, 20, device=device)
    got = scaled_gelu(a, b)
    ref = F.gelu(a) * b.mean(-1, keepdim=True)
    print(f"scaled_gelu: out {tuple(got.shape)}, max |braze - eager| = {(got - ref).abs().max().item():.2e}")
    print(scaled_gelu.report)  # the compile report of the function's plan


if __name__ == "__main__":
    main()
