"""A catalogue of bad inputs, over the API and the CLI: each gets one clear line naming the problem (an exception of
a braze error class or a plain TypeError for a wrong argument type, whose message is one line; a CLI command exits
2 for a usage error or 1 for a runtime failure with exactly one line on stderr and no traceback). Also: an
unsupported op falls back to eager and is reported, and the inputs that look odd but are fine (non-contiguous
tensors, sampling without top_p) work.

One tiny compiled llama (module fixture) serves every case; the package cases copy its saved package and break it.
"""

import json
import os
import shutil

import pytest
import torch

import braze
from braze.cli import main
from braze.models import tiny_causal_lm
from braze.runtime.errors import DigestMismatchError, PackageError, SamplingError
from braze.runtime.package import manifest_digest
from braze.runtime.sampling import select_next


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text, repr(text)
    assert "Traceback" not in text
    return text


def cli(argv, capsys) -> tuple[int, str]:
    """(exit code, the one stderr line) of `braze ARGV` in-process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return code, lines[0]


@pytest.fixture(scope="module")
def lm():
    model = tiny_causal_lm("llama", layers=1)
    return model, braze.compile(model, max_seq=16, max_batch=2)


@pytest.fixture(scope="module")
def pkg(lm, tmp_path_factory):
    """The compiled model saved with a character tokenizer, and once more without one."""
    from tests.tiny_factory import char_tokenizer

    root = tmp_path_factory.mktemp("bad")
    _, cm = lm
    cm.save(root / "pkg", tokenizer=char_tokenizer())
    cm.save(root / "notok")
    return root


@pytest.fixture
def copy(pkg, tmp_path):
    dest = tmp_path / "pkg"
    shutil.copytree(pkg / "pkg", dest)
    return dest


def _manifest(path):
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path, manifest):
    (path / "manifest.json").write_text(json.dumps(manifest))


# ---- API: compile options and the compiled forward ----------------------------------------------------------------
def test_compile_refuses_what_is_not_a_model():
    with pytest.raises(TypeError) as info:
        braze.compile(42)
    assert one_line(info.value) == "braze.compile takes an nn.Module or a function, got int"


@pytest.mark.parametrize("options,pattern", [
    ({"executor": "gpu"}, r"executor='gpu' is not valid; choose one of 'auto', 'cuda', 'interpret', 'reference'"),
    ({"quant": "int4"}, r"quant='int4' is not valid; choose one of None, 'df11', 'int6'"),
    ({"max_seq": 0}, r"max_seq must be a positive integer"),
    ({"warp_speed": 9}, r"unknown option\(s\) warp_speed; valid options: .*executor"),
    ({"speculate": "medusa"}, r"speculate='medusa' is not valid; choose one of None, 'suffix'"),
])
def test_bad_option_names_valid_ones(options, pattern):
    with pytest.raises(braze.ConfigError, match=pattern) as info:
        braze.compile(torch.nn.Linear(2, 2), **options)
    one_line(info.value)


def test_cuda_executor_on_cpu_model_is_refused():
    with pytest.raises(braze.ConfigError, match="executor='cuda' needs the model on a CUDA device") as info:
        braze.compile(torch.nn.Linear(2, 2), executor="cuda")(torch.randn(1, 2))
    one_line(info.value)


def test_sequence_outside_compiled_range(lm):
    _, cm = lm
    with pytest.raises(braze.ShapeOutOfRangeError,
                       match=r"dim 1 \(seq\) = 17 is outside the compiled range \[1, 16\]") as info:
        cm(torch.zeros(1, 17, dtype=torch.long))
    one_line(info.value)


def test_batch_outside_compiled_range(lm):
    _, cm = lm
    with pytest.raises(braze.ShapeOutOfRangeError, match=r"\(batch\) = 3 .*\[1, 2\]"):
        cm(torch.zeros(3, 4, dtype=torch.long))


@pytest.mark.parametrize("shape, dim", [((0, 4), r"dim 0 \(batch\) = 0"), ((1, 0), r"dim 1 \(seq\) = 0")])
def test_zero_size_input_is_outside_the_range(lm, shape, dim):
    _, cm = lm
    with pytest.raises(braze.ShapeOutOfRangeError, match=dim + " is outside the compiled range") as info:
        cm(torch.zeros(*shape, dtype=torch.long))
    one_line(info.value)


def test_non_contiguous_input_gives_the_contiguous_result(lm):
    _, cm = lm
    ids = (torch.arange(6).view(3, 2) + 5).t()  # [2, 3], strides (1, 2)
    assert not ids.is_contiguous()
    assert torch.equal(cm(ids).logits, cm(ids.contiguous()).logits)


def test_wrong_dtype_names_input(lm):
    _, cm = lm
    with pytest.raises(braze.InputMismatchError, match=r"input_ids must be an integer tensor of token ids \[batch, "
                                                       "seq\\], got a 2-dim float32 tensor"):
        cm(torch.zeros(1, 4))
    linear = braze.compile(torch.nn.Linear(4, 2))
    linear(torch.zeros(1, 4))
    with pytest.raises(braze.InputMismatchError, match="input 'input' has dtype int64, expected float32"):
        linear(torch.zeros(1, 4, dtype=torch.long))


def test_wrong_device_names_input(lm):
    _, cm = lm
    with pytest.raises(braze.InputMismatchError, match="input 'input_ids' is on meta"):
        cm(torch.zeros(1, 4, dtype=torch.long, device="meta"))


def test_static_dim_mismatch_names_dim(capfd):
    """A changed static dim recompiles with it dynamic; when the model itself rejects the size, the error names
    the dim and the model's reason in one line (no Dynamo trace, no torch log), and the first plan still serves."""
    m = torch.nn.Linear(8, 4)
    cm = braze.compile(m)
    cm(torch.randn(2, 8))
    capfd.readouterr()
    with pytest.raises(braze.InputMismatchError, match="input 'input' dim 1 is 9, expected 8, and the model "
                       "rejects the new size: a and b must have same reduction dim") as info:
        cm(torch.randn(2, 9))
    one_line(info.value)
    assert "Traceback" not in capfd.readouterr().err
    x = torch.randn(3, 8)
    torch.testing.assert_close(cm(x), m(x))


# ---- API: generate ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ids, kwargs, error, pattern", [
    (torch.ones(1, 17, dtype=torch.long), {}, braze.ShapeOutOfRangeError, r"prompt of 17 tokens exceeds max_seq=16"),
    (torch.ones(1, 12, dtype=torch.long), {"max_new_tokens": 8}, braze.ShapeOutOfRangeError,
     r"prompt \(12\) \+ max_new_tokens \(8\) = 20 exceeds the KV cache"),
    (torch.ones(1, 0, dtype=torch.long), {}, braze.InputMismatchError, "empty prompt"),
    (torch.ones(0, 4, dtype=torch.long), {}, braze.InputMismatchError, r"empty batch"),
    (torch.ones(3, 4, dtype=torch.long), {}, braze.ShapeOutOfRangeError, "a batch of 3 prompts exceeds max_batch=2"),
    (torch.ones(1, 4), {}, braze.InputMismatchError, "input_ids must be an integer tensor .* got a 2-dim float32"),
    ([[1, 2, 3]], {}, braze.InputMismatchError, "input_ids must be an integer tensor .* got a list"),
    (torch.ones(1, 4, dtype=torch.long), {"attention_mask": torch.tensor([[1, 1, 0, 0]])}, braze.InputMismatchError,
     "row 0 has right padding"),
    (torch.ones(2, 4, dtype=torch.long), {"attention_mask": torch.tensor([[1] * 4, [1, 0, 1, 1]])},
     braze.InputMismatchError, "row 1 has a gap"),
    (torch.ones(2, 6, dtype=torch.long), {"attention_mask": torch.ones(2, 5, dtype=torch.long)},
     braze.InputMismatchError, r"attention_mask must be a tensor shaped like input_ids \[2, 6\], got shape \[2, 5\]"),
    (torch.ones(1, 4, dtype=torch.long), {"attention_mask": [[1, 1, 1, 1]]}, braze.InputMismatchError,
     "attention_mask must be a tensor shaped like input_ids .*, got a list"),
    (torch.ones(1, 4, dtype=torch.long), {"do_sample": True, "seed": 2**70}, braze.ConfigError,
     "does not fit in 64 bits"),
    (torch.ones(1, 4, dtype=torch.long), {"spec_tree": True, "speculate": False}, braze.ConfigError,
     "spec_tree=True drafts trees for speculative decoding: give speculate=True"),
    (torch.ones(1, 4, dtype=torch.long), {"max_new_tokens": 0}, braze.ConfigError,
     "max_new_tokens must be a positive integer, got 0"),
    (torch.ones(1, 4, dtype=torch.long), {"do_sample": True, "top_p": 1.5}, braze.ConfigError,
     r"top_p must be a number in \(0, 1\]"),
    (torch.ones(1, 4, dtype=torch.long), {"do_sample": True, "top_p": 0.0}, braze.ConfigError,
     r"top_p must be a number in \(0, 1\]"),
    (torch.ones(1, 4, dtype=torch.long), {"do_sample": True, "top_k": -1}, braze.ConfigError,
     "top_k must be an integer >= 0"),
    (torch.ones(1, 4, dtype=torch.long), {"do_sample": True, "top_k": 2.5}, braze.ConfigError,
     "top_k must be an integer >= 0"),
    (torch.ones(1, 4, dtype=torch.long), {"do_sample": True, "temperature": 0.0}, braze.ConfigError,
     "temperature must be > 0 when sampling"),
    (torch.ones(1, 4, dtype=torch.long), {"do_sample": True, "temperature": float("nan")}, braze.ConfigError,
     "temperature must be a finite number > 0"),
    (torch.ones(1, 4, dtype=torch.long), {"do_sample": True, "temperature": float("inf")}, braze.ConfigError,
     "temperature must be a finite number > 0"),
    (torch.ones(1, 4, dtype=torch.long), {"num_beams": 4}, braze.ConfigError, "unknown generate option.*num_beams"),
    (torch.ones(2, 4, dtype=torch.long), {"speculate": True, "streamer": object()}, braze.InputMismatchError,
     "a streamer with speculative decoding takes one prompt, got a batch of 2"),
    (torch.ones(1, 4, dtype=torch.long), {"stop_strings": "x"}, braze.InputMismatchError,
     "stop_strings needs tokenizer="),
    (torch.ones(1, 4, dtype=torch.long), {"speculate": True, "stop_strings": "x", "tokenizer": object()},
     braze.InputMismatchError, "stop_strings needs a tokenizer with decode / batch_decode .*, got object"),
    (torch.ones(1, 4, dtype=torch.long), {"speculate": "yes"}, braze.ConfigError,
     "speculate must be True or False, got 'yes'"),
    (torch.ones(1, 4, dtype=torch.long), {"do_sample": 1}, braze.ConfigError, "do_sample must be True or False"),
], ids=lambda v: None)
def test_generate_refuses(lm, ids, kwargs, error, pattern):
    _, cm = lm
    kwargs = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(error, match=pattern) as info:
        cm.generate(ids, **kwargs)
    one_line(info.value)


def test_sampling_without_a_seed_follows_torch_manual_seed(lm):
    """As in HF: a call without seed= draws from torch's global RNG, so torch.manual_seed reproduces it and calls
    without a seed differ (they all sampled with seed 0)."""
    _, cm = lm
    ids = torch.tensor([[3, 4, 5]])
    kw = dict(max_new_tokens=8, do_sample=True, temperature=5.0, eos_token_id=None)
    torch.manual_seed(7)
    first = [cm.generate(ids, **kw) for _ in range(3)]
    torch.manual_seed(7)
    assert torch.equal(cm.generate(ids, **kw), first[0])
    assert not (torch.equal(first[0], first[1]) and torch.equal(first[1], first[2]))


def test_forward_output_reads_like_hf_model_output(lm):
    """cm(ids)["logits"], .to_tuple(), keys() and [0], as HF's ModelOutput; with labels the loss comes first."""
    _, cm = lm
    ids = torch.tensor([[3, 4, 5, 6]])
    out = cm(ids)
    assert out["logits"] is out.logits and out[0] is out.logits and out.keys() == ["logits"]
    assert len(out.to_tuple()) == 1
    with pytest.raises(KeyError, match="'loss': this output has logits"):
        out["loss"]
    out = cm(ids, labels=ids)
    assert out.keys() == ["loss", "logits"] and out["loss"] is out[0] and out.to_tuple()[1] is out.logits


def test_sampling_options_without_do_sample_warn_as_hf_does(lm):
    """generate(ids, temperature=0.7) without do_sample=True decodes greedily (HF's rule) and now says so: a
    UserWarning naming the ignored options; plain greedy calls do not warn."""
    import warnings

    _, cm = lm
    ids = torch.tensor([[5, 6, 7]])
    with pytest.warns(UserWarning, match=r"do_sample=False: greedy decoding ignores temperature=0.7, top_k=5"):
        got = cm.generate(ids, max_new_tokens=3, temperature=0.7, top_k=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(got, cm.generate(ids, max_new_tokens=3))


def test_sampling_without_top_p_or_top_k_works(lm):
    # issue #19: sampling with top_p / top_k left unset (None) raised a TypeError
    _, cm = lm
    ids = torch.tensor([[5, 6, 7]])
    a = cm.generate(ids, max_new_tokens=3, do_sample=True, temperature=0.7, top_k=None, top_p=None, seed=1)
    b = cm.generate(ids, max_new_tokens=3, do_sample=True, temperature=0.7, seed=1)
    assert a.shape == (1, 6) and torch.equal(a, b)


@pytest.mark.parametrize("fill, what", [(float("nan"), "NaN"), (float("inf"), r"\+inf"),
                                        (float("-inf"), "-inf for every token")])
def test_sampling_from_non_finite_logits_names_the_problem(fill, what):
    logits = torch.randn(2, 16)
    logits[1, :] = fill if what.startswith("-inf") else logits[1, :]
    if not what.startswith("-inf"):
        logits[1, 3] = fill
    with pytest.raises(SamplingError, match=f"logits contain {what}") as info:
        select_next(logits, True, 1.0, None, None, torch.Generator().manual_seed(0))
    one_line(info.value)


def test_generate_on_a_model_whose_logits_are_nan(lm):
    """A weight only the plan holds (a merged or transposed copy) turns NaN: editing one the model shares would
    change the model's weights, which a compiled causal LM refuses to run on."""
    model, cm = lm
    shared = {p.data_ptr() for p in model.parameters()}
    weight = next(w for w in cm.weights.values()
                  if w.dim() == 2 and w.is_floating_point() and w.data_ptr() not in shared)
    saved = weight.clone()
    weight.fill_(float("nan"))
    try:
        with pytest.raises(SamplingError, match="logits contain NaN") as info:
            cm.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=True)
        one_line(info.value)
    finally:
        weight.copy_(saved)


# ---- API: packages ------------------------------------------------------------------------------------------------
def test_load_takes_a_path():
    with pytest.raises(TypeError) as info:
        braze.load(123)
    assert "braze.load takes a package directory path" in one_line(info.value)


def _load_error(path, **kwargs):
    with pytest.raises(PackageError) as info:
        braze.load(path, **kwargs)
    return one_line(info.value)


def test_load_missing_path(tmp_path):
    assert "the path does not exist" in _load_error(tmp_path / "nope")


def test_load_a_file_not_a_directory(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    assert "no braze package at" in _load_error(tmp_path / "weights.bin")


def test_load_an_unreadable_manifest(copy):
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").mkdir()  # a path that exists and cannot be read as a file
    assert "no manifest.json" in _load_error(copy)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_load_a_manifest_without_read_permission(copy):
    (copy / "manifest.json").chmod(0)
    try:
        assert "unreadable manifest" in _load_error(copy)
    finally:
        (copy / "manifest.json").chmod(0o644)


def test_load_a_foreign_directory(copy):
    (copy / "manifest.json").write_text(json.dumps({"name": "some-other-tool", "version": "2.0"}))
    assert "no integer format_version; not a braze package manifest" in _load_error(copy)


def test_load_a_manifest_that_is_not_json(copy):
    (copy / "manifest.json").write_text("format_version = 1\n")
    assert "unreadable manifest" in _load_error(copy)


def test_load_a_newer_format_version(copy):
    manifest = _manifest(copy)
    manifest["format_version"] += 1
    _write_manifest(copy, manifest)
    assert "is newer than this braze" in _load_error(copy)


def test_load_truncated_weights(copy):
    data = (copy / "weights.safetensors").read_bytes()
    (copy / "weights.safetensors").write_bytes(data[: len(data) // 2])
    assert "weights.safetensors: sha256 mismatch" in _load_error(copy)


def test_load_a_tampered_kernel(copy):
    kernel = sorted((copy / "kernels").iterdir())[0]
    kernel.write_text(kernel.read_text() + "\nimport os; os.system('echo pwned')\n")
    assert "sha256 mismatch (package corrupted or tampered)" in _load_error(copy)


def test_load_a_package_whose_tokenizer_is_missing(copy):
    shutil.rmtree(copy / "tokenizer")
    assert "missing (package incomplete)" in _load_error(copy)


def test_wrong_sha256_is_refused_before_anything_else_is_read(copy, monkeypatch):
    import braze.runtime.package as package

    digest = manifest_digest(copy)
    other = ("f" if digest[0] != "f" else "e") + digest[1:]
    (copy / "weights.safetensors").write_bytes(b"garbage")  # would be a different error if it were read

    def must_not_run(*args, **kwargs):
        raise AssertionError("read past a wrong digest")

    monkeypatch.setattr(package, "verify_package", must_not_run)
    with pytest.raises(DigestMismatchError) as info:
        braze.load(copy, sha256=other)
    assert f"manifest sha256 is {digest}, not the pinned {other}" in one_line(info.value)


def test_right_sha256_loads_and_a_malformed_one_is_a_config_error(pkg):
    digest = manifest_digest(pkg / "pkg")
    rt = braze.load(pkg / "pkg", sha256="sha256:" + digest.upper())
    assert rt.causal_lm
    with pytest.raises(braze.ConfigError, match="sha256 must be 64 hex digits") as info:
        braze.load(pkg / "pkg", sha256="1234")
    one_line(info.value)


@pytest.mark.parametrize("executor, pattern", [("reference", "packages do not store"),
                                               ("gpu", "executor='gpu' is not valid for a package")])
def test_load_with_an_executor_a_package_cannot_use(pkg, executor, pattern):
    assert pattern in _load_error(pkg / "pkg", executor=executor)


# ---- CLI ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, code, needle", [
    (["--prompt", "x" * 20], 2, "the prompt has 20 tokens; the package's max seq is 16"),
    (["--prompt", "x" * 16], 2, "leaves no room to generate"),
    (["--prompt", ""], 2, "--prompt is empty"),
    (["--prompt", "   "], 2, "--prompt is empty"),
    (["--prompt-ids", ""], 2, "--prompt-ids is empty"),
    (["--prompt-ids", "1 two 3"], 2, "--prompt-ids: expected integers"),
    (["--prompt-ids", "999"], 2, "prompt token id 999 is outside the vocabulary [0, 256)"),
    (["--prompt-ids", "-1"], 2, "prompt token id -1 is outside the vocabulary"),
    (["--prompt", "hi", "--chat"], 2, "the tokenizer has no chat template; drop --chat"),
    (["--prompt-ids", "1 2", "--chat"], 2, "use it with --prompt, not --prompt-ids"),
    (["--prompt", "hi", "--temperature", "0", "--top-p", "0.5"], 2, "--temperature 0 means greedy"),
    (["--prompt", "hi", "--sha256", "not-a-digest"], 2, "sha256 must be 64 hex digits"),
], ids=lambda v: None)
def test_cli_run_refuses(pkg, args, code, needle, capsys):
    got, line = cli(["run", pkg / "pkg", "--max-new-tokens", "2", *args], capsys)
    assert got == code and needle in line, line


def test_cli_run_without_a_tokenizer(pkg, capsys):
    code, line = cli(["run", pkg / "notok", "--prompt", "hi"], capsys)
    assert code == 2 and "has no tokenizer; pass token ids with --prompt-ids" in line
    assert main(["run", str(pkg / "notok"), "--prompt-ids", "5 6", "--max-new-tokens", "2"]) == 0
    assert len(capsys.readouterr().out.split()) == 2  # ids printed as numbers


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cli_cuda_executor_without_a_gpu(pkg, capsys):
    code, line = cli(["run", pkg / "pkg", "--prompt", "hi", "--executor", "cuda"], capsys)
    assert code == 2 and "--executor cuda needs a CUDA GPU" in line


@pytest.mark.parametrize("breakage, needle", [
    ("truncate", "weights.safetensors: sha256 mismatch"),
    ("foreign", "not a braze package manifest"),
    ("newer", "is newer than this braze"),
    ("no-tokenizer", "missing (package incomplete)"),
    ("not-json", "unreadable manifest"),
])
def test_cli_run_on_a_broken_package(copy, breakage, needle, capsys):
    if breakage == "truncate":
        data = (copy / "weights.safetensors").read_bytes()
        (copy / "weights.safetensors").write_bytes(data[:100])
    elif breakage == "foreign":
        (copy / "manifest.json").write_text(json.dumps({"name": "other"}))
    elif breakage == "newer":
        manifest = _manifest(copy)
        manifest["format_version"] = 99
        _write_manifest(copy, manifest)
    elif breakage == "no-tokenizer":
        shutil.rmtree(copy / "tokenizer")
    else:
        (copy / "manifest.json").write_text("{")
    code, line = cli(["run", copy, "--prompt", "hi"], capsys)
    assert code == 1 and line.startswith("braze run: error: ") and needle in line, line


def test_cli_wrong_sha256(copy, capsys):
    digest = manifest_digest(copy)
    other = "0" * 64
    for command in (["run", copy, "--prompt", "hi"], ["inspect", copy], ["check", copy, "tests.tiny_factory:x"]):
        code, line = cli([*command, "--sha256", other], capsys)
        assert code == 1 and f"manifest sha256 is {digest}, not the pinned {other}" in line, line


def test_cli_inspect_reports_a_tampered_package(copy, capsys):
    kernel = sorted((copy / "kernels").iterdir())[0]
    kernel.write_text(kernel.read_text() + "\n# edited\n")
    assert main(["inspect", str(copy)]) == 1
    out = capsys.readouterr().out
    assert "integrity: FAILED" in out and "sha256 mismatch" in out


def test_cli_compile_refuses_an_output_it_would_clobber(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code, line = cli(["compile", "tests.tiny_factory:tiny_llama", "-o", tmp_path / "file"], capsys)
    assert code == 2 and "exists and is not a directory" in line
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.txt").write_text("mine")
    code, line = cli(["compile", "tests.tiny_factory:tiny_llama", "-o", tmp_path / "dir"], capsys)
    assert code == 2 and "not a braze package; refusing to overwrite it" in line


@pytest.mark.parametrize("argv, needle", [
    (["bench", "{pkg}", "--batch", "3", "--no-torch-compile", "--iters", "1"], "outside the package's range"),
    (["bench", "{pkg}", "--dtype", "float16"], "--dtype applies to a MODEL target"),
    (["bench", "tests.tiny_factory:tiny_llama", "--model", "x"], "--model applies to a package target"),
    (["bench", "tests.tiny_factory:tiny_llama", "--sha256", "0" * 64], "--sha256 pins a package"),
    (["bench", "{pkg}", "--decode", "1"], "--decode N needs N >= 2"),
    (["bench", "{pkg}", "--seq", "10", "--decode", "10", "--no-torch-compile", "--iters", "1"],
     "exceeds the package's max seq"),
    (["bench", "tests.tiny_factory:tiny_mlp", "--decode", "3", "--no-torch-compile", "--iters", "1"],
     "the target is not a causal LM"),
    (["eval", "tests.tiny_factory:tiny_llama", "--text", "{pkg}/no-such.txt"], "not a readable UTF-8 text file"),
    (["compile", "tests.tiny_factory:tiny_mlp", "-o", "{pkg}/o", "--speculate", "suffix"],
     "--speculate applies to causal LMs"),
])
def test_cli_other_commands_refuse(pkg, argv, needle, capsys):
    code, line = cli([a.replace("{pkg}", str(pkg / "pkg")) for a in argv], capsys)
    assert code == 2 and needle in line, line


# ---- fallbacks and capture ---------------------------------------------------------------------------------------
class WithSort(torch.nn.Module):
    def forward(self, x):
        return torch.sort(x * 2.0, dim=-1).values.sin()


def test_unsupported_op_falls_back_and_is_reported():
    cm = braze.compile(WithSort())
    x = torch.randn(3, 10)
    assert torch.allclose(cm(x), WithSort()(x), atol=1e-6)
    report = cm.compiled.report
    assert [r for _, r in report.fallbacks] == ["no lowering for aten.sort.default"]
    assert "eager fallbacks: 1" in str(report)
    assert cm.compiled.stats["launches"] == 2  # x*2 before, sin after: both still generated kernels


@pytest.mark.parametrize("command", ["compile", "bench"])
def test_cli_refuses_a_model_without_a_whole_plan(command, tmp_path, capsys):
    """torch.export refuses the model; the Dynamo fallback would run it in Python, but the commands need a plan."""
    extra = ["-o", tmp_path / "pkg"] if command == "compile" else ["--iters", "1", "--no-torch-compile"]
    code, line = cli([command, "tests.tiny_factory:branchy", *extra], capsys)
    assert code == 2 and "was compiled through Dynamo" in line and "whole-model plan" in line
    assert not (tmp_path / "pkg").exists()


def test_capture_failure_is_a_clear_error():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow cannot be exported
                return x + 1
            return x - 1

    with pytest.raises(braze.CaptureError, match="torch.export could not capture DataDependent") as info:
        braze.compile(DataDependent(), capture="export")(torch.randn(2, 3))  # "auto" falls back to Dynamo
    one_line(info.value)


def test_keyboard_interrupt_during_cli_generate_exits_cleanly(pkg, capsys, monkeypatch):
    """Ctrl-C while tokens are generated: exit code 130 and one line, no traceback."""
    from braze.runtime.compiled import CompiledModel

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(CompiledModel, "generate", interrupted)
    code, line = cli(["run", pkg / "pkg", "--prompt", "hi", "--max-new-tokens", "3"], capsys)
    assert code == 130 and line == "braze: interrupted"


def test_keyboard_interrupt_during_save_leaves_nothing_half_written(lm, tmp_path, monkeypatch):
    """Ctrl-C while a package is written: neither the package nor its temporary directory is left behind, and an
    existing package at the destination is untouched."""
    import braze.runtime.package as package

    _, cm = lm
    cm.save(tmp_path / "old")
    before = sorted(p.name for p in (tmp_path / "old").rglob("*"))
    real = package._write_contents

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(package, "_write_contents", interrupted)
    for dest in ("new", "old"):
        with pytest.raises(KeyboardInterrupt):
            cm.save(tmp_path / dest)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert sorted(p.name for p in (tmp_path / "old").rglob("*")) == before
    assert braze.load(tmp_path / "old") is not None


@pytest.mark.parametrize("args, needle", [
    (["--kv-budgets", "0.5"], "--kv-budgets set(s) the KV-compression table: give --kv-compression"),
    (["--kv-context", "64"], "--kv-context set(s) the KV-compression table"),
    (["--kv-compression", "snapkv", "--kv-context", "4"], "--kv-context 4: every policy keeps the 16 most recent"),
    (["--kv-compression", "snapkv", "--kv-budgets", "1.5"], "--kv-budgets 1.5: a budget is the share"),
    (["--kv-compression", "snapkv", "--kv-budgets", "0"], "--kv-budgets 0: a budget is the share"),
], ids=lambda v: None)
def test_cli_eval_kv_options_refused_before_loading(args, needle, capsys):
    code, line = cli(["eval", "no-such-model", *args], capsys)
    assert code == 2 and needle in line, line
