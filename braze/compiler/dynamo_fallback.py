"""When torch.export refuses a model, Dynamo captures it instead, so a compile never fails on a model that runs.

torch.export needs one graph for the whole forward: data-dependent Python control flow, or code that specializes
the sequence length (Mamba's selective-scan loop, Falcon-H1's hybrid layers), stops it. Dynamo splits such a
forward into graphs at the Python it cannot trace; each graph becomes a braze plan (compiled static, one per input
shape: Dynamo guards on shapes and asks again when they change) and the Python between graphs runs eagerly. The
report says so. Generation of a causal LM runs HF's own loop with the forward swapped for the compiled one, so
caches the model keeps for itself (Mamba's conv and SSM states) are written through the plans' in-place outputs.

What the fallback cannot give: a package (Dynamo's graphs and guards live in this process), and the options that
rewrite a whole-model plan (quant, speculate, tp, kv_compression, deterministic, targets) - those keep the capture
error, so no option is silently dropped.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch

from braze.compiler.config import CompileConfig
from braze.compiler.report import CompileReport
from braze.runtime.errors import CaptureError, ConfigError, PackageError

# options that need one plan for the whole model; the fallback refuses them with the capture error
WHOLE_MODEL_OPTIONS = ("quant", "speculate", "kv_compression", "targets", "deterministic")
SPECULATION_OPTIONS = ("speculate", "max_spec_tokens", "spec_tree")


CompileGraph = Callable[[torch.nn.Module, tuple, dict, CompileConfig], Any]  # braze.api.compile_module


def dynamo_fallback(model: torch.nn.Module, fn: Any, config: CompileConfig, error: CaptureError,
                    compile_graph: CompileGraph) -> DynamoCompiled:
    """The model compiled through Dynamo (each graph by `compile_graph`), or `error` again when config.capture is
    "export" or an option needs a whole-model plan."""
    if config.capture == "export":
        raise error
    wanted = [name for name in WHOLE_MODEL_OPTIONS if getattr(config, name)]
    if config.tp > 1:
        wanted.append("tp")
    if wanted:
        raise CaptureError(f"{error} (the Dynamo fallback compiles graph by graph, without "
                           f"{', '.join(wanted)})") from error
    return DynamoCompiled(model, fn, config, str(error), compile_graph)


class GraphCompiler:
    """A Dynamo backend: each graph Dynamo hands over runs as a braze plan per concrete input shape (a graph
    Dynamo made dynamic takes its sizes as int arguments; each distinct set compiles once, static). A graph braze
    refuses runs as Dynamo traced it and is listed in `eager_graphs`."""

    def __init__(self, config: CompileConfig, compile_graph: CompileGraph):
        self.config = dataclasses.replace(config, dynamic_shapes="static")
        self.compile_graph = compile_graph
        self.graphs: list[Any] = []  # the CompiledModel of every (graph, shape) compiled, in order
        self.eager_graphs: list[str] = []  # why each graph braze could not compile runs eagerly

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in example_inputs):
            # braze plans compute without autograd (outputs would not carry gradients, and a backward through them
            # fails far from here); Dynamo guards on grad mode, so under no_grad / inference_mode this graph is
            # handed over again and compiled
            why = ("a graph traced with gradients enabled and inputs that require them (parameters included) runs "
                   "eagerly: braze plans are inference plans; call the model under torch.no_grad() or "
                   "torch.inference_mode() to run it as braze kernels")
            if why not in self.eager_graphs:
                warnings.warn(f"braze: {why}", stacklevel=2)
            self.eager_graphs.append(why)
            return gm.forward
        plans: dict[tuple, Any] = {}

        def run(*args: Any) -> Any:
            key = tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in args)
            compiled = plans.get(key)
            if compiled is None:
                compiled = plans[key] = self._compile_one(gm, args)
            return compiled(*(a for a in args if isinstance(a, torch.Tensor)))

        run.plans = plans  # type: ignore[attr-defined]
        return run

    def _compile_one(self, gm: torch.fx.GraphModule, args: tuple) -> Any:
        from braze.runtime.errors import BrazeError

        bound = _SizesBound(gm, args)
        # copies: torch.export marks the tensors it traces, and these are the ones Dynamo's guards check next
        tensors = tuple(a.clone() for a in args if isinstance(a, torch.Tensor))
        sizes = _size_outputs(gm, bound, tensors)
        if sizes is not None:
            bound.size_outputs = sizes
        try:
            compiled = self.compile_graph(bound, tensors, {}, self.config)
        except BrazeError as e:
            self.eager_graphs.append(str(e))
            bound.size_outputs = None
            return bound
        self.graphs.append(compiled)
        return compiled if sizes is None else _WithSizeOutputs(compiled, sizes)


class DynamoCompiled:
    """A model compiled graph by graph through Dynamo. Call it like the model; `generate` for causal LMs."""

    def __init__(self, model: torch.nn.Module, fn: Any, config: CompileConfig, reason: str,
                 compile_graph: CompileGraph):
        from braze.compiler.capture import is_causal_lm

        self.model = model
        self.config = config
        self.reason = reason
        self.causal_lm = is_causal_lm(model)
        self.generation_missing: str | None = None
        self.backend = GraphCompiler(config, compile_graph)
        # automatic dynamic shapes: a dim Dynamo sees change becomes an int argument, bound per call (GraphCompiler),
        # so a growing sequence does not run into Dynamo's recompile limit (past it, frames run eagerly)
        self._forward = torch.compile(fn, backend=self.backend)
        warnings.warn(f"braze: {reason}; compiling through Dynamo instead (each graph a braze plan, the Python "
                      "between graphs runs eagerly; see .report)", stacklevel=4)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self._forward(*args, **kwargs)

    def generate(self, input_ids: torch.Tensor, **options: Any) -> Any:
        """HF generate over the compiled forward; the options are braze's (runtime/generate.py) but speculation."""
        from braze.runtime.generate import GenerateOutput, check_generate_options, hf_generation_config
        from braze.runtime.sampling import check_sampling

        if not self.causal_lm:
            raise ConfigError("generate() needs a causal LM compiled by braze.compile")
        check_generate_options(options)
        options = hf_generation_config(options)
        spec = [k for k in SPECULATION_OPTIONS if options.get(k)]
        if spec:
            raise ConfigError(f"{', '.join(spec)}: speculation needs braze's own generation plans, which "
                              f"this model has none of ({self.reason})")
        for k in SPECULATION_OPTIONS:
            options.pop(k, None)
        do_sample = bool(options.pop("do_sample", False))
        temperature, top_k, top_p = check_sampling(do_sample, options.pop("temperature", 1.0),
                                                   options.pop("top_k", 0), options.pop("top_p", 1.0))
        seed = options.pop("seed", None)
        output_logits = bool(options.pop("output_logits", False))
        hf: dict[str, Any] = dict(options, do_sample=do_sample)
        if "max_length" not in hf:
            hf.setdefault("max_new_tokens", 20)
        if do_sample:
            hf.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
        else:  # greedy whatever the model's generation_config samples with, as braze's own loop
            hf.update(temperature=None, top_k=None, top_p=None)
        if output_logits:
            hf.update(output_logits=True, return_dict_in_generate=True)
        model = self.model
        with torch.random.fork_rng(devices=[]), torch.no_grad(), _forward_swapped(model, self._forward):
            if seed is not None:
                torch.manual_seed(int(seed))
            out = model.generate(input_ids, **hf)
        if output_logits:
            return GenerateOutput(out.sequences, torch.stack(list(out.logits), dim=1))
        return out

    @property
    def report(self) -> CompileReport:
        """One report over every graph compiled so far (graphs compile on the calls that first reach them)."""
        first = self.backend.graphs[0].report if self.backend.graphs else None
        report = CompileReport(model=type(self.model).__name__, executor=first.executor if first else "-")
        for i, g in enumerate(self.backend.graphs):
            r = g.report
            report.kernels += [(name, family, [f"g{i}.{n}" for n in nodes]) for name, family, nodes in r.kernels]
            report.fallbacks += [(f"g{i}.{node}", why) for node, why in r.fallbacks]
            report.launches += r.launches
            report.compile_seconds += r.compile_seconds
            report.planned_peak_bytes = max(report.planned_peak_bytes, r.planned_peak_bytes)
            report.eager_peak_bytes = max(report.eager_peak_bytes, r.eager_peak_bytes)
            report.no_reuse_bytes = max(report.no_reuse_bytes, r.no_reuse_bytes)
        report.extra["capture"] = (f"Dynamo fallback ({self.reason}): {len(self.backend.graphs)} graphs compiled by "
                                   "braze so far, one per input shape (the kernels and launches above count them "
                                   "all); the Python between graphs runs eagerly; no package")
        for i, why in enumerate(self.backend.eager_graphs):
            report.fallbacks.append((f"eager graph {i}", why))
        return report

    @property
    def stats(self) -> dict[str, int]:
        """Launches and calls summed over every graph's plans."""
        total: dict[str, int] = {}
        for g in self.backend.graphs:
            for k, v in g.stats.items():
                total[k] = total.get(k, 0) + v
        return total

    def generate_text(self, tokenizer: Any, prompts: Any, chat: bool = True, **options: Any) -> list[str]:
        from braze.runtime.compiled import CompiledModel

        return CompiledModel.generate_text(self, tokenizer, prompts, chat, **options)  # type: ignore[arg-type]

    @property
    def launches(self) -> int:
        return sum(g.plan.launches for g in self.backend.graphs)

    @property
    def package_refusal(self) -> str:
        return (f"{type(self.model).__name__} was compiled through Dynamo ({self.reason}); its graphs and guards "
                "live in this process and cannot be written as a package")

    def save(self, path: Any, tokenizer: Any = None) -> Any:
        raise PackageError(self.package_refusal)

    def __repr__(self) -> str:
        return f"DynamoCompiled({type(self.model).__name__}, {len(self.backend.graphs)} graphs)"


class _SizesBound(torch.nn.Module):
    """A Dynamo graph with its non-tensor arguments (sizes of a graph Dynamo made dynamic) fixed to one call's
    values: tensors in, the graph's outputs out (only its tensors once `size_outputs` is set)."""

    def __init__(self, gm: torch.fx.GraphModule, args: tuple):
        super().__init__()
        self.gm = gm
        self.fixed = {i: int(a) if isinstance(a, torch.SymInt) else a
                      for i, a in enumerate(args) if not isinstance(a, torch.Tensor)}
        self.arity = len(args)
        self.size_outputs: dict[int, Any] | None = None

    def forward(self, *tensors: torch.Tensor) -> Any:
        rest = iter(tensors)
        out = self.gm(*(self.fixed[i] if i in self.fixed else next(rest) for i in range(self.arity)))
        if self.size_outputs is None:
            return out
        return tuple(o for i, o in enumerate(out) if i not in self.size_outputs)


def _size_outputs(gm: torch.fx.GraphModule, bound: _SizesBound, tensors: tuple) -> dict[int, Any] | None:
    """{position: value} of the graph's non-tensor outputs at this call's sizes, or None when it has none.

    Dynamo hands a graph the Python state it updates, such as a cache's `cumulative_length += seq_len`, as int
    outputs; a braze plan returns tensors only. Without graph breaks at `.item()`, such an int is a function of the
    sizes alone, and every plan here is compiled for one set of sizes, so one run gives its value for good."""
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if not isinstance(outputs, (tuple, list)):
        return None
    examples = [o.meta.get("example_value") if isinstance(o, torch.fx.Node) else o for o in outputs]
    if all(isinstance(e, torch.Tensor) for e in examples):
        return None
    with torch.no_grad():
        values = bound(*tensors)
    return {i: v for i, v in enumerate(values) if not isinstance(v, torch.Tensor)}


class _WithSizeOutputs:
    """A plan of a graph's tensor outputs, with its non-tensor outputs (fixed for its sizes) put back in place."""

    def __init__(self, compiled: Any, sizes: dict[int, Any]):
        self.compiled, self.sizes = compiled, sizes

    def __call__(self, *tensors: torch.Tensor) -> tuple:
        out = self.compiled(*tensors)
        rest = iter(out if isinstance(out, (tuple, list)) else (out,))
        count = len(self.sizes) + (len(out) if isinstance(out, (tuple, list)) else 1)
        return tuple(self.sizes[i] if i in self.sizes else next(rest) for i in range(count))


class _forward_swapped:
    """model.forward is the compiled forward inside the block (HF generate calls the model), restored after."""

    def __init__(self, model: torch.nn.Module, forward: Any):
        self.model, self.forward = model, forward

    def __enter__(self) -> None:
        self.had = "forward" in self.model.__dict__
        self.old = self.model.__dict__.get("forward")
        self.model.forward = self.forward

    def __exit__(self, *exc: Any) -> None:
        if self.had:
            self.model.forward = self.old
        else:
            del self.model.forward
