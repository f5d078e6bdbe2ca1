"""Run a function on N local ranks of a torch.distributed process group (torch.multiprocessing): how `braze compile
--tp N` compiles each rank's shard, and how tensor parallelism is tested without GPUs (gloo on CPU). Each rank's
return value (or its traceback) comes back to the caller, in rank order."""

from __future__ import annotations

import io
import os
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _rank_main(rank: int, world: int, init: str, backend: str, fn: Callable[..., Any], args: tuple,
               queue: Any) -> None:
    try:
        torch.set_num_threads(1)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
        try:
            buf = io.BytesIO()  # by value: a tensor sent as a shared-memory handle dies with this process
            torch.save(fn(rank, world, *args), buf)
            queue.put((rank, True, buf.getvalue()))
        finally:
            dist.destroy_process_group()
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


def spawn(world: int, fn: Callable[..., Any], *args: Any, timeout: float = 600.0, backend: str = "gloo"
          ) -> list[Any]:
    """fn(rank, world, *args) on `world` spawned processes sharing a process group (file rendezvous: no ports;
    backend "nccl" puts rank r on cuda:r);
    returns the results in rank order, or raises with the first failing rank's traceback. `fn` and its
    arguments must pickle, its result must torch.save."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    fd, path = tempfile.mkstemp(prefix="braze_tp_")
    os.close(fd)
    os.unlink(path)  # the store creates it
    procs = [ctx.Process(target=_rank_main, args=(r, world, f"file://{path}", backend, fn, args, queue), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    failure = None
    try:
        for _ in procs:
            rank, ok, value = queue.get(timeout=timeout)
            if not ok and failure is None:
                failure = f"rank {rank} failed:\n{value}"
                break
            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if failure else timeout)
            if p.is_alive():
                p.kill()
        if os.path.exists(path):
            os.unlink(path)
    if failure:
        raise RuntimeError(failure)
    return [results[r] for r in range(world)]
