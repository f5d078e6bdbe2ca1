"""Device descriptions: what a launch configuration may assume about the machine that runs it.

Every family chooses tiles, warps, stages and splits from a DeviceSpec, never from a bare "interpret" flag, so
one function serves the interpreter, the GPU in this process and the targets braze cross-compiles for.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache

import torch


@dataclass(frozen=True)
class DeviceSpec:
    """The limits a launch configuration must fit (per block / per SM)."""

    name: str  # "interpreter", "sm_90", ...
    capability: int  # 90 for sm_90; 0 for the interpreter
    sm_count: int  # streaming multiprocessors (0: the interpreter, which runs programs one after another)
    smem_per_block: int  # bytes of shared memory one program may use (opt-in maximum)
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255

    @property
    def interpret(self) -> bool:
        """The Triton interpreter pays per program, ignores warps/stages and has no shared memory limit."""
        return self.capability == 0


INTERPRETER = DeviceSpec("interpreter", capability=0, sm_count=0, smem_per_block=1 << 30)

# Cross-compilation targets; SM counts of the most common part of each (A100, A10, L4, H100 SXM).
TARGETS: dict[str, DeviceSpec] = {
    "sm_80": DeviceSpec("sm_80", 80, sm_count=108, smem_per_block=166912),
    "sm_86": DeviceSpec("sm_86", 86, sm_count=72, smem_per_block=101376),
    "sm_89": DeviceSpec("sm_89", 89, sm_count=58, smem_per_block=101376),
    "sm_90": DeviceSpec("sm_90", 90, sm_count=132, smem_per_block=232448),
}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@cache
def _cuda_spec(index: int) -> DeviceSpec:
    props = torch.cuda.get_device_properties(index)
    cap = props.major * 10 + props.minor
    known = TARGETS.get(f"sm_{cap}", TARGETS["sm_86"])
    smem = getattr(props, "shared_memory_per_block_optin", 0) or known.smem_per_block
    return DeviceSpec(f"sm_{cap}", cap, sm_count=props.multi_processor_count, smem_per_block=int(smem),
                      regs_per_sm=getattr(props, "regs_per_multiprocessor", 65536))


def device_spec(device: torch.device | str | None = None) -> DeviceSpec:
    """The description kernels launched on `device` get: the interpreter under TRITON_INTERPRET=1 (or on CPU)."""
    device = torch.device(device) if device is not None else None
    if interpreting() or device is None or device.type != "cuda":
        return INTERPRETER
    return _cuda_spec(device.index if device.index is not None else torch.cuda.current_device())


def target_spec(name: str) -> DeviceSpec:
    """A cross-compilation target by name ('sm_90', '90', 'sm90')."""
    key = name.strip().lower().replace("sm", "").lstrip("_")
    spec = TARGETS.get(f"sm_{key}")
    if spec is None:
        from braze.runtime.errors import ConfigError

        raise ConfigError(f"unknown GPU target {name!r}; valid targets: {', '.join(TARGETS)}")
    return spec
