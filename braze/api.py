"""braze.compile / braze.load and the torch.compile backend hook."""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import os
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from braze.runtime.call_signature import call_signature, signature_difference
from braze.runtime.compiled import CompiledModel, weights_version
from braze.runtime.errors import CaptureError, ConfigError, InputMismatchError
from braze.runtime.package import load_package  # also installs the writer behind CompiledModel.save
from braze.runtime.sharded_package import is_sharded, load_sharded  # tp > 1: one package per rank

if TYPE_CHECKING:  # the compiler is imported on first use, so `braze.load` stays runtime-only
    from braze.compiler.config import CompileConfig


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _executor(config: CompileConfig, device: torch.device) -> str:
    if config.executor != "auto":
        if config.executor == "cuda" and device.type != "cuda":
            from braze.runtime.errors import ConfigError

            raise ConfigError("executor='cuda' needs the model on a CUDA device; on CPU use 'interpret' or 'reference'")
        return config.executor
    return "cuda" if device.type == "cuda" else "interpret"


def _build(cap: Any, config: CompileConfig, device: torch.device, name: str, model_config: Any = None) -> CompiledModel:
    from braze.compiler.pipeline import compile_captured

    plan, report = compile_captured(cap, config, name=name)
    executor = _executor(config, device)
    report.executor = executor
    compiled = CompiledModel(plan, cap.weights, device, executor, report=report, out_spec=cap.out_spec,
                             in_spec=cap.in_spec, causal_lm=cap.causal_lm, graph_module=cap.gm, config=config,
                             model_config=model_config)
    compiled.state, compiled.mutations = cap.state, cap.mutations
    if cap.mutations:
        report.extra["in-place writes"] = ", ".join(f"{kind} {name}" for kind, name in cap.mutations)
    return compiled


def _with_calibration(model: torch.nn.Module, config: CompileConfig) -> CompileConfig:
    """quant="int6": the config with the eager model's calibration statistics (braze/quant/calibration.py), when
    the method or the activation mode uses them and a tokenizer for the shipped calibration text is found."""
    import dataclasses

    from braze.quant.calibration import collect, find_tokenizer
    from braze.runtime.errors import ConfigError

    wanted = config.int6_method != "rtn" or config.int6_act in ("a6", "mixed")
    if config.quant != "int6" or config.int6_calibration is not None or not wanted:
        return config
    tokenizer = find_tokenizer(model)
    if tokenizer is None:
        if config.int6_method in ("awq", "gptq"):
            raise ConfigError(f"int6_method={config.int6_method!r} calibrates on braze/data/calib_text.txt but "
                              "found no tokenizer next to the model; pass "
                              "int6_calibration=braze.quant.calibration.collect(model, tokenizer)")
        return config  # the pass rounds to nearest and says so in the report
    # X^T X only for GPTQ (auto/awq smooth with input samples): a K x K product per linear and window
    stats = collect(model, tokenizer, hessians=config.int6_method == "gptq")
    return dataclasses.replace(config, int6_calibration=stats)


def compile_causal_lm(model: torch.nn.Module, config: CompileConfig) -> Any:
    """Forward, prefill and decode plans from one capture, or from the compile cache (braze/compiler/cache.py);
    the report's `cache` line says which. A model torch.export refuses compiles through Dynamo instead."""
    compiled = _or_dynamo(lambda: _compile_causal_lm_cached(model, config), model, model.forward, config)
    if isinstance(compiled, CompiledModel):  # its forward warns when called on a model in training mode, and
        compiled.source_module = weakref.ref(model)  # refuses to run once the model's weights changed
        compiled.source_weights = weights_version(model)
    return compiled  # a DynamoCompiled follows the training mode itself (Dynamo guards on it)


def _compile_causal_lm_cached(model: torch.nn.Module, config: CompileConfig) -> CompiledModel:
    import time

    from braze.compiler import cache

    start = time.perf_counter()
    device = _device_of(model)
    with _gc_paused():
        key, status = cache.compile_key(model, config, device)
        if key is not None:
            compiled, status = cache.load(key, model, config, _executor(config, device))
            if compiled is not None:
                _cross_compile(compiled, config)
                return compiled
        compiled = _compile_causal_lm(model, config)
        compiled.report.compile_seconds = time.perf_counter() - start  # every plan, not just the forward
        compiled.report.extra["cache"] = cache.store(key, compiled, status) if key is not None else status
    _cross_compile(compiled, config)
    return compiled


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Compiling allocates millions of small objects (FX nodes, fake tensors, sympy expressions) and the cyclic
    collector's passes over them cost about a tenth of a SmolLM2 compile: paused while compiling, resumed after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _compile_causal_lm(model: torch.nn.Module, config: CompileConfig) -> CompiledModel:
    """Forward, prefill and decode plans from one capture."""
    from braze.compiler.capture import capture_causal_lm
    from braze.compiler.generation import attach_compression, compile_generation
    from braze.runtime.errors import KVCacheUnsupportedError

    build_config = _with_calibration(model, config)
    cap = capture_causal_lm(model, config.max_batch, config.max_seq)
    compiled = _build(cap, build_config, _device_of(model), type(model).__name__, model_config=model.config)
    compiled.config = config  # calibration statistics are only needed by the quant pass; don't keep them alive
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    pad = getattr(gen_cfg, "pad_token_id", None) if gen_cfg is not None else None
    try:
        gen = compile_generation(cap, config, compiled.report)
    except KVCacheUnsupportedError as e:  # attention braze cannot put over a KV cache: the forward plan runs, exactly
        compiled.generation_missing = str(e)
        compiled.recompute = {"max_seq": config.max_seq, "max_batch": config.max_batch, "eos_token_id": eos,
                              "pad_token_id": pad}
        compiled.report.extra["generation"] = (f"recompute: no KV-cache plans ({e}); generate() re-runs the forward "
                                               "plan over the whole sequence each step")
        return compiled
    compiled.attach_generation(gen.prefill, gen.decode, gen.kv_inputs, config.max_seq, config.max_batch, eos, pad,
                               graphs=(gen.prefill_graph, gen.decode_graph, gen.verify_graph), verify=gen.verify)
    compiled.generator.speculate_default = config.speculate == "suffix"
    compiled.generator.keyed_sampling = config.deterministic  # batch-invariant seeded sampling (KeyedNoise)
    compiled.generator.tp_world = config.tp  # tp > 1: speculation drafts on rank 0 and broadcasts
    attach_compression(compiled, gen)  # kv_compression: the generator's compression state, the report's bytes
    rows = compiled.generator.position_rows
    if rows is not None and rows < config.max_seq:
        compiled.report.extra["positions"] = (f"generation stops at {rows} tokens (prompt + new), the model's learned "
                                              f"position table, below max_seq={config.max_seq}")
    compiled.report.extra["generation"] = (f"prefill {gen.prefill.launches} launches, decode {gen.decode.launches} "
                                           f"launches per step, KV cache {len(gen.kv_inputs)} tensors "
                                           f"({'/'.join(sorted({d for _, _, d in gen.kv_inputs})) or 'none'})")
    return compiled


def _cross_compile(compiled: CompiledModel, config: CompileConfig) -> None:
    """config.targets: cross-compile every kernel specialization the plans launch for each GPU target (no GPU
    needed), keep the cubins for packages, and refuse kernels that do not fit unless target_check='warn'."""
    if not config.targets:
        return
    import warnings

    from braze.cli.common import plural
    from braze.compiler.targets import build_targets

    build = build_targets(compiled, config.targets)
    compiled.target_build = build
    errors = build.errors
    if compiled.report is not None:
        compiled.report.extra["gpu targets"] = (
            f"{', '.join(build.targets)}: {plural(len(build.results), 'kernel specialization')} cross-compiled in "
            f"{build.seconds:.1f} s; {len(errors)} {'does' if len(errors) == 1 else 'do'} not fit, "
            f"{plural(len(build.issues) - len(errors), 'warning')}")
    build.check(accept=config.target_check == "warn")
    issues = build.issues
    if issues:
        more = f" (+{len(issues) - 1} more: braze inspect, or compiled.target_build.issues)" if len(issues) > 1 else ""
        warnings.warn(f"cross-compiling: {issues[0].severity}: {issues[0]}{more}", stacklevel=3)


def compile_module(module: torch.nn.Module, args: tuple, kwargs: dict, config: CompileConfig,
                   dynamic: dict[str, set[int]] | None = None) -> CompiledModel:
    """dynamic: {argument name: dims} made dynamic besides dim 0 (the dims calls changed; LazyCompiled)."""
    from braze.compiler.capture import capture_module

    cap = capture_module(module, args, kwargs, config.dynamic_shapes, dynamic)
    compiled = _build(cap, config, _device_of(module), type(module).__name__)
    compiled.call_signature = call_signature(args, kwargs)
    _cross_compile(compiled, config)
    return compiled


def compile_or_fall_back(module: torch.nn.Module, fn: Any, args: tuple, kwargs: dict, config: CompileConfig,
                         dynamic: dict[str, set[int]] | None = None) -> Any:
    """compile_module, or the Dynamo fallback (over `fn`, the module or its forward) when torch.export refuses."""
    return _or_dynamo(lambda: compile_module(module, args, kwargs, config, dynamic), module, fn, config)


def _or_dynamo(build: Any, module: torch.nn.Module, fn: Any, config: CompileConfig) -> Any:
    """build(), or, when it fails because torch.export refused the model, the model compiled through Dynamo."""
    from braze.compiler.capture import capture_failure

    try:
        return build()
    except CaptureError as e:
        if not capture_failure(e):
            raise
        from braze.compiler.dynamo_fallback import dynamo_fallback

        return dynamo_fallback(module, fn, config, e, compile_module)


# distinct call signatures (non-tensor argument values, arguments passed or not) one lazily compiled module compiles
# plans for, per training mode, before it refuses, like torch.compile's recompile limit: a value that changes every
# call (a step counter passed as an int) would otherwise compile on every call
RECOMPILE_LIMIT = 8


def training_modes(module: torch.nn.Module) -> tuple[bool, ...]:
    """The `training` flag of the module and each submodule (module.modules() order): the forward a plan computes
    depends on them (dropout, batch-norm statistics, `if self.training` code), and torch.export bakes them in."""
    return tuple(m.training for m in module.modules())


def tensor_kinds(args: tuple, kwargs: dict) -> tuple[int, ...]:
    """The rank of each tensor argument: export fixes it (sizes stay dynamic), so a call with a tensor of another
    rank compiles its own plan, as torch.compile recompiles. (A dtype the plan was not compiled for stays a one-line
    error naming the input: a float model called with int64 would fail deep inside a kernel or op.)"""
    import torch.utils._pytree as pytree

    return tuple(t.dim() for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor))


def _kinds_text(kinds: tuple[int, ...]) -> str:
    return "(" + ", ".join(f"{rank}-dim" for rank in kinds) + ")"


def _mode_name(modes: tuple[bool, ...]) -> str:
    if all(modes):
        return "train"
    if not any(modes):
        return "eval"
    return f"mixed ({sum(modes)} of {len(modes)} modules training)"


class _Variants:
    """One compiled plan per training mode, tensor ranks and call signature (runtime/call_signature.py),
    compiled on first use:
    `.train()` / `.eval()` on the module after a call compiles (or reuses) the plan for the new mode, as
    torch.compile's guard on `training` recompiles."""

    def __init__(self) -> None:
        self.plans: dict[Any, Any] = {}  # (training_modes(module), tensor_kinds, call signature) -> compiled
        self.latest: Any = None
        self.weights: tuple | None = None  # weights_version(module) the plans were compiled from

    def get(self, module: torch.nn.Module, args: tuple, kwargs: dict, build: Any) -> Any:
        weights = weights_version(module)
        if weights != self.weights:  # a plan holds the weights it was compiled from (transposed, merged, quantized)
            self.plans.clear()
            self.weights = weights
        modes = training_modes(module)
        signature = call_signature(args, kwargs)
        key = (modes, tensor_kinds(args, kwargs), signature)
        compiled = self.plans.get(key)
        if compiled is None:
            same_mode = [(kinds, sig) for m, kinds, sig in self.plans if m == modes]
            if len(same_mode) >= RECOMPILE_LIMIT:
                mode = "" if len(self.plans) == len(same_mode) else f" in {_mode_name(modes)} mode"
                kinds, first = same_mode[0]
                what = (signature_difference(first, signature) if first != signature else
                        f"tensor ranks {_kinds_text(key[1])} differ from the first plan's "
                        f"{_kinds_text(kinds)}")
                raise ConfigError(f"{what}; {RECOMPILE_LIMIT} plans were compiled for different non-tensor arguments "
                                  f"or tensor ranks{mode} already: pass values that change from call to call as "
                                  "tensors")
            compiled = self.plans[key] = build()
            if len({m for m, _, _ in self.plans}) > 1:  # the reports say which mode each plan computes
                for (m, _, _), plan in self.plans.items():
                    extra = getattr(getattr(plan, "report", None), "extra", None)
                    if isinstance(extra, dict):  # a DynamoCompiled's report is built per read: no line
                        extra["mode"] = f"{_mode_name(m)} (a plan per training mode the module is called in)"
        self.latest = compiled
        return compiled

    def drop(self, compiled: Any) -> None:
        """Forget a plan (a call outgrew its static dims: a more general one replaces it)."""
        self.plans = {k: v for k, v in self.plans.items() if v is not compiled}


def _static_dims_changed(compiled: Any, module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, set[int]]:
    """{argument name: dims} where a top-level tensor argument's size differs from the static size the plan was
    compiled with."""
    if not isinstance(compiled, CompiledModel):
        return {}
    specs = {i.name: i.shape for i in compiled.plan.inputs if i.kind == "user"}
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError:
        return {}
    grown: dict[str, set[int]] = {}
    for name, value in bound.arguments.items():
        shape = specs.get(name)
        if isinstance(value, torch.Tensor) and shape is not None and len(shape) == value.dim():
            for d, (expr, size) in enumerate(zip(shape, value.shape)):
                if expr.isdigit() and int(expr) != size:
                    grown.setdefault(name, set()).add(d)
    return grown


class LazyCompiled:
    """Compiles on the first call, from that call's arguments (like torch.compile), then reuses the plan; a call
    with other non-tensor arguments (runtime/call_signature.py), or after `.train()` / `.eval()` changed the
    module's training mode, compiles its own plan."""

    def __init__(self, module: torch.nn.Module, config: CompileConfig):
        self.module = module
        self.config = config
        self.variants = _Variants()
        # argument name -> dims a call changed from the example's: dynamic in the next compile (as Dynamo's
        # automatic dynamic shapes), besides dim 0 of every tensor argument
        self.dynamic: dict[str, set[int]] = {}

    @property
    def compiled(self) -> Any:
        """The plan of the latest call (None before the first)."""
        return self.variants.latest

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        def build() -> Any:
            return compile_or_fall_back(self.module, self.module, args, kwargs, self.config, self.dynamic)

        compiled = self.variants.get(self.module, args, kwargs, build)
        grown = _static_dims_changed(compiled, self.module, args, kwargs)
        if grown and self.config.dynamic_shapes is None and \
                any(not dims <= self.dynamic.get(name, set()) for name, dims in grown.items()):
            compiled = self._recompile_dynamic(compiled, grown, args, kwargs)
        return compiled(*args, **kwargs)

    def _recompile_dynamic(self, static: CompiledModel, grown: dict[str, set[int]], args: tuple,
                           kwargs: dict) -> Any:
        """A plan with the changed dims dynamic replaces the static one. torch.export captured the model at the
        first size, so an export that fails at the new size means the model rejects it (a Linear's in_features):
        the static plan stays, and its one-line mismatch error names the dim, with the model's reason (not the
        Dynamo fallback, which would fail the same way from deep inside)."""
        saved, plans = {name: set(dims) for name, dims in self.dynamic.items()}, dict(self.variants.plans)
        for name, dims in grown.items():
            self.dynamic.setdefault(name, set()).update(dims)
        self.variants.drop(static)
        try:
            return self.variants.get(self.module, args, kwargs,
                                     lambda: compile_module(self.module, args, kwargs, self.config, self.dynamic))
        except CaptureError as e:
            self.dynamic, self.variants.plans, self.variants.latest = saved, plans, static
            try:
                static(*args, **kwargs)  # its input check raises before any kernel runs
            except InputMismatchError as mismatch:
                reason = str(e).split(": ", 1)[-1]
                raise InputMismatchError(f"{mismatch}, and the model rejects the new size: {reason}") from None
            raise

    @property
    def report(self) -> Any:
        return self.compiled.report if self.compiled else None

    def __getattr__(self, name: str) -> Any:
        if name in ("module", "config", "variants"):
            raise AttributeError(name)
        if self.compiled is None:
            raise AttributeError(f"{name!r}: the model compiles on its first call")
        return getattr(self.compiled, name)


class _FunctionModule(torch.nn.Module):
    def __init__(self, fn: Any):
        super().__init__()
        self.fn = fn

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def _function_module(fn: Any) -> _FunctionModule:
    """A module calling `fn`, whose forward has fn's signature: torch.export binds a call's arguments by it (with
    (*args, **kwargs) it could not take a keyword-only argument and fell back to Dynamo)."""
    import inspect

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: the generic forward
        return _FunctionModule(fn)
    if any(p.name == "self" for p in sig.parameters.values()):
        return _FunctionModule(fn)
    forward = _FunctionModule.forward
    bound = functools.wraps(forward)(lambda self, *args, **kwargs: forward(self, *args, **kwargs))
    bound.__signature__ = sig.replace(parameters=[
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *sig.parameters.values()])
    cls = type("_FunctionModule", (_FunctionModule,), {"forward": bound, "__qualname__": "_FunctionModule"})
    return cls(fn)


def compile(model: Any = None, **options: Any) -> Any:
    """Compile `model` (an nn.Module or a function); without a model, return a decorator.

    HF causal LMs compile at once (their example inputs are known); other modules compile on the first call.
    """
    from braze.compiler.config import CompileConfig, tp_rank

    config = CompileConfig.from_options(**options)
    tp_rank(config)  # tp > 1 outside a matching process group: refused before anything is captured
    if model is None or isinstance(model, type):  # @braze.compile(...) or a bare @braze.compile on a class
        return functools.partial(_decorate, config=config) if model is None else _decorate(model, config)
    return _compile_object(model, config)


def _compile_object(model: Any, config: CompileConfig) -> Any:
    from braze.compiler.capture import is_causal_lm

    if isinstance(model, torch.nn.Module):
        if is_causal_lm(model):
            return compile_causal_lm(model, config)
        return LazyCompiled(model, config)
    if callable(model):
        return functools.wraps(model)(LazyCompiled(_function_module(model), config))
    raise TypeError(f"braze.compile takes an nn.Module or a function, got {type(model).__name__}")


def _decorate(obj: Any, config: CompileConfig) -> Any:
    if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
        class Compiled(obj):  # type: ignore[valid-type, misc]
            def __call__(self, *args: Any, **kwargs: Any) -> Any:
                if getattr(self, "_braze_capturing", False):
                    return super().__call__(*args, **kwargs)
                variants = self.__dict__.setdefault("_braze_variants", _Variants())

                def build() -> Any:
                    self.__dict__["_braze_capturing"] = True
                    try:
                        return compile_or_fall_back(self, self.forward, args, kwargs, config)
                    finally:
                        self.__dict__["_braze_capturing"] = False

                compiled = self.__dict__["_braze_compiled"] = variants.get(self, args, kwargs, build)
                return compiled(*args, **kwargs)

        Compiled.__name__ = obj.__name__
        Compiled.__qualname__ = obj.__qualname__
        return Compiled
    return _compile_object(obj, config)


def load(path: Any, executor: str = "auto", sha256: str | None = None) -> CompiledModel:
    """Load a kernel package written by `CompiledModel.save` (runtime only).

    sha256: the package's pinned digest (the sha256 of its manifest.json, which `braze inspect` prints): a package
    whose manifest differs is refused (braze.PackageError) before anything else in it is read.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"braze.load takes a package directory path (str or os.PathLike), got {type(path).__name__}")
    if is_sharded(path):  # a tensor-parallel package: this rank's shard
        return load_sharded(path, executor=executor, sha256=sha256)
    return load_package(path, executor=executor, sha256=sha256)


def dynamo_backend(gm: torch.fx.GraphModule, example_inputs: list[Any], options: dict[str, Any] | None = None,
                   **more: Any) -> Any:
    """`torch.compile(model, backend="braze", options={...})`: each graph Dynamo hands over runs as a braze plan
    per input shape (braze/compiler/dynamo_fallback.py: GraphCompiler); a graph braze refuses runs as Dynamo
    traced it. `options` are braze.compile's (torch.compile hands its `options` dict over as one argument)."""
    from braze.compiler.config import CompileConfig
    from braze.compiler.dynamo_fallback import GraphCompiler

    return GraphCompiler(CompileConfig.from_options(**{**(options or {}), **more}), compile_module)(gm, example_inputs)


try:  # make torch.compile(backend="braze") work once braze is imported
    from torch._dynamo import list_backends, register_backend

    if "braze" not in list_backends(exclude_tags=()):
        register_backend(name="braze")(dynamo_backend)
except Exception:  # pragma: no cover - dynamo unavailable
    pass
