"""Capture when torch's shape solver cannot prove a guard (torch 2.11 on HF's repeat_kv reshape): the export is
retried with deferred runtime asserts, each assert is proven over the compiled range and dropped, and the plans
are the ones a plain export gives. Under torch 2.13 (pinned) the first export succeeds, so the retry is forced."""

import pytest
import sympy
import torch

import braze
from braze.compiler import capture
from braze.models import tiny_causal_lm
from braze.runtime.errors import CaptureError


@pytest.fixture
def unprovable_guards(monkeypatch):
    """torch.export fails like torch 2.11 does unless asked to defer its guards to runtime asserts."""
    real = torch.export.export
    calls = []

    def export(*args, prefer_deferred_runtime_asserts_over_guards=False, **kwargs):
        calls.append(prefer_deferred_runtime_asserts_over_guards)
        if not prefer_deferred_runtime_asserts_over_guards:
            raise torch._dynamo.exc.UserError(torch._dynamo.exc.UserErrorType.CONSTRAINT_VIOLATION,
                                              "Constraints violated (seq)! min(16*s, 32*s) == 16*s")
        return real(*args, prefer_deferred_runtime_asserts_over_guards=True, **kwargs)

    monkeypatch.setattr(torch.export, "export", export)
    return calls


def test_deferred_export_compiles_the_same_model(unprovable_guards):
    model = tiny_causal_lm("llama", layers=2)
    cm = braze.compile(model, max_seq=32, max_batch=2, executor="reference")
    assert unprovable_guards[:2] == [False, True]  # the plain export failed, the deferred one was taken
    assert not any(n.target is torch.ops.aten._assert_scalar.default for n in cm.graph_module.graph.nodes)
    ids = torch.randint(3, 256, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(cm(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_an_assert_is_dropped_only_where_it_holds_over_the_range():
    s, b = sympy.Symbol("s", integer=True), sympy.Symbol("b", integer=True)
    ranges = {s: (1, 64), b: (1, 8)}
    assert capture.holds_over_ranges(sympy.Eq(sympy.Min(16 * s, 32 * s), 16 * s), ranges)
    assert not capture.holds_over_ranges(sympy.Eq(s % 2, 0), ranges)  # odd lengths break it
    assert not capture.holds_over_ranges(sympy.Le(s * b, 100), ranges)  # fails at the corner 64 x 8
    assert not capture.holds_over_ranges(sympy.Ge(s, 1), {s: (1, None)})  # unbounded: not enumerable


def test_an_assert_that_fails_in_range_is_a_capture_error(unprovable_guards):
    class EvenOnly(torch.nn.Module):
        def forward(self, x):
            torch._check(x.shape[1] % 2 == 0)
            return x.reshape(x.shape[0], -1, 2).sum(-1)

    x = torch.randn(2, 8)
    with pytest.raises(CaptureError, match="constrains its input shapes"):
        capture.capture_module(EvenOnly(), (x,), {}, ({0: torch.export.Dim("b", max=4),
                                                      1: torch.export.Dim("n", max=16)},))


def test_asserts_with_torchs_sympy_functions_are_evaluated():
    """CUDA's efficient-attention path guards s * round_up(s, 8) > 1 (PythonMod); torch 2.11 could not prove it."""
    from torch.utils._sympy.functions import PythonMod

    s = sympy.Symbol("s", integer=True, positive=True)
    assert capture.holds_over_ranges(sympy.Gt(s * (8 + s - PythonMod(s, 8)), 1), {s: (1, 128)})
    assert not capture.holds_over_ranges(sympy.Gt(s * (8 + s - PythonMod(s, 8)), 8), {s: (1, 128)})  # s = 1
    assert not capture.holds_over_ranges(sympy.Eq(PythonMod(s, 8), 0), {s: (1, 128)})


def test_a_length_limit_names_the_sizes_that_work():
    """MPT refuses its config's max_seq_len positions (its ALiBi covers fewer): the fallback's reason says which
    sizes of the compiled range the model accepts, so the user knows what max_seq to pass."""
    s, b = sympy.Symbol("s", integer=True), sympy.Symbol("b", integer=True)
    limit = sympy.Ne(sympy.Max(0, 128 - s), 0)
    assert capture._largest_size_that_holds(limit, {s: (1, 512)}) == ", which holds for sizes 1..127 of 1..512"
    assert capture._largest_size_that_holds(sympy.Eq(s % 2, 0), {s: (1, 64)}) == ""  # fails at 1: no prefix
    assert capture._largest_size_that_holds(sympy.Le(s * b, 100), {s: (1, 64), b: (1, 8)}) == ""  # two sizes
    with pytest.warns(UserWarning, match="holds for sizes 1..127 of 1..512"):
        braze.compile(tiny_causal_lm("mpt", layers=1), max_seq=512, max_batch=2, executor="reference")
