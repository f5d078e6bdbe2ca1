"""Non-tensor arguments: a plan is compiled per call signature (runtime/call_signature.py), never reused for
another one. Before, a module compiled at scale=2.0 answered a scale=3.0 call with the scale=2.0 result, a call
that passed a mask it had not been compiled with was refused, and a float passed on the first call crashed capture."""

import pytest
import torch

import braze
from braze.api import RECOMPILE_LIMIT
from braze.runtime.call_signature import call_signature, signature_difference


class Scaled(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, scale: float = 2.0, mask=None, gelu: bool = False):
        h = self.proj(x) * scale
        if gelu:
            h = torch.nn.functional.gelu(h)
        return h if mask is None else h.masked_fill(mask, 0.0)


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
MASK = torch.rand(4, 8, generator=torch.Generator().manual_seed(2)) > 0.5
CALLS = [((X,), {}), ((X,), {"scale": 3.0}), ((X,), {"mask": MASK}), ((X, 0.5), {"gelu": True}),
         ((X,), {"scale": 3.0})]


def test_each_call_signature_gets_its_own_plan_and_the_eager_answer():
    model = Scaled().eval()
    compiled = braze.compile(model)
    for args, kwargs in CALLS:
        torch.testing.assert_close(compiled(*args, **kwargs), model(*args, **kwargs), rtol=1e-5, atol=1e-5)
    assert len(compiled.variants.plans) == 4  # the repeated scale=3.0 call reuses its plan


def test_a_float_passed_on_the_first_call_is_part_of_the_plan():
    model = Scaled().eval()
    compiled = braze.compile(model)
    torch.testing.assert_close(compiled(X, scale=0.25), model(X, scale=0.25), rtol=1e-5, atol=1e-5)
    assert [i.name for i in compiled.compiled.plan.inputs if i.kind == "user"] == ["x"]


def test_a_plan_refuses_a_call_it_was_not_compiled_for():
    compiled = braze.compile(Scaled().eval())
    compiled(X)
    plan = compiled.compiled  # the CompiledModel itself, as a user holding it would call it
    with pytest.raises(braze.InputMismatchError, match=r"scale= is float 3\.0 here and was not passed when the "
                                                       r"model was compiled"):
        plan(X, scale=3.0)
    with pytest.raises(braze.InputMismatchError, match="mask= is a tensor here"):
        plan(X, mask=MASK)


def test_a_value_that_changes_every_call_hits_the_recompile_limit():
    compiled = braze.compile(Scaled().eval())
    for i in range(RECOMPILE_LIMIT):
        compiled(X, scale=float(i))
    with pytest.raises(braze.ConfigError, match="pass values that change from call to call as tensors"):
        compiled(X, scale=99.0)


def test_a_decorated_class_compiles_per_signature():
    @braze.compile
    class Decorated(Scaled):
        pass

    model, reference = Decorated().eval(), Scaled().eval()
    for args, kwargs in CALLS[:3]:
        torch.testing.assert_close(model(*args, **kwargs), reference(*args, **kwargs), rtol=1e-5, atol=1e-5)


def test_signature_names_arguments_by_position_and_keyword():
    compiled_for = call_signature((X, 2), {"flag": True})
    assert compiled_for == (("positional argument 0", "a tensor"), ("positional argument 1", "int 2"),
                            ("flag=", "bool True"))
    assert signature_difference(compiled_for, call_signature((X, 3), {"flag": True})) == (
        "positional argument 1 is int 3 here and was int 2 when the model was compiled")
    assert signature_difference(compiled_for, call_signature((X, 2), {})) == (
        "flag= was passed when the model was compiled and is missing here")
    nested = call_signature(({"a": [X, 1.5]},), {})
    assert nested == (("positional argument 0['a'][0]", "a tensor"), ("positional argument 0['a'][1]", "float 1.5"))


def test_a_package_keeps_the_signature_it_was_compiled_for(tmp_path):
    model = Scaled().eval()
    compiled = braze.compile(model)
    compiled(X, scale=3.0)
    compiled.save(tmp_path / "pkg")
    loaded = braze.load(tmp_path / "pkg")
    torch.testing.assert_close(loaded(X, scale=3.0), model(X, scale=3.0), rtol=1e-5, atol=1e-5)
    with pytest.raises(braze.InputMismatchError, match=r"scale= is float 2\.0 here and was float 3\.0"):
        loaded(X, scale=2.0)
