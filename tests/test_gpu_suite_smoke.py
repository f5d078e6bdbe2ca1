"""benchmarks/gpu_suite.py --smoke: the whole GPU suite script runs on CPU (tiny model) and writes its report, so CI
keeps the script working between GPU runs. The figures mean nothing here; the structure of the report does."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.py"


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_smoke_writes_every_section(tmp_path):
    suite = _suite()
    out = tmp_path / "suite.md"
    assert suite.main(["--smoke", "--budget", "1e9", "--out", str(out)]) == 0
    text = out.read_text()
    for title in ("## pytest -m gpu", "## Copy bandwidth", "## Decode tokens/s and % of the HBM floor",
                  "## Speculation on the shipped workloads"):
        assert title in text
    assert "failed:" not in text and "skipped" not in text, text
    rows = [line.split("|")[1:4] for line in text.splitlines() if line.startswith("| ")]
    impls = {(cells[0].strip(), cells[1].strip()) for cells in rows}
    for impl in ("hf-eager", "torch.compile", *suite.BRAZE_VARIANTS):
        assert {(impl, "1"), (impl, "2")} <= impls, (impl, text)
    assert "% HBM floor" in text and "n/a (no GPU)" in text  # energy needs NVML on a GPU
    assert "| chat |" in text or "| " in text.split("## Speculation")[1]


def test_gpu_suite_refuses_cpu_figures(capsys):
    assert _suite().main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
