"""The kernel-family contract, and the one path every kernel launch goes through.

A family (Inductor's TritonTemplate, Thunder's checker + implementation) owns, in one module under braze/kernels/:
its name (the plan Step's `launcher`), the braze ops it lowers, its Jinja2 template(s), `supports` (why a node
cannot use it), `lower` (node -> kernel source + Step), `config` (tiles, warps, stages, splits from a DeviceSpec),
`launch` (tensors -> grid + arguments) and `launch_count` (the launches one step issues). Lowering, the plan
executor, the report and the tests all reach a family through braze.kernels.FAMILIES; packages import this
package without the compiler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from braze.kernels import interpreter_bf16
from braze.kernels.device import DeviceSpec

if TYPE_CHECKING:
    import torch.fx as fx

    from braze.runtime.plan import Step

interpreter_bf16.install()  # bf16 kernels under the Triton interpreter compute as on a GPU

FLOAT_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

@dataclass(frozen=True)
class Launch:
    """One launch as a hook sees it. kind: "kernel" (a Triton kernel: `kernel`, `args`, `meta` are what it was
    called with, e.g. for cross-compiling the same specialization) or "torch" (a device op a launcher issues
    itself: a memset, a cast copy)."""

    kind: str
    name: str
    grid: tuple[int, ...] = ()
    kernel: Any = None
    args: tuple[Any, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


# Called with a Launch for every launch; tests, the executor's counters and the cross-compiler observe them here.
LAUNCH_HOOKS: list[Callable[[Launch], None]] = []


def launch_kernel(kernel: Any, grid: Sequence[int], *args: Any, **meta: Any) -> None:
    """Launch one Triton kernel (every family launches through here, so counts are observed, not assumed)."""
    grid = tuple(grid)
    if LAUNCH_HOOKS:
        event = Launch("kernel", getattr(kernel, "__name__", str(kernel)), grid, kernel, args, meta)
        for hook in LAUNCH_HOOKS:
            hook(event)
    kernel[grid](*args, **meta)


def device_op(name: str) -> None:
    """Record a torch device op (memset, copy) a launcher issues: on a GPU it is a launch like any kernel."""
    for hook in LAUNCH_HOOKS:
        hook(Launch("torch", name))


def workspace_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The executor's workspace buffers handed to a launch (KernelFamily.workspace), by key."""
    return {k.removeprefix("workspace_"): t for k, t in tensors.items() if k.startswith("workspace_")}


@contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Collect every Launch inside the block."""
    seen: list[Launch] = []
    hook = seen.append

    LAUNCH_HOOKS.append(hook)
    try:
        yield seen
    finally:
        LAUNCH_HOOKS.remove(hook)


class KernelFamily:
    """Base of every family; subclasses set `name`, `ops`, `templates` and implement lower/launch/launch_count."""

    name: str = ""
    ops: tuple[Any, ...] = ()  # braze ops (OpOverloads) this family lowers
    templates: tuple[str, ...] = ()  # files under braze/templates/
    # the launcher / template interface version: bumped when `launch` passes arguments kernels lowered before would
    # not accept, so a package lowered against the old interface is refused in one line (plan steps record it when
    # it is above 1; PlanExecutor checks it) instead of failing inside a kernel call
    abi: int = 1

    def supports(self, node: fx.Node) -> str | None:
        """None when `node` can use this family's kernel, else the reason it runs eagerly (shown in the report)."""
        return None

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        """Kernel source (kernels named `name`) and the plan Step that launches it."""
        raise NotImplementedError

    def lower_deterministic(self, node: fx.Node, name: str) -> tuple[str, Step]:
        """lower() for a deterministic compile: the Step records the mode (params["deterministic"]) and `launch`
        picks the family's batch-invariant configuration from it. Families whose kernel source changes in that
        mode (matmul: LayerCast) override this."""
        body, step = self.lower(node, name)
        step.params["deterministic"] = True
        return body, step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        """Compute sizes, strides, grid and configuration from the real tensors and launch."""
        raise NotImplementedError

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        """Launches (kernels + device ops) one step issues for an output of `out_shape` on `device`."""
        return 1

    def workspace(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> dict[str, int]:
        """Scratch one step needs for an output of `out_shape` (key -> elements), handed to `launch` as
        tensors["workspace_<key>"]. The executor allocates it once for the plan's largest shapes and shares it
        between steps (they run one after another). A key is a dtype name ("float32", "int32"): zeroed buffers,
        which a launch must leave at zero; or "scratch_<dtype>": contents undefined, a launch writes what it reads."""
        return {}

    def __repr__(self) -> str:
        return f"<kernel family {self.name}: {', '.join(self.templates)}>"
