"""Every example runs as a newcomer would run it: `python examples/X.py`, and pytest on the example test file."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SCRIPTS = [
    "compile_hf_model.py",
    "decorator.py",
    "torch_compile_backend.py",
    "speculative_code_edit.py",
    "quantized_packages.py",
]


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.pop("TRITON_INTERPRET", None)  # as a user runs them: braze itself turns the interpreter on without a GPU
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(EXAMPLES.parent), env.get("PYTHONPATH")) if p)
    return env


def _run(args, cwd) -> subprocess.CompletedProcess:
    # no wall-clock limit: a loaded CI machine may take minutes, which is not a failure (the work stays small)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=_env(), capture_output=True, text=True)


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted([*SCRIPTS, "test_with_golden.py"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_script_runs(script, tmp_path):
    res = _run([str(EXAMPLES / script)], cwd=tmp_path)
    assert res.returncode == 0, f"{script} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    assert "max |braze - eager|" in res.stdout


def test_golden_example_records_then_compares(tmp_path):
    # a copy, so the run records its snapshots under tmp_path rather than in examples/
    shutil.copy(EXAMPLES / "test_with_golden.py", tmp_path)
    args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), "test_with_golden.py"]
    for attempt in ("record", "compare"):
        res = _run(args, cwd=tmp_path)
        assert res.returncode == 0, f"{attempt} run failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
        assert "3 passed" in res.stdout
    snaps = sorted(p.name for p in (tmp_path / "golden" / "test_with_golden").iterdir())
    assert snaps == ["block_b1.safetensors", "block_b4.safetensors", "block_bits.safetensors"]
