"""Decode-layer block families: a decode layer in three launches (norm + QKV; attention block; MLP block).

`attention_block` (braze::attention_block): the split-KV decode kernel in its o_proj form
(decode_attention.py.j2): RoPE, the cache write, attention, the split merge, o_proj and the residual add in one
launch (braze::attention_block_recording: also R-KV's query recording; braze::tree_attention_block: the same
for the deterministic verify's draft nodes, after its rope_write).
`mlp_block` (braze::mlp_block, mlp_block.py.j2): norm (RMSNorm or LayerNorm), gate/up and SwiGLU / GeGLU (or up,
its bias and an activation: GPT-2's plain MLP), down (and its bias) and the residual add in one launch.
ClusterFusion's cluster-wide reduction has no Triton equivalent (no distributed shared memory); both blocks instead
run two roles in one grid, handed out by start ticket (kernels/projection.py): the first role (attention,
of which the last split of each (row, kv head) merges and stores the result; norm + gate/up + GLU) fills an fp32
scratch, and projecting programs wait for all of it and compute o_proj / down + residual as a GEMV over all SMs.
No float atomics, so deterministic compiles use both blocks too, with tiles that do not depend on the batch
(and LayerCast gate/up).

The scratch and counters are the plan executor's workspace (KernelFamily.workspace), allocated once, so
no launch allocates or clears anything and CUDA-graph replay captures none.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import triton

from braze.kernels.attention import (
    AttentionExtras,
    DecodeAttentionSpec,
    OutputProjection,
    _attention_mask_reason,
    _precision,
    render_cache_write,
    render_decode_attention,
    rope_write,
    split_kv_decode,
    tree_decode,
)
from braze.kernels.device import DeviceSpec
from braze.kernels.family import FLOAT_NAMES, KernelFamily, workspace_tensors
from braze.kernels.matmul import check_header, pow2_clamp
from braze.kernels.projection import PostNorm, Projection
from braze.kernels.render import render_template
from braze.ops.library import ACTIVATIONS, qk_norm_form

if TYPE_CHECKING:
    import torch.fx as fx

    from braze.runtime.plan import Step

GLU_KINDS = {"silu": "swiglu", "gelu_tanh": "geglu", "gelu": "geglu_erf"}


def _rows(out_shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in out_shape[:-1])


class AttentionBlockFamily(KernelFamily):
    """braze::attention_block (decode: one launch from q/k/v to the residual stream) and
    braze::tree_attention_block (the deterministic verify: the verify's rope_write, then the tree form of the same
    kernel with the same o_proj tail, so accepted nodes match decode bitwise)."""

    name = "attention_block"
    templates = ("decode_attention.py.j2", "kv_cache.py.j2", "projection.py.j2")
    abi = 2  # 2: the projection runs in its own programs (tail_sync counters, attn scratch)

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401

        return (torch.ops.braze.attention_block.default, torch.ops.braze.tree_attention_block.default,
                torch.ops.braze.attention_block_recording.default)

    def supports(self, node: fx.Node) -> str | None:
        return _attention_mask_reason(node)

    def lower(self, node: fx.Node, name: str, deterministic: bool = False) -> tuple[str, Step]:
        from braze.ops.schema import op_args
        from braze.runtime.plan import Step

        a = op_args(node)
        tree = node.target is torch.ops.braze.tree_attention_block.default
        ring = node.target is torch.ops.braze.attention_block_recording.default
        k_cache = a["k_cache"].meta["val"]
        head_start = a["kv_start"].meta["val"].dim() == 2
        attn_dtype = FLOAT_NAMES[a["q"].meta["val"].dtype]  # the attention output's dtype before o_proj
        qk_norm = a.get("q_norm_weight") is not None
        # a weight with a row per head ([H, D]: Cohere's), or one over the whole projection (OLMo 2's: the RMSNorm
        # then spans all heads of the row), both read at each head's row
        form = qk_norm_form(a["q_norm_weight"].meta["val"].shape, a["q"].meta["val"].shape[-1]) if qk_norm else "head"
        source = render_decode_attention(DecodeAttentionSpec(
            name, True, _precision(k_cache.dtype), attn_dtype, from_cache_len=True, head_start=head_start,
            rope_write=not tree, tree=tree, o_proj=True, ring=ring, qk_norm=qk_norm,
            qk_norm_whole=form == "whole", qk_norm_rows=form != "head", qk_layer_norm=bool(a.get("qk_layer_norm")),
            qk_norm_bias=a.get("q_norm_bias") is not None, window=bool(a.get("window")),
            softcap=bool(a.get("softcap")), alibi=a.get("alibi") is not None))
        post_norm = a.get("post_norm_weight") is not None
        roles = ["q", "k", "v", "cos", "sin", "k_cache", "v_cache", "cache_len", "kv_start",
                 *(["tree_mask"] if tree else []), "o_weight", "residual", *(["q_ring"] if ring else []),
                 *(["q_norm_weight", "k_norm_weight"] if qk_norm else []),
                 *(["q_norm_bias", "k_norm_bias"] if a.get("q_norm_bias") is not None else []),
                 *(["post_norm_weight"] if post_norm else []),
                 *(["o_bias"] if a.get("o_bias") is not None else []),
                 *(["alibi"] if a.get("alibi") is not None else [])]
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a[r].name for r in roles],
                    params={"roles": roles, "scale": float(a["scale"]), "heads_kv": int(k_cache.shape[1]),
                            "s_max": int(k_cache.shape[2]), "attn_width": int(a["o_weight"].meta["val"].shape[1]),
                            **({"qk_norm_eps": float(a["qk_norm_eps"])} if qk_norm else {}),
                            **({"window": int(a["window"])} if a.get("window") else {}),
                            **({"softcap": float(a["softcap"])} if a.get("softcap") else {}),
                            **({"post_norm_eps": float(a["post_norm_eps"])} if post_norm else {}),
                            **({"head_start": True} if head_start else {}),
                            **({"tree": True} if tree else {}),
                            **({"deterministic": True} if deterministic else {})})
        return (source + "\n\n" + render_cache_write(name)) if tree else source, step

    def lower_deterministic(self, node: fx.Node, name: str) -> tuple[str, Step]:
        """The same kernel (it has no float atomics); the launch fixes the projection's tiles for any batch."""
        return self.lower(node, name, deterministic=True)

    def workspace(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> dict[str, int]:
        rows, heads_kv = _rows(out_shape), int(params["heads_kv"])
        # the merged attention [rows, Hq * D] (and with a post-norm, o_proj's output [rows, N] after it), written
        # before it is read; tickets per (row, kv head), then the launch's three (start, merged, projected)
        post = rows * int(out_shape[-1]) if "post_norm_eps" in params else 0
        return {"scratch_float32": rows * int(params["attn_width"]) + post, "int32": rows * heads_kv + 3}

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        t = tensors
        tree = bool(params.get("tree"))
        Hkv = t["k_cache"].shape[1]
        rows = math.prod(out.shape[:-1])
        out2 = out.view(rows, -1)
        n_out = out2.shape[1]
        ws = workspace_tensors(tensors)
        counters = ws["int32"]
        scratch = ws["scratch_float32"]
        post = _post_norm(t, params, scratch[rows * int(params["attn_width"]):])
        proj = OutputProjection(Projection(t["o_weight"], t["residual"].reshape(rows, n_out), out2, scratch,
                                           counters[:3], bool(params.get("deterministic")), post, t.get("o_bias")),
                                counters[3:3 + rows * Hkv])
        head_start = bool(params.get("head_start"))
        if tree:
            qo = rope_write(module, name, tensors, device)
            tree_decode(module, name, qo, t["k_cache"], t["v_cache"], None, t["cache_len"], t["kv_start"],
                        t["tree_mask"], params["scale"], device, head_start=head_start, block=proj)
            return
        split_kv_decode(module, name, t["q"][:, :, 0, :], t["k_cache"], t["v_cache"], None, t["cache_len"],
                        t["kv_start"], params["scale"], device, from_cache_len=True, head_start=head_start,
                        rope=(t["k"][:, :, 0, :], t["v"][:, :, 0, :], t["cos"][:, 0, :], t["sin"][:, 0, :]),
                        block=proj, ring=t.get("q_ring"),
                        qk_norm=(t["q_norm_weight"], t["k_norm_weight"], params["qk_norm_eps"],
                                 *((t["q_norm_bias"], t["k_norm_bias"]) if "q_norm_bias" in t else ()))
                        if "q_norm_weight" in t else None,
                        extras=AttentionExtras(softcap=float(params.get("softcap", 0.0)),
                                               window=int(params.get("window", 0)), alibi=t.get("alibi")))

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        # the split merge happens in the kernel's last program: no combine launch; tree: the rope_write first
        return 2 if params.get("tree") else 1


NORMS = (None, "rms", "layer")
DENSE_ACTIVATIONS = tuple(a for a in ACTIVATIONS if a != "none")  # a plain (ungated) MLP's activation


@dataclass(frozen=True)
class MlpBlockSpec:
    name: str
    glu: str | None = "swiglu"  # None: a plain MLP, activation(up(x) + up_bias) (GPT-2, OPT, Falcon)
    input_precision: str = "ieee"
    out_dtype: str = "float32"
    layercast: bool = False  # deterministic compiles: 16-bit weights upcast, fp32 math
    norm: str | None = "rms"  # the norm of x before gate/up: RMSNorm, LayerNorm, or none (OLMo 2 norms after)
    has_norm_bias: bool = False  # the LayerNorm's shift
    activation: str | None = None  # the plain MLP's activation
    has_up_bias: bool = False  # the plain MLP's up bias (the down bias is the projection's: projection.py)

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"kernel name {self.name!r} is not a Python identifier")
        if self.glu is not None and self.glu not in GLU_KINDS.values():
            raise ValueError(f"glu must be None or one of {tuple(GLU_KINDS.values())}, got {self.glu!r}")
        if (self.glu is None) != (self.activation in DENSE_ACTIVATIONS):
            raise ValueError(f"a plain MLP (glu=None) takes one of {DENSE_ACTIVATIONS}, a gated one none; got "
                             f"glu={self.glu!r}, activation={self.activation!r}")
        if self.has_up_bias and self.glu is not None:
            raise ValueError("has_up_bias is the plain MLP's (the gated MLP's gate and up have no bias)")
        if self.norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
        if self.has_norm_bias and self.norm != "layer":
            raise ValueError("has_norm_bias is a LayerNorm's shift: it needs norm='layer'")
        if self.layercast and self.input_precision != "ieee":
            raise ValueError("layercast computes in fp32: it needs input_precision='ieee'")


def render_mlp_block(spec: MlpBlockSpec, header: str = "") -> str:
    return render_template("mlp_block.py.j2", header=check_header(header), name=spec.name, glu=spec.glu,
                           input_precision=spec.input_precision, out_dtype=spec.out_dtype, layercast=spec.layercast,
                           norm=spec.norm, has_norm_bias=spec.has_norm_bias, activation=spec.activation,
                           has_up_bias=spec.has_up_bias)


@dataclass(frozen=True)
class MlpBlockConfig:
    """Tiles of the up role (norm + gate/up); the down projection's come from kernels/projection.py."""

    block_m: int
    block_i: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2
    row_dot: bool = False  # per-row gate/up reductions (UP_ROW_DOT) instead of tl.dot

    def meta(self, device: DeviceSpec) -> dict[str, int | bool]:
        meta: dict[str, int | bool] = {"BLOCK_M": self.block_m, "BLOCK_I": self.block_i, "BLOCK_K": self.block_k,
                                       "UP_ROW_DOT": self.row_dot}
        if not device.interpret:
            meta.update(num_warps=self.num_warps, num_stages=self.num_stages)
        return meta


def mlp_block_config(M: int, K: int, inter: int, device: DeviceSpec, *, elem_size: int = 2,
                     deterministic: bool = False, post_norm: bool = False) -> MlpBlockConfig:
    """The interpreter takes big tiles (it pays per program). A GPU: 16-row MMA tiles, intermediate columns
    narrowed until the up programs cover every SM (each streams its slice of the gate and up weights: a b=1
    decode is bandwidth bound), a [BLOCK_K, BLOCK_I] pair of gate/up tiles per step.
    deterministic: tiles from K, I and the device only (never the rows), as the deterministic matmul's: per-row
    reductions under the interpreter (its tl.dot is a BLAS call, not row-invariant), fp32 FMA dots with 32-wide K
    tiles and 8 warps on a GPU."""
    if device.interpret:
        if deterministic:
            return MlpBlockConfig(16, pow2_clamp(inter, 16, 64), pow2_clamp(K, 16, 64), row_dot=True)
        return MlpBlockConfig(16, pow2_clamp(inter, 16, 512), pow2_clamp(K, 16, 512))
    row_tiles = 1 if deterministic else triton.cdiv(M, 16)  # deterministic tiles must not depend on the rows
    block_i = 64
    while block_i > 16 and triton.cdiv(inter, block_i) * row_tiles < device.sm_count:
        block_i //= 2
    if deterministic:
        return MlpBlockConfig(16, block_i, 32, num_warps=8)
    # a post-norm (Gemma 2/3): 8 warps. At 4, ptxas chose 80 registers and spilled 16 B on sm_80 (Gemma 2 shape,
    # 16-row tiles; 92 registers and no spill without the post-norm); 8 warps: 64, none
    return MlpBlockConfig(16, block_i, 32 if elem_size > 2 else 64, num_warps=8 if post_norm else 4)


class MlpBlockFamily(KernelFamily):
    """braze::mlp_block: one decode launch for norm, gate/up, SwiGLU / GeGLU, down and the residual add
    (deterministic compiles: LayerCast gate/up and batch-invariant tiles throughout)."""

    name = "mlp_block"
    templates = ("mlp_block.py.j2", "projection.py.j2")
    abi = 2  # 2: the down projection runs in its own programs (no accumulator; h scratch, three tickets)

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401

        return (torch.ops.braze.mlp_block.default,)

    def supports(self, node: fx.Node) -> str | None:
        from braze.ops.schema import op_args

        a = op_args(node)
        if node.meta["val"].dtype not in FLOAT_NAMES:
            return f"{node.target} output dtype {node.meta['val'].dtype} has no kernel"
        if a["gate_weight"] is not None and a["activation"] not in GLU_KINDS:
            return f"gated MLP with activation {a['activation']!r} has no kernel"
        if a["gate_weight"] is None and a["activation"] not in DENSE_ACTIVATIONS:
            return f"MLP with activation {a['activation']!r} has no kernel"
        return None

    def lower(self, node: fx.Node, name: str, deterministic: bool = False) -> tuple[str, Step]:
        from braze.ops.schema import op_args
        from braze.runtime.plan import Step

        a = op_args(node)
        out = node.meta["val"]
        w = a["up_weight"].meta["val"]
        gated = a["gate_weight"] is not None
        layercast = deterministic and w.dtype != torch.float32
        norm = None if a["norm_weight"] is None else "layer" if a["layer_norm"] else "rms"
        optional = [r for r in ("norm_bias", "up_bias", "down_bias", "post_norm_weight") if a.get(r) is not None]
        spec = MlpBlockSpec(name, GLU_KINDS[a["activation"]] if gated else None,
                            "ieee" if layercast else _precision(w.dtype), FLOAT_NAMES[out.dtype],
                            layercast=layercast, norm=norm, has_norm_bias="norm_bias" in optional,
                            activation=None if gated else a["activation"], has_up_bias="up_bias" in optional)
        post_norm = "post_norm_weight" in optional
        roles = ["x", *(["norm_weight"] if norm else []), *(["gate_weight"] if gated else []), "up_weight",
                 "down_weight", "residual", *optional]
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a[r].name for r in roles],
                    params={"roles": roles, "eps": float(a["eps"]), "inter": int(w.shape[0]),
                            **({"post_norm_eps": float(a["post_norm_eps"])} if post_norm else {}),
                            **({"deterministic": True} if deterministic else {})})
        return render_mlp_block(spec), step

    def lower_deterministic(self, node: fx.Node, name: str) -> tuple[str, Step]:
        """LayerCast gate/up, and tiles (gate/up and down) that do not depend on the rows."""
        return self.lower(node, name, deterministic=True)

    def workspace(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> dict[str, int]:
        # the intermediate h [M, I] (and with a post-norm, down's output [M, N] after it), written before it is
        # read; the launch's three tickets
        rows = _rows(out_shape)
        post = rows * int(out_shape[-1]) if "post_norm_eps" in params else 0
        return {"scratch_float32": rows * int(params["inter"]) + post, "int32": 3}

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        t = tensors
        x = t["x"].reshape(-1, t["x"].shape[-1])
        wu, wd = t["up_weight"], t["down_weight"]
        wg = t.get("gate_weight", wu)  # (a plain MLP: the up weight stands in for the gate the kernel never reads)
        M, K = x.shape
        inter, N = wu.shape[0], wd.shape[0]
        o = out.view(M, N)
        res = t["residual"].reshape(M, N)
        ws = workspace_tensors(tensors)
        deterministic = bool(params.get("deterministic"))
        cfg = mlp_block_config(M, K, inter, device, elem_size=max(x.element_size(), wu.element_size()),
                               deterministic=deterministic, post_norm="post_norm_weight" in t)
        args = [x, t.get("norm_weight", x), t.get("norm_bias", x), wg, wu, t.get("up_bias", x), M, K, inter,
                *x.stride(), *wg.stride(), *wu.stride(),
                float(params["eps"])]  # (x stands in for the norm weight and biases a kernel never reads)
        scratch = ws["scratch_float32"]
        down = Projection(wd, res, o, scratch, ws["int32"][:3], deterministic,
                          _post_norm(t, params, scratch[M * inter:]), t.get("down_bias"))
        up = triton.cdiv(inter, cfg.block_i) * triton.cdiv(M, cfg.block_m)
        down.launch(getattr(module, name), up, args, device, **cfg.meta(device))

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        return 1


def _post_norm(tensors: dict[str, torch.Tensor], params: dict[str, Any], y: torch.Tensor) -> PostNorm | None:
    """The block's post-norm (weight, eps, the fp32 staging after the first role's scratch), if it has one."""
    if "post_norm_weight" not in tensors:
        return None
    return PostNorm(tensors["post_norm_weight"], float(params["post_norm_eps"]), y)


ATTENTION_BLOCK = AttentionBlockFamily()
MLP_BLOCK = MlpBlockFamily()
