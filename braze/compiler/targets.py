"""Cross-compiling a compiled model's kernels for GPU targets on a machine that has no GPU.

Three steps, each usable alone:

1. **Enumerate** (`enumerate_specializations`): every plan of the model (forward, prefill, decode, verify) runs
   on the host with each target's DeviceSpec (`PlanExecutor(spec=...)`), at the corners of its compiled shape
   range (each dynamic dim at its lower and upper bound; `sizes="full"` adds an unaligned value in between). The
   kernels are not run: each launcher gets a stand-in for its Triton kernel that records what it was called with
   (positional args and meta: constexprs, num_warps, num_stages), so the launch configuration is the one the
   target gets, from the same tensors a real run passes. Triton's specialization of those arguments (pointer
   alignment / divisibility by 16 of pointers and ints, ints equal to 1) is computed by triton's own binder for
   the target's backend, exactly as `JITFunction.run` does. One record per distinct (kernel source, signature,
   constexprs, attributes, options - num_warps and num_stages among them) per target.
2. **Compile** (`compile_specializations`): `triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`
   in worker processes (the Triton interpreter must be off there), giving TTGIR, PTX and a cubin; the bundled
   `ptxas -v` log gives registers, spill bytes and static shared memory; `metadata.shared` the dynamic shared
   memory the launch requests; the PTX the MMA kind (`wgmma` on sm_90, `mma.sync` on sm_80-89, or `none`: an
   FMA loop). Results and cubins are cached by content hash (source, specialization, options, target, triton
   version) under `kernel_cache_dir()/xcompile`, so a repeat is instant.
3. **Check** (`TargetBuild.issues`): a compile error, shared memory over the target's per-block limit, more than
   255 registers, or any spill in a 16-bit (bf16/fp16) model is an error; a spill in an fp32 model is a warning
   (fp32 models run their dots as FMA loops or tf32x3 and may spill; they still launch).

`build_targets(compiled, ["sm_80", "sm_90"])` does all three; braze.compile(..., targets=[...]) calls it, and
packages carry the cubins per target (braze/runtime/package.py). Executing from those cubins needs a GPU and is
not done here: on a GPU the runtime JIT-compiles the same sources (same specializations, same cubins).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import pickle
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from braze.kernels.device import TARGETS, DeviceSpec, target_spec
from braze.runtime.errors import BrazeError, ConfigError
from braze.runtime.expr import Expr
from braze.runtime.plan import Plan

XC_VERSION = 2  # bump when what a cached result holds changes
SIXTEEN_BIT = ("bfloat16", "float16")
SIZE_MODES = ("corners", "full")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
           "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool}


class TargetCheckError(BrazeError):
    """A kernel does not fit a GPU target (compile error, shared memory or registers over the limit, spills)."""


def parse_targets(targets: str | Iterable[str] | None) -> tuple[str, ...]:
    """'sm_80,sm_90' or ['80', 'sm90'] -> ('sm_80', 'sm_90'); an unknown name is a one-line ConfigError."""
    if targets is None:
        return ()
    names = targets.split(",") if isinstance(targets, str) else list(targets)
    out: list[str] = []
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"targets must be GPU target names ({', '.join(TARGETS)}), got {targets!r}")
        spec = target_spec(name)
        if spec.name not in out:
            out.append(spec.name)
    return tuple(out)


# ---- 1. enumeration --------------------------------------------------------------------------------------------
@dataclass
class Specialization:
    """One kernel specialization for one target: what triton.compile needs, plus where it is launched."""

    key: str  # content hash: source, kernel, target, signature, constexprs, attrs, options, triton version
    target: str
    family: str  # the plan step's family (launcher), "fused" for generated pointwise/reduction kernels
    kernel: str  # the @triton.jit function
    module: str  # the plan kernel (module) it belongs to
    source: str
    signature: dict[str, str]
    constexprs: dict[tuple, Any]
    attrs: dict[tuple, Any]
    options: dict[str, Any]
    dtype: str  # the model's compute dtype (the plan's dominant float activation dtype)
    uses: list[str] = field(default_factory=list)  # "decode batch=1", ...
    programs: dict[str, int] = field(default_factory=dict)  # use -> programs in its launch grid (the smallest)

    @property
    def num_warps(self) -> int:
        return int(self.options.get("num_warps", 4))

    @property
    def num_stages(self) -> int:
        return int(self.options.get("num_stages", 3))

    def describe(self) -> dict[str, Any]:
        """JSON-able summary (package index, reports)."""
        return {"key": self.key, "family": self.family, "kernel": self.kernel, "module": self.module,
                "signature": self.signature, "constexprs": {_path(k): _plain(v) for k, v in self.constexprs.items()},
                "attrs": {_path(k): _plain(v) for k, v in self.attrs.items() if v},
                "num_warps": self.num_warps, "num_stages": self.num_stages, "dtype": self.dtype,
                "uses": list(self.uses), "programs": dict(self.programs)}


def _path(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _plain(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _triton_version() -> str:
    import triton

    return triton.__version__


def _jit_function(obj: Any) -> Any:
    """The JITFunction for a kernel attribute (an InterpretedFunction under TRITON_INTERPRET=1 is rebuilt as a
    JITFunction from the same Python function and decorator options: only its signature is used here)."""
    from triton.runtime.jit import JITFunction

    if isinstance(obj, JITFunction):
        return obj
    fn = getattr(obj, "fn", None)
    if fn is None:
        raise TypeError(f"{obj!r} is not a Triton kernel")
    return JITFunction(fn, **getattr(obj, "kwargs", {}))


class _Recorder:
    """Turns recorded launches into Specializations for one target (triton's binder for that target's backend)."""

    def __init__(self, spec: DeviceSpec):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.spec = spec
        self.backend = make_backend(GPUTarget("cuda", spec.capability, 32))
        self.binders: dict[int, Any] = {}
        self.found: dict[str, Specialization] = {}
        self.version = _triton_version()

    def record(self, jit: Any, source: str, module: str, family: str, dtype: str, use: str, args: tuple,
               meta: dict[str, Any], programs: int = 0) -> None:
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature

        binder = self.binders.get(id(jit))
        if binder is None:
            binder = self.binders[id(jit)] = create_function_from_signature(jit.signature, jit.params, self.backend)
        kwargs = dict(meta)  # what JITFunction.run adds before binding
        kwargs["debug"] = kwargs.get("debug", jit.debug) or knobs.runtime.debug
        for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(knobs.compilation, name):
                kwargs[name] = getattr(knobs.compilation, name)
        bound, specialization, options = binder(*args, **kwargs)
        with warnings.catch_warnings():  # triton 3.9 warns once that its fp-fusion default will change
            warnings.simplefilter("ignore", UserWarning)
            options, signature, constexprs, attrs = jit._pack_args(self.backend, kwargs, bound, specialization,
                                                                   options)
        opts = dict(options.__dict__)
        ident = json.dumps({"v": XC_VERSION, "triton": self.version, "target": self.spec.capability,
                            "kernel": jit.__name__, "source": hashlib.sha256(source.encode()).hexdigest(),
                            "signature": signature,
                            "constexprs": sorted((list(k), repr(v)) for k, v in constexprs.items()),
                            "attrs": sorted((list(k), repr(v)) for k, v in attrs.items()),
                            "options": sorted((k, repr(v)) for k, v in opts.items())}, sort_keys=True)
        key = hashlib.sha256(ident.encode()).hexdigest()[:32]
        found = self.found.get(key)
        if found is None:
            found = self.found[key] = Specialization(key, self.spec.name, family, jit.__name__, module, source,
                                                     dict(signature), dict(constexprs), dict(attrs), opts, dtype)
        if use not in found.uses:
            found.uses.append(use)
        if programs:
            found.programs[use] = min(programs, found.programs.get(use, programs))


class _DryKernel:
    """Stands in for a Triton kernel: `kernel[grid](*args, **meta)` records the call instead of running it."""

    def __init__(self, recorder: _Recorder, jit: Any, source: str, module: str, family: str, dtype: str,
                 use: Callable[[], str]):
        self.recorder, self.jit, self.source, self.module, self.family, self.dtype = (
            recorder, jit, source, module, family, dtype)
        self.use = use
        self.__name__ = jit.__name__

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **meta: Any) -> None:
            self.recorder.record(self.jit, self.source, self.module, self.family, self.dtype, self.use(), args, meta,
                                 grid_programs(grid, meta))
        return launch


def grid_programs(grid: Any, meta: dict[str, Any]) -> int:
    """Programs a launch grid starts (a grid may be a callable of the launch's meta, as triton allows)."""
    dims = grid(meta) if callable(grid) else grid
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    total = 1
    for d in dims:
        total *= int(d)
    return total


class _DryModule:
    def __init__(self, kernels: dict[str, _DryKernel]):
        self.kernels = kernels

    def __getattr__(self, name: str) -> _DryKernel:
        try:
            return self.kernels[name]
        except KeyError:
            raise AttributeError(name) from None


def _jit_functions(source: str) -> dict[str, Any]:
    """name -> JITFunction for every kernel a generated module defines."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    from braze.runtime.kernel_loader import load_kernel_module

    module = load_kernel_module(source)
    return {name: _jit_function(obj) for name, obj in vars(module).items()
            if isinstance(obj, (JITFunction, InterpretedFunction))}


def plan_dtype(plan: Plan) -> str:
    """The plan's compute dtype: the most common float dtype of its activation buffers (kv caches first)."""
    for i in plan.inputs:
        if i.kind == "user" and i.name.startswith("kv_cache") and i.dtype in ("float32", *SIXTEEN_BIT):
            return i.dtype
    counts: dict[str, int] = {}
    for b in plan.buffers:
        if b.dtype in ("float32", *SIXTEEN_BIT):
            counts[b.dtype] = counts.get(b.dtype, 0) + 1
    return max(counts, key=lambda d: (counts[d], d != "float32")) if counts else "float32"


def size_points(plan: Plan, sizes: str = "corners") -> list[dict[str, int]]:
    """Values of the plan's dynamic dims to enumerate: every combination of each dim's lower and upper bound
    ("corners"), plus a value in between that is neither 1, a power of two nor a multiple of 16 ("full")."""
    if sizes not in SIZE_MODES:
        raise ConfigError(f"sizes={sizes!r} is not valid; choose one of {', '.join(SIZE_MODES)}")
    per_symbol: list[list[int]] = []
    for s in plan.symbols:
        hi = s.upper if s.upper is not None else max(s.lower, 16)
        values = [s.lower, hi]
        if sizes == "full" and hi - s.lower >= 2:
            mid = (s.lower + hi) // 2
            while mid < hi and (mid == 1 or mid % 16 == 0 or mid & (mid - 1) == 0):
                mid += 1
            if s.lower < mid < hi:
                values.append(mid)
        per_symbol.append(sorted(set(values)))
    points: list[dict[str, int]] = [{}]
    for s, values in zip(plan.symbols, per_symbol):
        points = [{**p, s.name: v} for p in points for v in values]
    return points


def plan_inputs(plan: Plan, syms: dict[str, int], device: torch.device) -> list[torch.Tensor]:
    """Valid user inputs for `plan` at `syms`: token ids and positions 0, empty caches (cache_len 0), no padding
    (kv_start 0), a causal tree mask."""
    out = []
    for spec in plan.inputs:
        if spec.kind != "user":
            continue
        shape = [Expr(e)(syms) for e in spec.shape]
        dtype = _DTYPES[spec.dtype]
        if spec.name == "tree_mask":
            t = torch.ones(shape, dtype=dtype, device=device).tril()
        else:
            t = torch.zeros(shape, dtype=dtype, device=device)
        out.append(t)
    return out


def _plans(compiled: Any) -> dict[str, Plan]:
    compiled = getattr(compiled, "compiled", None) or compiled
    plans = {"forward": compiled.plan}
    for name, plan in (getattr(compiled, "extra_plans", None) or {}).items():
        if isinstance(plan, Plan) and plan is not compiled.plan:
            plans.setdefault(name, plan)
    return plans


def enumerate_specializations(compiled: Any, targets: Sequence[str], sizes: str = "corners",
                              plans: Sequence[str] | None = None) -> list[Specialization]:
    """Every distinct kernel specialization the model's plans launch on each target (see the module docstring)."""
    from braze.runtime.executor import PlanExecutor

    compiled = getattr(compiled, "compiled", None) or compiled
    all_plans = _plans(compiled)
    if plans is not None:
        unknown = [p for p in plans if p not in all_plans]
        if unknown:
            raise ConfigError(f"unknown plan(s) {', '.join(unknown)}; the model has {', '.join(all_plans)}")
        all_plans = {p: all_plans[p] for p in plans}
    device = torch.device(getattr(compiled, "device", "cpu"))
    jits: dict[str, dict[str, Any]] = {}
    found: list[Specialization] = []
    for tname in parse_targets(targets):
        recorder = _Recorder(target_spec(tname))
        for pname, plan in all_plans.items():
            dtype = plan_dtype(plan)
            families = {s.kernel: (s.launcher or s.kind) for s in plan.steps if s.kind in ("fused", "template")}
            current = {"use": pname}

            def module(name: str, plan: Plan = plan, families: dict = families, dtype: str = dtype,
                       current: dict = current) -> _DryModule:
                source = plan.kernels[name]
                if source not in jits:
                    jits[source] = _jit_functions(source)
                kernels = {k: _DryKernel(recorder, j, source, name, families.get(name, "fused"), dtype,
                                         lambda: current["use"])
                           for k, j in jits[source].items()}
                return _DryModule(kernels)

            executor = PlanExecutor(plan, compiled.weights, device, kernels=False, spec=recorder.spec)
            executor.module = module  # type: ignore[method-assign]
            for syms in size_points(plan, sizes):
                labels = {s.name: s.label for s in plan.symbols}
                current["use"] = f"{pname} " + " ".join(f"{labels[k]}={v}" for k, v in syms.items())
                with torch.no_grad():
                    executor.run(plan_inputs(plan, syms, device))
        found.extend(recorder.found.values())
    return found


# ---- 2. compilation --------------------------------------------------------------------------------------------
@dataclass
class KernelResult:
    """What ptxas and triton report for one specialization on one target."""

    spec: Specialization
    regs: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    smem: int = 0  # bytes of shared memory a launch requests (triton's allocation + ptxas' static smem)
    mma: str = "none"  # wgmma | mma.sync | none
    float_atomics: int = 0  # float atom.* / red.* instructions in the PTX (float_atomic_count)
    error: str | None = None
    cubin: Path | None = None  # in the cache
    sha256: str | None = None
    compile_s: float = 0.0
    cached: bool = False

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    def describe(self) -> dict[str, Any]:
        return {**self.spec.describe(), "target": self.spec.target, "regs": self.regs,
                "spill_stores": self.spill_stores, "spill_loads": self.spill_loads, "stack": self.stack,
                "smem": self.smem, "mma": self.mma, "float_atomics": self.float_atomics, "error": self.error,
                "sha256": self.sha256}


def xcompile_cache_dir() -> Path:
    from braze.runtime.kernel_loader import kernel_cache_dir

    path = kernel_cache_dir() / "xcompile"
    path.mkdir(parents=True, exist_ok=True)
    return path


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, int] | None:
    """Registers, stack, spill stores/loads and static smem from `ptxas -v` output (None: no report in `log`)."""
    regs = [int(m) for m in _PTXAS_REGS.findall(log)]
    if not regs:
        return None
    spills = [tuple(map(int, m)) for m in _PTXAS_SPILL.findall(log)]
    smem = [int(m) for m in _PTXAS_SMEM.findall(log)]
    return {"regs": max(regs), "stack": max((s[0] for s in spills), default=0),
            "spill_stores": sum(s[1] for s in spills), "spill_loads": sum(s[2] for s in spills),
            "static_smem": max(smem, default=0)}


def mma_kind(ptx: str) -> str:
    """The tensor-core instructions a kernel's PTX uses: wgmma (Hopper), mma.sync (Ampere/Ada) or none."""
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync\b", ptx):
        return "mma.sync"
    return "none"


_FLOAT_ATOMIC = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:atom|red)(?:\.\w+)*\.(?:f16|bf16|f32|f64|f16x2|bf16x2)\b", re.M)


def float_atomic_count(ptx: str) -> int:
    """Floating-point atomic read-modify-writes (atom.* / red.* on f16/bf16/f32/f64) in a kernel's PTX: split-K
    partial sums and the like, whose summation order is the order the programs happen to finish in. Integer atomics
    (a block's start tickets and merge counters) are exact whatever the order and are not counted."""
    return len(_FLOAT_ATOMIC.findall(ptx))


def _run_ptxas(ptx: str, capability: int, fp_fusion: bool) -> str:
    """`ptxas -v` on a kernel's PTX with triton's flags (when triton's own log was not captured: a cache hit)."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(capability).path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [ptxas, "-lineinfo", *([] if fp_fusion else ["--fmad=false"]), "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(capability)}", str(src), "-o", str(Path(tmp) / "k.o")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        return done.stderr + done.stdout


def _compile_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: compile one specialization for its target (the Triton interpreter is off in this process)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from braze.runtime.kernel_loader import load_kernel_module

    t0 = time.perf_counter()
    out: dict[str, Any] = {"key": job["key"]}
    try:
        fn = getattr(load_kernel_module(job["source"]), job["kernel"])
        src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
        log = io.StringIO()
        saved = knobs.nvidia.dump_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
        try:
            with contextlib.redirect_stdout(log):
                k = triton.compile(src, target=GPUTarget("cuda", job["capability"], 32), options=job["options"])
        finally:
            knobs.nvidia.dump_ptxas_log = saved
        ptx = k.asm["ptx"]
        report = parse_ptxas_log(log.getvalue())
        if report is None:
            report = parse_ptxas_log(_run_ptxas(ptx, job["capability"], job["options"].get("enable_fp_fusion", True)))
        if report is None:
            raise RuntimeError("ptxas -v printed no register report")
        cubin = k.asm["cubin"]
        path = Path(job["cache"]) / f"{job['key']}.cubin"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(cubin)
        os.replace(tmp, path)
        out.update(regs=report["regs"], spill_stores=report["spill_stores"], spill_loads=report["spill_loads"],
                   stack=report["stack"], smem=int(k.metadata.shared) + report["static_smem"], mma=mma_kind(ptx),
                   float_atomics=float_atomic_count(ptx),
                   sha256=hashlib.sha256(cubin).hexdigest(), num_warps=int(k.metadata.num_warps))
    except Exception as e:  # a compile error is a result, reported per kernel and target
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        out["error"] = f"{type(e).__name__}: {lines[-1] if lines else ''}"[:400]
    out["compile_s"] = time.perf_counter() - t0
    if out.get("error") is None:
        meta = Path(job["cache"]) / f"{job['key']}.json"
        tmp = meta.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, meta)
    return out


def _worker_env() -> dict[str, str]:
    """Workers start with the interpreter off (triton reads TRITON_INTERPRET at import)."""
    env = dict(os.environ)
    env["TRITON_INTERPRET"] = "0"  # set, not unset: `import braze` defaults it to 1 on a machine without a GPU
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class _Worker:
    """One `python -m braze.compiler.targets` process compiling the jobs it is fed (pickled, one per line)."""

    def __init__(self) -> None:
        self.err = tempfile.TemporaryFile()  # the worker's stderr: its last line explains a worker that died
        self.proc = subprocess.Popen([sys.executable, "-m", "braze.compiler.targets", "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err,
                                     env=_worker_env())

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(base64.b64encode(pickle.dumps(job)) + b"\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = b""
        if not line:  # the worker died (e.g. a crash inside the compiler): report it, start another
            self.close()
            self.err.seek(0)
            last = [ln for ln in self.err.read()[-4000:].decode(errors="replace").splitlines() if ln.strip()]
            self.err.close()
            code = self.proc.returncode
            self.__init__()  # type: ignore[misc]
            return {"key": job["key"], "error": f"compiler process died (exit code {code})"
                                                + (f": {last[-1].strip()}" if last else "")}
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if not self.err.closed and self.proc.returncode == 0:
            self.err.close()


def _worker_main() -> None:
    """Read pickled jobs from stdin, write one JSON result per line to the real stdout (anything else that prints,
    triton's messages included, goes to stderr)."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    torch.set_num_threads(1)
    for line in sys.stdin.buffer:
        if line.strip():
            out.write(json.dumps(_compile_job(pickle.loads(base64.b64decode(line)))) + "\n")
            out.flush()


def compile_specializations(specs: Sequence[Specialization], workers: int | None = None,
                            progress: Callable[[int, int, KernelResult], None] | None = None) -> list[KernelResult]:
    """Compile every specialization (cached ones are read back) in `workers` processes (default: one per CPU);
    results in the order of `specs`."""
    cache = xcompile_cache_dir()
    results: dict[str, KernelResult] = {}
    todo: dict[str, Specialization] = {}
    for spec in specs:
        meta, cubin = cache / f"{spec.key}.json", cache / f"{spec.key}.cubin"
        if spec.key in results or spec.key in todo:
            continue
        if meta.is_file() and cubin.is_file():
            try:
                results[spec.key] = _result(spec, json.loads(meta.read_text()), cubin, cached=True)
                continue
            except (ValueError, KeyError):
                pass
        todo[spec.key] = spec
    total = len(results) + len(todo)
    done = 0
    if progress:
        for r in results.values():
            done += 1
            progress(done, total, r)
    if todo:
        jobs = queue.SimpleQueue()
        for s in todo.values():
            jobs.put({"key": s.key, "source": s.source, "kernel": s.kernel,
                      "capability": TARGETS[s.target].capability, "signature": s.signature,
                      "constexprs": s.constexprs, "attrs": s.attrs, "options": s.options, "cache": str(cache)})
        lock = threading.Lock()

        def drain() -> None:
            nonlocal done
            worker = _Worker()
            try:
                while True:
                    try:
                        job = jobs.get_nowait()
                    except queue.Empty:
                        return
                    data = worker.run(job)
                    spec = todo[data["key"]]
                    with lock:
                        results[spec.key] = _result(spec, data, cache / f"{spec.key}.cubin", cached=False)
                        done += 1
                        if progress:
                            progress(done, total, results[spec.key])
            finally:
                worker.close()

        n = max(1, min(len(todo), workers or os.cpu_count() or 1))
        threads = [threading.Thread(target=drain, daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return [results[s.key] if results[s.key].spec is s else _rebind(results[s.key], s) for s in specs]


def _rebind(result: KernelResult, spec: Specialization) -> KernelResult:
    return KernelResult(**{**result.__dict__, "spec": spec})


def _result(spec: Specialization, data: dict[str, Any], cubin: Path, cached: bool) -> KernelResult:
    if data.get("error"):
        return KernelResult(spec, error=data["error"], compile_s=data.get("compile_s", 0.0), cached=cached)
    return KernelResult(spec, regs=data["regs"], spill_stores=data["spill_stores"], spill_loads=data["spill_loads"],
                        stack=data["stack"], smem=data["smem"], mma=data["mma"],
                        float_atomics=data["float_atomics"],
                        cubin=cubin, sha256=data["sha256"],
                        compile_s=data.get("compile_s", 0.0), cached=cached)


# ---- 3. checks, the build --------------------------------------------------------------------------------------
@dataclass
class Issue:
    severity: str  # "error" | "warning"
    target: str
    kernel: str
    family: str
    what: str  # "compile error: ...", "shared memory 114,688 B > 101,376 B", "spills 1,024 B"
    use: str

    def __str__(self) -> str:
        return f"{self.target}: kernel {self.kernel} ({self.family}, {self.use}): {self.what}"


def check_result(r: KernelResult) -> list[Issue]:
    """The limit checks of one result (see the module docstring)."""
    s = r.spec
    spec = TARGETS[s.target]
    use = s.uses[0] if s.uses else "?"
    issue = lambda sev, what: Issue(sev, s.target, s.kernel, s.family, what, use)  # noqa: E731
    if r.error:
        return [issue("error", f"compile error: {r.error}")]
    out = []
    if r.smem > spec.smem_per_block:
        out.append(issue("error", f"shared memory {r.smem:,} B > {spec.smem_per_block:,} B per block"))
    if r.regs > spec.max_regs_per_thread:
        out.append(issue("error", f"{r.regs} registers > {spec.max_regs_per_thread}"))
    if r.spills:
        fp16 = s.dtype in SIXTEEN_BIT
        out.append(issue("error" if fp16 else "warning",
                         f"spills {r.spill_stores:,} B stored / {r.spill_loads:,} B loaded at {r.regs} registers"
                         f" ({s.dtype} model)"))
    return out


@dataclass
class TargetBuild:
    """Cross-compiled kernels of one model for some GPU targets."""

    targets: tuple[str, ...]
    results: list[KernelResult]
    triton: str
    seconds: float = 0.0

    @property
    def issues(self) -> list[Issue]:
        return [i for r in self.results for i in check_result(r)]

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    def check(self, accept: bool = False) -> None:
        """Raise TargetCheckError naming the kernels, targets and figures that do not fit (unless `accept`)."""
        errors = self.errors
        if errors and not accept:
            shown = "; ".join(str(e) for e in errors[:3])
            more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
            raise TargetCheckError(f"{len(errors)} kernel(s) do not fit their GPU target: {shown}{more}; "
                                   f"pass target_check='warn' (CLI: --target-check warn) to accept")

    def summary(self) -> list[dict[str, Any]]:
        """Per family x target: specializations, max registers, max spill bytes, max smem, MMA kinds, issues."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for r in self.results:
            s = r.spec
            row = rows.setdefault((s.family, s.target), {
                "family": s.family, "target": s.target, "kernels": 0, "regs": 0, "spills": 0, "smem": 0,
                "mma": set(), "errors": 0, "warnings": 0})
            row["kernels"] += 1
            if not r.error:
                row["regs"] = max(row["regs"], r.regs)
                row["spills"] = max(row["spills"], r.spills)
                row["smem"] = max(row["smem"], r.smem)
                row["mma"].add(r.mma)
            for i in check_result(r):
                row["errors" if i.severity == "error" else "warnings"] += 1
        order = {t: n for n, t in enumerate(TARGETS)}
        out = sorted(rows.values(), key=lambda x: (x["family"], order.get(x["target"], 99)))
        for row in out:
            kinds = row["mma"] - {"none"} if row["mma"] - {"none"} else row["mma"]
            row["mma"] = "/".join(sorted(kinds)) or "-"
        return out

    def table(self) -> str:
        lines = [f"{'family':<22} {'target':<6} {'kernels':>7} {'regs':>5} {'spills B':>9} {'smem B':>9} "
                 f"{'limit B':>9} {'mma':<16} {'errors':>6} {'warn':>5}"]
        for row in self.summary():
            lines.append(f"{row['family']:<22} {row['target']:<6} {row['kernels']:>7} {row['regs']:>5} "
                         f"{row['spills']:>9,} {row['smem']:>9,} {TARGETS[row['target']].smem_per_block:>9,} "
                         f"{row['mma']:<16} {row['errors']:>6} {row['warnings']:>5}")
        return "\n".join(lines)

    def package_entries(self) -> dict[str, dict[str, Any]]:
        """Per target: what braze/runtime/package.py writes (index entries and the cubins to copy)."""
        out: dict[str, dict[str, Any]] = {}
        for t in self.targets:
            entries = []
            for r in self.results:
                if r.spec.target != t or r.cubin is None:
                    continue
                entries.append({**r.describe(), "cubin_file": str(r.cubin)})
            out[t] = {"target": t, "capability": TARGETS[t].capability, "triton": self.triton,
                      "smem_per_block": TARGETS[t].smem_per_block,
                      "issues": [f"{i.severity}: {i}" for i in self.issues if i.target == t], "kernels": entries}
        return out


def build_targets(compiled: Any, targets: str | Iterable[str], sizes: str = "corners", workers: int | None = None,
                  plans: Sequence[str] | None = None,
                  progress: Callable[[int, int, KernelResult], None] | None = None) -> TargetBuild:
    """Enumerate, cross-compile and check the model's kernels for `targets` (see the module docstring)."""
    names = parse_targets(targets)
    if not names:
        raise ConfigError(f"no GPU target given; valid targets: {', '.join(TARGETS)}")
    t0 = time.perf_counter()
    specs = enumerate_specializations(compiled, names, sizes=sizes, plans=plans)
    results = compile_specializations(specs, workers=workers, progress=progress)
    return TargetBuild(names, results, _triton_version(), time.perf_counter() - t0)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    _worker_main()
