"""The braze CLI: help, compile -> inspect -> run -> check on a tiny module:factory model, and one-line errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from braze.cli import main

ROOT = Path(__file__).resolve().parent.parent
BRAZE = Path(sys.executable).parent / "braze"
FACTORY = "tests.tiny_factory:tiny_llama"


def _cli(*args, timeout=180):
    """The installed console script if there is one, else `python -m braze.cli`; run from the repo root."""
    cmd = [str(BRAZE)] if BRAZE.exists() else [sys.executable, "-m", "braze.cli"]
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    return subprocess.run(cmd + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _one_line_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "pkg"
    proc = _cli("compile", FACTORY, "-o", str(out), "--max-seq", "48", "--max-batch", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"-> {out}" in proc.stdout and "launches per forward" in proc.stdout
    return out


def test_help_lists_every_command():
    proc = _cli("--help")
    assert proc.returncode == 0
    for cmd in ("compile", "run", "inspect", "bench", "check"):
        assert cmd in proc.stdout
    assert "module:factory" in proc.stdout


@pytest.mark.parametrize("command", ["compile", "run", "inspect", "bench", "check"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: braze {command}" in out and "--debug" in out


def test_compile_writes_a_package_with_tokenizer_and_source(package):
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["metadata"]["source"] == FACTORY
    assert manifest["tokenizer"] == "tokenizer" and (package / "tokenizer").is_dir()
    assert manifest["compile_options"]["max_seq"] == 48


def test_inspect(package, capsys):
    assert main(["inspect", str(package)]) == 0
    out = capsys.readouterr().out
    assert "integrity: ok" in out
    assert "launches per call" in out and "kernels (" in out and "embedding" in out
    assert "bytes per token" in out and "weights:" in out
    assert main(["inspect", str(package), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["plans"]["forward"]["launches"] >= 1
    assert info["bytes_per_token_decode"] == info["weights"]["bytes"] > 0


def test_run_greedy_and_sampled(package, capsys):
    assert main(["run", str(package), "--prompt", "Hello", "--max-new-tokens", "4"]) == 0
    first = capsys.readouterr()
    assert "tokens/s" in first.err and "executor: interpret" in first.err
    assert main(["run", str(package), "--prompt", "Hello", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == first.out  # greedy is deterministic
    args = ["run", str(package), "--prompt-ids", "5 6 7", "--max-new-tokens", "3", "--temperature", "0.9",
            "--top-k", "10", "--top-p", "0.9", "--seed", "1", "--stream"]
    assert main(args) == 0
    assert "3 tokens" in capsys.readouterr().err


def test_check_passes_against_the_source_and_fails_against_another_model(package, capsys):
    assert main(["check", str(package), FACTORY, "--prompts", "2"]) == 0
    assert "check passed" in capsys.readouterr().out
    assert main(["check", str(package), "tests.tiny_factory:tiny_llama_other", "--prompts", "1"]) == 1
    err = _one_line_error(capsys.readouterr().err)
    assert "check failed" in err and "max abs error" in err


def test_bad_arguments_exit_2_with_one_line():
    proc = _cli("compile", FACTORY, "-o", "x", "--max-seq", "lots")
    assert proc.returncode == 2
    assert "--max-seq" in _one_line_error(proc.stderr)


@pytest.mark.parametrize("argv, needle", [
    (["compile"], "required"),
    (["run", "pkg", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["run", "pkg", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["compile", "m", "-o", "o", "--quant", "int4"], "--quant"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_in_process(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert needle in _one_line_error(capsys.readouterr().err)


def test_int6_options_need_quant_int6(capsys):
    assert main(["compile", "m", "-o", "o", "--int6-act", "a8"]) == 2
    assert "--quant int6 only" in _one_line_error(capsys.readouterr().err)
    assert main(["compile", "m", "-o", "o", "--quant", "int6", "--df11-strategy", "fused"]) == 2
    assert "--quant df11 only" in _one_line_error(capsys.readouterr().err)


def test_missing_model_path_exits_1_with_the_path(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["compile", str(missing), "-o", str(tmp_path / "out")]) == 1
    err = _one_line_error(capsys.readouterr().err)
    assert str(missing) in err


@pytest.mark.parametrize("argv, needle", [
    (["inspect", "{tmp}/nothing"], "no braze package at"),
    (["run", "{tmp}/nothing", "--prompt", "x"], "no braze package at"),
    (["compile", "tests.tiny_factory:missing", "-o", "{tmp}/o"], "has no attribute 'missing'"),
    (["compile", "tests.tiny_factory:not_a_module", "-o", "{tmp}/o"], "not an nn.Module"),
    (["compile", "{tmp}", "-o", "{tmp}/o"], "no config.json"),
])
def test_runtime_errors_exit_1(argv, needle, tmp_path, capsys):
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 1
    assert needle in _one_line_error(capsys.readouterr().err)


def test_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FrobForCausalLM"], "model_type": "frob"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert main(["compile", str(tmp_path), "-o", str(tmp_path / "o")]) == 1
    err = _one_line_error(capsys.readouterr().err)
    assert "unsupported architecture 'FrobForCausalLM'" in err


def test_run_rejects_a_non_causal_package(tmp_path, capsys):
    assert main(["compile", "tests.tiny_factory:tiny_mlp", "-o", str(tmp_path / "mlp")]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "mlp"), "--prompt", "hi"]) == 2
    assert "causal-LM package" in _one_line_error(capsys.readouterr().err)
    assert main(["check", str(tmp_path / "mlp"), "tests.tiny_factory:tiny_mlp"]) == 0



def test_compile_an_hf_model_directory(tmp_path, capsys):
    from tests.tiny_factory import tiny_llama

    made = tiny_llama()
    made["model"].save_pretrained(tmp_path / "model")  # config.json + model.safetensors
    made["tokenizer"].save_pretrained(tmp_path / "model")
    assert main(["compile", str(tmp_path / "model"), "-o", str(tmp_path / "pkg"), "--max-seq", "16",
                 "--max-batch", "2"]) == 0
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert manifest["metadata"]["source_kind"] == "hf-dir" and manifest["tokenizer"] == "tokenizer"
    capsys.readouterr()
    assert main(["check", str(tmp_path / "pkg"), str(tmp_path / "model"), "--prompts", "1"]) == 0


def test_eval_prints_a_perplexity_table():
    res = subprocess.run([sys.executable, "-m", "braze.cli", "eval", "tests.tiny_factory:tiny_llama", "--quant",
                          "int6", "--window", "32", "--max-tokens", "64", "--agreement-tokens", "8"],
                         capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["eager", "braze", "int6"]
    assert "+0.000%" in rows[1]  # the compiled FP model is the eager model
    agreement = [r.split("|")[6].strip() for r in rows]
    assert agreement[0] == agreement[1] == "8/8 / 100.0%"  # the reference, and the same model compiled
    assert re.fullmatch(r"\d/8 / \d+\.\d%", agreement[2])
