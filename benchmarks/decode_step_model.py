"""The decode step of the Llama-3.2-1B shape as each GPU target gets it: the launch list, programs per launch vs
SMs, registers and spills (ptxas), and a bytes-per-step model from the recorded launch arguments. CPU only.

    .venv/bin/python benchmarks/decode_step_model.py [--targets sm_90,sm_80] [--context 1024] [--out FILE]
        [--quant int6 [--int6-act a16|a8]]

The plan is compiled from the 1B config with 1 and 2 layers (seeded weights, bf16); its decode plan runs dry on
the CPU with each target's launch configuration (braze/compiler/targets.py: every launch is recorded, none runs),
and the kernels are cross-compiled for the target. The 16-layer figures are the 1-layer plan plus 15 times what the
second layer added. Bytes model: each launch reads the distinct tensors it is passed once, except the KV caches, of
which it reads the live part (context + 1 of max_seq slots), the executor's workspace, of which it reads what the
step declares at this shape, and pointwise kernels, which read at most one element per output element (the
embedding gather reads one row); the ideal is every weight once plus the live caches.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

import braze  # noqa: E402
from braze.compiler.targets import build_targets, plan_inputs  # noqa: E402
from braze.kernels import FAMILIES, TARGETS, recording_launches  # noqa: E402
from braze.runtime.executor import PlanExecutor  # noqa: E402
from braze.runtime.expr import Expr  # noqa: E402

LAYERS = 16
MAX_SEQ = 2048


class _NoKernel:
    """A kernel that records nothing and runs nothing (the launch hook sees its name, grid and arguments)."""

    def __init__(self, name: str):
        self.__name__ = name

    def __getitem__(self, grid):  # noqa: ANN001, ANN204
        return lambda *args, **meta: None


class _NoModule:
    def __getattr__(self, name: str) -> _NoKernel:
        return _NoKernel(name)


def _layer_of(step) -> int | None:  # noqa: ANN001
    """The decoder layer a plan step belongs to, from the names of the weights and caches it reads."""
    for name in step.inputs:
        m = re.search(r"(?:layers_|kv_cache_)(\d+)_", name)
        if m:
            return int(m.group(1))
    return None


def record_step(cm, target: str, context: int) -> list[dict]:  # noqa: ANN001
    """The decode plan at batch 1 with `context` cached tokens, run dry with `target`'s configuration: one entry
    per launch (kernel, layer, programs, modelled bytes)."""
    plan = cm.generator.decode.plan
    spec = TARGETS[target]
    ex = PlanExecutor(plan, cm.generator.decode.weights, torch.device("cpu"), kernels=False, spec=spec)
    ex.module = lambda name: _NoModule()  # type: ignore[method-assign]
    syms = {s.name: 1 for s in plan.symbols}
    inputs = plan_inputs(plan, syms, torch.device("cpu"))
    names = [i.name for i in plan.inputs if i.kind == "user"]
    for name, t in zip(names, inputs):
        if name == "cache_len":
            t.fill_(context)
    caches = {t.data_ptr() for name, t in zip(names, inputs) if name.startswith("kv_cache_")}
    live = (context + 1) / MAX_SEQ
    with recording_launches() as seen, torch.no_grad():
        ex.run(inputs)
    # launches come in step order; each step issues what its family counts for this target
    owners: list[tuple[object, list[int]]] = []
    for step in plan.steps:
        if step.kind in ("fused", "template"):
            shape = [Expr(e)(syms) for e in ex.buffers[step.outputs[0]].shape]
            count = FAMILIES[step.launcher or step.kind].launch_count(step.params, spec, shape)
            owners += [(step, shape)] * count
    assert len(owners) == len(seen), (len(owners), len(seen))
    workspace = {t.data_ptr(): key for key, t in ex.workspace.items()}
    launches = []
    for (step, shape), launch in zip(owners, seen):
        tensors = {(a.data_ptr(), a.nbytes, a.element_size()) for a in launch.args if isinstance(a, torch.Tensor)}
        # a workspace buffer is sized for the plan's largest shapes: count what this step uses of it at batch 1
        used = FAMILIES[step.launcher or step.kind].workspace(step.params, spec, shape)
        tensors = {(ptr, used[workspace[ptr]] * elem if ptr in workspace else size, elem)
                   for ptr, size, elem in tensors}
        # a pointwise kernel reads at most one element of each input per output element (the embedding gather:
        # one table row per token, not the table)
        cap = None
        if step.kind == "fused" and not step.params.get("reduction"):
            cap = math.prod(shape)
        nbytes = sum(int(size * live) if ptr in caches else (size if cap is None else min(size, cap * elem))
                     for ptr, size, elem in tensors)
        programs = 1
        for d in launch.grid:
            programs *= int(d)
        launches.append({"name": launch.name, "family": step.launcher or step.kind, "layer": _layer_of(step),
                         "programs": programs, "bytes": nbytes})
    return launches


def compile_shape(layers: int, options: dict) -> object:
    from quant_decode import LLAMA_1B, build

    model = build({**LLAMA_1B, "num_hidden_layers": layers}, torch.bfloat16, "cpu")
    return braze.compile(model, max_seq=MAX_SEQ, max_batch=16, **options)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="sm_90,sm_80")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--out", default=None)
    p.add_argument("--quant", choices=["int6"], default=None, help="int6: rounded to nearest (no calibration)")
    p.add_argument("--int6-act", choices=["a16", "a8"], default="a16")
    args = p.parse_args(argv)
    targets = args.targets.split(",")
    options = dict(quant="int6", int6_method="rtn", int6_act=args.int6_act) if args.quant else {}
    models = {n: compile_shape(n, options) for n in (1, 2)}
    weights = f"int6 W6{args.int6_act.upper()} (rtn)" if args.quant else "bf16"
    lines = [f"# decode step model: Llama-3.2-1B shape ({LAYERS} layers), {weights}, batch 1, context "
             f"{args.context}, max_seq {MAX_SEQ}", ""]
    for target in targets:
        sms = TARGETS[target].sm_count
        build = build_targets(models[2], [target], plans=["decode"])
        ptxas = {}
        for r in build.results:
            ptxas[r.spec.kernel] = (max(r.regs, ptxas.get(r.spec.kernel, (0, 0))[0]),
                                    max(r.spill_stores + r.spill_loads, ptxas.get(r.spec.kernel, (0, 0))[1]))
        step = record_step(models[2], target, args.context)
        layer = [s for s in step if s["layer"] == 1]
        rest = [s for s in step if s["layer"] is None]
        assert len(layer) == len([s for s in step if s["layer"] == 0]), "layers 0 and 1 launch differently"
        per_layer = len(layer)
        total = sum(s["bytes"] for s in rest) + LAYERS * sum(s["bytes"] for s in layer)
        weights = models[1].generator.decode.weights, models[2].generator.decode.weights
        w1 = sum({t.data_ptr(): t.nbytes for t in weights[0].values()}.values())
        w2 = sum({t.data_ptr(): t.nbytes for t in weights[1].values()}.values())
        kv_layer = 2 * 8 * 64 * 2 * (args.context + 1)  # k and v, 8 kv heads x 64 dims, bf16, live slots
        ideal = w1 + (LAYERS - 1) * (w2 - w1) + LAYERS * kv_layer
        lines += [f"## {target} ({sms} SMs): {len(rest) + LAYERS * per_layer} launches per step, "
                  f"{per_layer} per layer", "",
                  f"{'launch (layer: each of the 16; once: per step)':<60} {'programs':>8} {'>= SMs':>6} {'regs':>4} "
                  f"{'spill B':>7} {'MB read':>8}"]
        for tag, group in (("layer", layer), ("once", rest)):
            for s in group:
                regs, spill = ptxas.get(s["name"], (0, 0))
                lines.append(f"{tag + ': ' + s['family'] + ' ' + s['name']:<60} {s['programs']:>8} "
                             f"{'yes' if s['programs'] >= sms else 'no':>6} {regs:>4} {spill:>7} "
                             f"{s['bytes'] / 1e6:>8.2f}")
        lines += ["", f"bytes per step (model): {total / 1e9:.3f} GB; ideal (weights once + live KV): "
                      f"{ideal / 1e9:.3f} GB; model / ideal = {total / ideal:.3f}", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
