"""The compiler: passes -> lowering -> plan, with BRAZE_DUMP dumps and the report."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.fx as fx

from braze.codegen.lower import lower_graph
from braze.compiler.capture import Captured
from braze.compiler.config import CompileConfig
from braze.compiler.report import CompileReport, PassResult
from braze.passes.context import PassContext
from braze.passes.registry import PASSES
from braze.runtime.plan import Plan

AfterPass = Callable[[str, fx.GraphModule, dict[str, torch.Tensor]], None]


def _dump_dir() -> Path | None:
    d = os.environ.get("BRAZE_DUMP")
    if not d:
        return None
    path = Path(d)
    path.mkdir(parents=True, exist_ok=True)
    return path


GENERATION_PHASES = ("cache", "verify", "decode", "prefill")


def run_passes(cap: Captured, config: CompileConfig, report: CompileReport,
               after_pass: AfterPass | None = None, phases: tuple[str, ...] | None = None) -> PassContext:
    """Rewrite cap.gm in place with every enabled pass; `after_pass` sees the graph after each one.

    `phases` selects which phases run; by default all but "cache", "verify", "decode" and "prefill" (generation
    graphs only).
    """
    ctx = PassContext(config=config, weights=cap.weights, fake_mode=cap.fake_mode, causal_lm=cap.causal_lm)
    dump = _dump_dir()
    if dump and phases is None:
        (dump / "00_captured.txt").write_text(cap.gm.code)
    for i, spec in enumerate(PASSES, start=1):
        if not spec.enabled(config):
            continue
        if (phases is None and spec.phase in GENERATION_PHASES) or (phases is not None and spec.phase not in phases):
            continue
        ctx.current_pass = spec.name
        count = spec.fn(cap.gm, ctx)
        cap.gm.graph.lint()
        report.passes.append(PassResult(spec.name, spec.phase, count, ctx.notes.get(spec.name, [])))
        if dump or after_pass:  # they read or run the module's code; passes only read the graph
            cap.gm.recompile()
        if dump:
            (dump / f"{i:02d}_{spec.name}.txt").write_text(cap.gm.code)
        if after_pass:
            after_pass(spec.name, cap.gm, ctx.weights)
    cap.gm.recompile()  # once, for whoever runs the rewritten graph (the reference executor)
    return ctx


def drop_unused_weights(gm: fx.GraphModule, weights: dict[str, torch.Tensor]) -> None:
    """Weights no longer read by the graph (e.g. merged into a concatenated one) are dropped, placeholder too."""
    for n in list(gm.graph.nodes):
        if n.op == "placeholder" and n.name in weights and not n.users:
            gm.graph.erase_node(n)
    gm.recompile()
    used = {n.name for n in gm.graph.nodes if n.op == "placeholder"}
    for k in list(weights):
        if k not in used:
            del weights[k]


def compile_captured(cap: Captured, config: CompileConfig, name: str = "forward",
                     after_pass: AfterPass | None = None) -> tuple[Plan, CompileReport]:
    start = time.perf_counter()
    report = CompileReport(model=name, executor=config.executor)
    run_passes(cap, config, report, after_pass)
    drop_unused_weights(cap.gm, cap.weights)
    plan, record = lower_graph(cap.gm, name, cap.symbols, set(cap.weights), config.deterministic)
    report.kernels = [(s.kernel, "fused" if s.kind == "fused" else s.launcher, s.nodes)
                      for s in plan.steps if s.kind in ("fused", "template")]
    report.fallbacks = record.fallbacks
    report.launches = plan.launches
    report.planned_peak_bytes = record.planned_peak_bytes
    report.eager_peak_bytes = record.eager_peak_bytes
    report.no_reuse_bytes = record.no_reuse_bytes
    dump = _dump_dir()
    if dump:
        kdir = dump / "kernels"
        kdir.mkdir(exist_ok=True)
        for kname, src in plan.kernels.items():
            (kdir / f"{kname}.py").write_text(src)
        (dump / "plan.json").write_text(plan.to_json())
    report.compile_seconds = time.perf_counter() - start
    return plan, report
