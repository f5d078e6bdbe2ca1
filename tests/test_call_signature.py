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


# ---- training mode: `.train()` / `.eval()` after a call compiles (or reuses) the plan for the new mode ----------
# Before, the first call's plan was reused whatever the mode: a BatchNorm compiled in train mode kept normalising with
# batch statistics after .eval(), and one compiled in eval mode ignored .train() (no running-stat updates, Dropout
# zeroing nothing), where torch.compile guards on `training` and recompiles.


def _batches():
    gen = torch.Generator().manual_seed(3)
    return [torch.randn(16, 8, generator=gen) * (i + 2) + i for i in range(4)]


def _assert_same_batchnorm(compiled_bn, eager_bn):
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(compiled_bn, name), getattr(eager_bn, name), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("modes", [("train", "eval", "train", "eval"), ("eval", "train", "eval", "train")])
def test_batch_norm_follows_train_and_eval_after_compiling(modes):
    torch.manual_seed(0)
    bn, ref = torch.nn.BatchNorm1d(8), torch.nn.BatchNorm1d(8)
    ref.load_state_dict(bn.state_dict())
    compiled = braze.compile(bn)
    for mode, x in zip(modes, _batches()):
        bn.train(mode == "train")
        ref.train(mode == "train")
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
        _assert_same_batchnorm(bn, ref)  # train: the running statistics updated; eval: read, as updated so far
    assert len(compiled.variants.plans) == 2  # one per mode, reused when the mode comes back
    assert compiled.report.extra["mode"].startswith(modes[-1])


def test_dropout_follows_train_after_compiling_in_eval():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Dropout(0.5)).eval()
    compiled = braze.compile(model)
    x = torch.randn(16, 8)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    model.train()
    y, kept = compiled(x), model[0](x)
    zeroed = y == 0
    assert 0 < zeroed.float().mean().item() < 1  # dropout in train mode zeroes some elements (~ half) ...
    torch.testing.assert_close(y[~zeroed], kept[~zeroed] * 2, rtol=1e-5, atol=1e-5)  # ... and scales the rest
    model.eval()
    model[1].train()  # a submodule's mode alone counts too
    assert (compiled(x) == 0).any()
    model[1].eval()
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert len(compiled.variants.plans) == 3


def test_a_decorated_class_follows_the_training_mode():
    @braze.compile
    class Normed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm1d(8)

        def forward(self, x):
            return self.bn(x) * 2

    torch.manual_seed(0)
    model, ref = Normed(), torch.nn.BatchNorm1d(8)
    for mode, x in zip(("train", "eval"), _batches()):
        model.train(mode == "train")
        ref.train(mode == "train")
        torch.testing.assert_close(model(x), ref(x) * 2, rtol=1e-5, atol=1e-5)
        _assert_same_batchnorm(model.bn, ref)


def test_the_recompile_limit_counts_plans_per_training_mode():
    model = Scaled().eval()
    compiled = braze.compile(model)
    for i in range(RECOMPILE_LIMIT):
        compiled(X, scale=float(i))
    model.train()  # a new mode is not a value that changes every call
    torch.testing.assert_close(compiled(X, scale=0.0), model(X, scale=0.0), rtol=1e-5, atol=1e-5)
    model.eval()
    with pytest.raises(braze.ConfigError, match=r"scale= is float 99\.0 here and was float 0\.0 when the model was "
                                                r"compiled; 8 plans were compiled for different non-tensor arguments "
                                                r"or tensor ranks in eval mode already"):
        compiled(X, scale=99.0)


def test_a_compiled_causal_lm_warns_when_called_in_training_mode():
    """A causal LM compiles at once, in eval mode, into inference plans: after model.train() its forward still
    computes eval mode's, and says so once per switch."""
    import warnings

    from braze.models import tiny_causal_lm

    model = tiny_causal_lm("llama", layers=1).eval()
    compiled = braze.compile(model)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = compiled(ids).logits
    model.train()
    with pytest.warns(UserWarning, match="is in training mode, but braze plans are inference plans"):
        torch.testing.assert_close(compiled(ids).logits, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled(ids)  # once per switch to training mode
        model.eval()
        compiled(ids)


def test_a_tensor_of_another_rank_compiles_its_own_plan():
    """torch.export fixes each tensor's rank (sizes stay dynamic): a call with a 3-D input after a 2-D one compiles
    a plan for it (it raised "has 3 dims, expected 2"), as torch.compile recompiles; the recompile limit counts
    these plans too. Another dtype stays a one-line error naming the input (test_bad_inputs.py)."""
    class Rowwise(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x * 2.0, dim=-1) + x.sum(-1, keepdim=True)

    model = Rowwise().eval()
    compiled = braze.compile(model)
    for x in (torch.randn(3, 8), torch.randn(2, 3, 8), torch.randn(4), torch.randn(5, 8)):
        got = compiled(x)
        assert got.dtype == x.dtype and got.shape == x.shape
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
    assert len(compiled.variants.plans) == 3
    for rank in range(4, 4 + RECOMPILE_LIMIT - 3):
        compiled(torch.randn(*[2] * rank))
    with pytest.raises(braze.ConfigError, match=r"tensor ranks \(9-dim\) differ from the first plan's \(2-dim\)"):
        compiled(torch.randn(*[2] * 9))


def test_a_function_with_keyword_only_and_positional_only_arguments_exports():
    """A decorated function's keyword-only argument (k) and positional-only one (x) are captured by torch.export
    like a module's (the wrapper's forward takes the function's signature; with (*args, **kwargs) export failed
    "Must provide a tree_name" and the call fell back to Dynamo with that message); each k value is its own plan."""
    import warnings

    @braze.compile
    def f(x, /, y=None, *, k=2):
        return x * k + (0 if y is None else y)

    a, b = torch.randn(3), torch.randn(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Dynamo-fallback warning
        torch.testing.assert_close(f(a, k=3), a * 3)
        torch.testing.assert_close(f(a, b), a * 2 + b)
        torch.testing.assert_close(f(a, y=b, k=5), a * 5 + b)
    assert len(f.variants.plans) == 3
