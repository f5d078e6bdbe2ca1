"""INT6 matmul family (braze/templates/int6_matmul.py.j2): braze::int6_linear and braze::int6_linear_q.

Packed weight layout and quantization rules: see braze/quant/int6.py.

Rendered module for spec ``Int6MatmulSpec(name, act_bits, has_bias, out_dtype)``:

* ``act_bits is None`` (W6A16, decode path) defines ``<name>``::

      <name>[grid](x, packed_w, w_scales, [bias,] out, M, N, K, n_groups,
                   stride_xm, stride_wn, stride_wsn, stride_om,
                   GROUP=, BLOCK_M=, BLOCK_N=, SPLIT_K=, DOT_PRECISION=)

  x [M, K] fp16/bf16/fp32 with unit stride along K. DOT_PRECISION is ignored for 16-bit x (x * q is exact
  in the fp32 accumulator); for fp32 x the launcher passes "tf32x3": q is exact in tf32, so only x's
  hi/lo split rounds (~2**-22 per product), keeping fp32-level accuracy on tensor cores ("ieee" compiles to
  an FMA loop that spills heavily on sm_90).

* ``act_bits in (8, 6)`` (W6A8 / W6A6) defines two kernels::

      <name>_quantize_activations[(M, cdiv(n_groups, GROUPS_PER_PROG))](
          x, xq, x_scales, K, n_groups, stride_xm, stride_qm, stride_sm, GROUP=, GROUPS_PER_PROG=)
      <name>[grid](xq, x_scales, packed_w, w_scales, [bias,] out, M, N, n_groups,
                   stride_xqm, stride_xsm, stride_wn, stride_wsn, stride_om,
                   GROUP=, BLOCK_M=, BLOCK_N=, SPLIT_K=)

  xq int8 [M, n_groups * GROUP] (zero tail), x_scales fp32 [M, n_groups]. The quantizer is a separate
  kernel so it can move into the producer of x: in compiled plans braze/passes/int6_act.py splits the linear
  and the fused family computes xq / x_scales inside the kernel that produces x (braze/codegen/fused.py, same
  fp32 ops, bit-identical); the plan then launches only ``<name>`` (braze::int6_linear_q). The quantizer
  kernel here serves int6_linear steps the pass leaves alone and int6_linear_triton.

Matmul grid: ``(cdiv(N, BLOCK_N), cdiv(M, BLOCK_M), SPLIT_K)``. Weight scales are indexed
``ws[n * stride_wsn + g]``. With SPLIT_K == 1 the kernel stores ``out`` in ``spec.out_dtype``; with
SPLIT_K > 1 each program owns a contiguous run of K-groups and atomically adds into a zeroed fp32 ``out``
(bias added by split 0), which the caller casts — this keeps decode (M of 1..16) from launching only
N / BLOCK_N programs on a 132-SM GPU. GROUP must be a multiple of 128 for the int8 path (tl.dot int8 needs
K >= 32 per sub-dot) and of 64 for the 16-bit path.

GPU design (checked by compiling for sm_90 with Triton's runtime divisibility specialisation; not timed):
each group loads 3 contiguous byte planes per row (0.75 B/weight) with 16-byte cp.async, software-pipelined;
rebuilds 24-bit words with two shifts/ors, extracts four contiguous K-slices with two shifts each, and issues
four tensor-core dots of K = GROUP / 4 against contiguous activation slices. Decode tiles (16 x 64, 4 warps)
use ~80 registers; 128 x 128 prefill tiles (8 warps, wgmma) ~220-250; no spills.
W6A16 applies the weight scale to the group's fp32 partial rather than to the unpacked weights: q is exact in
fp16/bf16 while q * scale is not (so the result stays within fp32 rounding of F.linear(x, fq(W))), and
BLOCK_M x BLOCK_N rescale FMAs are fewer than GROUP x BLOCK_N whenever BLOCK_M < GROUP (always in decode).
The W6A8 path needs the same structure anyway.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import triton

from braze.kernels.device import DeviceSpec, device_spec
from braze.kernels.family import FLOAT_NAMES, KernelFamily, device_op, launch_kernel
from braze.kernels.render import render_template
from braze.ops.library import ACTIVATIONS
from braze.quant.int6 import ACT_RANGES, Int6Weight

if TYPE_CHECKING:
    import torch.fx as fx

    from braze.runtime.plan import Step

A16 = 16  # act_bits value of W6A16: activations stay in the compute dtype
_TL_DTYPES = {"float32": "tl.float32", "float16": "tl.float16", "bfloat16": "tl.bfloat16"}


@dataclass(frozen=True)
class Int6MatmulSpec:
    """What a rendered INT6 matmul module is specialised on; shapes stay runtime arguments."""

    name: str
    act_bits: int | None = None  # None: W6A16; 8 / 6: dynamic per-token-group activation quantization
    has_bias: bool = False
    out_dtype: str = "float16"
    # W6A16 only: prologue (RMSNorm, smoothing scale; x is rounded to dot_dtype after it) and epilogue
    norm: bool = False
    smooth: bool = False
    dot_dtype: str = "float16"
    activation: str = "none"
    glu: bool = False
    has_residual: bool = False

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"kernel name must be a Python identifier, got {self.name!r}")
        if self.act_bits is not None and self.act_bits not in ACT_RANGES:
            raise ValueError(f"act_bits must be None, 8 or 6, got {self.act_bits}")
        for dtype in (self.out_dtype, self.dot_dtype):
            if dtype not in _TL_DTYPES:
                raise ValueError(f"dtypes must be one of {sorted(_TL_DTYPES)}, got {dtype!r}")
        if self.act_bits is not None and (self.norm or self.smooth or self.fused_epilogue or self.has_residual):
            raise ValueError("the W6A8 / W6A6 kernel takes no prologue or epilogue (they fuse with the quantizer)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")

    @property
    def fused_epilogue(self) -> bool:
        """An epilogue that does not commute with a sum over K splits."""
        return self.glu or self.activation != "none"

    def step_params(self, in_features: int, group_size: int, eps: float) -> dict[str, Any]:
        """The launcher's params for a step of this kernel (a compiled plan's Step and int6_linear_triton alike)."""
        params: dict[str, Any] = {"in_features": in_features, "group_size": group_size,
                                  "act_bits": self.act_bits or A16, "out_dtype": self.out_dtype}
        if self.act_bits is None:
            params.update(eps=eps, dot_dtype=self.dot_dtype, glu=self.glu, split=not self.fused_epilogue)
        return params


def dot_dtype(x: torch.dtype, *prologue: torch.dtype | None) -> str:
    """The dtype x is rounded to for the dots, after the prologue: x's promoted with the norm weight's and the
    smoothing scale's (fp32 norm weights on a bf16 model give fp32 dots, as the unfused ops would compute)."""
    for t in prologue:
        x = x if t is None else torch.promote_types(x, t)
    return FLOAT_NAMES[x]


def _comment_block(text: str) -> str:
    lines = text.splitlines() or [""]
    return "\n".join(line if line.startswith("#") else f"# {line}".rstrip() for line in lines)


def render_int6_matmul(spec: Int6MatmulSpec, header: str = "") -> str:
    """Python source of the kernel module for `spec`, starting with `header` as a comment block."""
    qmin, qmax = ACT_RANGES[spec.act_bits] if spec.act_bits is not None else (0, 0)
    lines = [f"braze int6 matmul: {spec}"] + ([header] if header else [])
    return render_template("int6_matmul.py.j2", header=_comment_block("\n".join(lines)), name=spec.name,
                           act_bits=spec.act_bits, has_bias=spec.has_bias, out_tl_dtype=_TL_DTYPES[spec.out_dtype],
                           qmin=qmin, qmax=qmax, norm=spec.norm, smooth=spec.smooth,
                           dot_tl_dtype=_TL_DTYPES[spec.dot_dtype], activation=spec.activation, glu=spec.glu,
                           has_residual=spec.has_residual)


@dataclass(frozen=True)
class Int6Config:
    block_m: int
    block_n: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


def int6_config(m: int, n: int, n_groups: int, device: DeviceSpec, deterministic: bool = False,
                elem_size: int = 2, split: bool = True, weight_tiles: int = 1) -> Int6Config:
    """Tiles and split-K: decode (small M) narrows the N tiles until they cover the device's SMs, and splits K only
    when even 16-wide tiles leave most SMs idle (the interpreter has none, so it never splits); stages as deep as
    shared memory allows, at most 3.
    The 128 x 128 prefill tile (8 warps) fits wgmma (sm_90) at 16-bit x; mma.sync (sm_80-89) spilled at 255
    registers (+1 KB, ptxas) and takes 64 x 128 (~150); fp32 x (elem_size 4: tf32x3, three dots per product)
    takes 128 x 64 on sm_90 and 32 x 128 before it (no spills; 128 x 128 spilled 0.1-2.4 KB).
    deterministic: the batch-invariant configuration: BLOCK_M 16 and BLOCK_N 64 whatever M, split_k 1 (no atomics).
    split=False (an activation / GLU epilogue, which a sum over K splits would not commute with): split_k 1;
    weight_tiles 2: the GLU kernel streams the gate and up tiles of each N block together."""
    bm = 16 if deterministic else min(128, max(16, triton.next_power_of_2(m)))
    bn = 64 if deterministic or m <= 64 else 128
    prefill = bm == 128 and bn == 128 and not device.interpret
    if prefill and elem_size >= 4:
        bm, bn = (128, 64) if device.capability >= 90 else (32, 128)
    elif prefill and device.capability < 90:
        bm = 64
    if device.interpret and not deterministic:
        bn = max(bn, min(256, triton.next_power_of_2(n)))  # the interpreter's cost is per program, not per element
    warps = 8 if prefill or bm * bn > 64 * 64 else 4
    if weight_tiles == 2 and not device.interpret and bm > 16:
        # two weight tiles and two accumulators (gate, up): ptxas fits them without spills in 64 x 64 tiles of
        # 8 warps on sm_90 and 32 x 64 of 4 warps before it (the single-weight tiles spilled 0.2-1 KB)
        bm, bn, warps = (64, 64, 8) if device.capability >= 90 else (32, 64, 4)
    split_k = 1
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    if device.sm_count and m <= 64 and not deterministic:
        # narrower N tiles first: split-K costs two launches more (the fp32 buffer's memset, the cast), so it is
        # left for outputs too narrow to occupy half the SMs even with 16-wide tiles (1B decode: none)
        while bn > 16 and tiles < device.sm_count:
            bn //= 2
            tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        if split and 2 * tiles < device.sm_count:
            split_k = max(1, min(n_groups // 2, triton.cdiv(device.sm_count, tiles), 16))
    # one stage: an x tile (<= 4 B/elem) and 3 byte planes of the weights per 128-wide group
    stage_bytes = bm * 128 * 4 + bn * 96 * weight_tiles
    stages = max(2, min(3, (device.smem_per_block - 8 * 1024) // stage_bytes))
    return Int6Config(bm, bn, max(1, min(split_k, n_groups)), num_warps=warps, num_stages=stages)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    t2 = t.reshape(-1, width)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def quantize_activations(module: Any, name: str, x2: torch.Tensor, act_bits: int, group: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch `<name>_quantize_activations`: x [M, K] -> (int8 codes [M, G * group], fp32 scales [M, G])."""
    m, k = x2.shape
    g = triton.cdiv(k, group)
    xq = torch.empty((m, g * group), device=x2.device, dtype=torch.int8)
    xs = torch.empty((m, g), device=x2.device, dtype=torch.float32)
    gpp = min(triton.next_power_of_2(g), max(1, 2048 // group))
    launch_kernel(getattr(module, f"{name}_quantize_activations"), (m, triton.cdiv(g, gpp)),
                  x2, xq, xs, k, g, x2.stride(0), xq.stride(0), xs.stride(0), GROUP=group, GROUPS_PER_PROG=gpp)
    return xq, xs


class Int6MatmulFamily(KernelFamily):
    """y = fq(x) @ (q * scale)^T (+ bias): W6A16 in one launch; W6A8 / W6A6 quantize x first (two launches),
    unless the step is braze::int6_linear_q, whose xq / xs were computed by the fused kernel that produced x."""

    name = "int6_matmul"
    templates = ("int6_matmul.py.j2", "activations.j2")

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401

        return (torch.ops.braze.int6_linear.default, torch.ops.braze.int6_linear_q.default)

    def supports(self, node: fx.Node) -> str | None:
        from braze.ops.schema import op_args

        a = op_args(node)
        if node.target is torch.ops.braze.int6_linear_q.default:
            if node.meta["val"].dtype not in FLOAT_NAMES or int(a["group_size"]) % 128:
                return "int6_linear_q needs a float output and groups of 128k"
            return None
        x = a["x"].meta["val"]
        if x.dtype not in FLOAT_NAMES:
            return f"int6_linear input dtype {x.dtype} has no kernel"
        if int(a["group_size"]) % (64 if int(a["act_bits"]) == A16 else 128):
            return f"int6 group size {a['group_size']} has no kernel"
        return None

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.ops.schema import op_args
        from braze.runtime.plan import Step

        a = op_args(node)
        act_bits = int(a["act_bits"])
        fused = {}
        if act_bits == A16:  # W6A16 (braze::int6_linear only): the prologue and epilogue ride in the kernel
            fused = dict(norm=a["norm_weight"] is not None, smooth=a["smooth"] is not None,
                         dot_dtype=dot_dtype(*(a[k].meta["val"].dtype if a[k] is not None else None
                                               for k in ("x", "norm_weight", "smooth"))),
                         activation=a["activation"], glu=bool(a["glu"]), has_residual=a["residual"] is not None)
        spec = Int6MatmulSpec(name=name, act_bits=None if act_bits == A16 else act_bits,
                              has_bias=a["bias"] is not None, out_dtype=FLOAT_NAMES[node.meta["val"].dtype], **fused)
        inputs = ("xq", "xs") if node.target is torch.ops.braze.int6_linear_q.default else ("x",)
        roles = {k: a.get(k) for k in (*inputs, "packed", "scales", "bias", "norm_weight", "smooth", "residual")
                 if a.get(k) is not None}
        params = {"roles": list(roles),
                  **spec.step_params(int(a["in_features"]), int(a["group_size"]), float(a.get("eps") or 0.0))}
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[v.name for v in roles.values()],
                    params=params)
        return render_int6_matmul(spec), step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        packed, w_scales, bias = tensors["packed"], tensors["scales"], tensors.get("bias")
        k, group, act_bits = int(params["in_features"]), int(params["group_size"]), int(params["act_bits"])
        glu = bool(params.get("glu"))
        n, g = packed.shape[0] // (2 if glu else 1), triton.cdiv(k, group)
        prequantized = "xq" in tensors
        x2 = _rows(tensors["xq"] if prequantized else tensors["x"], g * group if prequantized else k)
        m = x2.shape[0]
        o = out.view(-1, n)
        if m == 0:
            return
        cfg = self._config(params, m, n, g, device, x2.element_size())
        acc = o
        if cfg.split_k > 1:  # split-K programs atomically add into a zeroed fp32 buffer
            acc = o if o.dtype == torch.float32 else torch.empty((m, n), dtype=torch.float32, device=o.device)
            acc.zero_()
            device_op("memset")
        grid = (triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
        bias_args = (bias.contiguous(),) if bias is not None else ()
        meta: dict[str, Any] = {"GROUP": group, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                                "SPLIT_K": cfg.split_k}
        if not device.interpret:
            meta.update(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if act_bits == A16:
            dot_fp32 = params.get("dot_dtype", FLOAT_NAMES[x2.dtype]) == "float32"
            prologue = tuple(tensors[r].contiguous() for r in ("norm_weight", "smooth") if r in tensors)
            residual, res_args = tensors.get("residual"), ()
            if residual is not None:
                residual = _rows(residual.expand(out.shape), n)
                res_args = (residual,)
            launch_kernel(getattr(module, name), grid, x2, packed, w_scales, *bias_args, *prologue, *res_args, acc,
                          m, n, k, g, x2.stride(0), packed.stride(0), w_scales.stride(0), acc.stride(0),
                          *((residual.stride(0),) if residual is not None else ()),
                          *((float(params["eps"]),) if "norm_weight" in tensors else ()),
                          DOT_PRECISION="tf32x3" if dot_fp32 else "tf32", **meta)
        else:
            if prequantized:
                xq, xs = x2, _rows(tensors["xs"], g)
            else:
                xq, xs = quantize_activations(module, name, x2, act_bits, group)
            launch_kernel(getattr(module, name), grid, xq, xs, packed, w_scales, *bias_args, acc, m, n, g,
                          xq.stride(0), xs.stride(0), packed.stride(0), w_scales.stride(0), acc.stride(0), **meta)
        if acc is not o:
            o.copy_(acc)
            device_op("cast")

    @staticmethod
    def _config(params: dict[str, Any], m: int, n: int, g: int, device: DeviceSpec, elem_size: int = 2
                ) -> Int6Config:
        return int6_config(m, n, g, device, bool(params.get("deterministic")), elem_size=elem_size,
                           split=bool(params.get("split", True)), weight_tiles=2 if params.get("glu") else 1)

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        m = 1
        for s in out_shape[:-1]:
            m *= int(s)
        if m == 0:
            return 0
        n, g = int(out_shape[-1]), triton.cdiv(int(params["in_features"]), int(params["group_size"]))
        quantizer = int(int(params["act_bits"]) != A16 and "x" in params["roles"])
        split = self._config(params, m, n, g, device).split_k > 1
        cast = split and params.get("out_dtype", "float32") != "float32"
        return 1 + quantizer + int(split) + int(cast)


INT6_MATMUL = Int6MatmulFamily()


# ---- eager entry points over the same launcher (tests, benchmarks) ------------------------------------------
def int6_linear_triton(x: torch.Tensor, qw: Int6Weight, act_bits: int | None = None,
                       bias: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None,
                       device: DeviceSpec | None = None, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                       smooth: torch.Tensor | None = None, activation: str = "none", glu: bool = False,
                       residual: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequant(qw)^T (+ bias) through the int6_matmul launcher; x [..., K] -> [..., N].

    act_bits None: W6A16; 8 or 6: activations quantized per token per group by the companion kernel. `device`
    overrides the description the launch configuration is chosen for (tests use it to force split-K). W6A16 also
    takes braze::int6_linear's prologue (norm_weight, eps, smooth) and epilogue (activation, glu, residual).
    """
    from braze.runtime.kernel_loader import load_kernel_module

    n, k = qw.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]}, weight expects K={k}")
    if x.dtype not in FLOAT_NAMES:
        raise ValueError(f"unsupported activation dtype {x.dtype}")
    if qw.group_size % (128 if act_bits else 64):
        raise ValueError(f"group_size {qw.group_size} unsupported by the kernels")
    out_dtype = out_dtype or x.dtype
    fused = {"norm_weight": norm_weight, "smooth": smooth, "residual": residual}
    spec = Int6MatmulSpec(name=f"int6_mm_a{act_bits or 16}", act_bits=act_bits, has_bias=bias is not None,
                          out_dtype=FLOAT_NAMES[out_dtype], norm=norm_weight is not None, smooth=smooth is not None,
                          dot_dtype=dot_dtype(x.dtype, *(t.dtype for t in (norm_weight, smooth) if t is not None)),
                          activation=activation, glu=glu, has_residual=residual is not None)
    out = torch.empty((*x.shape[:-1], n // (2 if glu else 1)), device=x.device, dtype=out_dtype)
    tensors = {"x": x, "packed": qw.packed, "scales": qw.scales, **({"bias": bias} if bias is not None else {}),
               **{r: t for r, t in fused.items() if t is not None}}
    params = {"roles": list(tensors), **spec.step_params(k, qw.group_size, eps)}
    INT6_MATMUL.launch(load_kernel_module(render_int6_matmul(spec)), spec.name, tensors, out, params,
                       device or device_spec(x.device))
    return out


def quantize_activations_triton(x: torch.Tensor, act_bits: int, group_size: int = 128
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token-group activation quantizer alone: x [M, K] -> (int8 [M, K_pad], fp32 scales [M, G])."""
    from braze.runtime.kernel_loader import load_kernel_module

    name = f"int6_mm_a{act_bits}"
    module = load_kernel_module(render_int6_matmul(Int6MatmulSpec(name=name, act_bits=act_bits)))
    return quantize_activations(module, name, _rows(x, x.shape[-1]), act_bits, group_size)
