"""braze as a torch.compile backend: `torch.compile(model, backend="braze")`.

Dynamo traces the model, hands braze each FX graph, and guards on shapes: a new input shape re-invokes the
backend (each graph is compiled static). `import braze` registers the backend; installed braze also registers it
through the `torch_dynamo_backends` entry point.

    python examples/torch_compile_backend.py
"""

import torch

import braze  # noqa: F401  (registers backend="braze")


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: kernels run under the Triton interpreter
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.SiLU(), torch.nn.LayerNorm(64), torch.nn.Linear(64, 16)
    ).eval().to(device)
    compiled = torch.compile(model, backend="braze")

    x = torch.randn(8, 16, device=device)
    with torch.no_grad():
        out = compiled(x)
        ref = model(x)
    print(f"out {tuple(out.shape)}; max |braze - eager| = {(out - ref).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
