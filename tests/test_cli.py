"""The braze CLI: help, compile -> inspect -> run -> check on a tiny module:factory model, every sampling option
combination of `braze run` (valid ones generate what CompiledModel.generate generates, the rest exit 2 with one
line), pinned digests, and one-line errors. Commands run in-process (main(argv)) except where the console script
itself is under test."""

import itertools
import json
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

import braze
import braze.cli.run as cli_run
from braze.cli import main
from braze.cli.common import UsageError
from braze.models import tiny_causal_lm

ROOT = Path(__file__).resolve().parent.parent
BRAZE = Path(sys.executable).parent / "braze"
FACTORY = "tests.tiny_factory:tiny_llama"
CHAT_FACTORY = "tests.test_cli:tiny_chat_llama"
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_chat_llama():
    """tests.tiny_factory's tiny llama, its character tokenizer given a chat template (for `run --chat`)."""
    from tests.tiny_factory import tiny_llama

    made = tiny_llama()
    made["tokenizer"].chat_template = CHAT_TEMPLATE
    return made


def _cli(*args, timeout=180):
    """The installed console script (braze.cli:main) if there is one, else `python -m braze.cli`."""
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
    assert main(["compile", CHAT_FACTORY, "-o", str(out), "--max-seq", "48", "--max-batch", "2"]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(package):
    """The same package through the library: what every `braze run` must reproduce."""
    from transformers import AutoTokenizer

    return braze.load(package), AutoTokenizer.from_pretrained(str(package / "tokenizer"))


@pytest.fixture
def ids_out(monkeypatch):
    """`braze run` prints token ids instead of text (the char tokenizer drops ids past its vocabulary)."""
    monkeypatch.setattr(cli_run, "decode", lambda tokenizer, ids: " ".join(str(i) for i in ids))


def test_help_lists_every_command():
    proc = _cli("--help")
    assert proc.returncode == 0
    for cmd in ("compile", "run", "inspect", "bench", "check", "eval"):
        assert cmd in proc.stdout
    assert "module:factory" in proc.stdout


@pytest.mark.parametrize("command", ["compile", "run", "inspect", "bench", "check", "eval"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: braze {command}" in out and "--debug" in out


def test_compile_writes_a_package_with_tokenizer_source_and_digest(package, capsys):
    manifest = json.loads((package / "manifest.json").read_text())
    assert manifest["metadata"]["source"] == CHAT_FACTORY
    assert manifest["tokenizer"] == "tokenizer" and (package / "tokenizer").is_dir()
    assert manifest["compile_options"]["max_seq"] == 48
    from braze.runtime.package import manifest_digest

    assert re.fullmatch(r"[0-9a-f]{64}", manifest_digest(package))


def test_inspect_prints_the_digest(package, capsys):
    from braze.runtime.package import manifest_digest

    digest = manifest_digest(package)
    assert main(["inspect", str(package)]) == 0
    out = capsys.readouterr().out
    assert f"sha256: {digest}" in out
    assert "integrity: ok" in out
    assert "launches per call" in out and "kernels (" in out and "embedding" in out
    assert "bytes per token" in out and "weights:" in out
    assert "compile options: " in out and "kv_dtype=auto" in out and "max_seq=48" in out
    assert main(["inspect", str(package), "--json", "--sha256", digest]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["sha256"] == digest
    assert info["plans"]["forward"]["launches"] >= 1
    assert info["bytes_per_token_decode"] == info["weights"]["bytes"] > 0


# ---- sampling: every combination ----------------------------------------------------------------------------------
TEMPERATURES, TOP_KS, TOP_PS, SEEDS = (None, 0.0, 0.7), (None, 5), (None, 0.9), (None, 3)


def _expected(temperature, top_k, top_p, seed):
    """What `braze run` must do with these options: a UsageError needle, or generate()'s sampling kwargs."""
    if temperature == 0.0 and (top_k or top_p):
        return "--temperature 0 means greedy"
    if not (temperature or top_k or top_p):
        return "--seed only affects sampling" if seed is not None else {"do_sample": False}
    return {"do_sample": True, "temperature": temperature or 1.0, "top_k": top_k, "top_p": top_p,
            "seed": seed or 0}


@pytest.mark.parametrize("temperature, top_k, top_p, seed", list(itertools.product(TEMPERATURES, TOP_KS, TOP_PS,
                                                                                     SEEDS)))
def test_every_sampling_combination_maps_to_generate_or_is_refused(temperature, top_k, top_p, seed):
    args = Namespace(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    want = _expected(temperature, top_k, top_p, seed)
    if isinstance(want, str):
        with pytest.raises(UsageError, match=want):
            cli_run.sampling_options(args)
    else:
        assert cli_run.sampling_options(args) == want


def _run_ids(argv, capsys):
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err and "executor: interpret" in captured.err
    return [int(x) for x in captured.out.split()]


def _library(loaded, prompt, chat=False, n=3, **kwargs):
    """New token ids CompiledModel.generate gives for the prompt (the CLI passes the tokenizer's EOS)."""
    rt, tok = loaded
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False).input_ids
    else:
        ids = tok(prompt).input_ids
    out = rt.generate(torch.tensor([ids]), max_new_tokens=n, eos_token_id=[tok.eos_token_id], **kwargs)
    return out[0, len(ids):].tolist()


SAMPLED = [  # (CLI options, generate kwargs): one of each kind of valid combination, checked token for token
    ([], {}),
    (["--temperature", "0"], {}),
    (["--temperature", "0.7"], dict(do_sample=True, temperature=0.7, seed=0)),
    (["--top-k", "5"], dict(do_sample=True, top_k=5, seed=0)),
    (["--top-p", "0.9"], dict(do_sample=True, top_p=0.9, seed=0)),
    (["--temperature", "1.3", "--top-k", "20", "--seed", "4"], dict(do_sample=True, temperature=1.3, top_k=20,
                                                                    seed=4)),
    (["--temperature", "0.8", "--top-k", "10", "--top-p", "0.9", "--seed", "3"],
     dict(do_sample=True, temperature=0.8, top_k=10, top_p=0.9, seed=3)),
    (["--repetition-penalty", "1.5"], dict(repetition_penalty=1.5)),
    (["--top-p", "0.9", "--repetition-penalty", "1.2", "--seed", "2"],
     dict(do_sample=True, top_p=0.9, seed=2, repetition_penalty=1.2)),
]


@pytest.mark.parametrize("options, kwargs", SAMPLED, ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_run_generates_what_the_library_generates(options, kwargs, package, loaded, ids_out, capsys):
    got = _run_ids(["run", str(package), "--prompt", "Hello", "--max-new-tokens", "3", *options], capsys)
    assert got == _library(loaded, "Hello", **kwargs)


def test_run_repetition_penalty_with_speculation_is_plain_decoding(package, loaded, ids_out, capsys):
    """Speculation applies the penalty at every verify node (lossless); it was refused before."""
    prompt = "abcabcabcabcabcabc"
    got = _run_ids(["run", str(package), "--prompt", prompt, "--max-new-tokens", "8", "--repetition-penalty", "1.2",
                    "--speculate"], capsys)
    assert got == _library(loaded, prompt, n=8, repetition_penalty=1.2, speculate=False)
    with pytest.raises(SystemExit) as info:  # argparse
        main(["run", str(package), "--prompt", "Hi", "--repetition-penalty", "0"])
    assert info.value.code == 2
    assert "expected a finite number > 0" in _one_line_error(capsys.readouterr().err)


def test_run_says_when_a_row_stops_at_end_of_sequence(package, loaded, ids_out, capsys):
    """Fewer tokens than --max-new-tokens because the model emitted EOS: the stats line names the stop; a run that
    reaches --max-new-tokens says nothing of the kind."""
    rt, tok = loaded
    eos = cli_run._eos_ids(tok, rt.model_config)
    stops = runs = None
    for k in range(3, 60):  # greedy continuations of seeded weights: find a prompt of each kind
        new = rt.generate(torch.tensor([[k, k + 1, k]]), max_new_tokens=4)[0, 3:].tolist()
        hit = next((i for i, t in enumerate(new) if t in eos), None)
        if hit is not None and hit < 3 and stops is None:
            stops = (k, new[: hit + 1])
        elif hit is None and runs is None:
            runs = k
    assert stops is not None and runs is not None
    k, want = stops
    assert main(["run", str(package), "--prompt-ids", f"{k} {k + 1} {k}", "--max-new-tokens", "4"]) == 0
    got = capsys.readouterr()
    assert [int(x) for x in got.out.split()] == want
    count = "1 token" if len(want) == 1 else f"{len(want)} tokens"
    assert f"[braze] {count} (stopped at end-of-sequence token {want[-1]}) in" in got.err
    assert main(["run", str(package), "--prompt-ids", f"{runs} {runs + 1} {runs}", "--max-new-tokens", "4"]) == 0
    got = capsys.readouterr()
    assert len(got.out.split()) == 4 and "[braze] 4 tokens in" in got.err and "end-of-sequence" not in got.err


def test_the_issue_command_samples_at_a_temperature_without_top_p(package, capsys):
    # issue #19: `braze run pkg --prompt hello --temperature 0.7` failed with a TypeError (top_p None)
    assert main(["run", str(package), "--prompt", "hello", "--temperature", "0.7", "--max-new-tokens", "3"]) == 0
    assert "sampled (temperature=0.7, seed=0)" in capsys.readouterr().err


def test_seeds_reproduce_and_filters_to_one_token_are_greedy(package, ids_out, capsys):
    base = ["run", str(package), "--prompt", "Hello", "--max-new-tokens", "3"]
    greedy = _run_ids(base, capsys)
    assert _run_ids(base + ["--top-k", "1", "--temperature", "5"], capsys) == greedy
    assert _run_ids(base + ["--top-p", "1e-9"], capsys) == greedy
    first = _run_ids(base + ["--temperature", "3", "--seed", "11"], capsys)
    assert _run_ids(base + ["--temperature", "3", "--seed", "11"], capsys) == first
    others = {tuple(_run_ids(base + ["--temperature", "3", "--seed", str(s)], capsys)) for s in (12, 13)}
    assert others != {tuple(first)}  # at temperature 3 over a 256-token vocabulary, seeds differ


@pytest.mark.parametrize("options, kwargs", [([], {}), (["--temperature", "0.9", "--top-p", "0.8", "--seed", "2"],
                                                        dict(do_sample=True, temperature=0.9, top_p=0.8, seed=2))])
def test_run_with_chat_template(options, kwargs, package, loaded, ids_out, capsys):
    got = _run_ids(["run", str(package), "--chat", "--prompt", "Hi", "--max-new-tokens", "3", *options], capsys)
    assert got == _library(loaded, "Hi", chat=True, **kwargs)


@pytest.mark.parametrize("options, kwargs", [([], {}), (["--temperature", "0.7", "--top-k", "8"],
                                                        dict(do_sample=True, temperature=0.7, top_k=8, seed=0))])
def test_run_speculative(options, kwargs, package, loaded, ids_out, capsys):
    got = _run_ids(["run", str(package), "--speculate", "--prompt", "abcabcabc", "--max-new-tokens", "4", *options],
                   capsys)
    fresh = (braze.load(package), loaded[1])  # the drafter remembers earlier outputs: start from the same state
    assert got == _library(fresh, "abcabcabc", n=4, speculate=True, **kwargs)
    if not kwargs:  # greedy speculation is lossless: the plain greedy tokens
        assert got == _library(loaded, "abcabcabc", n=4)


def test_run_streams_and_takes_prompt_ids(package, capsys):
    assert main(["run", str(package), "--prompt-ids", "5 6 7", "--max-new-tokens", "3", "--temperature", "0.9",
                 "--top-k", "10", "--top-p", "0.9", "--seed", "1", "--stream"]) == 0
    assert "3 tokens" in capsys.readouterr().err


def test_run_streams_with_speculation(package, capsys):
    """--stream --speculate prints each verify step's accepted tokens as they come: the same text as without
    --stream (a repetitive prompt, so drafts are accepted)."""
    prompt = ["--prompt", "abcabcabcabcabc", "--max-new-tokens", "12", "--speculate"]
    assert main(["run", str(package), *prompt]) == 0
    plain = capsys.readouterr()
    assert main(["run", str(package), *prompt, "--stream"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out == plain.out and "speculative (suffix)" in streamed.err


def test_max_new_tokens_is_reduced_to_the_room_left(package, capsys):
    assert main(["run", str(package), "--prompt", "x" * 46, "--max-new-tokens", "5"]) == 0
    err = capsys.readouterr().err
    assert "--max-new-tokens reduced to 2" in err and "2 tokens" in err


@pytest.mark.parametrize("options, needle", [
    (["--temperature", "0", "--top-k", "5"], "--temperature 0 means greedy decoding, which --top-k"),
    (["--temperature", "0", "--top-p", "0.5"], "--temperature 0 means greedy decoding, which --top-p"),
    (["--seed", "3"], "--seed only affects sampling"),
    (["--temperature", "0", "--seed", "3"], "--seed only affects sampling"),
    (["--top-k", "0"], "--top-k: expected a positive integer"),
    (["--top-p", "0"], "--top-p: expected a number in (0, 1]"),
    (["--top-p", "1.5"], "--top-p: expected a number in (0, 1]"),
    (["--temperature", "-1"], "--temperature: expected a finite number >= 0"),
    (["--temperature", "nan"], "--temperature: expected a finite number >= 0"),
    (["--temperature", "inf"], "--temperature: expected a finite number >= 0"),
    (["--seed", "-1"], "--seed: expected an integer >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--executor", "gpu"], "invalid choice: 'gpu'"),
])
def test_refused_run_options_exit_2_with_one_line(options, needle, capsys):
    # refused before the package is read: the path need not exist
    try:
        code = main(["run", "no-such-pkg", "--prompt", "x", *options])
    except SystemExit as e:  # argparse
        code = e.code
    assert code == 2
    assert needle in _one_line_error(capsys.readouterr().err)


# ---- pinned digests ----------------------------------------------------------------------------------------------
def test_run_with_the_pinned_digest_and_with_another(package, capsys):
    from braze.runtime.package import manifest_digest

    digest = manifest_digest(package)
    assert main(["run", str(package), "--prompt", "Hi", "--max-new-tokens", "1", "--sha256", digest]) == 0
    assert main(["run", str(package), "--prompt", "Hi", "--max-new-tokens", "1", "--sha256",
                 "sha256:" + digest.upper()]) == 0
    capsys.readouterr()
    other = ("0" if digest[0] != "0" else "1") + digest[1:]
    assert main(["run", str(package), "--prompt", "Hi", "--sha256", other]) == 1
    err = _one_line_error(capsys.readouterr().err)
    assert f"manifest sha256 is {digest}, not the pinned {other}" in err
    assert main(["run", str(package), "--prompt", "Hi", "--sha256", "abc"]) == 2
    assert "sha256 must be 64 hex digits" in _one_line_error(capsys.readouterr().err)


# ---- check ---------------------------------------------------------------------------------------------------------
def test_check_uses_braze_testing_tolerances(package, capsys):
    from braze.testing import default_tolerances

    rtol, atol = default_tolerances()[torch.float32]
    assert main(["check", str(package), FACTORY, "--prompts", "2"]) == 0
    out = capsys.readouterr().out
    assert f"tolerance |a-b| <= {atol:g} + {rtol:g}*|b|" in out and "check passed" in out
    assert main(["check", str(package), "tests.tiny_factory:tiny_llama_other", "--prompts", "1"]) == 1
    err = _one_line_error(capsys.readouterr().err)
    assert "check failed" in err and "max abs error" in err


def test_check_keeps_the_example_calls_other_arguments(tmp_path, capsys):
    """The random cases replace the example call's tensors and keep its float: a plan is compiled for one call
    signature, and a call without the float is refused (runtime/call_signature.py)."""
    pkg = tmp_path / "scaled"
    assert main(["compile", "tests.tiny_factory:scaled_mlp", "-o", str(pkg)]) == 0
    assert main(["check", str(pkg), "tests.tiny_factory:scaled_mlp", "--prompts", "3"]) == 0
    out = capsys.readouterr().out
    assert "random inputs #2" in out and "check passed: 3 inputs" in out


def test_check_of_an_int6_package_says_the_difference_is_quantization(tmp_path, capsys):
    """int6 is lossy and the eager model is not quantized: the default (rounding) tolerance fails, and the output
    says why and what to use instead; a tolerance the user gives is honoured. inspect names the int6 options."""
    pkg = tmp_path / "int6"
    assert main(["compile", FACTORY, "-o", str(pkg), "--max-seq", "32", "--max-batch", "1", "--quant", "int6",
                 "--int6-method", "rtn"]) == 0
    capsys.readouterr()
    assert main(["check", str(pkg), FACTORY, "--prompts", "1"]) == 1
    captured = capsys.readouterr()
    assert "note: int6 weights are lossy" in captured.out
    err = _one_line_error(captured.err)
    assert "check failed" in err and "braze eval measures the loss" in err
    assert main(["check", str(pkg), FACTORY, "--prompts", "1", "--atol", "0.5", "--rtol", "0.5"]) == 0
    assert "tolerance |a-b| <= 0.5 + 0.5*|b|, given" in capsys.readouterr().out
    assert main(["inspect", str(pkg)]) == 0
    assert "quant=int6, int6_act=a16, int6_method=rtn" in capsys.readouterr().out


# ---- other argument errors ---------------------------------------------------------------------------------------
def test_bad_arguments_exit_2_with_one_line_from_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "braze.cli", "compile", FACTORY, "-o", "x", "--max-seq", "lots"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--max-seq" in _one_line_error(proc.stderr)


@pytest.mark.parametrize("argv, needle", [
    (["compile"], "required"),
    (["run", "pkg"], "one of the arguments --prompt --prompt-ids is required"),
    (["run", "pkg", "--prompt", "x", "--prompt-ids", "1"], "not allowed with argument"),
    (["compile", "m", "-o", "o", "--quant", "int4"], "--quant"),
    (["bench", "m", "--warmup", "-1"], "--warmup"),
    (["eval", "m", "--max-tokens", "1"], "argument --max-tokens: expected an integer >= 2"),
    (["eval", "m", "--window", "1"], "argument --window: expected an integer >= 2"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_in_process(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert needle in _one_line_error(capsys.readouterr().err)


def test_compile_option_combinations_refused_before_loading(tmp_path, capsys):
    for argv, needle in [
        (["--int6-act", "a8"], "--quant int6 only"),
        (["--int6-method", "gptq", "--quant", "df11", "--dtype", "bfloat16"], "--quant int6 only"),
        (["--quant", "int6", "--df11-strategy", "fused"], "--quant df11 only"),
        (["--kv-budget", "0.5"], "--kv-compression only"),
        (["--kv-window", "4"], "--kv-compression only"),
        (["--quant", "df11"], "add --dtype bfloat16"),
        (["--target-check", "warn"], "--target-check applies with --target only"),
        (["--executor", "cuda"] if not torch.cuda.is_available() else ["--quant", "df11", "--dtype", "float16"],
         "--executor cuda needs a CUDA GPU" if not torch.cuda.is_available() else "add --dtype bfloat16"),
    ]:
        assert main(["compile", "no.such:model", "-o", str(tmp_path / "o"), *argv]) == 2, argv
        assert needle in _one_line_error(capsys.readouterr().err)


def test_compile_and_run_a_kv_compressed_package(tmp_path, ids_out, capsys):
    """--kv-compression/--kv-budget/--kv-window reach braze.compile, the package keeps the policy, and `braze run`
    generates what the library's compressed compile generates (greedy and sampled)."""
    out = tmp_path / "pkg"
    argv = ["--kv-compression", "snapkv", "--kv-budget", "24", "--kv-window", "4", "--max-seq", "48"]
    assert main(["compile", CHAT_FACTORY, "-o", str(out), "--max-batch", "2", *argv]) == 0
    assert "kv compression: snapkv, budget 24 -> 24 of 48" in capsys.readouterr().out
    rt = braze.load(out)
    assert rt.generator.compression.policy == "snapkv" and rt.generator.compression.window == 4
    made = tiny_chat_llama()
    cm = braze.compile(made["model"], max_seq=48, max_batch=2, kv_compression="snapkv", kv_budget=24, kv_window=4)
    prompt = "the quick brown fox jumps"
    for options, kwargs in (([], {}), (["--temperature", "0.7", "--seed", "3"],
                                       dict(do_sample=True, temperature=0.7, seed=3))):
        got = _run_ids(["run", str(out), "--prompt", prompt, "--max-new-tokens", "4", *options], capsys)
        assert got == _library((cm, made["tokenizer"]), prompt, n=4, **kwargs), options
    # more tokens than the compressed cache holds after the kept prompt: clamped with a note, not refused
    assert main(["run", str(out), "--prompt", prompt, "--max-new-tokens", "40"]) == 0
    err = capsys.readouterr().err
    assert "--max-new-tokens reduced to 20 (the compressed KV cache holds 24 tokens" in err, err


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


def test_non_causal_package(tmp_path, capsys):
    assert main(["compile", "tests.tiny_factory:tiny_mlp", "-o", str(tmp_path / "o"), "--speculate", "suffix"]) == 2
    assert "--speculate applies to causal LMs" in _one_line_error(capsys.readouterr().err)
    assert main(["compile", "tests.tiny_factory:tiny_mlp", "-o", str(tmp_path / "mlp")]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "mlp"), "--prompt", "hi"]) == 2
    assert "causal-LM package" in _one_line_error(capsys.readouterr().err)
    assert main(["check", str(tmp_path / "mlp"), "tests.tiny_factory:tiny_mlp"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "mlp")]) == 0  # no decode step: no bytes-per-token line
    out = capsys.readouterr().out
    assert "weights:" in out and "bytes per token" not in out


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
    assert "check passed: 1 input matches the eager model" in capsys.readouterr().out


def test_hf_loads_print_no_progress_bar_to_a_piped_stderr(tmp_path, capsys):
    """transformers' "Loading weights" bar went to a piped stderr although the CLI shows no progress there; the
    CLI turns it off for the load only (a program calling main() gets its setting back)."""
    from transformers.utils import logging as hf_logging

    from tests.tiny_factory import tiny_llama

    made = tiny_llama()
    made["model"].save_pretrained(tmp_path / "model")
    made["tokenizer"].save_pretrained(tmp_path / "model")
    hf_logging.enable_progress_bar()
    capsys.readouterr()
    assert main(["compile", str(tmp_path / "model"), "-o", str(tmp_path / "pkg"), "--max-seq", "16",
                 "--max-batch", "1"]) == 0
    assert capsys.readouterr().err == ""
    assert hf_logging.is_progress_bar_enabled()


def test_an_hf_directory_without_a_tokenizer_runs_on_token_ids(tmp_path, capsys):
    """A saved model with no tokenizer files (a Qwen3 config: transformers would build an empty 1-token tokenizer
    from its class, which decoded every generated id to ""): the package has no tokenizer, `run --prompt-ids`
    prints the ids it generated, and `run --prompt` says to pass ids."""
    model = tiny_causal_lm("qwen3", layers=1)
    model.save_pretrained(tmp_path / "model")
    assert main(["compile", str(tmp_path / "model"), "-o", str(tmp_path / "pkg"), "--max-seq", "16",
                 "--max-batch", "1"]) == 0
    assert not (tmp_path / "pkg" / "tokenizer").exists()
    capsys.readouterr()
    assert main(["run", str(tmp_path / "pkg"), "--prompt-ids", "5 6 7", "--max-new-tokens", "3"]) == 0
    ids = capsys.readouterr().out.split()
    assert len(ids) == 3 and all(0 <= int(i) < model.config.vocab_size for i in ids)
    assert main(["run", str(tmp_path / "pkg"), "--prompt", "hi"]) == 2
    assert "--prompt-ids" in _one_line_error(capsys.readouterr().err)


def test_an_hf_directory_without_sdpa_compiles_with_eager_attention(tmp_path, capsys):
    """A saved Gemma 2 (transformers has no SDPA path for it and refused the load, which the CLI reported as an
    unsupported architecture): it loads with the eager attention, compiles, and `check` passes against it."""
    tiny_causal_lm("gemma2", layers=1).save_pretrained(tmp_path / "model")
    assert main(["compile", str(tmp_path / "model"), "-o", str(tmp_path / "pkg"), "--max-seq", "16",
                 "--max-batch", "1"]) == 0
    capsys.readouterr()
    assert main(["check", str(tmp_path / "pkg"), str(tmp_path / "model")]) == 0
    assert "check passed" in capsys.readouterr().out


def test_an_hf_gpt2_directory_compiles_and_runs(tmp_path, capsys):
    """A saved GPT-2 (GPT2LMHeadModel: not *ForCausalLM, which the CLI alone required, so it refused the directory
    as "not a HF causal LM" while braze.compile took the model) compiles, runs sampled decoding and passes check."""
    tiny_causal_lm("gpt2", layers=1).save_pretrained(tmp_path / "model")
    assert main(["compile", str(tmp_path / "model"), "-o", str(tmp_path / "pkg"), "--max-seq", "16",
                 "--max-batch", "1"]) == 0
    capsys.readouterr()
    assert main(["run", str(tmp_path / "pkg"), "--prompt-ids", "5 6 7", "--max-new-tokens", "3", "--temperature",
                 "0.7", "--seed", "1"]) == 0
    assert len(capsys.readouterr().out.split()) == 3
    assert main(["check", str(tmp_path / "pkg"), str(tmp_path / "model")]) == 0
    assert "check passed" in capsys.readouterr().out


def test_eval_prints_a_perplexity_table(capsys):
    assert main(["eval", FACTORY, "--quant", "int6", "--window", "32", "--max-tokens", "64",
                 "--agreement-tokens", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "variant" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["eager", "braze", "int6"]
    assert "+0.000%" in rows[1]  # the compiled FP model is the eager model
    agreement = [r.split("|")[6].strip() for r in rows]
    assert agreement[0] == agreement[1] == "8/8 / 100.0%"  # the reference, and the same model compiled
    assert re.fullmatch(r"\d/8 / \d+\.\d%", agreement[2])


def test_tensor_parallel_package_through_the_cli(tmp_path):
    """`braze compile --tp 2` then `torchrun --nproc-per-node 2 -m braze run`, as the help says: the tokens of the
    tp=1 package (same model, same prompt), printed once (rank 0 speaks for the group: text on stdout, one stats
    line on stderr); outside torchrun, run / bench / check name the torchrun command in one line."""
    tp1, tp2 = tmp_path / "tp1", tmp_path / "tp2"
    for out, extra in ((tp1, []), (tp2, ["--tp", "2"])):
        done = _cli("compile", FACTORY, "-o", str(out), "--max-seq", "32", "--max-batch", "1", *extra, timeout=300)
        assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tp2.iterdir()) == ["rank0", "rank1", "shards.json"]
    prompt = ["--prompt-ids", "5 6 7 8", "--max-new-tokens", "5"]
    want = _cli("run", str(tp1), *prompt)
    assert want.returncode == 0, want.stderr
    torchrun = Path(sys.executable).parent / "torchrun"
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    got = subprocess.run([str(torchrun), "--nproc-per-node", "2", "-m", "braze", "run", str(tp2), *prompt],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    assert got.stdout == want.stdout and "[braze] 5 tokens" in want.stderr
    assert sum("tokens/s" in line for line in got.stderr.splitlines()) == 1, got.stderr
    for command in (["run", str(tp2), *prompt], ["bench", str(tp2)], ["check", str(tp2), FACTORY]):
        refused = _cli(*command)
        assert refused.returncode != 0
        assert "torchrun --nproc-per-node 2" in _one_line_error(refused.stderr), command


def test_a_callers_process_group_survives_a_command(package, tmp_path, capsys):
    """braze.cli.main inside a program's own torch.distributed group: the command leaves that group alone (braze
    tears down only a group it started itself for a tp package)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        assert main(["inspect", str(package)]) == 0
        assert dist.is_initialized()
        assert main(["run", str(tmp_path / "missing"), "--prompt-ids", "5 6"]) != 0
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()
    capsys.readouterr()


def test_bench_decode_step_lost_in_timer_noise_is_reported_not_printed_as_zero(package, monkeypatch, capsys):
    """t(N) - t(1) <= 0 (a tiny model on a noisy machine) printed 0.00 ms and 2e9 tokens/s; now a dash and a note."""
    import braze.cli.bench as bench

    monkeypatch.setattr(bench, "_seconds", lambda fn, cuda: (fn(), 1.0)[1])  # every generate takes "1 s"
    assert main(["bench", str(package), "--seq", "6", "--decode", "3", "--iters", "1", "--batch", "2",
                 "--no-torch-compile"]) == 0
    decode = capsys.readouterr().out.split("\ndecode: ")[1]
    assert re.search(r"^braze \(package\)\s+\S+\s+-\s+-\s+-$", decode, re.M)
    assert "note: braze (package): t(3) - t(1) <= 0, the 2 steps are within the timer's noise" in decode
    assert " 0.00 " not in decode


def test_bench_times_forward_and_decode_side_by_side(package, loaded, capsys):
    """`braze bench PKG --decode N`: the forward table, then a decode table with the eager model (HF generate over a
    static cache), torch.compile (a row, or a note naming why it could not run) and the package, and the package's
    decode launches; the eager model is the one the manifest records."""
    assert main(["bench", str(package), "--seq", "6", "--decode", "3", "--iters", "1", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    forward, decode = out.split("\ndecode: ")
    assert "inputs 2x6" in forward and re.search(r"^eager\s+PyTorch", forward, re.M)
    assert decode.startswith("3 new tokens after the 6-token prompt, batch 2, greedy")
    rows = {m.group(1): m.group(2) for m in re.finditer(
        r"^(eager|torch\.compile|braze \(package\))\s+\S+(?: generate)?\s+(\d+\.\d+|-)\s+(?:\d|-)", decode, re.M)}
    assert "eager" in rows and "braze (package)" in rows
    for name, step in rows.items():  # a step time, or (2 steps of a tiny model lost in timer noise) a note saying so
        assert float(step) > 0 if step != "-" else f"note: {name}: t(3) - t(1) <= 0" in decode
    assert "torch.compile" in rows or "note: torch.compile decode unavailable: " in decode
    rt, _ = loaded
    assert f"braze: {rt.generator.decode.plan.launches} launches per decode step" in decode


# ---- reviewer's findings: int6 calibration, mismatched kinds, ignored or unusable arguments, grammar ----------------
@pytest.mark.parametrize("method, weights", [([], "awq"), (["--int6-method", "gptq"], "gptq")])
def test_int6_compile_of_a_factory_calibrates_with_its_tokenizer(method, weights, tmp_path, capsys):
    """A factory's tokenizer reaches braze.compile as calibration statistics: auto smooths (awq) instead of rounding
    to nearest, and gptq compiles instead of failing with "found no tokenizer next to the model"."""
    assert main(["compile", FACTORY, "-o", str(tmp_path / "pkg"), "--max-seq", "16", "--max-batch", "1", "--quant",
                 "int6", *method, "--report"]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"W6A16; weights: {weights}; calibration: \d+ tokens", out), out


def test_check_refuses_a_model_of_the_other_kind(package, tmp_path, capsys):
    mlp = tmp_path / "mlp"
    assert main(["compile", "tests.tiny_factory:tiny_mlp", "-o", str(mlp)]) == 0
    capsys.readouterr()
    assert main(["check", str(package), "tests.tiny_factory:tiny_mlp"]) == 2
    err = _one_line_error(capsys.readouterr().err)
    assert (f"{package} holds a LlamaForCausalLM (a causal LM) but tests.tiny_factory:tiny_mlp is a TinyMLP (not a "
            "causal LM)") in err
    assert main(["check", str(mlp), FACTORY]) == 2
    err = _one_line_error(capsys.readouterr().err)
    assert f"{mlp} holds a TinyMLP (not a causal LM) but {FACTORY} is a LlamaForCausalLM (a causal LM)" in err


def test_eval_refuses_a_text_of_one_token(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("a")
    assert main(["eval", FACTORY, "--text", str(tmp_path / "one.txt"), "--quant", "int6"]) == 2
    assert "tokenizes to fewer than 2 tokens" in _one_line_error(capsys.readouterr().err)


def test_bench_refuses_batch_and_seq_it_would_ignore(tmp_path, capsys):
    """A non-LM runs on its example inputs: --batch / --seq given for it are refused (package or model target);
    left at their defaults, the bench runs."""
    mlp = tmp_path / "mlp"
    assert main(["compile", "tests.tiny_factory:tiny_mlp", "-o", str(mlp)]) == 0
    capsys.readouterr()
    assert main(["bench", str(mlp), "--batch", "5", "--seq", "99"]) == 2
    err = _one_line_error(capsys.readouterr().err)
    assert err.startswith("braze bench: error: --batch 5 --seq 99: --batch / --seq shape a causal LM's input_ids")
    assert f"{mlp} holds a TinyMLP, not a causal LM" in err
    assert main(["bench", "tests.tiny_factory:tiny_mlp", "--seq", "99"]) == 2
    assert "error: --seq 99: --batch / --seq shape" in _one_line_error(capsys.readouterr().err)
    assert main(["bench", str(mlp), "--iters", "1", "--no-torch-compile"]) == 0
    assert "inputs 3x8; 1 timed iteration (median)" in capsys.readouterr().out


def test_compile_refuses_an_output_it_cannot_create_before_loading(tmp_path, capsys):
    """-o under a regular file, or somewhere nothing can be created: exit 2 naming -o, before the model is loaded
    (the model here does not exist: loading it would exit 1)."""
    (tmp_path / "afile").write_text("")
    assert main(["compile", "no.such:model", "-o", str(tmp_path / "afile" / "sub")]) == 2
    err = _one_line_error(capsys.readouterr().err)
    assert f"-o {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a directory" in err
    if Path("/proc/self").is_dir():  # procfs takes no new directories, even from root
        assert main(["compile", "no.such:model", "-o", "/proc/braze-test/pkg"]) == 2
        assert "-o /proc/braze-test/pkg: cannot create the package under /proc (" in (
            _one_line_error(capsys.readouterr().err))
    assert not list(tmp_path.glob(".braze-probe-*"))


def test_run_generates_for_each_repeated_prompt(package, loaded, ids_out, capsys):
    """--prompt repeated: one left-padded batch, each completion under its prompt, the tokens each prompt gets
    alone; --stream with several prompts and more prompts than the package's max batch exit 2."""
    prompts = ["Hello", "abc de"]
    assert main(["run", str(package), "--prompt", prompts[0], "--prompt", prompts[1], "--max-new-tokens", "3"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0] == "==> prompt 1: 'Hello' <==" and lines[2] == "==> prompt 2: 'abc de' <==", lines
    want = [_library(loaded, p) for p in prompts]
    assert [[int(x) for x in lines[1].split()], [int(x) for x in lines[3].split()]] == want
    total = sum(len(w) for w in want)
    assert f"[braze] {total} tokens over 2 prompts" in captured.err
    for extra, needle in ((["--stream"], "--stream prints one completion as it is generated; got 2 prompts"),
                          (["--prompt", "c"], "3 prompts; the package generates at most 2 rows at once")):
        assert main(["run", str(package), "--prompt", "a", "--prompt", "b", *extra]) == 2
        assert needle in _one_line_error(capsys.readouterr().err)


def test_one_new_token_reads_as_one_token(package, capsys):
    assert main(["run", str(package), "--prompt", "Hi", "--max-new-tokens", "1"]) == 0
    assert "[braze] 1 token in " in capsys.readouterr().err


def test_counts_in_messages_agree():
    from braze.cli.common import article, plural

    assert [plural(n, "token") for n in (0, 1, 2)] == ["0 tokens", "1 token", "2 tokens"]
    assert plural(1, "launch", "launches") == "1 launch" and plural(3, "launch", "launches") == "3 launches"
    assert {n: article(n) for n in (1, 8, 11, 12, 18, 80, 100, 180, 800, 1100, 8000, 11000, 18500, 21000)} == {
        1: "a", 8: "an", 11: "an", 12: "a", 18: "an", 80: "an", 100: "a", 180: "a", 800: "an", 1100: "a",
        8000: "an", 11000: "an", 18500: "an", 21000: "a"}
