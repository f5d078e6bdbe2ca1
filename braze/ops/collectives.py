"""Collectives for tensor parallelism, as braze::* ops over torch.distributed's default process group.

They are functional (a new tensor out, the input untouched) so passes and the plan treat them like any other op;
the plan runs them as eager steps. Every rank's plan issues them in the same order (the sharded graphs are
identical across ranks), which is what torch.distributed requires. `COUNTS` lets tests and reports observe how
many collectives a step issues.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from torch import Tensor

COUNTS: Counter = Counter()  # op name -> calls in this process


@torch.library.custom_op("braze::all_reduce", mutates_args=())
def all_reduce(x: Tensor) -> Tensor:
    """Sum of `x` over every rank (row-parallel linears' partial products)."""
    return all_reduce_in_place(x.contiguous().clone())


def all_reduce_in_place(x: Tensor) -> Tensor:
    """braze::all_reduce as a plan step where its input is a kernel's output that nothing else reads
    (codegen/lower.py): the sum lands in that buffer, no copy; the memory plan keeps the buffer alive as the
    result (Step.params["in_place"]). A plain function, not an op: the graph keeps the functional all_reduce."""
    COUNTS["all_reduce"] += 1
    if not x.is_contiguous():
        x = x.contiguous()
    dist.all_reduce(x)
    return x


@all_reduce.register_fake
def _all_reduce_fake(x: Tensor) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("braze::all_gather", mutates_args=())
def all_gather(x: Tensor, world: int) -> Tensor:
    """Every rank's `x` concatenated along the last dim in rank order (vocab-parallel logits)."""
    COUNTS["all_gather"] += 1
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    return torch.cat(parts, dim=-1)


@all_gather.register_fake
def _all_gather_fake(x: Tensor, world: int) -> Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] * world)


COLLECTIVE_OPS = {
    "all_reduce": torch.ops.braze.all_reduce.default,
    "all_gather": torch.ops.braze.all_gather.default,
}
