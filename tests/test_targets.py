"""Cross-compiling for GPU targets without a GPU (braze/compiler/targets.py): the specializations a plan launches on
a target, compiled by triton for that target, checked against its limits; packages carrying the cubins; bad input.

Kept small (a tiny model's decode plan on two targets, a tiny MLP): `make gpucheck` runs every test model, variant
and target. Cubins are verified, not executed (no GPU here)."""

import itertools
import json
import warnings
from pathlib import Path

import pytest
import torch

import braze
from braze.cli import main
from braze.compiler.targets import (
    KernelResult,
    Specialization,
    TargetBuild,
    TargetCheckError,
    build_targets,
    enumerate_specializations,
    mma_kind,
    parse_ptxas_log,
    parse_targets,
    size_points,
)
from braze.kernels import TARGETS
from braze.models import tiny_causal_lm
from braze.runtime.errors import ConfigError, PackageError
from braze.runtime.package import check_gpu_targets, read_manifest

MLP = "tests.tiny_factory:tiny_mlp"


@pytest.fixture(scope="module")
def decode_build():
    model = tiny_causal_lm("llama", layers=1, dtype=torch.bfloat16)
    cm = braze.compile(model, max_batch=4, max_seq=64)
    return build_targets(cm, ["sm_90", "sm_86"], plans=["decode"])


def test_decode_plan_fits_sm90_and_sm86(decode_build):
    build = decode_build
    assert build.targets == ("sm_90", "sm_86")
    assert not build.issues, [str(i) for i in build.issues]
    families = {r.spec.family for r in build.results}
    assert {"matmul", "attention_block", "mlp_block", "fused"} <= families  # the 3-launch decode layer
    for r in build.results:
        limit = TARGETS[r.spec.target]
        assert r.error is None and r.cubin is not None and r.cubin.stat().st_size > 0
        assert 0 < r.regs <= limit.max_regs_per_thread and r.spills == 0
        assert r.smem <= limit.smem_per_block
        assert r.spec.uses and all(u.startswith("decode batch=") for u in r.spec.uses)
    # decode linears take the GEMV form (ROW_DOT: per-row reductions, no MMA) where it measured faster (batch 1,
    # K >= N: matmul.takes_gemv_form), else tensor-core tiles; the PTX says which each specialization got. The
    # decode plan's K >= N linears (o_proj, down_proj) now sit inside the attention and MLP blocks, so what is
    # left (QKV, lm_head) is tiles; the GEMV form is the forward plan's at batch 1 (test_matmul_template)
    forms = set()
    for r in build.results:
        if r.spec.family == "matmul":
            row_dot = r.spec.constexprs[(list(r.spec.signature).index("ROW_DOT"),)]
            assert (r.mma == "none") == bool(row_dot), (r.spec.kernel, r.mma)
            forms.add(bool(row_dot))
    assert forms == {False}
    # both ends of the batch range were enumerated, and triton's specialization is the JIT's: M == 1 is a
    # constexpr at batch 1, an i32 at batch 4; aligned pointers carry tt.divisibility 16
    per_use = {(r.spec.target, u): r.spec for r in build.results if r.spec.family == "matmul" for u in r.spec.uses}
    assert per_use[("sm_90", "decode batch=1")].signature["M"] == "constexpr"
    assert per_use[("sm_90", "decode batch=4")].signature["M"] == "i32"
    spec = per_use[("sm_86", "decode batch=4")]
    assert spec.attrs[(0,)] == [["tt.divisibility", 16]]
    assert spec.num_warps in (4, 8) and spec.num_stages >= 2


def test_repeat_is_cached(decode_build):
    from braze.compiler.targets import compile_specializations

    again = compile_specializations([r.spec for r in decode_build.results])
    assert all(r.cached for r in again)
    assert [r.sha256 for r in again] == [r.sha256 for r in decode_build.results]


@pytest.mark.parametrize("policy", ["adakv", "rkv"])
def test_kv_compression_kernels_fit_sm86_and_sm90(policy):
    """The KV-compression kernels a bf16 compile's prefill (and rkv's decode) launches compile for the L4-class
    and H100 targets within their limits, without spills (adakv: window attention, pooling, both selection modes,
    compaction; rkv: the R-KV scoring kernels, and decode's attention block recording the queries).
    benchmarks/kv_compress_kernels.py runs every policy on the 1B shape."""
    from braze.compiler.targets import check_result, compile_specializations, enumerate_specializations

    model = tiny_causal_lm("llama", layers=1, dtype=torch.bfloat16)
    cm = braze.compile(model, max_batch=2, max_seq=128, kv_compression=policy, kv_budget=0.5)
    specs = [s for s in enumerate_specializations(cm, ["sm_86", "sm_90"], plans=["prefill", "decode"])
             if s.family in ("kv_compress", "attention_block")]
    results = compile_specializations(specs)
    kernels = {r.spec.kernel.split("_", 3)[-1] for r in results if r.spec.family == "kv_compress"}
    assert kernels == {"window", "pool", "select", "compact", *(("last_dup", "redundancy") if policy == "rkv" else ())}
    # the decode attention block (rkv: with the query ring, which replaced kv_record_query's kernel)
    assert {r.spec.target for r in results if r.spec.family == "attention_block"} == {"sm_86", "sm_90"}
    for r in results:
        assert r.error is None and r.spills == 0 and not check_result(r), (r.spec.kernel, r.spec.target)
        assert r.smem <= TARGETS[r.spec.target].smem_per_block


def test_ptxas_log_and_mma_parsing():
    log = ("ptxas info    : Compiling entry function 'k' for 'sm_90a'\nptxas info    : Function properties for k\n"
           "    48 bytes stack frame, 40 bytes spill stores, 44 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 1024 bytes smem, 392 bytes cmem[0]\n")
    assert parse_ptxas_log(log) == {"regs": 255, "stack": 48, "spill_stores": 40, "spill_loads": 44,
                                    "static_smem": 1024}
    assert parse_ptxas_log("no report") is None
    assert mma_kind("wgmma.mma_async.sync.aligned.m64n64k16") == "wgmma"
    assert mma_kind("mma.sync.aligned.m16n8k16.row.col") == "mma.sync"
    assert mma_kind("fma.rn.f32") == "none"


def _fake_result(target="sm_86", dtype="bfloat16", **figures):
    spec = Specialization("k" * 32, target, "matmul", "matmul_x", "matmul_x", "", {}, {}, {},
                          {"num_warps": 8, "num_stages": 4}, dtype, ["prefill batch=8 seq=512"])
    return KernelResult(spec, **figures)


def test_limits_are_errors_naming_kernel_target_and_figure():
    over = TargetBuild(("sm_86",), [_fake_result(smem=114688, regs=128)], "3.9.0")
    with pytest.raises(TargetCheckError, match=r"sm_86: kernel matmul_x \(matmul, prefill batch=8 seq=512\): shared "
                                               r"memory 114,688 B > 101,376 B"):
        over.check()
    over.check(accept=True)  # target_check="warn"
    spills = TargetBuild(("sm_80",), [_fake_result("sm_80", regs=255, spill_stores=64, spill_loads=64)], "3.9.0")
    assert [i.severity for i in spills.issues] == ["error"]
    assert "spills 64 B stored / 64 B loaded at 255 registers" in str(spills.issues[0])
    fp32 = TargetBuild(("sm_80",), [_fake_result("sm_80", "float32", regs=255, spill_stores=8)], "3.9.0")
    assert [i.severity for i in fp32.issues] == ["warning"] and not fp32.errors
    failed = TargetBuild(("sm_90",), [_fake_result("sm_90", error="CompilationError: boom")], "3.9.0")
    with pytest.raises(TargetCheckError, match="sm_90: kernel matmul_x .*compile error: CompilationError: boom"):
        failed.check()


def test_target_names_and_size_points():
    assert parse_targets("sm_80, 90,sm86") == ("sm_80", "sm_90", "sm_86")
    with pytest.raises(ConfigError, match="unknown GPU target 'sm_75'; valid targets: sm_80, sm_86, sm_89, sm_90"):
        parse_targets(["sm_75"])
    with pytest.raises(ConfigError, match="unknown GPU target"):
        braze.compile(torch.nn.Linear(4, 4), targets=["sm_75"])
    with pytest.raises(ConfigError, match="target_check='maybe' is not valid"):
        braze.compile(torch.nn.Linear(4, 4), targets=["sm_90"], target_check="maybe")
    from braze.runtime.plan import Plan, SymbolSpec

    plan = Plan("p", [], [SymbolSpec("s0", "batch", 1, 8), SymbolSpec("s1", "seq", 1, 512)], [], [], [], {})
    assert size_points(plan) == [{"s0": a, "s1": b} for a in (1, 8) for b in (1, 512)]
    full = size_points(plan, "full")
    assert {p["s1"] for p in full} == {1, 257, 512} and {p["s0"] for p in full} == {1, 5, 8}


@pytest.fixture(scope="module")
def target_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("targets") / "mlp"
    assert main(["compile", MLP, "-o", str(out), "--target", "sm_80,sm_90"]) == 0
    return out


def test_package_carries_cubins_per_target(target_package, capsys):
    manifest = read_manifest(target_package)
    assert set(manifest["gpu_targets"]) == {"sm_80", "sm_90"}
    for name, info in manifest["gpu_targets"].items():
        index = json.loads((target_package / info["index"]).read_text())
        assert index["target"] == name and index["capability"] == TARGETS[name].capability and index["kernels"]
        for entry in index["kernels"]:
            assert manifest["files"][entry["cubin"]] == entry["sha256"]  # hashed in the manifest
            assert entry["smem"] <= TARGETS[name].smem_per_block and entry["mma"] in ("none", "mma.sync", "wgmma")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same triton, CPU: loading verifies and has nothing to say
        loaded = braze.load(target_package)
    assert loaded.target_notes == []
    x = torch.randn(3, 8)
    from tests.tiny_factory import tiny_mlp

    torch.testing.assert_close(loaded(x), tiny_mlp()["model"](x), rtol=1e-4, atol=1e-4)
    capsys.readouterr()
    assert main(["inspect", str(target_package)]) == 0
    out = capsys.readouterr().out
    assert "GPU target sm_80" in out and "GPU target sm_90" in out
    assert "regs" in out and "spills B" in out and "smem B" in out and "mma" in out


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _rehash(root: Path, rel: str) -> None:
    from braze.runtime.package import _sha256

    manifest = json.loads((root / "manifest.json").read_text())
    manifest["files"][rel] = _sha256(root / rel)
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_cubin_is_refused(target_package, tmp_path):
    pkg = _copy(target_package, tmp_path / "p")
    index = json.loads((pkg / "targets/sm_90/index.json").read_text())
    cubin = pkg / index["kernels"][0]["cubin"]
    blob = bytearray(cubin.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    cubin.write_bytes(bytes(blob))
    with pytest.raises(PackageError, match=r"\.cubin: sha256 mismatch \(package corrupted or tampered\)"):
        braze.load(pkg)
    _rehash(pkg, index["kernels"][0]["cubin"])  # manifest rewritten to match: the index still disagrees
    with pytest.raises(PackageError, match="sha256 differs from its sm_90 index entry"):
        braze.load(pkg)


def test_unknown_target_and_other_triton(target_package, tmp_path):
    pkg = _copy(target_package, tmp_path / "p")
    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["gpu_targets"]["sm_75"] = manifest["gpu_targets"].pop("sm_80")
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match="unknown GPU target 'sm_75'"):
        braze.load(pkg)
    pkg = _copy(target_package, tmp_path / "q")
    index = json.loads((pkg / "targets/sm_90/index.json").read_text())
    index["triton"] = "0.0.1"
    (pkg / "targets/sm_90/index.json").write_text(json.dumps(index))
    _rehash(pkg, "targets/sm_90/index.json")
    with pytest.warns(UserWarning, match="sm_90 cubins were built with triton 0.0.1, this is triton"):
        braze.load(pkg)


def test_package_without_the_running_gpus_target_notes_it(target_package, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    notes = check_gpu_targets(target_package, read_manifest(target_package), torch.device("cuda"))
    assert notes == ["package has cubins for sm_80, sm_90, not for this GPU (sm_86): kernels JIT-compile from "
                     "source"]


def test_cli_unknown_target_is_one_line(tmp_path, capsys):
    assert main(["compile", MLP, "-o", str(tmp_path / "o"), "--target", "sm_80,sm_75"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown GPU target 'sm_75'" in err[0]


def test_a_cache_hit_launches_the_specializations_of_the_compile_that_stored_it(tmp_path, monkeypatch):
    """make gpucheck's figures changed from run to run: a cache hit's weights came back from safetensors at
    addresses off 16-byte alignment (other pointer specializations), and kernel headers listed their regions in
    set order (another source hash). Both change the cross-compile key, so both are checked here."""
    monkeypatch.setenv("BRAZE_CACHE", "1")
    monkeypatch.setenv("BRAZE_CACHE_DIR", str(tmp_path))
    model = tiny_causal_lm("llama", layers=2, dtype=torch.bfloat16)
    cold = braze.compile(model, max_batch=2, max_seq=32)
    warm = braze.compile(model, max_batch=2, max_seq=32)
    assert warm.report.extra["cache"].startswith("hit"), warm.report.extra["cache"]

    def keys(cm):
        return sorted((s.module, s.key) for s in enumerate_specializations(cm, ["sm_90"], plans=["decode"]))

    assert keys(cold) == keys(warm)
    # a kernel's header lists the regions it covers in plan order
    plan = cold.extra_plans["decode"]
    for name, source in plan.kernels.items():
        header = itertools.takewhile(lambda line: line.startswith("#   "), source.splitlines()[1:])
        listed = [line[4:] for line in header if line[4] != " " and not line.startswith("#   ... and")]
        used = [", ".join(s.nodes) for s in plan.steps if s.kernel == name][:8]
        assert listed == used, name


def test_an_encoder_cross_compiles():
    """The dry run that records launches runs no kernel, so an eager step reading a kernel's output read whatever
    memory held: BERT's cross-compile failed with an out-of-bounds int64 index. Kernel outputs are zeros there."""
    from tests.tiny_factory import tiny_bert

    bert, ids, mask = tiny_bert()
    compiled = braze.compile(bert, targets=["sm_86"])
    out = compiled(ids, mask)
    with torch.no_grad():
        torch.testing.assert_close(out.last_hidden_state, bert(ids, mask).last_hidden_state, rtol=1e-4, atol=1e-4)
    build = compiled.compiled.target_build
    assert build.targets == ("sm_86",) and build.results and not build.errors


def test_unrolled_convolutions_fit_without_spills():
    """Unrolled convs read many tensors an element (27 for a 3-channel 3x3 stem): their launches give each thread
    one element (kernels/fused.py: fused_blocks). At four, the fp16 stem spilled 24-28 B on sm_80."""
    from tests.test_fused_ops import ConvStack

    model = ConvStack().eval().to(torch.float16)
    compiled = braze.compile(model, targets=["sm_80", "sm_86"])
    compiled(torch.randn(2, 3, 16, 16, dtype=torch.float16))
    build = compiled.compiled.target_build
    stem = next(s for s in compiled.compiled.plan.steps if s.kind == "fused")
    assert stem.params["loads"] > 16 and not stem.params["reduction"]
    assert build.results and not build.issues, [str(i) for i in build.issues]
    assert all(r.spills == 0 for r in build.results)


def test_pooling_kernels_fit_without_spills():
    """The unrolled max / average pooling windows (up to 9 taps, dilated, ceil_mode) in fp16 on sm_80 / sm_90."""
    from tests.test_fused_ops import Pools

    compiled = braze.compile(Pools().eval(), targets=["sm_80", "sm_90"])
    compiled(torch.randn(2, 4, 9, 10, dtype=torch.float16), torch.randn(2, 4, 11, dtype=torch.float16))
    build = compiled.compiled.target_build
    assert build.results and not build.issues, [str(i) for i in build.issues]
    assert all(r.spills == 0 for r in build.results)


def test_cached_conv_kernels_fit_without_spills():
    """The conv-cache kernel of a short-conv hybrid (LFM2, fp16) on sm_80 / sm_86 / sm_90, in every form the
    generation plans launch (prefill, decode, the tree verify reading a [S, S] mask tile up to S = max_seq): no
    error, no spill, no float atomic."""
    from braze.compiler.targets import compile_specializations
    from tests.test_generate import _tiny_held_out

    model = _tiny_held_out("lfm2", layer_types=["conv", "full_attention"]).to(torch.float16)
    compiled = braze.compile(model, max_seq=64, max_batch=4)
    specs = [s for s in enumerate_specializations(compiled, ["sm_80", "sm_86", "sm_90"],
                                                  plans=["prefill", "decode", "verify"])
             if s.family == "cached_conv"]
    assert {u.split()[0] for s in specs for u in s.uses} == {"prefill", "decode", "verify"}
    results = compile_specializations(specs)
    assert len(results) == len(specs) >= 9
    assert all(r.error is None and r.spills == 0 and r.float_atomics == 0 for r in results), \
        [(r.spec.target, r.spec.uses, r.error, r.spills) for r in results]


def test_gated_delta_kernels_fit_without_spills():
    """The gated-delta kernel at Qwen3.5's head dims (128 x 128: a [128, 32] fp32 state slice per program) and
    Mamba2's SSD form (state 128 x head dim 64, no delta rule) and Mamba's selective scan (state 16 x 1536
    channels, a decay per state entry) in bf16 on sm_80 / sm_90, in every form the plans
    launch (forward, prefill, decode over the state cache): no error, no spill (ptxas: 31-156 registers), no float
    atomic (each program owns its state slice)."""
    from braze.compiler.targets import compile_specializations
    from tests.test_gated_deltanet import _tiny, _tiny_ssd

    model = _tiny("qwen3_5_text", linear_key_head_dim=128, linear_value_head_dim=128).to(torch.bfloat16)
    compiled = braze.compile(model, max_seq=64, max_batch=4)
    specs = [s for s in enumerate_specializations(compiled, ["sm_80", "sm_90"], plans=["forward", "prefill", "decode"])
             if s.family == "gated_delta"]
    # Mamba2's SSD at its dims (state 128 x head_dim 64), the kernel without the delta rule
    ssd = _tiny_ssd("mamba2", num_heads=2, head_dim=64, state_size=128, n_groups=1).to(torch.bfloat16)
    compiled = braze.compile(ssd, max_seq=64, max_batch=4)
    specs += [s for s in enumerate_specializations(compiled, ["sm_80", "sm_90"], plans=["forward", "decode"])
              if s.family == "gated_delta"]
    # Mamba's selective scan at Mamba-130m's dims (state 16, 1536 channels as the value dim, A per state entry)
    mamba = _tiny_ssd("mamba", state_size=16, intermediate_size=1536).to(torch.bfloat16)
    compiled = braze.compile(mamba, max_seq=64, max_batch=4)
    specs += [s for s in enumerate_specializations(compiled, ["sm_80", "sm_90"], plans=["decode"])
              if s.family == "gated_delta"]
    assert {u.split()[0] for s in specs for u in s.uses} == {"forward", "prefill", "decode"}
    results = compile_specializations(specs)
    assert len(results) == len(specs) >= 12
    assert all(r.error is None and r.spills == 0 and r.float_atomics == 0 for r in results), \
        [(r.spec.target, r.spec.uses, r.error, r.spills) for r in results]
