"""Steady-state check of a long-running generation process: after a warm-up, host memory stays flat and no list,
dict, set or deque reachable from the compiled model keeps growing (a per-step append nobody trims would, over
millions of steps, take the process down). Used by tests/test_steady_state.py (short) and
benchmarks/steady_state.py (10,000 decode steps)."""

from __future__ import annotations

import gc
import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

CONTAINERS = (list, dict, set, deque)


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def container_sizes(root: Any, max_depth: int = 6) -> dict[str, int]:
    """len() of every container reachable from `root` through attributes and container items (paths as keys);
    tensors and modules are leaves, each object is visited once."""
    sizes: dict[str, int] = {}
    seen: set[int] = set()
    stack: list[tuple[Any, str, int]] = [(root, "model", 0)]
    while stack:
        obj, path, depth = stack.pop()
        if id(obj) in seen or depth > max_depth or isinstance(obj, (torch.Tensor, torch.nn.Module, type)):
            continue
        seen.add(id(obj))
        if isinstance(obj, CONTAINERS):
            sizes[path] = len(obj)
            items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, deque)) else ()
            for k, v in list(items)[:64]:
                stack.append((v, f"{path}[{k!r}]" if isinstance(k, (str, int)) else f"{path}[.]", depth + 1))
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("braze"):
            for k, v in vars(obj).items():
                stack.append((v, f"{path}.{k}", depth + 1))
    return sizes


@dataclass
class SteadyState:
    steps: int
    requests: int
    rss_after_warmup: int
    rss_end: int
    grown: dict[str, tuple[int, int]] = field(default_factory=dict)  # path -> (after warm-up, end)

    @property
    def rss_growth(self) -> float:
        return (self.rss_end - self.rss_after_warmup) / max(1, self.rss_after_warmup)

    def __str__(self) -> str:
        return (f"{self.steps} decode steps in {self.requests} requests: RSS {self.rss_after_warmup / 2**20:.1f} -> "
                f"{self.rss_end / 2**20:.1f} MiB ({100 * self.rss_growth:+.2f}%); growing containers: "
                f"{', '.join(f'{k} {a}->{b}' for k, (a, b) in self.grown.items()) or 'none'}")


def run_steady_state(model: Any, steps: int, batch: int = 2, new_tokens: int = 48, prompt_len: int = 8,
                     warmup_requests: int = 3, seed: int = 0) -> SteadyState:
    """Generate requests of `batch` random prompts (`new_tokens` decode steps each, the cache reset by every new
    request) until `steps` decode steps have run after the warm-up; report RSS and container growth."""
    vocab = int(getattr(getattr(model, "model_config", None), "vocab_size", 0) or 256)
    g = torch.Generator().manual_seed(seed)

    def request() -> None:
        ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
        model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[])  # no early stop

    for _ in range(warmup_requests):
        request()
    gc.collect()
    before, rss0 = container_sizes(model), rss_bytes()
    done = requests = 0
    while done < steps:
        request()
        done += new_tokens - 1  # the first new token comes from prefill
        requests += 1
    gc.collect()
    after, rss1 = container_sizes(model), rss_bytes()
    grown = {k: (before.get(k, 0), n) for k, n in after.items() if n > before.get(k, 0)}
    return SteadyState(done, requests, rss0, rss1, grown)
