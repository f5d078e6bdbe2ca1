"""CUDA-graph replay of a plan: one graph per input-shape bucket, captured once over static buffers.

Kernels are compiled in a warm-up run before capture; all buckets share one memory pool so capturing many shapes
does not multiply memory. Inputs named with a `static_prefixes` prefix (the KV cache, per-request state) are
captured by identity and must be the same tensors at replay; the others are copied into static buffers.
`ReplayRunner` keeps the same bookkeeping without CUDA (a "graph" is a plan run over the captured buffers), so the
CPU tests check what a graph would see: stale pointers, state that is not static, outputs reused across replays.
"""

from __future__ import annotations

from typing import Any

import torch


class CudaGraphRunner:
    def __init__(self, executor: Any, static_prefixes: tuple[str, ...] = ()):
        self.executor = executor
        self.graphs: dict[tuple, tuple[Any, list[torch.Tensor], list[torch.Tensor]]] = {}
        self.pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None
        names = [i.name for i in executor.user_inputs]
        self.static = [any(n.startswith(p) for p in static_prefixes) for n in names]

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            self.executor.bind(inputs)  # shape errors before any capture
            static_in = [t if keep else t.clone() for t, keep in zip(inputs, self.static)]
            entry = self.graphs[key] = self._capture(static_in)
        graph, static_in, static_out = entry
        for dst, src, keep in zip(static_in, inputs, self.static):
            if keep:
                if dst.data_ptr() != src.data_ptr():
                    raise RuntimeError("a CUDA-graph state input changed identity; allocate it once per bucket")
            else:
                dst.copy_(src)
        return [o.clone() for o in self._replay(entry)]

    def _capture(self, static_in: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.executor.run(static_in)  # warm-up: compiles every kernel outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            static_out = self.executor.run(static_in)
        return graph, static_in, static_out

    def _replay(self, entry: tuple[Any, list[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
        entry[0].replay()
        return entry[2]


class ReplayRunner(CudaGraphRunner):
    """CudaGraphRunner's bookkeeping without CUDA: each replay runs the plan over the buffers captured first."""

    def _capture(self, static_in: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor], list[torch.Tensor]]:
        return None, static_in, []

    def _replay(self, entry: tuple[Any, list[torch.Tensor], list[torch.Tensor]]) -> list[torch.Tensor]:
        return self.executor.run(entry[1])
