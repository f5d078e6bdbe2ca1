"""The object braze.compile returns: the model's call signature in front of a compiled plan.

Executors: `interpret` / `cuda` run the plan's generated kernels (PlanExecutor); `reference` runs the rewritten
graph's torch reference implementations (for golden checks and long CPU runs). Never report reference-executor
timings as kernel performance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils import _pytree as pytree

from braze.runtime.executor import PlanExecutor
from braze.runtime.plan import Plan


@dataclass
class CausalLMOutput:
    """Mirrors the `.logits` field of HF's CausalLMOutputWithPast."""

    logits: torch.Tensor

    def __getitem__(self, i: int) -> torch.Tensor:
        return (self.logits,)[i]


class CompiledModel:
    """A compiled forward. Call it like the original module."""

    def __init__(self, plan: Plan, weights: dict[str, torch.Tensor], device: torch.device, executor: str,
                 report: Any = None, out_spec: Any = None, in_spec: Any = None, causal_lm: bool = False,
                 graph_module: Any = None, config: Any = None, model_config: Any = None):
        self.plan = plan
        self.weights = weights
        self.device = device
        self.executor_name = executor
        self.report = report
        self.out_spec = out_spec
        self.in_spec = in_spec
        self.causal_lm = causal_lm
        self.graph_module = graph_module
        self.config = config
        self.model_config = model_config
        self.executor = PlanExecutor(plan, weights, device) if executor != "reference" else None
        self._cuda_graphs: Any = None
        if executor == "cuda" and (config is None or getattr(config, "cuda_graphs", True)):
            from braze.runtime.cuda_graphs import CudaGraphRunner

            self._cuda_graphs = CudaGraphRunner(self.executor)

    # ---- running --------------------------------------------------------------------------------------
    def run_flat(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.executor_name == "reference":
            return self._run_reference(inputs)
        if self._cuda_graphs is not None:
            return self._cuda_graphs.run(inputs)
        return self.executor.run(inputs)

    def _run_reference(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.graph_module is None:
            raise RuntimeError("the reference executor needs the rewritten graph; it is not stored in packages")
        from braze.runtime.executor import PlanExecutor as _PE

        _PE(self.plan, {}, self.device).bind(inputs) if self.plan else None
        env = dict(self.weights)
        args = []
        users = iter(inputs)
        for n in self.graph_module.graph.nodes:
            if n.op == "placeholder":
                args.append(env[n.name] if n.name in env else next(users))
        with torch.no_grad():
            out = torch.fx.Interpreter(self.graph_module).run(*args)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.causal_lm:
            return self._call_causal_lm(*args, **kwargs)
        flat, _ = pytree.tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        with torch.no_grad():
            outs = self.run_flat(tensors)
        if self.out_spec is not None:
            return pytree.tree_unflatten(outs, self.out_spec)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _call_causal_lm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        position_ids: torch.Tensor | None = None, **unused: Any) -> CausalLMOutput:
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the compiled forward takes unpadded batches; use generate() for padded prompts")
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        with torch.no_grad():
            (logits,) = self.run_flat([input_ids, position_ids.contiguous()])
        return CausalLMOutput(logits)

    # ---- introspection --------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        return dict(self.executor.stats) if self.executor else {}

    def __repr__(self) -> str:
        return f"CompiledModel({self.plan.name}, executor={self.executor_name}, launches={self.plan.launches})"
