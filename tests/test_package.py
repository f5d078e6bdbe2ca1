"""Kernel packages: save -> load in a fresh process gives bit-identical outputs; every bad package is a clear error."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import braze
from braze.models import tiny_causal_lm
from braze.runtime.errors import PackageError
from braze.runtime.package import (
    FORMAT_VERSION,
    WEIGHT_ALIGN,
    _load_weights,
    _sha256,
    _weights_for_file,
    load_package,
    save_package,
)

ROOT = Path(__file__).resolve().parent.parent


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 32)
        self.b = torch.nn.Linear(32, 4)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x))) * 2


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """Tiny llama and MLP packages plus inputs and the in-memory compiled outputs."""
    root = tmp_path_factory.mktemp("pkgs")
    torch.manual_seed(0)
    llama = braze.compile(tiny_causal_lm("llama", layers=1), max_seq=32, max_batch=2)
    ids1, ids2 = torch.randint(0, 256, (1, 7)), torch.randint(0, 256, (2, 5))
    prompt = torch.randint(0, 256, (1, 4))
    expected = {"llama_1": llama(ids1).logits, "llama_2": llama(ids2).logits}
    if getattr(llama, "generator", None) is not None:
        expected["llama_gen"] = llama.generate(prompt, max_new_tokens=5)
    llama.save(root / "llama")

    torch.manual_seed(1)
    mlp = braze.compile(MLP())
    x1, x2 = torch.randn(3, 8), torch.randn(5, 8)
    expected["mlp_1"], expected["mlp_2"] = mlp(x1), mlp(x2)
    mlp.save(root / "mlp")  # a LazyCompiled forwards save() to its CompiledModel
    save_file({"ids1": ids1, "ids2": ids2, "prompt": prompt, "x1": x1, "x2": x2}, str(root / "inputs.safetensors"))
    return root, expected


LOADER = textwrap.dedent("""
    import sys
    import braze.runtime.package as p
    from safetensors.torch import load_file, save_file
    root = sys.argv[1]
    inp = load_file(root + "/inputs.safetensors")
    llama = p.load_package(root + "/llama")
    mlp = p.load_package(root + "/mlp")
    assert llama.graph_module is None and llama.executor_name == "interpret"
    out = {"llama_1": llama(inp["ids1"]).logits, "llama_2": llama(inp["ids2"]).logits,
           "mlp_1": mlp(inp["x1"]), "mlp_2": mlp(inp["x2"])}
    if getattr(llama, "generator", None) is not None:
        out["llama_gen"] = llama.generate(inp["prompt"], max_new_tokens=5)
    save_file({k: v.contiguous() for k, v in out.items()}, root + "/outputs.safetensors")
    bad = sorted(m for m in sys.modules if m.startswith(("braze.compiler", "braze.passes", "braze.codegen")))
    assert not bad, bad
    print("LEAN-OK")
""")


def test_round_trip_in_a_fresh_process_is_bit_identical_and_lean(packages):
    root, expected = packages
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", LOADER, str(root)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "LEAN-OK" in proc.stdout
    got = load_file(str(root / "outputs.safetensors"))
    assert set(got) == set(expected)
    for key, want in expected.items():
        assert torch.equal(got[key], want), key


def test_package_layout_and_manifest(packages):
    root, _ = packages
    pkg = root / "llama"
    manifest = json.loads((pkg / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION == 3
    assert set(manifest["versions"]) == {"braze", "torch", "triton"}
    assert manifest["target"]["device"] == "cpu" and manifest["causal_lm"] is True
    assert manifest["compile_options"]["max_seq"] == 32 and manifest["compile_options"]["max_batch"] == 2
    labels = {s["label"]: (s["lower"], s["upper"]) for s in manifest["symbols"]["forward"]}
    assert labels["batch"] == (1, 2) and labels["seq"] == (1, 32)
    assert manifest["model_config"]["model_type"] == "llama"
    assert manifest["plans"]["forward"] == "plans/forward.json"
    on_disk = {p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()} - {"manifest.json"}
    assert on_disk == set(manifest["files"])
    assert all(_sha256(pkg / rel) == digest for rel, digest in manifest["files"].items())
    kernels = list((pkg / "kernels").glob("*.py"))
    assert kernels and all(k.read_text().startswith("# braze generated kernel") for k in kernels)
    plan = json.loads((pkg / "plans/forward.json").read_text())
    assert all(v.startswith("kernels/") for v in plan["kernels"].values())
    assert (pkg / "weights.safetensors").read_bytes()[:8]  # safetensors: an 8-byte header length, then JSON
    mlp_manifest = json.loads((root / "mlp" / "manifest.json").read_text())
    assert mlp_manifest["causal_lm"] is False and mlp_manifest["model_config"] is None


def test_shared_storages_are_aliased_or_cloned():
    base = torch.randn(4, 6)
    weights = {"a": base, "tied": base, "row": base[1], "t": base.t()}
    tensors, aliases = _weights_for_file(weights)
    assert aliases == {"tied": "a"}
    assert set(tensors) == {"a", "row", "t"}
    assert all(t.is_contiguous() for t in tensors.values())
    assert torch.equal(tensors["row"], base[1]) and torch.equal(tensors["t"], base.t())


def test_loaded_weights_are_aligned_for_the_kernels(tmp_path):
    """safetensors packs tensors back to back: after a 6-byte tensor the next one sits 6 B into the data section
    (and the section itself only 8-byte aligned), while Triton specializes pointers on 16-byte divisibility."""
    odd = torch.tensor([1.0, 2.0, 3.0], dtype=torch.bfloat16)
    weights = {"a_odd": odd, "b": torch.randn(5, 7), "c": torch.arange(9, dtype=torch.int16)}
    save_file(weights, str(tmp_path / "w.safetensors"))
    raw = load_file(str(tmp_path / "w.safetensors"))
    assert any(t.data_ptr() % WEIGHT_ALIGN for t in raw.values()), "the file no longer produces a misaligned load"
    loaded = _load_weights(tmp_path / "w.safetensors", torch.device("cpu"), {"tied": "b"})
    assert all(t.data_ptr() % WEIGHT_ALIGN == 0 for t in loaded.values())
    assert all(torch.equal(loaded[k], v) for k, v in weights.items()) and loaded["tied"] is loaded["b"]


class _Embed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(10, 4)

    def forward(self, ids):
        return self.table(ids) * 2


def test_a_module_package_refuses_ids_outside_its_embedding(tmp_path):
    """The plan records which inputs index an embedding (and its rows), so a loaded package checks them too."""
    torch.manual_seed(0)
    model = _Embed()
    ids = torch.tensor([[1, 9, 0]])
    cm = braze.compile(model)
    torch.testing.assert_close(cm(ids), model(ids))
    cm.save(tmp_path / "pkg")
    loaded = load_package(tmp_path / "pkg")
    torch.testing.assert_close(loaded(ids), model(ids))
    for compiled in (cm, loaded):
        with pytest.raises(braze.InputMismatchError, match=r"input 'ids' holds id 10, outside the embedding table's "
                                                           r"rows \[0, 10\)"):
            compiled(torch.tensor([[1, 10, 0]]))


def test_save_refuses_a_non_package_directory_and_replaces_a_package(packages, tmp_path):
    root, _ = packages
    compiled = load_package(root / "mlp")
    other = tmp_path / "stuff"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(PackageError, match="not a braze package; refusing"):
        save_package(compiled, other)
    assert (other / "notes.txt").read_text() == "mine"
    dest = tmp_path / "pkg"
    save_package(compiled, dest)
    save_package(compiled, dest)  # replacing an existing package is fine
    assert load_package(dest)(torch.ones(2, 8)).shape == (2, 4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left behind


# ---- bad packages: each is a one-line PackageError naming the problem -------------------------------------------
@pytest.fixture
def copy(packages, tmp_path):
    root, _ = packages
    dest = tmp_path / "pkg"
    shutil.copytree(root / "llama", dest)
    return dest


def _error(path, **kwargs) -> str:
    with pytest.raises(PackageError) as info:
        load_package(path, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _rehash(pkg: Path, rel: str) -> None:
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"][rel] = _sha256(pkg / rel)
    (pkg / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_kernel_is_rejected_before_it_is_imported(copy, tmp_path):
    kernel = sorted((copy / "kernels").glob("*.py"))[0]
    marker = tmp_path / "imported"
    kernel.write_text(f"open({str(marker)!r}, 'w').close()\n" + kernel.read_text())
    msg = _error(copy)
    assert msg == f"{kernel}: sha256 mismatch (package corrupted or tampered)"
    assert not marker.exists()


def test_tampered_plan(copy):
    plan = copy / "plans" / "forward.json"
    plan.write_text(plan.read_text().replace('"fused"', '"eager"', 1))
    assert _error(copy) == f"{plan}: sha256 mismatch (package corrupted or tampered)"


@pytest.mark.parametrize("payload", ["__import__('os').system('touch MARKER')", "s0 ** 99999", "1.5"])
def test_a_plan_expression_is_data_not_code(copy, tmp_path, payload):
    """Even with its hash rewritten, a plan whose expression is not integer arithmetic is refused at load."""
    plan = copy / "plans" / "forward.json"
    raw = json.loads(plan.read_text())
    marker = tmp_path / "MARKER"
    raw["slots"] = [payload.replace("MARKER", str(marker))] + raw["slots"][1:]
    plan.write_text(json.dumps(raw))
    _rehash(copy, "plans/forward.json")
    msg = _error(copy)
    assert msg.startswith(f"{plan}: plan expression ") and "is not allowed" in msg
    assert not marker.exists()


def test_tampered_weights(copy):
    w = copy / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x40
    w.write_bytes(bytes(data))
    assert _error(copy) == f"{w}: sha256 mismatch (package corrupted or tampered)"


def test_truncated_weights(copy):
    w = copy / "weights.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert "sha256 mismatch" in _error(copy)
    _rehash(copy, "weights.safetensors")  # even with a matching hash, the file itself is checked
    msg = _error(copy)
    assert msg.startswith(f"{w}: not a readable safetensors file (truncated or corrupt")


def test_missing_file(copy):
    (copy / "plans" / "forward.json").unlink()
    assert _error(copy) == f"{copy / 'plans' / 'forward.json'}: missing (package incomplete)"


def test_newer_format_version(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert _error(copy) == f"{copy}: package format 4 is newer than this braze (supports 3); upgrade braze"


def test_format_2_deterministic_verify_plan_is_refused(copy):
    """Format 2 deterministic verify plans read lengths on the host (host_read) with kernels that lack the tree
    form their launcher now runs: refused in one line, with what to do (other format 2 plans still load)."""
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    load_package(copy)
    plan = copy / "plans" / "forward.json"
    raw = json.loads(plan.read_text())
    raw["steps"][-1]["params"]["host_read"] = True
    plan.write_text(json.dumps(raw))
    _rehash(copy, "plans/forward.json")
    assert _error(copy) == (f"{plan}: a deterministic verify plan from package format 2 (its attention kernels "
                            "predate the on-device tree form); rebuild the package")


def test_older_format_version(copy):
    """Format 1 packages were launched by per-kind launchers that no longer exist: refused, with what to do."""
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["format_version"] = 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert _error(copy) == (f"{copy}: package format 1 is older than this braze supports (2); recompile it with "
                            "`braze compile`")


def test_missing_path(tmp_path):
    assert _error(tmp_path / "nope") == f"no braze package at {tmp_path / 'nope'} (the path does not exist)"
    assert _error(tmp_path) == f"no braze package at {tmp_path} (no manifest.json)"


def test_unreadable_manifest(copy):
    (copy / "manifest.json").write_text("{not json")
    assert "unreadable manifest" in _error(copy)


@pytest.mark.skipif(torch.cuda.is_available(), reason="simulates a CPU-only machine")
def test_cuda_package_on_cpu_needs_interpret(copy, packages):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"] = {"device": "cuda", "executor": "cuda", "device_name": "NVIDIA H100"}
    (copy / "manifest.json").write_text(json.dumps(manifest))  # the manifest holds the hashes, not its own
    msg = _error(copy)
    assert "compiled for a CUDA GPU" in msg and "executor='interpret'" in msg
    assert "executor='interpret'" in _error(copy, executor="cuda")
    compiled = load_package(copy, executor="interpret")
    ids = load_file(str(packages[0] / "inputs.safetensors"))["ids1"]
    assert torch.equal(compiled(ids).logits, packages[1]["llama_1"])


def test_reference_executor_is_not_available_from_a_package(copy):
    assert "packages do not store" in _error(copy, executor="reference")
    assert "not valid" in _error(copy, executor="gpu")


def test_braze_load_is_the_package_loader(packages):
    root, expected = packages
    ids = load_file(str(root / "inputs.safetensors"))["ids2"]
    compiled = braze.load(root / "llama")
    assert torch.equal(compiled(ids).logits, expected["llama_2"])
    with pytest.raises(braze.PackageError, match="reference executor runs the rewritten FX graph"):
        braze.load(root / "llama", executor="reference")


ENCODER_LOADER = textwrap.dedent("""
    import sys
    import braze
    from safetensors.torch import load_file
    root = sys.argv[1]
    inp = load_file(root + "/inputs.safetensors")
    assert "transformers.modeling_outputs" not in sys.modules  # what registers the output type with pytree
    out = braze.load(root + "/bert")(inp["ids"], inp["mask"])
    print(type(out).__name__, float((out.last_hidden_state - inp["expected"]).abs().max()))
""")


def test_an_hf_encoder_package_loads_in_a_fresh_process(tmp_path):
    """An HF encoder returns a ModelOutput, a pytree type transformers registers when its module is imported: a
    fresh process could not read the package's output structure (`braze check` / `bench` of a BERT package
    failed with 'Deserializing ... in pytree is not registered'). The loader imports that module (transformers
    modules only) and reads it again."""
    from tests.tiny_factory import tiny_bert

    bert, ids, mask = tiny_bert()
    compiled = braze.compile(bert)
    compiled(ids, mask)
    compiled.save(tmp_path / "bert")
    with torch.no_grad():
        expected = bert(ids, mask).last_hidden_state
    save_file({"ids": ids, "mask": mask, "expected": expected.contiguous()}, str(tmp_path / "inputs.safetensors"))
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", ENCODER_LOADER, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    name, err = proc.stdout.split()
    assert name == "BaseModelOutputWithPoolingAndCrossAttentions" and float(err) < 1e-5
