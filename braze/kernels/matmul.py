"""Matmul family: C = epilogue(prologue(A) @ W^T), rendered from templates/matmul.py.j2.

One template covers every linear layer of a decoder block, so fusions (RMSNorm before the GEMM, a gate/up pair
with SwiGLU/GeGLU, bias, activation, residual add) save whole round trips through memory. Lowers braze::linear
and braze::linear_glu.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import triton

from braze.kernels.device import DeviceSpec
from braze.kernels.family import FLOAT_NAMES, KernelFamily, launch_kernel
from braze.kernels.render import render_template

if TYPE_CHECKING:
    import torch.fx as fx

    from braze.runtime.plan import Step

DUAL_KINDS = (None, "swiglu", "geglu", "geglu_erf")
ACTIVATIONS = (None, "silu", "gelu", "gelu_tanh", "relu", "relu2")
INPUT_PRECISIONS = ("ieee", "tf32")
OUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_GLU = {"silu": "swiglu", "gelu_tanh": "geglu", "gelu": "geglu_erf"}


@dataclass(frozen=True)
class MatmulSpec:
    """What one generated kernel computes; hashable so a spec can key a kernel cache."""

    name: str
    rmsnorm_prologue: bool = False
    # LayerNorm prologue instead (GPT-2, OPT, Falcon, Phi, GPT-NeoX, ...): centred rows, then the optional bias
    layernorm_prologue: bool = False
    has_norm_bias: bool = False
    dual: str | None = None
    has_bias: bool = False
    activation: str | None = None
    has_residual: bool = False
    input_precision: str = "ieee"
    out_dtype: str = "float32"
    # deterministic compiles: fp32 math on upcast 16-bit weights (LayerCast), and the ROW_DOT constexpr
    layercast: bool = False
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        # Reject bad specs here: a wrong flag would otherwise surface as a confusing Triton compile error.
        if not self.name.isidentifier():
            raise ValueError(f"kernel name {self.name!r} is not a Python identifier")
        if self.dual not in DUAL_KINDS:
            raise ValueError(f"dual must be one of {DUAL_KINDS}, got {self.dual!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.dual is not None and (self.has_bias or self.activation is not None):
            raise ValueError("dual (gated) GEMM takes neither bias nor a separate activation")
        if self.input_precision not in INPUT_PRECISIONS:
            raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {self.input_precision!r}")
        if self.out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {tuple(OUT_DTYPES)}, got {self.out_dtype!r}")
        if self.layernorm_prologue and self.rmsnorm_prologue:
            raise ValueError("a matmul takes one norm prologue: rmsnorm_prologue or layernorm_prologue")
        if self.has_norm_bias and not self.layernorm_prologue:
            raise ValueError("has_norm_bias is the LayerNorm prologue's shift: it needs layernorm_prologue")
        if self.layercast and self.input_precision != "ieee":
            raise ValueError("layercast computes in fp32: it needs input_precision='ieee'")


def check_header(header: str) -> str:
    """Headers are pasted at the top of generated source, so they must be comments."""
    header = header.rstrip("\n")
    bad = [line for line in header.splitlines() if line.strip() and not line.startswith("#")]
    if bad:
        raise ValueError(f"header lines must be comments, got {bad[0]!r}")
    return header


def render_matmul(spec: MatmulSpec, header: str = "") -> str:
    """Return the Triton source of the kernel described by `spec`; `header` lines must start with '#'."""
    return render_template(
        "matmul.py.j2", header=check_header(header), name=spec.name, rmsnorm_prologue=spec.rmsnorm_prologue,
        layernorm_prologue=spec.layernorm_prologue, has_norm_bias=spec.has_norm_bias,
        dual=spec.dual, has_bias=spec.has_bias, activation=spec.activation, has_residual=spec.has_residual,
        input_precision=spec.input_precision, out_dtype=spec.out_dtype, layercast=spec.layercast,
        batch_invariant=spec.batch_invariant)


def pow2_clamp(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(1, x))))


@dataclass(frozen=True)
class MatmulConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    row_dot: bool = False  # the GEMV form: per-row reductions instead of tl.dot

    def meta(self, device: DeviceSpec) -> dict[str, Any]:
        meta: dict[str, Any] = {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                                "ROW_DOT": self.row_dot}
        if not device.interpret:  # the interpreter ignores warps and stages
            meta.update(num_warps=self.num_warps, num_stages=self.num_stages)
        return meta


def matmul_config(M: int, N: int, K: int, device: DeviceSpec, *, elem_size: int = 2, dual: bool = False,
                  deterministic: bool = False) -> MatmulConfig:
    """Tiles, warps and stages for one launch.

    The interpreter pays per program, so it gets the biggest tiles. On a GPU a few single-row launches take the
    GEMV form (takes_gemv_form); the rest are tl.dot tiles (mma_config): decode is bandwidth bound and wants
    enough programs to cover the SMs, and stages are as deep as the device's shared memory per block allows.

    deterministic: the batch-invariant configuration: nothing depends on M (BLOCK_M fixed at 16, BLOCK_N/BLOCK_K
    from N and K only, no split-K), so a row's dot products are the same computation at any batch size.
    """
    if deterministic:
        return _deterministic_config(N, K, device, dual=dual)
    if device.interpret:
        # Interpreted time is the weight loads plus a fixed NumPy cost per op; wide N tiles and a 128-deep K tile
        # keep both low (SmolLM2's 49152 x 576 lm_head at M=1: 12.7 s at 128 x 128, 1.5 s at 2048 x 128).
        return MatmulConfig(pow2_clamp(M, 16, 64), pow2_clamp(N, 16, INTERPRETER_MAX_BLOCK_N), pow2_clamp(K, 16, 128))
    if takes_gemv_form(M, N, K, dual=dual):
        return gemv_config(M, N, K, device, elem_size=elem_size, dual=dual)
    return mma_config(M, N, K, device, elem_size=elem_size, dual=dual)


def mma_config(M: int, N: int, K: int, device: DeviceSpec, *, elem_size: int = 2, dual: bool = False,
               aligned: bool | None = None) -> MatmulConfig:
    """tl.dot (tensor-core) launch: BLOCK_M covers M (at least the 16-row MMA tile), BLOCK_N halves until the
    grid covers the SMs, and the K tile and stages fit the device's shared memory per block.

    aligned: whether every operand stride other than 1 is a multiple of 16 elements (default: K is, as for
    contiguous rows): triton specializes such ints as divisible by 16 and vectorizes the loads; other rows it
    loads element by element."""
    block_m = pow2_clamp(M, 16, 128)
    block_n = pow2_clamp(N, 16, 64 if dual else 128)
    block_k = pow2_clamp(K, 16, 64 if block_m >= 64 else 128)
    if elem_size >= 4:  # fp32 dots are FMA loops that hold a K slice of both operands in registers: keep it thin
        block_k = min(block_k, 16 if block_m >= 64 else 32)  # (ptxas, sm_80: 64 -> 30 KB of spills; 16/32 -> none)
    if not (K % 16 == 0 if aligned is None else aligned):
        # element-wise loads, each element with its own 64-bit address: a 128 x 64 fp16 tile took 255 registers
        # and spilled 332 B on sm_80 at K = 100 (a Linear(100, N), ptxas); at most UNALIGNED_TILE_ELEMS per
        # operand tile: none spilled (K = 50 and 100, M 16-1024, N 64-2048, sm_80 / sm_86)
        widest = max(block_m, (2 if dual else 1) * block_n)
        while block_k > 16 and widest * block_k > UNALIGNED_TILE_ELEMS:
            block_k //= 2
    # down to 16 columns for one row (the 1B QKV at batch 1: 96 programs at 32, 192 at 16 on 132 SMs); at M = 8
    # a 16-column tile spilled on sm_90 (make gpucheck), M = 1 is a constant Triton specializes on
    narrowest = 16 if M == 1 else 32
    while block_n > narrowest and triton.cdiv(M, block_m) * triton.cdiv(N, block_n) < device.sm_count:
        block_n //= 2
    if dual and block_m == 16:  # two 16-row accumulators 64 wide plus a GeGLU (gelu-tanh) epilogue spilled 20 B at
        block_n = min(block_n, 32)  # 96 registers on sm_90 (Gemma-2-2B gate/up, make gpucheck); 32: none, and what
        # the 1B shape's gate/up already took to fill 132 SMs (2554 GB/s on an H200, benchmarks/matmul_tiles.py)
    n_weights = 2 if dual else 1
    budget = device.smem_per_block - 8 * 1024  # headroom for the epilogue's layout conversion
    stage_bytes = lambda bk: (block_m * bk + n_weights * bk * block_n) * elem_size  # noqa: E731
    while block_k > 32 and 2 * stage_bytes(block_k) > budget:
        block_k //= 2
    stages = max(2, min(4, budget // stage_bytes(block_k)))
    big = block_m * block_n * n_weights >= 128 * 128
    return MatmulConfig(block_m, block_n, block_k, num_warps=8 if big else 4, num_stages=stages)


INTERPRETER_MAX_BLOCK_N = 2048
UNALIGNED_TILE_ELEMS = 1024
GEMV_MAX_M = 1  # decode rows (batch x draft tokens) up to which a GPU launch may take the GEMV form
GEMV_MIN_BLOCK_N = 4
# fp32 products of one K tile per thread (per weight): 48-128 registers, no spills (ptxas, sm_80-90); 64 took
# up to 221 registers and spilled at M=8 on sm_86/89
GEMV_ELEMS_PER_THREAD = 32


def takes_gemv_form(M: int, N: int, K: int, *, dual: bool = False) -> bool:
    """Whether a GPU launch uses the GEMV form (ROW_DOT) rather than tl.dot tiles.

    benchmarks/matmul_tiles.py on an H200 (2026-11-30, Llama-3.2-1B shapes, bf16): the GEMV form wins only at M=1
    on single-weight GEMMs with K >= N (o_proj 10.1 vs 10.6 us, down_proj 24.6 vs 28.9 us); tl.dot wins QKV,
    gate/up and lm_head at M=1 and every shape from M=2 on (2-37x at M=8: the per-row reduction's cost grows with
    M while a 16-row MMA tile is free up to 16 rows).
    """
    return M <= GEMV_MAX_M and not dual and K >= N


def gemv_config(M: int, N: int, K: int, device: DeviceSpec, *, elem_size: int = 2, dual: bool = False,
                num_warps: int = 4) -> MatmulConfig:
    """Small-M (decode) launch: no MMA, so M is not padded to 16 rows; BLOCK_N shrinks until the grid covers every
    SM (a b=1 GEMV is bandwidth bound: an idle SM is lost bandwidth); BLOCK_K takes what is left of a per-thread
    register budget for the [BLOCK_M, BLOCK_K, BLOCK_N] product tile, so a program streams long contiguous runs
    of each weight row."""
    block_m = pow2_clamp(M, 1, 16)
    block_n = 16 if dual else 32
    while block_n > GEMV_MIN_BLOCK_N and triton.cdiv(N, block_n) < device.sm_count:
        block_n //= 2
    n_weights = 2 if dual else 1
    budget = GEMV_ELEMS_PER_THREAD * 32 * num_warps // n_weights
    while block_n > GEMV_MIN_BLOCK_N and block_m * block_n * 16 > budget:  # BLOCK_K is at least 16
        block_n //= 2
    block_k = pow2_clamp(K, 16, max(16, min(1024, budget // (block_m * block_n))))
    stage_bytes = (block_m + n_weights * block_n) * block_k * elem_size
    stages = max(1, min(3, (device.smem_per_block - 8 * 1024) // stage_bytes))
    return MatmulConfig(block_m, block_n, block_k, num_warps=num_warps, num_stages=stages, row_dot=True)


def _deterministic_config(N: int, K: int, device: DeviceSpec, *, dual: bool) -> MatmulConfig:
    if device.interpret:
        # ROW_DOT: the interpreter's tl.dot (BLAS) is not row-invariant; a GPU's tl.dot with fixed tiles is
        return MatmulConfig(16, pow2_clamp(N, 16, 64), pow2_clamp(K, 16, 64), row_dot=True)
    # Deterministic dots are fp32 (LayerCast upcasts 16-bit weights): FMA loops that hold a K slice of both operands
    # in registers, as in matmul_config's fp32 case. make gpucheck (bf16-det, 2026-11-30) at BLOCK_K 128: 5.9-16.7 KB
    # of spills and 102-184 KB of shared memory (over sm_80/86/89's limits); BLOCK_K 32 is what fp32 tiles take.
    # With 4 warps one sm_90 forward tile still spilled 8 B at 80 registers; 8 warps: no spill on any target.
    block_n = pow2_clamp(N, 16, 64 if dual else 128)
    # narrower N tiles until a single-row launch covers the SMs (decode: 1B o_proj went from 16 programs to 128):
    # decided by N and the device alone, so still batch-invariant
    while block_n > 16 and triton.cdiv(N, block_n) < device.sm_count:
        block_n //= 2
    block_k = pow2_clamp(K, 16, 32)
    budget = device.smem_per_block - 8 * 1024
    stage_bytes = (16 * block_k + (2 if dual else 1) * block_k * block_n) * 4  # operands upcast to fp32 in the kernel
    return MatmulConfig(16, block_n, block_k, num_warps=8, num_stages=max(2, min(4, budget // stage_bytes)))


def _precision(dtype: torch.dtype) -> str:
    # fp32 models get IEEE fp32 dots, as eager does; 16-bit inputs use the tensor cores natively anyway
    return "ieee" if dtype == torch.float32 else "tf32"


def matmul_args(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, *, w2: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                residual: torch.Tensor | None = None, eps: float = 0.0,
                norm_bias: torch.Tensor | None = None) -> list[Any]:
    """Kernel arguments in the template's signature order. a [M, K], w/w2 [N, K], residual/out [M, N]."""
    M, K = a.shape
    N = w.shape[0]
    args: list[Any] = [a, w]
    args += [t for t in (w2, bias, norm_weight, norm_bias, residual) if t is not None]
    args += [out, M, N, K, a.stride(0), a.stride(1), w.stride(0), w.stride(1)]
    if w2 is not None:
        args += [w2.stride(0), w2.stride(1)]
    if residual is not None:
        args += [residual.stride(0), residual.stride(1)]
    args += [out.stride(0), out.stride(1)]
    if norm_weight is not None:
        args.append(float(eps))
    return args


class MatmulFamily(KernelFamily):
    name = "matmul"
    templates = ("matmul.py.j2",)

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401  (registers braze::*)

        return (torch.ops.braze.linear.default, torch.ops.braze.linear_glu.default)

    def supports(self, node: fx.Node) -> str | None:
        from braze.ops.schema import op_args

        a = op_args(node)
        out = node.meta["val"]
        glu = node.target is torch.ops.braze.linear_glu.default
        if out.dtype not in FLOAT_NAMES:
            return f"{node.target} output dtype {out.dtype} has no kernel"
        if glu and a["activation"] not in _GLU:
            return f"gated linear with activation {a['activation']!r} has no kernel"
        if not glu and a["activation"] not in ("none", *[x for x in ACTIVATIONS if x]):
            return f"linear activation {a['activation']!r} has no kernel"
        if not glu and a["residual"] is not None:
            if tuple(a["residual"].meta["val"].shape) != tuple(out.shape):
                return "residual epilogue needs the residual in the output's shape"
        return None

    def lower(self, node: fx.Node, name: str, deterministic: bool = False) -> tuple[str, Step]:
        from braze.ops.schema import op_args
        from braze.runtime.plan import Step

        a = op_args(node)
        glu = node.target is torch.ops.braze.linear_glu.default
        w_dtype = (a["gate_weight"] if glu else a["weight"]).meta["val"].dtype
        layercast = deterministic and w_dtype != torch.float32
        normed, layer_norm = a["norm_weight"] is not None, bool(a["layer_norm"])
        spec = MatmulSpec(
            name=name, rmsnorm_prologue=normed and not layer_norm, layernorm_prologue=normed and layer_norm,
            has_norm_bias=normed and layer_norm and a["norm_bias"] is not None,
            dual=_GLU[a["activation"]] if glu else None,
            has_bias=(not glu) and a["bias"] is not None,
            activation=None if glu or a["activation"] == "none" else a["activation"],
            has_residual=(not glu) and a["residual"] is not None,
            input_precision="ieee" if layercast else _precision(a["x"].meta["val"].dtype),
            out_dtype=FLOAT_NAMES[node.meta["val"].dtype], layercast=layercast, batch_invariant=deterministic)
        roles = {"x": a["x"], "w": a["gate_weight"] if glu else a["weight"], "w2": a["up_weight"] if glu else None,
                 "bias": None if glu else a["bias"], "norm_weight": a["norm_weight"],
                 "norm_bias": a["norm_bias"] if normed and layer_norm else None,
                 "residual": None if glu else a["residual"]}
        present = {k: v for k, v in roles.items() if v is not None}
        step = Step(kind="template", launcher=self.name, outputs=[node.name],
                    inputs=[v.name for v in present.values()],
                    params={"roles": list(present), "eps": float(a["eps"] or 0.0),
                            **({"deterministic": True} if deterministic else {})})
        return render_matmul(spec), step

    def lower_deterministic(self, node: fx.Node, name: str) -> tuple[str, Step]:
        """Batch-invariant tiles at launch; 16-bit weights computed in fp32 (LayerCast)."""
        return self.lower(node, name, deterministic=True)

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        x, w = tensors["x"], tensors["w"]
        K, N = x.shape[-1], w.shape[0]
        a = x.reshape(-1, K)
        o = out.view(-1, N)
        w2 = tensors.get("w2")
        res = tensors.get("residual")
        if res is not None:
            res = res.reshape(-1, N)
        args = matmul_args(a, w, o, w2=w2, bias=tensors.get("bias"), norm_weight=tensors.get("norm_weight"),
                           residual=res, eps=params.get("eps", 0.0), norm_bias=tensors.get("norm_bias"))
        M = a.shape[0]
        deterministic = bool(params.get("deterministic"))
        cfg = matmul_config(M, N, K, device, elem_size=max(a.element_size(), w.element_size()), dual=w2 is not None,
                            deterministic=deterministic)
        launch_kernel(getattr(module, name), (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n)), *args,
                      **cfg.meta(device))

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        return 1


MATMUL = MatmulFamily()
