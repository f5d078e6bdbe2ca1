"""The compile cache: a compiled causal LM kept as a kernel package under the user cache directory.

`braze.compile(model, **options)` looks the model up before capturing it. The key is a sha256 over everything the
compile depends on:

* the cache format, braze's version and a digest of its sources (compiler, kernels, templates, data), and the
  torch / triton / transformers versions;
* the model: its class, `config.to_dict()`, generation config, and every parameter and buffer (name, dtype,
  shape, strides and a sha256 of its bytes);
* the compile options (`CompileConfig`; calibration statistics passed in are digested by content) and the target
  device (type; GPU name and compute capability);
* for `quant="int6"` with calibration collected on the shipped text, the tokenizer files next to the model.

An entry is a package (braze/runtime/package.py) at `<cache dir>/compiled/<key>/`, written atomically by
`save_package`; a hit is read back with `load_package`, which checks every file's sha256 before any kernel is
imported. An entry that fails to load (corrupt, truncated, from another package format, for another key) is
deleted and compiled again: nothing in it is trusted. The cache directory is `$BRAZE_CACHE_DIR`, else
`$XDG_CACHE_HOME/braze`, else `~/.cache/braze`; `BRAZE_CACHE=0` turns the cache off. The report's `cache` line
says what happened.

The entries are capped at `BRAZE_CACHE_MAX_GB` (a positive number of gigabytes, 10**9 bytes; default 10; anything
else is a ConfigError): after each store the least recently used entries (last used = the mtime of their
manifest.json, which a hit refreshes) are deleted until the rest fit, never the entry just stored. `braze cache`
lists the entries and `braze cache --clear` deletes them.

Not cached: the reference executor (it runs the rewritten FX graphs, which packages do not hold), modules other
than HF causal LMs (compiled from call arguments, the dynamo backend), GPU cross-compilation targets, and options
whose values cannot be digested.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

import braze
from braze.compiler.config import CompileConfig
from braze.compiler.report import CompileReport, PassResult
from braze.runtime.compiled import CompiledModel
from braze.runtime.errors import ConfigError, first_line
from braze.runtime.package import MANIFEST, REPORT, load_package, save_package

CACHE_FORMAT = 1
ENTRIES = "compiled"
SOURCE_SUFFIXES = (".py", ".j2", ".txt", ".json")
MAX_GB_VAR = "BRAZE_CACHE_MAX_GB"
DEFAULT_MAX_GB = 10.0
GB = 10**9
STALE_SECONDS = 24 * 3600  # a save_package temp dir this old belongs to a writer that was killed
_source_digest: str | None = None


def env_switch(name: str) -> bool:
    """An on-by-default switch: `name` set to 0/false/no/off (or empty) turns it off."""
    return os.environ.get(name, "1").strip().lower() not in ("0", "false", "no", "off", "")


def enabled() -> bool:
    return env_switch("BRAZE_CACHE")


def cache_dir() -> Path:
    """`$BRAZE_CACHE_DIR`, else `$XDG_CACHE_HOME/braze`, else `~/.cache/braze`."""
    explicit = os.environ.get("BRAZE_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "braze"


def entries_dir() -> Path:
    return cache_dir() / ENTRIES


def entry_path(key: str) -> Path:
    return entries_dir() / key


def max_gb() -> float:
    """`$BRAZE_CACHE_MAX_GB` (default 10): read on every use so a changed setting applies at once; a value that
    is not a positive finite number is a ConfigError rather than a silently unbounded or empty cache."""
    text = os.environ.get(MAX_GB_VAR, "").strip()
    if not text:
        return DEFAULT_MAX_GB
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value < float("inf")):
        raise ConfigError(f"{MAX_GB_VAR}={text!r} is not valid: expected a positive number of gigabytes (the "
                          f"compile cache's size cap; default {DEFAULT_MAX_GB:g})")
    return value


# ---- the key ---------------------------------------------------------------------------------------------
def braze_source_digest() -> str:
    """sha256 over braze's own files (so a changed compiler never serves an old entry); computed once."""
    global _source_digest
    if _source_digest is None:
        root = Path(braze.__file__).resolve().parent
        h = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()):
            h.update(path.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(path.read_bytes()).digest())
        _source_digest = h.hexdigest()
    return _source_digest


def _versions() -> dict[str, str]:
    import triton

    out = {"braze": getattr(braze, "__version__", "unknown"), "braze_sources": braze_source_digest(),
           "torch": torch.__version__, "triton": triton.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - causal LMs come from transformers
        pass
    return out


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def _tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """name -> 'dtype shape stride offset sha256' (identical views hashed once; threads share the hashing)."""
    firsts: dict[tuple, str] = {}
    todo: dict[str, torch.Tensor] = {}
    meta: dict[str, tuple] = {}
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise _Uncacheable(f"{name} is on the meta device")
        ident = (t.untyped_storage().data_ptr(), t.dtype, tuple(t.shape), t.stride(), t.storage_offset()) \
            if t.numel() else (name,)
        meta[name] = ident
        if ident not in firsts:
            firsts[ident] = name
            todo[name] = t

    def digest(item: tuple[str, torch.Tensor]) -> tuple[str, str]:
        name, t = item
        return name, hashlib.sha256(_tensor_bytes(t)).hexdigest()

    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        sha = dict(pool.map(digest, sorted(todo.items(), key=lambda kv: -kv[1].nbytes)))
    out = {}
    for name, t in tensors.items():
        out[name] = f"{t.dtype} {list(t.shape)} {list(t.stride())} {sha[firsts[meta[name]]]}"
    return out


class _Uncacheable(Exception):
    """This compile cannot be keyed (the message says why); it runs uncached."""


def _digest_value(value: Any) -> Any:
    """A JSON-able stand-in for an option value (tensors and tensor containers by content)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return {"tensor": _tensor_digests({"t": value})["t"]}
    if isinstance(value, (list, tuple)):
        return [_digest_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _digest_value(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__qualname__,
                **{f.name: _digest_value(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    raise _Uncacheable(f"option value of type {type(value).__name__} cannot be digested")


def _options(config: CompileConfig) -> dict[str, Any]:
    return {f.name: _digest_value(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type}
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        info["name"] = torch.cuda.get_device_name(idx)
        info["capability"] = list(torch.cuda.get_device_capability(idx))
    return info


def _calibration_inputs(model: torch.nn.Module, config: CompileConfig) -> Any:
    """What automatic int6 calibration reads besides the weights: the tokenizer files next to the model."""
    wanted = config.int6_method != "rtn" or config.int6_act in ("a6", "mixed")
    if config.quant != "int6" or config.int6_calibration is not None or not wanted:
        return None
    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not path or not Path(path).is_dir():
        return {"path": str(path), "files": None}
    files = {}
    for f in sorted(Path(path).iterdir()):
        if not f.is_file():
            continue
        st = f.stat()
        if f.suffix in (".safetensors", ".bin", ".pt", ".pth", ".gguf") or st.st_size > 64 << 20:
            files[f.name] = [st.st_size, st.st_mtime_ns]  # weights (digested above) or too big to read each time
        else:
            files[f.name] = hashlib.sha256(f.read_bytes()).hexdigest()
    return {"path": str(Path(path).resolve()), "files": files}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def compile_key(model: torch.nn.Module, config: CompileConfig, device: torch.device) -> tuple[str | None, str]:
    """(key, why): the cache key of compiling `model` with `config`, or (None, the reason it is not cached)."""
    if not enabled():
        return None, "off (BRAZE_CACHE=0)"
    max_gb()  # a bad cap fails before the compile, not after it
    if config.executor == "reference":
        return None, "off (the reference executor runs FX graphs, which cache entries do not hold)"
    if getattr(config, "targets", None):
        return None, "off (GPU cross-compilation targets are not cached)"
    if getattr(config, "tp", 1) > 1:
        return None, "off (tensor parallel: each rank compiles its own shard)"
    try:
        tensors = dict(model.named_parameters(remove_duplicate=False))
        tensors.update(dict(model.named_buffers(remove_duplicate=False)))
        gen_cfg = getattr(model, "generation_config", None)
        cfg = getattr(model, "config", None)
        doc = {
            "format": CACHE_FORMAT,
            "versions": _versions(),
            "model": f"{type(model).__module__}.{type(model).__qualname__}",
            "config": _jsonable(cfg.to_dict() if hasattr(cfg, "to_dict") else vars(cfg)),
            "generation_config": _jsonable(gen_cfg.to_dict()) if hasattr(gen_cfg, "to_dict") else None,
            "training": model.training,
            "tensors": _tensor_digests(tensors),
            "options": _options(config),
            "device": _device_info(device),
            "calibration_inputs": _calibration_inputs(model, config),
        }
    except _Uncacheable as e:
        return None, f"off ({e})"
    text = json.dumps(doc, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest(), ""


# ---- hits and stores -------------------------------------------------------------------------------------
def _report_from(entry: Path, executor: str) -> CompileReport:
    try:
        raw = json.loads((entry / REPORT).read_text())
        report = CompileReport(model=raw["model"], executor=executor)
        report.passes = [PassResult(**p) for p in raw.get("passes", [])]
        report.kernels = [(k[0], k[1], list(k[2])) for k in raw.get("kernels", [])]
        report.fallbacks = [(f[0], f[1]) for f in raw.get("fallbacks", [])]
        for name in ("launches", "planned_peak_bytes", "eager_peak_bytes", "no_reuse_bytes", "compile_seconds"):
            setattr(report, name, raw.get(name, getattr(report, name)))
        report.extra = {str(k): str(v) for k, v in raw.get("extra", {}).items() if k != "cache"}
        return report
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return CompileReport(model="(from the compile cache)", executor=executor)


def load(key: str, model: torch.nn.Module, config: CompileConfig, executor: str) -> tuple[CompiledModel | None, str]:
    """The cached compile for `key` as a CompiledModel, or (None, what happened: no entry, or it was corrupt and
    has been removed)."""
    entry = entry_path(key)
    if not (entry / MANIFEST).is_file():
        return None, "miss"
    start = time.perf_counter()
    try:
        compiled = load_package(entry, executor=executor)
        if (compiled.manifest.get("metadata") or {}).get("cache_key") != key:
            raise ValueError("the entry was stored under another key")
    except Exception as e:  # a bad entry is never trusted: drop it and compile again
        remove_entry(entry)
        first = first_line(e)
        return None, f"miss (the cached entry was unusable and has been rebuilt: {first})"
    touch(entry)
    compiled.config = config
    compiled.model_config = getattr(model, "config", compiled.model_config)
    if getattr(compiled, "generator", None) is not None:
        compiled.generator.speculate_default = config.speculate == "suffix"
    report = _report_from(entry, executor)
    seconds = time.perf_counter() - start
    report.extra["cache"] = (f"hit: loaded {entry} in {seconds:.2f} s (the original compile took "
                             f"{report.compile_seconds:.1f} s)")
    report.compile_seconds = seconds
    compiled.report = report
    compiled.cache_entry = entry
    return compiled, "hit"


def store(key: str, compiled: CompiledModel, why: str) -> str:
    """Write `compiled` as the entry for `key`; returns the report's cache line (a failure only says so)."""
    entry = entry_path(key)
    start = time.perf_counter()
    try:
        save_package(compiled, entry, metadata={"cache_key": key})
    except Exception as e:  # the compile itself succeeded; a cache that cannot be written is only a slower next time
        first = first_line(e)
        return f"{why}; not stored ({type(e).__name__}: {first})"
    compiled.cache_entry = entry
    line = f"{why}; stored as {entry} in {time.perf_counter() - start:.2f} s"
    try:
        return line + _eviction_note(entry, max_gb())
    except Exception as e:  # e.g. the cap was changed to a bad value mid-compile: the entry is stored all the same
        first = first_line(e)
        return f"{line}; nothing evicted ({type(e).__name__}: {first})"


# ---- size cap and least-recently-used eviction -----------------------------------------------------------
@dataclasses.dataclass
class Entry:
    """One stored compile: `last_used` is its manifest's mtime (set when written, refreshed by every hit)."""

    path: Path
    size: int
    last_used: float

    @property
    def key(self) -> str:
        return self.path.name


def format_gb(n: float) -> str:
    """Bytes in the unit of BRAZE_CACHE_MAX_GB (decimal GB), with MB / kB for small entries."""
    for unit, scale in (("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def entries_word(n: int) -> str:
    return "entry" if n == 1 else "entries"


def touch(entry: Path) -> None:
    """Mark `entry` used now (its manifest's mtime): a read-only cache still serves hits, so errors are ignored."""
    try:
        os.utime(entry / MANIFEST)
    except OSError:
        pass


def _tree_size(path: Path) -> int:
    """Bytes of the files under `path` (symlinks not followed); files that vanish meanwhile count as 0."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def list_entries(root: Path | None = None) -> list[Entry]:
    """The complete entries under `root` (default: the cache's `compiled/`), least recently used first.

    save_package writes into `.<key>.tmp-*` and renames it into place, so a name starting with '.' is a write or a
    removal in progress: never counted. An entry that vanishes while it is read (another process evicted it) is
    skipped."""
    root = entries_dir() if root is None else root
    try:
        children = list(root.iterdir())
    except OSError:  # no cache yet (or `compiled` is not a directory)
        return []
    out = []
    for path in children:
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            last_used = (path / MANIFEST).stat().st_mtime
        except OSError:
            continue
        out.append(Entry(path, _tree_size(path), last_used))
    return sorted(out, key=lambda e: (e.last_used, e.key))


def remove_entry(entry: Path) -> bool:
    """Delete `entry`; False if it was already gone. It is renamed to a dot-name first so that no process ever
    loads a half-deleted entry (the rename is atomic; the slow delete happens out of sight)."""
    trash = entry.parent / f".{entry.name}.evict-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(entry, trash)
    except OSError:
        return False
    shutil.rmtree(trash, ignore_errors=True)
    return True


def remove_stale_leftovers(root: Path | None = None) -> None:
    """Delete dot-dirs (temp dirs of save_package or of a removal) untouched for a day: their process was killed.
    Younger ones may belong to a writer still at work and are left alone."""
    root = entries_dir() if root is None else root
    try:
        children = list(root.iterdir())
    except OSError:
        return
    now = time.time()
    for path in children:
        try:
            stale = path.name.startswith(".") and path.is_dir() and now - path.stat().st_mtime > STALE_SECONDS
        except OSError:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)


def evict(keep: Path, cap_bytes: float) -> tuple[list[Entry], int]:
    """Delete least recently used entries, never `keep`, until the entries total at most `cap_bytes`; returns
    (the entries deleted, the bytes the remaining entries hold)."""
    remove_stale_leftovers(keep.parent)
    entries = list_entries(keep.parent)
    total = sum(e.size for e in entries)
    evicted = []
    for e in entries:
        if total <= cap_bytes:
            break
        if e.path == keep:
            continue
        if remove_entry(e.path):
            evicted.append(e)
        total -= e.size  # gone either way: this process removed it or another one did
    return evicted, total


def _eviction_note(entry: Path, cap_gb: float) -> str:
    """The part of the report's cache line that says what the size cap did ('' when nothing)."""
    evicted, total = evict(entry, cap_gb * GB)
    note = ""
    if evicted:
        freed = sum(e.size for e in evicted)
        note = (f"; evicted {len(evicted)} older {entries_word(len(evicted))} ({format_gb(freed)}) "
                f"to stay under {MAX_GB_VAR}={cap_gb:g}")
    if total > cap_gb * GB:
        note += (f"; the cache holds {format_gb(total)}, over {MAX_GB_VAR}={cap_gb:g}, because the entry just "
                 f"stored is never evicted")
    return note
