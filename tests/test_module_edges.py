"""Generic modules at the edges a new user reaches first: Python scalars that arrive as tensors (`t.item()`, and
torch.compile's handling of a float argument), sizes returned from forward, and weights swapped after compile."""

import pytest
import torch

import braze


class ScalarOperands(torch.nn.Module):
    def forward(self, x, s):
        return x * s.item() + (x > s.item()).float(), torch.clamp(x, max=s.item())


def test_item_scalars_are_kernel_operands():
    """`t.item()` of a 0-d tensor used as a scalar operand becomes that tensor, loaded by the fused kernel: no
    eager step, no unbacked symbol for codegen to trip on."""
    x, s = torch.randn(2, 5), torch.tensor(0.3)
    compiled = braze.compile(ScalarOperands())
    for got, want in zip(compiled(x, s), ScalarOperands()(x, s), strict=True):
        torch.testing.assert_close(got, want)
    s2 = torch.tensor(-0.7)  # the value is read at run time, not baked in
    for got, want in zip(compiled(x, s2), ScalarOperands()(x, s2), strict=True):
        torch.testing.assert_close(got, want)
    assert compiled.report.fallbacks == []


def test_torch_compile_with_a_changing_float_argument():
    """Dynamo turns a float argument that changes between calls into a 0-d tensor read with .item()."""
    fn = torch.compile(lambda x, s, n: (x * s + n, x.half() * s), backend="braze")
    x = torch.randn(5)
    with torch.no_grad():
        for scale in (2.0, 3.5, -0.25):
            for got, want in zip(fn(x, scale, 3), (x * scale + 3, x.half() * scale), strict=True):
                torch.testing.assert_close(got, want)


class ReturnsSizes(torch.nn.Module):
    def forward(self, a):
        return a + 1, a.shape[0], a.shape[1] * 2


def test_sizes_returned_from_forward_follow_the_call():
    compiled = braze.compile(ReturnsSizes())
    for batch in (3, 6):
        out, rows, width = compiled(torch.zeros(batch, 4))
        assert (rows, width) == (batch, 8) and isinstance(rows, int)
        assert torch.equal(out, torch.ones(batch, 4))


def _swaps():
    return {
        "load_state_dict": lambda m: m.load_state_dict({"0.weight": torch.randn(4, 4), "0.bias": torch.randn(4)}),
        "data": lambda m: setattr(m[0].weight, "data", torch.randn(4, 4)),
        "parameter": lambda m: setattr(m[0], "weight", torch.nn.Parameter(torch.randn(4, 4))),
        "submodule": lambda m: m.__setitem__(0, torch.nn.Linear(4, 4)),
        "in place": lambda m: torch.nn.init.normal_(m[0].weight),
    }


@pytest.mark.parametrize("swap", list(_swaps()))
def test_a_module_whose_weights_change_is_compiled_again(swap):
    """A plan holds the weights it was compiled from (transposed, merged, quantized copies): a generic module whose
    weights were replaced or edited after its first call compiles again on the next, as torch.compile would."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    compiled, x = braze.compile(model), torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        _swaps()[swap](model)
        torch.testing.assert_close(compiled(x), model(x))


def test_a_causal_lm_whose_weights_changed_refuses_to_run():
    from braze.models import tiny_causal_lm
    from braze.runtime.errors import ConfigError

    model = tiny_causal_lm("llama", layers=1).eval()
    compiled, ids = braze.compile(model), torch.randint(3, 100, (1, 5))
    compiled(ids)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2)
    with pytest.raises(ConfigError, match="weights of LlamaForCausalLM changed after braze.compile"):
        compiled(ids)
    with pytest.raises(ConfigError, match="compile the model again"):
        compiled.generate(ids, max_new_tokens=2)


class Mixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return torch.softmax(self.proj(x) @ x.transpose(-1, -2), dim=-1) @ x


def test_a_call_with_other_sizes_compiles_those_dims_dynamic():
    """Dim 0 is dynamic from the first call; a call that changes another dim (a sequence length) or the batch a
    first call of 1 pinned compiles once more with those dims dynamic (as torch.compile's automatic dynamic
    shapes), and later sizes reuse that plan."""
    model = Mixer().eval()
    compiled = braze.compile(model)
    for shape in [(1, 5, 8), (3, 5, 8), (2, 9, 8), (4, 3, 8), (1, 11, 8)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert len(compiled.variants.plans) == 1 and compiled.dynamic == {"x": {0, 1}}  # batch 1 had pinned dim 0
    assert compiled.report.fallbacks == []
