"""Kernel packages: a compiled model saved as a directory that runs with torch + triton and the braze runtime.

Layout of a package directory::

    manifest.json           format version, versions, target, compile options, symbolic dim ranges, model config,
                            and the sha256 of every other file
    plans/<name>.json       one Plan per entry point (forward, and e.g. prefill/decode/verify); the plan's
                            `kernels` field maps each kernel name to its file under kernels/
    kernels/<name>.py       the generated Triton sources, readable as written by codegen
    weights.safetensors     every weight (safetensors, never pickle); identical tensors are stored once
    report.json             the compile report as plain data (for `braze inspect`)
    targets/<sm_XX>/        optional (braze.compile(..., targets=[...])): cross-compiled cubins of every kernel
                            specialization the plans launch on that GPU target, and index.json (per cubin: kernel,
                            family, signature, constexprs, warps, stages, registers, spills, shared memory, MMA
                            kind, sha256); the manifest's `gpu_targets` names them with the triton version
    tokenizer/              optional: tokenizer.save_pretrained(...)

Loading verifies the manifest's format version and every file's hash before any kernel source is imported, and
imports nothing from braze.compiler, braze.passes or braze.codegen. The hashes detect corruption and accidental
edits; they are not a signature (whoever can write the files can rewrite the manifest too).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from braze.runtime.compiled import CompiledModel
from braze.runtime.errors import ConfigError, DigestMismatchError, PackageError
from braze.runtime.expr import Expr, ExprError
from braze.runtime.plan import Plan

FORMAT_VERSION = 3  # 2: plans launch through the kernel-family registry (launch counts and params recorded)
# 3: the deterministic verify plan's attention is the decode kernel's tree form (read on device)
OLDEST_FORMAT = 2  # older packages were launched by per-kind launchers that no longer exist: recompile them
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
# safetensors packs tensors back to back after a header padded to 8 bytes, so a CPU load (mmap) puts a weight at
# whatever offset the file gives it. Triton specializes a pointer on 16-byte divisibility: a cache hit's weights
# 24 B off alignment launched (and cross-compiled) other kernels than the compile that stored them.
WEIGHT_ALIGN = 16
REPORT = "report.json"
TOKENIZER_DIR = "tokenizer"
TARGETS_DIR = "targets"
PRIMARY_PLAN = "forward"
EXECUTORS = ("auto", "cuda", "interpret")


# ---- helpers ---------------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):  # Python >= 3.11
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
        return h.hexdigest()


def _versions() -> dict[str, str]:
    import triton

    import braze

    return {"braze": getattr(braze, "__version__", "unknown"), "torch": torch.__version__,
            "triton": triton.__version__}


def _jsonable(value: Any) -> Any:
    """`value` if json can write it, else None."""
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return None


def _compile_options(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if dataclasses.is_dataclass(config):
        items = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    else:
        items = dict(vars(config))
    return {k: v for k, v in items.items() if _jsonable(v) is not None or v is None}


def _model_config_dict(model_config: Any) -> dict[str, Any] | None:
    if model_config is None:
        return None
    if hasattr(model_config, "to_dict"):
        raw = model_config.to_dict()
    elif isinstance(model_config, dict):
        raw = dict(model_config)
    else:
        raw = dict(vars(model_config))
    return json.loads(json.dumps(raw, default=str))


def _dump_spec(spec: Any) -> str | None:
    if spec is None:
        return None
    try:
        from torch.utils import _pytree as pytree

        return pytree.treespec_dumps(spec)
    except Exception:
        return None


# modules whose import registers the output types they define with pytree (HF's ModelOutput subclasses): the only
# modules a package's output structure may make the loader import (a manifest names them; nothing else is imported)
_OUTPUT_TYPE_MODULES = ("transformers.",)


def _load_spec(text: str | None) -> Any:
    """A saved pytree structure. An output type registered when its module is imported (an HF encoder's
    BaseModelOutput...) is unknown to a fresh process: its module is imported, if it is one of
    _OUTPUT_TYPE_MODULES, and the structure read again."""
    if text is None:
        return None
    import importlib

    from torch.utils import _pytree as pytree

    imported: set[str] = set()
    while True:
        try:
            return pytree.treespec_loads(text)
        except Exception as e:
            found = re.search(r"Deserializing (\S+) in pytree is not registered", str(e))
            module = found.group(1).rsplit(".", 1)[0] if found else ""
            if not module.startswith(_OUTPUT_TYPE_MODULES) or module in imported:
                raise
            imported.add(module)
            importlib.import_module(module)


def _all_plans(compiled: Any) -> dict[str, Plan]:
    """The forward plan plus any further entry points (`plans` / `extra_plans` dict attributes)."""
    plans: dict[str, Plan] = {PRIMARY_PLAN: compiled.plan}
    for attr in ("plans", "extra_plans"):
        more = getattr(compiled, attr, None)
        if isinstance(more, dict):
            for name, plan in more.items():
                if isinstance(plan, Plan) and plan is not compiled.plan:
                    plans.setdefault(str(name), plan)
    return plans


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and a.dtype == b.dtype
            and a.shape == b.shape and a.stride() == b.stride() and a.storage_offset() == b.storage_offset())


def _weights_for_file(weights: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Contiguous CPU tensors with no shared storage, plus aliases (name -> stored name) for identical tensors."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[int, list[tuple[str, torch.Tensor]]] = {}
    for name, t in weights.items():
        if not isinstance(t, torch.Tensor):
            raise PackageError(f"weight {name!r} is a {type(t).__name__}, not a tensor; packages store tensors only")
        ptr = t.untyped_storage().data_ptr() if t.numel() else -1
        twin = next((n for n, o in seen.get(ptr, []) if _same_view(o, t)), None) if ptr != -1 else None
        if twin is not None:
            aliases[name] = twin
            continue
        shared = ptr != -1 and ptr in seen
        seen.setdefault(ptr, []).append((name, t))
        t = t.detach().to("cpu")
        # safetensors refuses tensors that share memory: a partial overlap gets its own copy
        t = t.clone() if shared or not t.is_contiguous() or t.untyped_storage().nbytes() != t.nbytes else t
        out[name] = t.contiguous()
    return out, aliases


def _generation_info(compiled: Any, plans: dict[str, Plan]) -> dict[str, Any] | None:
    """What CompiledModel.attach_generation needs besides the plans (None: no generation attached)."""
    gen = getattr(compiled, "generator", None)
    kv = getattr(compiled, "kv_inputs", None)
    if gen is None or kv is None or not {"prefill", "decode"} <= set(plans):
        return None
    info = {"prefill": "prefill", "decode": "decode", "kv_inputs": [list(x) for x in kv],
            "max_seq": getattr(gen, "max_seq", None), "max_batch": getattr(gen, "max_batch", None),
            "eos_token_id": getattr(gen, "default_eos", None), "pad_token_id": getattr(gen, "default_pad", None)}
    if getattr(gen, "compression", None) is not None:  # kv_compression: the prefill plan holds the selection
        info["compression"] = dataclasses.asdict(gen.compression)
    return json.loads(json.dumps(info, default=str))


def _report_dict(report: Any) -> dict[str, Any] | None:
    if report is None:
        return None
    try:
        raw = dataclasses.asdict(report) if dataclasses.is_dataclass(report) else dict(vars(report))
        return json.loads(json.dumps(raw, default=str))
    except Exception:
        return None


# ---- save ------------------------------------------------------------------------------------------------
def save_package(compiled: Any, path: str | os.PathLike, tokenizer: Any = None,
                 metadata: dict[str, Any] | None = None) -> Path:
    """Write `compiled` (a CompiledModel) as a package directory at `path`; returns the path.

    `metadata` (JSON-able) is stored in the manifest as-is (the CLI records the model it compiled from).
    An existing package at `path` is replaced; any other non-empty directory is left alone (PackageError).
    """
    from safetensors.torch import save_file

    compiled = getattr(compiled, "compiled", None) or compiled  # a LazyCompiled that has compiled
    refusal = getattr(compiled, "package_refusal", None)  # a model compiled without one whole plan
    if refusal:
        raise PackageError(refusal)
    if not hasattr(compiled, "plan") or compiled.plan is None:
        raise PackageError("nothing to save: the model has not been compiled yet (call it once first)")
    dest = Path(path)
    if dest.exists() and not dest.is_dir():
        raise PackageError(f"{dest} exists and is not a directory")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / MANIFEST).exists():
        raise PackageError(f"{dest} is a non-empty directory that is not a braze package; refusing to overwrite it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = _write_contents(compiled, tmp, tokenizer, metadata, save_file)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if dest.exists():
            trash = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(dest, trash)
            os.replace(tmp, dest)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


CompiledModel.package_writer = save_package  # CompiledModel.save (compiled.py does not import this module)


def _write_contents(compiled: Any, root: Path, tokenizer: Any, metadata: dict | None, save_file: Any) -> dict:
    plans = _all_plans(compiled)
    (root / "kernels").mkdir()
    (root / "plans").mkdir()
    kernel_files: dict[str, str] = {}  # file name -> source
    plan_files: dict[str, str] = {}
    for pname, plan in plans.items():
        files: dict[str, str] = {}
        for kname, source in plan.kernels.items():
            fname = f"{kname}.py"
            if kernel_files.get(fname, source) != source:  # same name, different source in another plan
                fname = f"{pname}.{kname}.py"
            kernel_files[fname] = source
            files[kname] = f"kernels/{fname}"
        stored = dataclasses.replace(plan, kernels=files, out_spec=None)
        rel = f"plans/{pname}.json"
        (root / rel).write_text(stored.to_json())
        plan_files[pname] = rel
    for fname, source in kernel_files.items():
        (root / "kernels" / fname).write_text(source)

    state = getattr(compiled, "state", {})
    tensors, aliases = _weights_for_file({**compiled.weights, **state})  # state: its value at save time
    save_file(tensors, str(root / WEIGHTS), metadata={"format": "pt", "braze_aliases": json.dumps(aliases)})
    # safetensors writes 0600; give the weights the mode our other files got from the umask
    os.chmod(root / WEIGHTS, (root / plan_files[PRIMARY_PLAN]).stat().st_mode & 0o666)
    report = _report_dict(compiled.report)
    if report is not None:
        (root / REPORT).write_text(json.dumps(report, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(root / TOKENIZER_DIR))
    gpu_targets = _write_gpu_targets(compiled, root)

    device = torch.device(compiled.device)
    target: dict[str, Any] = {"device": device.type, "executor": compiled.executor_name}
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        target["device_name"] = torch.cuda.get_device_name(idx)
        target["capability"] = list(torch.cuda.get_device_capability(idx))
    files = {str(p.relative_to(root).as_posix()): _sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}
    return {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "target": target,
        "compile_options": _compile_options(compiled.config),
        "symbols": {n: [dataclasses.asdict(s) for s in p.symbols] for n, p in plans.items()},
        "causal_lm": bool(compiled.causal_lm),
        "model": getattr(compiled.report, "model", None) or compiled.plan.name,
        "model_config": _model_config_dict(compiled.model_config),
        "plans": plan_files,
        "primary_plan": PRIMARY_PLAN,
        "out_spec": _dump_spec(compiled.out_spec),
        "in_spec": _dump_spec(compiled.in_spec),
        # the non-tensor arguments the plan was captured with (runtime/call_signature.py); null: not checked
        "call_signature": [list(x) for x in sig] if (sig := getattr(compiled, "call_signature", None)) else None,
        "weights": {"file": WEIGHTS, "tensors": len(tensors), "aliases": aliases,
                    "bytes": sum(t.nbytes for t in tensors.values())},
        "tokenizer": TOKENIZER_DIR if tokenizer is not None else None,
        "generation": _generation_info(compiled, plans),
        "generation_missing": getattr(compiled, "generation_missing", None),
        "recompute": json.loads(json.dumps(getattr(compiled, "recompute", None), default=str)),
        "state": {"buffers": sorted(state), "mutations": [list(m) for m in getattr(compiled, "mutations", [])]},
        "metadata": _jsonable(metadata) if metadata else {},
        **({"gpu_targets": gpu_targets} if gpu_targets else {}),
        "files": files,
    }


def _write_gpu_targets(compiled: Any, root: Path) -> dict[str, Any]:
    """targets/<sm_XX>/: the cubins and index of a cross-compiled model (compiled.target_build, made by
    braze.compiler.targets.build_targets); returns the manifest's `gpu_targets` entry ({} when there are none)."""
    build = getattr(compiled, "target_build", None)
    if build is None:
        return {}
    out: dict[str, Any] = {}
    for target, data in build.package_entries().items():
        tdir = root / TARGETS_DIR / target
        tdir.mkdir(parents=True)
        entries = []
        for entry in data["kernels"]:
            entry = dict(entry)
            blob = Path(entry.pop("cubin_file")).read_bytes()
            if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
                raise PackageError(f"cross-compiled cubin of {entry['kernel']} ({target}) changed in the cache since "
                                   f"it was built; compile again")
            rel = f"{TARGETS_DIR}/{target}/{entry['kernel']}.{entry['key'][:16]}.cubin"
            (root / rel).write_bytes(blob)
            entries.append({**entry, "cubin": rel})
        index = {**{k: v for k, v in data.items() if k != "kernels"}, "kernels": entries}
        rel = f"{TARGETS_DIR}/{target}/index.json"
        (root / rel).write_text(json.dumps(index, indent=1))
        out[target] = {"capability": data["capability"], "triton": data["triton"], "index": rel,
                       "kernels": len(entries), "issues": len(data.get("issues", []))}
    return out


def check_gpu_targets(root: Path, manifest: dict[str, Any], device: torch.device | None = None) -> list[str]:
    """Check a package's cross-compiled targets (after verify_package checked every file's sha256): known target
    names, index and cubins covered by the manifest's hashes and matching the index, the triton version. Returns
    one-line notes (triton version differs; no cubins for the GPU in use); a package that fails a check raises
    PackageError. Cubins are verified, not executed: on a GPU the runtime JIT-compiles the same sources."""
    from importlib.metadata import PackageNotFoundError, version

    from braze.kernels.device import TARGETS

    try:  # not `import triton`: it must not be imported before TRITON_INTERPRET is settled
        triton_version = version("triton")
    except PackageNotFoundError:
        triton_version = "unknown"
    targets = manifest.get("gpu_targets") or {}
    if not isinstance(targets, dict):
        raise PackageError(f"{root / MANIFEST}: gpu_targets must map target names to their index")
    notes: list[str] = []
    for name, info in targets.items():
        if name not in TARGETS:
            raise PackageError(f"{root / MANIFEST}: unknown GPU target {name!r} (this braze knows "
                               f"{', '.join(TARGETS)})")
        rel = info.get("index") if isinstance(info, dict) else None
        if rel not in manifest["files"]:
            raise PackageError(f"{root / MANIFEST}: the {name} kernel index is not covered by a hash")
        try:
            index = json.loads((root / rel).read_text())
        except (OSError, ValueError) as e:
            raise PackageError(f"{root / rel}: unreadable target index ({e})") from None
        if index.get("target") != name or index.get("capability") != TARGETS[name].capability:
            raise PackageError(f"{root / rel}: index is for {index.get('target')!r} "
                               f"(capability {index.get('capability')}), not {name}")
        for entry in index.get("kernels", []):
            cubin = entry.get("cubin")
            if cubin not in manifest["files"]:
                raise PackageError(f"{root / rel}: cubin {cubin!r} is not covered by a hash")
            if manifest["files"][cubin] != entry.get("sha256"):
                raise PackageError(f"{root / cubin}: sha256 differs from its {name} index entry (package tampered)")
        if index.get("triton") != triton_version:
            notes.append(f"{name} cubins were built with triton {index.get('triton')}, this is triton "
                         f"{triton_version}: kernels JIT-compile from source")
    if targets and device is not None and device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        here = f"sm_{major}{minor}"
        if here not in targets:
            notes.append(f"package has cubins for {', '.join(targets)}, not for this GPU ({here}): kernels "
                         f"JIT-compile from source")
    return notes


# ---- load ------------------------------------------------------------------------------------------------
def pinned_digest(sha256: str) -> str:
    """A digest as users write it ('HEX' or 'sha256:HEX', any case) as 64 lowercase hex digits; else ConfigError."""
    text = sha256.strip().lower().removeprefix("sha256:") if isinstance(sha256, str) else None
    if text is None or len(text) != 64 or any(c not in "0123456789abcdef" for c in text):
        raise ConfigError(f"sha256 must be 64 hex digits (optionally prefixed 'sha256:'), got {sha256!r}")
    return text


def manifest_digest(path: str | os.PathLike) -> str:
    """The package's digest: the sha256 of its manifest.json, which holds the sha256 of every other file, so
    pinning it (`braze.load(path, sha256=...)`, `braze run --sha256`) pins the whole package."""
    root = Path(path)
    try:
        return hashlib.sha256((root / MANIFEST).read_bytes()).hexdigest()
    except OSError as e:
        raise PackageError(f"no braze package at {root} ({MANIFEST} unreadable: {e.strerror or e})") from None


def read_manifest(path: str | os.PathLike, sha256: str | None = None) -> dict[str, Any]:
    """The package's manifest, with the format version checked (no hashes verified).

    sha256: the expected manifest digest (see `manifest_digest`), checked on the bytes read before they are parsed.
    """
    root = Path(path)
    want = pinned_digest(sha256) if sha256 is not None else None
    if not (root / MANIFEST).is_file():
        if not root.exists():
            raise PackageError(f"no braze package at {root} (the path does not exist)")
        raise PackageError(f"no braze package at {root} (no {MANIFEST})")
    try:
        raw = (root / MANIFEST).read_bytes()
        if want is not None and hashlib.sha256(raw).hexdigest() != want:
            raise DigestMismatchError(f"{root}: manifest sha256 is {hashlib.sha256(raw).hexdigest()}, not the pinned "
                                      f"{want}; refusing to load a package other than the one pinned")
        manifest = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PackageError(f"{root / MANIFEST}: unreadable manifest ({e})") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int):
        raise PackageError(f"{root / MANIFEST}: no integer format_version; not a braze package manifest")
    if version > FORMAT_VERSION:
        raise PackageError(f"{root}: package format {version} is newer than this braze (supports "
                           f"{FORMAT_VERSION}); upgrade braze")
    if version < 1:
        raise PackageError(f"{root}: package format {version} is not a valid version")
    if version < OLDEST_FORMAT:
        raise PackageError(f"{root}: package format {version} is older than this braze supports ({OLDEST_FORMAT}); "
                           "recompile it with `braze compile`")
    for key in ("files", "plans", "target", "weights"):
        if key not in manifest:
            raise PackageError(f"{root / MANIFEST}: missing field {key!r}")
    return manifest


def verify_package(path: str | os.PathLike, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every file listed in the manifest against its sha256; returns the manifest."""
    root = Path(path)
    manifest = manifest if manifest is not None else read_manifest(root)
    for rel, digest in manifest["files"].items():
        file = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise PackageError(f"{root / MANIFEST}: file entry {rel!r} points outside the package")
        if not file.is_file():
            raise PackageError(f"{file}: missing (package incomplete)")
        if _sha256(file) != digest:
            raise PackageError(f"{file}: sha256 mismatch (package corrupted or tampered)")
    needed = [manifest["weights"]["file"], *manifest["plans"].values()]
    for rel in needed:
        if rel not in manifest["files"]:
            raise PackageError(f"{root / MANIFEST}: {rel} is not covered by a hash")
    return manifest


def _choose(manifest: dict[str, Any], executor: str, root: Path) -> tuple[str, torch.device]:
    if executor not in EXECUTORS:
        if executor == "reference":
            raise PackageError("the reference executor runs the rewritten FX graph, which packages do not store; "
                               "load with executor='interpret' (CPU) or 'cuda'")
        raise PackageError(f"executor={executor!r} is not valid for a package; choose one of "
                           f"{', '.join(repr(e) for e in EXECUTORS)}")
    target = manifest["target"].get("device", "cpu")
    have_cuda = torch.cuda.is_available()
    if executor == "interpret":
        return "interpret", torch.device("cpu")
    if executor == "cuda":
        if not have_cuda:
            raise PackageError(f"{root}: executor='cuda' needs a CUDA GPU and none is available; "
                               f"pass executor='interpret' to run the kernels under the Triton interpreter on CPU")
        return "cuda", torch.device("cuda")
    if target == "cpu" and manifest.get("gpu_targets") and have_cuda:  # cross-compiled for GPUs on a CPU
        return "cuda", torch.device("cuda")
    if target == "cuda":
        if not have_cuda:
            raise PackageError(f"{root}: this package was compiled for a CUDA GPU and this machine has none; "
                               f"pass executor='interpret' (CLI: --executor interpret) to run it on CPU under the "
                               f"Triton interpreter")
        return "cuda", torch.device("cuda")
    return "interpret", torch.device("cpu")


def _load_weights(file: Path, device: torch.device, aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(file), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PackageError(f"{file}: not a readable safetensors file (truncated or corrupt: {msg})") from None
    for name, t in weights.items():
        if t.data_ptr() % WEIGHT_ALIGN:
            weights[name] = t.clone()  # a fresh allocation is aligned (see WEIGHT_ALIGN)
    for name, target in aliases.items():
        if target not in weights:
            raise PackageError(f"{file}: alias {name!r} -> {target!r} names a tensor that is not stored")
        weights[name] = weights[target]
    return weights


def _plan_name(plans: dict[str, Plan], plan: Plan) -> str:
    return next(n for n, p in plans.items() if p is plan)


class PackagedConfig(SimpleNamespace):
    """A model config read back from a package: attribute access to the saved `to_dict()` fields."""

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


def load_package(path: str | os.PathLike, executor: str = "auto", sha256: str | None = None) -> Any:
    """Load a package written by `save_package` as a CompiledModel (runtime only; no compiler imports).

    executor: "auto" (the package's target device: CUDA kernels on a GPU, the Triton interpreter for CPU
    packages), "cuda", or "interpret" (CPU, Triton interpreter; also runs a CUDA-compiled package on CPU).
    sha256: refuse the package unless its manifest digest (`manifest_digest`) is this, before reading anything else.
    """
    root = Path(path)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    manifest = read_manifest(root, sha256=sha256)
    executor_name, device = _choose(manifest, executor, root)
    verify_package(root, manifest)  # before any kernel source is imported
    target_notes = check_gpu_targets(root, manifest, device)
    timings["verify"] = time.perf_counter() - t0
    if executor_name == "interpret":
        os.environ["TRITON_INTERPRET"] = "1"  # must be set before the kernels are imported
    t1 = time.perf_counter()
    plans: dict[str, Plan] = {}
    for pname, rel in manifest["plans"].items():
        try:
            plan = Plan.from_json((root / rel).read_text())
        except (ValueError, KeyError, TypeError) as e:
            raise PackageError(f"{root / rel}: not a valid plan ({type(e).__name__}: {e})") from None
        try:  # plans are data: every expression must be the integer arithmetic the compiler prints
            for text in plan.expressions():
                Expr(text)
        except ExprError as e:
            raise PackageError(f"{root / rel}: {e}") from None
        if any(s.params.get("host_read") for s in plan.steps):
            raise PackageError(f"{root / rel}: a deterministic verify plan from package format "
                               f"{manifest['format_version']} (its attention kernels predate the on-device tree "
                               "form); rebuild the package")
        sources = {}
        for kname, krel in plan.kernels.items():
            if krel not in manifest["files"]:
                raise PackageError(f"{root / rel}: kernel file {krel} is not covered by a hash")
            sources[kname] = (root / krel).read_text()
        plan.kernels = sources
        plans[pname] = plan
    primary = manifest.get("primary_plan", PRIMARY_PLAN)
    if primary not in plans:
        raise PackageError(f"{root / MANIFEST}: no {primary!r} plan")
    timings["plans"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    weights = _load_weights(root / manifest["weights"]["file"], device, manifest["weights"].get("aliases", {}))
    timings["weights"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    options = manifest.get("compile_options") or {}
    config = SimpleNamespace(**options) if options else None
    mc = manifest.get("model_config")
    model_config = PackagedConfig(**mc) if isinstance(mc, dict) else None
    try:
        out_spec, in_spec = _load_spec(manifest.get("out_spec")), _load_spec(manifest.get("in_spec"))
    except Exception as e:
        raise PackageError(f"{root / MANIFEST}: unreadable output structure ({e})") from None
    extra = {n: p for n, p in plans.items() if n != primary}
    state = manifest.get("state") or {}  # buffers the forward writes: plan inputs, not weights
    state_buffers = {name: weights.pop(name) for name in state.get("buffers", ()) if name in weights}
    if len(state_buffers) != len(state.get("buffers", ())):
        raise PackageError(f"{root / MANIFEST}: state buffers missing from {manifest['weights']['file']}")
    compiled = CompiledModel(plans[primary], weights, device, executor_name, report=None, out_spec=out_spec,
                             in_spec=in_spec, causal_lm=bool(manifest.get("causal_lm")), graph_module=None,
                             config=config, model_config=model_config)
    compiled.generation_missing = manifest.get("generation_missing")
    if manifest.get("call_signature"):
        compiled.call_signature = tuple(tuple(x) for x in manifest["call_signature"])
    compiled.recompute = manifest.get("recompute")
    compiled.state, compiled.mutations = state_buffers, [tuple(m) for m in state.get("mutations", ())]
    gen = manifest.get("generation")
    if gen and hasattr(compiled, "attach_generation"):
        missing = [gen[k] for k in ("prefill", "decode") if gen[k] not in plans]
        if missing:
            raise PackageError(f"{root / MANIFEST}: generation plan(s) {', '.join(missing)} are not in the package")
        compiled.attach_generation(plans[gen["prefill"]], plans[gen["decode"]],
                                   [tuple(x) for x in gen["kv_inputs"]], gen["max_seq"], gen["max_batch"],
                                   gen.get("eos_token_id"), gen.get("pad_token_id"), verify=plans.get("verify"))
        if gen.get("compression"):
            from braze.runtime.kv_compression import CompressionSpec

            spec = dict(gen["compression"])
            spec["kv_inputs"] = [tuple(x) for x in spec["kv_inputs"]]
            spec["query_inputs"] = [tuple(x) for x in spec.get("query_inputs", [])]
            spec["heads"] = {int(k): int(v) for k, v in spec["heads"].items()}  # JSON keys are strings
            compiled.generator.compression = CompressionSpec(**spec)
        compiled.generator.speculate_default = options.get("speculate") == "suffix"  # as the compile set it
        compiled.generator.keyed_sampling = bool(options.get("deterministic"))
        compiled.generator.tp_world = int(options.get("tp") or 1)
    if extra:
        compiled.extra_plans = extra
    from braze.runtime.kernel_loader import load_kernel_module

    for plan in plans.values():  # import every (verified) kernel now: a broken source fails at load, not mid-run
        for kname, source in plan.kernels.items():
            try:
                load_kernel_module(source)
            except Exception as e:
                raise PackageError(f"{root / manifest['plans'][_plan_name(plans, plan)]}: kernel {kname} does not "
                                   f"import ({type(e).__name__}: {e})") from None
    compiled.target_notes = target_notes
    for note in target_notes:
        warnings.warn(note, stacklevel=2)
    compiled.manifest = manifest
    compiled.package_path = root
    compiled.tokenizer_path = root / manifest["tokenizer"] if manifest.get("tokenizer") else None
    timings["build"] = time.perf_counter() - t3
    compiled.load_timings = timings
    return compiled


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved in a package (transformers AutoTokenizer), or None if the package has none."""
    root = Path(path)
    manifest = read_manifest(root)
    if not manifest.get("tokenizer"):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(root / manifest["tokenizer"]))
