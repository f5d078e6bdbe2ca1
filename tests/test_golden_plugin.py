"""The braze.testing pytest plugin: the `golden` fixture on a compiled module, and its record / compare / update
cycle driven through pytester."""

import textwrap

import pytest
import torch

import braze
from braze.runtime.compiled import CausalLMOutput
from braze.testing import assert_matches, compare, flatten_output, load_snapshot, tolerance_for

pytest_plugins = ["pytester"]


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()


def test_golden_on_compiled_sequential(golden):
    model = _mlp()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    cm = braze.compile(model)
    golden.check("sequential_mlp", cm(x), eager_fn=lambda: model(x))
    assert golden.path("sequential_mlp").exists()


def test_flatten_structures():
    t = torch.ones(2)
    flat = flatten_output({"a": (t, None, 3), "b": CausalLMOutput(t)})
    assert sorted(flat) == ["output.a.0", "output.a.2", "output.b.logits"]
    assert list(flatten_output(t)) == ["output"]


def test_per_dtype_tolerances():
    assert tolerance_for(torch.float32) == (1e-4, 1e-4)
    assert tolerance_for(torch.float16) == (1e-2, 1e-2)
    assert tolerance_for(torch.bfloat16) == (2e-2, 2e-2)
    assert tolerance_for(torch.float32, rtol=0.5) == (0.5, 1e-4)
    with pytest.raises(ValueError, match="pass rtol= and atol="):
        tolerance_for(torch.float8_e4m3fn)
    ref = torch.tensor([1.0, 2.0, -3.0])
    for dtype, ok, bad in [(torch.float32, 5e-5, 5e-4), (torch.float16, 4e-3, 4e-2), (torch.bfloat16, 1e-2, 8e-2)]:
        assert compare("x", (ref * (1 + ok)).to(dtype), ref.to(dtype)) is None, dtype
        assert compare("x", (ref * (1 + bad)).to(dtype), ref.to(dtype)) is not None, dtype


def test_exact_compares_bits_not_values():
    zero = torch.zeros(3)
    msg = compare("z", -zero, zero, exact=True)  # -0.0 == 0.0 as floats, but not as bits
    assert msg is not None and "0x80000000" in msg and "0x00000000" in msg
    nan = torch.full((2,), float("nan"))
    assert compare("n", nan, nan.clone(), exact=True) is None
    assert compare("n", nan, nan.clone()) is None  # tolerance mode: NaN matches NaN
    one = torch.ones(4, dtype=torch.bfloat16)
    bumped = one.clone()
    bumped[2] = torch.nextafter(one[2:3].float(), torch.tensor([2.0])).to(torch.bfloat16)  # fp32 ulp: rounds back
    assert compare("b", bumped, one, exact=True) is None
    bumped.view(torch.int16)[2] += 1  # one bf16 ulp
    msg = compare("b", bumped, one, exact=True)
    assert "first differing index (2,)" in msg and "max ulp distance: 1" in msg
    assert compare("b", bumped, one) is None  # a bf16 ulp is within the bf16 tolerance


def test_mismatch_message_and_structure():
    ref = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    out = ref.clone()
    out[1, 2] += 0.5
    out[2, 3] += 0.25
    with pytest.raises(AssertionError) as err:
        assert_matches(out, ref, name="m")
    text = str(err.value)
    assert "2 of 12 elements differ (rtol=0.0001 atol=0.0001)" in text
    assert "max abs error: 0.5 at (1, 2)" in text
    assert "max rel error: 0.0833" in text  # 0.5 / 6
    assert "first differing index (1, 2): compiled=6.5" in text and "golden=6 (0x40c00000)" in text
    with pytest.raises(AssertionError, match="shape"):
        assert_matches(ref[:2], ref)
    with pytest.raises(AssertionError, match="dtype float16 but the golden has float32"):
        assert_matches(ref.half(), ref)
    with pytest.raises(AssertionError, match="lacks output.1"):
        assert_matches((ref,), (ref, ref))


# ---- the record / compare / update cycle, through pytester --------------------------------------------------------
INNER = textwrap.dedent(
    """
    import os

    import torch

    import braze


    def _setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).eval()
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
        return model, x


    def test_mlp(golden):
        model, x = _setup()
        out = braze.compile(model)(x)
        out = out + float(os.environ.get("INNER_PERTURB", "0"))
        golden.check("mlp", out, eager_fn=lambda: model(x))


    def test_mlp_exact(golden):
        model, x = _setup()
        cm = braze.compile(model)
        out = cm(x)
        if os.environ.get("INNER_ULP"):
            out = out.clone()
            out.view(torch.int32)[1, 2] += 1  # one ulp
        golden.check("mlp_bits", out, eager_fn=lambda: cm(x), exact=True)
        golden.check("mlp_tol", out, eager_fn=lambda: cm(x))  # the same ulp passes the fp32 tolerance
    """
)


@pytest.fixture
def inner(pytester, monkeypatch):
    monkeypatch.delenv("INNER_PERTURB", raising=False)
    monkeypatch.delenv("INNER_ULP", raising=False)
    pytester.makepyfile(test_inner=INNER)
    return pytester


def _run(pytester, *args):
    # in-process runs; plugins that re-import heavy modules on every inner session are left out (hypothesis: ~2 s)
    return pytester.runpytest("-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:xdist", *args)


def _snap(pytester, name):
    return pytester.path / "golden" / "test_inner" / f"{name}.safetensors"


def test_first_run_records_second_compares(inner):
    res = _run(inner)
    res.assert_outcomes(passed=2)
    for name in ("mlp", "mlp_bits", "mlp_tol"):
        assert _snap(inner, name).exists()
    tensors, source = load_snapshot(_snap(inner, "mlp"))
    assert list(tensors) == ["output"] and tensors["output"].shape == (3, 4) and source == "eager"
    before = _snap(inner, "mlp").stat().st_mtime_ns
    res = _run(inner)
    res.assert_outcomes(passed=2)
    assert _snap(inner, "mlp").stat().st_mtime_ns == before  # compared, not rewritten


def test_perturbed_output_fails_with_max_error(inner, monkeypatch):
    _run(inner).assert_outcomes(passed=2)
    monkeypatch.setenv("INNER_PERTURB", "0.01")
    res = _run(inner, "-k", "test_mlp and not exact")
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines([
        "*golden 'mlp' mismatch (compiled vs eager reference, recorded earlier*",
        "*output (float32, shape (3, 4)): 12 of 12 elements differ (rtol=0.0001 atol=0.0001)*",
        "*max abs error: 0.01*",
        "*max rel error: *",
        "*first differing index (0, 0): compiled=* golden=*",
        "*rerun with --braze-update-golden*",
    ])


def test_exact_mode_catches_one_ulp(inner, monkeypatch):
    _run(inner).assert_outcomes(passed=2)
    monkeypatch.setenv("INNER_ULP", "1")
    res = _run(inner, "-k", "exact")
    res.assert_outcomes(failed=1)
    res.stdout.fnmatch_lines([
        "*golden 'mlp_bits' mismatch*",
        "*1 of 12 elements differ (bit patterns)*",
        "*first differing index (1, 2): compiled=* (0x*) golden=* (0x*)*",
        "*max ulp distance: 1*",
    ])
    assert "golden 'mlp_tol'" not in res.stdout.str()  # never reached: the exact check failed first
    monkeypatch.delenv("INNER_ULP")


def test_update_golden_rewrites_snapshot(inner):
    from safetensors.torch import save_file

    _run(inner).assert_outcomes(passed=2)
    path = _snap(inner, "mlp")
    old, _ = load_snapshot(path)
    # a stale snapshot (say, from before an intended model change) fails until it is re-recorded
    save_file({"output": old["output"] + 1.0}, str(path), metadata={"source": "eager"})
    _run(inner, "-k", "test_mlp and not exact").assert_outcomes(failed=1)
    res = _run(inner, "--braze-update-golden")
    res.assert_outcomes(passed=2)
    new, source = load_snapshot(path)
    assert torch.equal(new["output"], old["output"]) and source == "eager"  # re-recorded from eager_fn
    _run(inner).assert_outcomes(passed=2)


def test_no_eager_fn_records_compiled_with_warning(pytester):
    pytester.makepyfile(
        test_snap="""
        import torch

        def test_snap(golden):
            golden.check("t", torch.arange(4.0))
        """
    )
    res = _run(pytester)
    res.assert_outcomes(passed=1, warnings=1)
    res.stdout.fnmatch_lines(["*GoldenWarning*recorded from the compiled output*"])
    assert load_snapshot(pytester.path / "golden" / "test_snap" / "t.safetensors")[1] == "compiled"
    _run(pytester).assert_outcomes(passed=1)


def test_duplicate_name_across_tests_is_an_error(pytester):
    pytester.makepyfile(
        test_dup="""
        import pytest
        import torch

        @pytest.mark.parametrize("k", [1, 2])
        def test_dup(golden, k):
            golden.check("same", torch.full((2,), float(k)), eager_fn=lambda: torch.full((2,), float(k)))
        """
    )
    res = _run(pytester)
    res.assert_outcomes(passed=1, failed=1)
    res.stdout.fnmatch_lines(["*golden name 'same' is already used by test_dup.py::test_dup?1?*"])
