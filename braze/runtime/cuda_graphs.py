"""CUDA-graph replay of a plan: one graph per input-shape bucket, captured once over static buffers.

Autotuning/compilation happens in the warm-up run before capture; all buckets share one memory pool so
capturing many shapes does not multiply memory.
"""

from __future__ import annotations

from typing import Any

import torch


class CudaGraphRunner:
    def __init__(self, executor: Any):
        self.executor = executor
        self.graphs: dict[tuple, tuple[Any, list[torch.Tensor], list[torch.Tensor]]] = {}
        self.pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        entry = self.graphs.get(key)
        if entry is None:
            self.executor.bind(inputs)  # errors before any capture
            static_in = [t.clone() for t in inputs]
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.executor.run(static_in)  # warm-up: compiles every kernel outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                static_out = self.executor.run(static_in)
            entry = (graph, static_in, static_out)
            self.graphs[key] = entry
        graph, static_in, static_out = entry
        for dst, src in zip(static_in, inputs):
            dst.copy_(src)
        graph.replay()
        return [o.clone() for o in static_out]
