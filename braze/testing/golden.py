"""Golden-output checks: record an eager reference once, compare compiled outputs against it.

A snapshot is one safetensors file, `<test dir>/golden/<test module>/<name>.safetensors`, holding every tensor of
the output under a dotted key (`output`, `output.logits`, `output.0`, ...). safetensors stores bf16/fp16/fp32 and
integer tensors bit for bit, which the bit-exact mode needs.

Why not pytest-regressions' `ndarrays_regression` or syrupy (the obvious libraries to build on): both resolve from
PyPI here, but neither fits without more glue than this module. `ndarrays_regression` stores NumPy `.npz` files
(NumPy has no bfloat16, so bf16 outputs would be stored widened to float32 with their dtype tracked on the side),
fails the first run by design ("file not found, created") where we want a first run with an eager reference to
record *and* check, has its own `--force-regen` flag and message format, and has no bit-pattern mode. syrupy
compares serialized snapshots (amber text or raw bytes) for equality, with no numeric tolerances. What they would
save us is file naming and an update flag, about forty lines; so the store is written here on top of safetensors,
which braze already depends on, and no test dependency is added.

torch and safetensors are imported inside the functions that need them, so this module adds nothing to pytest's
start-up beyond what `import braze` (the parent package of the plugin entry point) already costs.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

SNAPSHOT_DIR = "golden"
SUFFIX = ".safetensors"
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-\[\]=+,]+$")


def default_tolerances() -> dict[Any, tuple[float, float]]:
    """(rtol, atol) per floating dtype, used when `check` is not given rtol/atol.

    A compiled model does not reproduce eager bit for bit: it fuses ops (an intermediate stays in an fp32 register
    where eager rounds it to the storage dtype), reorders and re-blocks reductions (split-K GEMMs, online softmax),
    and uses different math-library approximations (exp, rsqrt, erf). Each of these is a rounding-level difference,
    and they accumulate over a model's layers. The bounds are sized from each dtype's machine epsilon (the
    spacing of values near 1, i.e. the relative size of one rounding step):

    - float32 (eps 1.2e-7, 24-bit significand): a K-long dot product reordered differs by about sqrt(K) * eps
      relative, ~4e-6 for K = 1024, and a few layers multiply that; 1e-4 leaves ~10x headroom over what a correct
      kernel shows while a real bug (wrong mask, wrong scale, a dropped term) gives errors of 1e-2 and up.
      torch.testing's per-op default (rtol 1.3e-6) is for single ops and too tight for whole fused models.
    - float16 (eps 9.8e-4, 11-bit significand): rounding the output alone costs up to half an ulp (4.9e-4
      relative), and eager rounds every intermediate to fp16 where fused kernels keep fp32, so a few ulps of
      disagreement are normal; 1e-2 is ~10 ulps.
    - bfloat16 (eps 7.8e-3, 8-bit significand): one ulp is 0.8% relative, so any single rounding difference is
      already ~1e-2; 2e-2 allows ~2.5 ulps. (pytorch#161457 and #158699 are real bf16 mismatches bigger than this.)
    - float64 (eps 2.2e-16): 1e-7 / 1e-7, for references computed in double.

    atol equals rtol so that values near zero (where relative error is meaningless) are judged on the scale of the
    output's typical O(1) magnitude. Integer and bool outputs are always compared exactly.
    """
    import torch

    return {
        torch.float32: (1e-4, 1e-4),
        torch.float16: (1e-2, 1e-2),
        torch.bfloat16: (2e-2, 2e-2),
        torch.float64: (1e-7, 1e-7),
    }


def tolerance_for(dtype: Any, rtol: float | None = None, atol: float | None = None) -> tuple[float, float]:
    """The (rtol, atol) `check` uses for `dtype`; an explicit rtol/atol overrides that half of the default."""
    defaults = default_tolerances()
    if rtol is not None and atol is not None:
        return rtol, atol
    if dtype not in defaults:
        valid = ", ".join(str(d).replace("torch.", "") for d in defaults)
        raise ValueError(f"no default tolerance for {dtype}; pass rtol= and atol= (defaults exist for {valid}) "
                         "or exact=True")
    d_rtol, d_atol = defaults[dtype]
    return (d_rtol if rtol is None else rtol), (d_atol if atol is None else atol)


# ---- flattening outputs ---------------------------------------------------------------------------------------
def flatten_output(output: Any, prefix: str = "output") -> dict[str, Any]:
    """Every tensor in `output` under a dotted key: tensors, tuples/lists, dicts (HF ModelOutput included),
    dataclasses (braze's CausalLMOutput) and Python numbers. None entries are skipped; complex tensors are stored
    as their real view (..., 2)."""
    import torch

    if isinstance(output, torch.Tensor):
        return {prefix: torch.view_as_real(output) if output.is_complex() else output}
    if output is None:
        return {}
    if isinstance(output, bool | int | float):
        return {prefix: torch.tensor(output)}
    out: dict[str, Any] = {}
    if isinstance(output, Mapping):
        items = [(str(k), v) for k, v in output.items()]
    elif dataclasses.is_dataclass(output) and not isinstance(output, type):
        items = [(f.name, getattr(output, f.name)) for f in dataclasses.fields(output)]
    elif isinstance(output, list | tuple):
        items = [(str(i), v) for i, v in enumerate(output)]
    else:
        raise TypeError(f"golden.check cannot store a {type(output).__name__} at {prefix!r}: give tensors, "
                        "tuples/lists/dicts of tensors, dataclasses or numbers (for an HF model output, pass its "
                        ".logits)")
    for key, value in items:
        out.update(flatten_output(value, f"{prefix}.{key}"))
    return out


def _to_cpu(tensors: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


# ---- the store -------------------------------------------------------------------------------------------------
def save_snapshot(path: Path, tensors: Mapping[str, Any], source: str) -> None:
    """Write `tensors` (flattened keys -> tensors) to `path`; `source` ('eager' or 'compiled') goes in metadata."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(_to_cpu(tensors), str(tmp), metadata={"format": "braze-golden-1", "source": source})
    tmp.replace(path)


def load_snapshot(path: Path) -> tuple[dict[str, Any], str]:
    """The tensors stored at `path` and the source they were recorded from."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        for key in f.keys():
            tensors[key] = f.get_tensor(key)
    return tensors, meta.get("source", "unknown")


# ---- comparison ------------------------------------------------------------------------------------------------
_BITS_VIEW = {2: "int16", 4: "int32", 8: "int64", 1: "int8"}


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    idx = []
    for dim in reversed(shape):
        idx.append(flat % dim if dim else 0)
        flat = flat // dim if dim else 0
    return tuple(reversed(idx))


def _fmt(v: float, digits: int = 9) -> str:
    """Errors with 3 significant digits; values with enough digits to round-trip their dtype (9 for fp32)."""
    return f"{v:.{digits}g}"


def _bits(t: Any) -> Any:
    import torch

    if not t.dtype.is_floating_point:
        return t
    return t.view(getattr(torch, _BITS_VIEW[t.element_size()]))


def compare(key: str, actual: Any, expected: Any, *, exact: bool = False, rtol: float | None = None,
            atol: float | None = None) -> str | None:
    """None when `actual` matches `expected`; otherwise a message with the max abs / rel error and the first
    differing index with both values.

    exact=True compares bit patterns (`.view(int16/int32/...)`), never float `==`: so -0.0 differs from 0.0, a NaN
    must carry the same payload, and a 1-ulp difference fails. Otherwise |actual - expected| <= atol +
    rtol * |expected| elementwise (torch.isclose, NaN == NaN), with `tolerance_for` the defaults.
    """
    import torch

    if actual.shape != expected.shape:
        return f"{key}: shape {tuple(actual.shape)} but the golden has {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return (f"{key}: dtype {str(actual.dtype).replace('torch.', '')} but the golden has "
                f"{str(expected.dtype).replace('torch.', '')} (re-record with --braze-update-golden if intended)")
    if actual.numel() == 0:
        return None
    a, e = actual.reshape(-1), expected.reshape(-1)
    is_float = a.dtype.is_floating_point
    if exact or not is_float:
        bad = _bits(a) != _bits(e)
        criterion = "bit patterns" if is_float else "values (integer dtype: compared exactly)"
    else:
        rtol, atol = tolerance_for(a.dtype, rtol, atol)
        bad = ~torch.isclose(a.double(), e.double(), rtol=rtol, atol=atol, equal_nan=True)
        criterion = f"rtol={rtol:g} atol={atol:g}"
    n_bad = int(bad.sum())
    if n_bad == 0:
        return None

    ad, ed = a.double(), e.double()
    diff = (ad - ed).abs()
    finite = torch.isfinite(diff)
    shape = tuple(actual.shape)
    lines = [f"{key} ({str(a.dtype).replace('torch.', '')}, shape {shape}): {n_bad} of {a.numel()} elements "
             f"differ ({criterion})"]
    if bool(finite.any()):
        d = torch.where(finite, diff, torch.zeros_like(diff))
        i_abs = int(d.argmax())
        denom = ed.abs()
        rel = torch.where(denom > 0, d / denom.clamp_min(torch.finfo(torch.float64).tiny),
                          torch.where(d > 0, torch.full_like(d, math.inf), torch.zeros_like(d)))
        i_rel = int(rel.argmax())
        lines.append(f"  max abs error: {_fmt(float(d[i_abs]), 3)} at {_unravel(i_abs, shape)}")
        lines.append(f"  max rel error: {_fmt(float(rel[i_rel]), 3)} at {_unravel(i_rel, shape)}")
    n_nonfinite = int((bad & ~finite).sum())
    if n_nonfinite:
        lines.append(f"  {n_nonfinite} differing elements involve NaN/inf")
    first = int(bad.nonzero()[0, 0])
    av, ev = float(ad[first]), float(ed[first])
    if is_float:
        digits = 17 if a.element_size() == 8 else 9
        nbits = a.element_size() * 8
        ab, eb = int(_bits(a)[first]) & ((1 << nbits) - 1), int(_bits(e)[first]) & ((1 << nbits) - 1)
        width = nbits // 4
        lines.append(f"  first differing index {_unravel(first, shape)}: compiled={_fmt(av, digits)} "
                     f"(0x{ab:0{width}x}) golden={_fmt(ev, digits)} (0x{eb:0{width}x})")
        if exact:
            lines.append(f"  max ulp distance: {_max_ulps(a, e)}")
    else:
        lines.append(f"  first differing index {_unravel(first, shape)}: compiled={int(a[first])} "
                     f"golden={int(e[first])}")
    return "\n".join(lines)


def _max_ulps(a: Any, e: Any) -> int:
    """Largest distance in representable values between a and e (sign-magnitude bits mapped to a line)."""
    import torch

    def ordered(t: Any) -> Any:
        b = _bits(t).to(torch.int64)
        nbits = t.element_size() * 8
        mag = b & ((1 << (nbits - 1)) - 1)
        return torch.where(b < 0, -mag, mag)

    return int((ordered(a) - ordered(e)).abs().max())


def compare_outputs(actual: Mapping[str, Any], expected: Mapping[str, Any], *, exact: bool = False,
                    rtol: float | None = None, atol: float | None = None) -> list[str]:
    """Compare two flattened outputs; one message per mismatch (missing keys included)."""
    problems = []
    missing, extra = sorted(set(expected) - set(actual)), sorted(set(actual) - set(expected))
    if missing:
        problems.append(f"the compiled output lacks {', '.join(missing)}")
    if extra:
        problems.append(f"the compiled output has {', '.join(extra)}, which the golden lacks")
    for key in expected:
        if key in actual:
            msg = compare(key, actual[key], expected[key], exact=exact, rtol=rtol, atol=atol)
            if msg:
                problems.append(msg)
    return problems


def assert_matches(actual: Any, expected: Any, *, exact: bool = False, rtol: float | None = None,
                   atol: float | None = None, name: str = "output") -> None:
    """Assert that two outputs (any structure `flatten_output` takes) match; usable outside pytest."""
    __tracebackhide__ = True
    problems = compare_outputs(_to_cpu(flatten_output(actual)), _to_cpu(flatten_output(expected)),
                               exact=exact, rtol=rtol, atol=atol)
    if problems:
        raise AssertionError(f"golden {name!r} mismatch:\n" + "\n".join(problems))


# ---- the fixture object ----------------------------------------------------------------------------------------
class GoldenWarning(UserWarning):
    """A snapshot was recorded from the compiled output (no eager_fn), so it only guards against regressions."""


class Golden:
    """The `golden` fixture: `golden.check(name, compiled_output, eager_fn=None, *, exact=False, rtol=None,
    atol=None)`.

    - No snapshot yet (or pytest ran with `--braze-update-golden`): the reference is `eager_fn()` when given, else
      the compiled output itself (a regression snapshot; a GoldenWarning says so). It is written to
      `self.path(name)` and the compiled output is then checked against it, so a first run with `eager_fn` already
      tests compiled vs eager.
    - A snapshot exists: the compiled output is compared with it; `eager_fn` is not called.
    """

    def __init__(self, test_path: Path, nodeid: str, update: bool, registry: dict[Path, str] | None = None):
        self.directory = Path(test_path).parent / SNAPSHOT_DIR / Path(test_path).stem
        self.nodeid = nodeid
        self.update = update
        self._registry = registry if registry is not None else {}

    def path(self, name: str) -> Path:
        """Where the snapshot `name` lives."""
        if not _NAME_RE.match(name) or name in (".", ".."):
            raise ValueError(f"golden name {name!r}: use letters, digits and _ . - [ ] = + , (it is a file name)")
        return self.directory / f"{name}{SUFFIX}"

    def check(self, name: str, compiled_output: Any, eager_fn: Callable[[], Any] | None = None, *,
              exact: bool = False, rtol: float | None = None, atol: float | None = None) -> None:
        __tracebackhide__ = True
        path = self.path(name)
        owner = self._registry.setdefault(path, self.nodeid)
        if owner != self.nodeid:
            raise ValueError(f"golden name {name!r} is already used by {owner} in this module; each test (and each "
                             "parametrization) needs its own name, e.g. golden.check(f'mlp_{dtype}', ...)")
        actual = _to_cpu(flatten_output(compiled_output))
        if not actual:
            raise ValueError(f"golden {name!r}: the compiled output holds no tensors")
        recorded = False
        if self.update or not path.exists():
            if eager_fn is not None:
                import torch

                with torch.no_grad():
                    expected, source = _to_cpu(flatten_output(eager_fn())), "eager"
            else:
                import warnings

                expected, source = actual, "compiled"
                warnings.warn(GoldenWarning(f"golden {name!r}: no eager_fn, so the snapshot was recorded from the "
                                            "compiled output; pass eager_fn to check against eager"), stacklevel=2)
            save_snapshot(path, expected, source)
            recorded = True
        else:
            expected, source = load_snapshot(path)
        problems = compare_outputs(actual, expected, exact=exact, rtol=rtol, atol=atol)
        if problems:
            how = "just recorded" if recorded else "recorded earlier"
            raise AssertionError(
                f"golden {name!r} mismatch (compiled vs {source} reference, {how}; snapshot {path}):\n"
                + "\n".join(problems)
                + ("" if recorded else "\nif the change is intended, rerun with --braze-update-golden"))
