"""DFloat11 families: the unit decoder (df11_decode), the embedding gather (df11_embedding) and the fused decode +
GEMV (df11_gemv).

Why a GPU decoder: DF11 weights are ~11 bits instead of 16, and decoding them into a BF16 buffer right
before use keeps the memory saving while matmuls still see plain BF16.

Layout the kernel reads (all produced by ``encode_df11``):

* ``encoded`` uint8: MSB-first canonical Huffman codes of the exponents, 8-byte window per thread, plus
  4 pad bytes; thread t loads bytes [8t, 8t + 12) as three big-endian words so a code starting at
  bit 63 (at most 32 bits long) can be finished.
* ``gaps`` uint8: 5-bit fields, MSB first; field t = bit offset of the first code starting in window t.
* ``output_positions`` int64: first output index of each block of ``threads_per_block`` windows.
* ``luts`` uint8 ``(n_tables, 256)``: entry < 240 is an exponent, 240..255 points to table ``256 - v``
  for the next code byte; ``code_lengths`` uint8[256] maps an exponent to its code length.
* ``sign_mantissa`` uint8, one per encoded weight, indexed by output position.

The kernel (one program per block of threads) counts codes per window, scans in-block from
``output_positions[block]``, decodes again and writes int16 weight bits
``((s & 0x80) << 8) | (e << 7) | (s & 0x7F)``; the caller views the buffer as BF16. No BF16 arithmetic
happens in the kernel. Writes are limited to ``[out_lo, out_hi)`` and shifted by ``out_base``, so one
tensor of a unit can be decoded alone by launching only the blocks that cover it.

The fused family (``df11_gemv.py.j2``, strategy "fused") reads the same tensors with the same two phases, but
instead of storing a weight it multiplies it with x in registers and reduces per row of W (decomposition in that
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import triton

from braze.kernels.device import DeviceSpec, device_spec
from braze.kernels.family import FLOAT_NAMES, KernelFamily, device_op, launch_kernel
from braze.kernels.render import render_template
from braze.quant.df11 import GAP_BITS, POINTER_BASE, WINDOW_BITS, WINDOW_BYTES, DF11Unit

if TYPE_CHECKING:
    import torch.fx as fx

    from braze.runtime.plan import Step

KERNEL_NAME = "df11_decode_kernel"
GEMV_KERNEL_NAME = "df11_gemv_kernel"
MAX_LUT_LEVELS = 4  # 32-bit codes -> root table + 3 levels
STREAM_ROLES = ("encoded", "sign_mantissa", "gaps", "output_positions", "luts", "code_lengths")

# Widen BF16 bits to the compute dtype with bit moves only (exact, and no conversion unit needed): the BF16 bit
# pattern shifted left by 16 *is* the fp32 value.
_WIDEN = """

@triton.jit
def {name}_widen(src_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    bits = tl.load(src_ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF
    value = (bits << 16).to(tl.float32, bitcast=True)
    tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=mask)
"""


def _render(template: str, header: str, kernel_name: str, **context: Any) -> str:
    return render_template(
        template, header=header, kernel_name=kernel_name, max_levels=MAX_LUT_LEVELS, pointer_base=POINTER_BASE,
        window_bytes=WINDOW_BYTES, window_bits=WINDOW_BITS, gap_bits=GAP_BITS, gap_mask=(1 << GAP_BITS) - 1,
        **context)


def render_df11_decode(header: str = "", kernel_name: str = KERNEL_NAME, widen: bool = False,
                       gather: bool = False) -> str:
    """Python source of the DF11 decode kernel (plus `<name>_widen` for a non-BF16 compute dtype, and
    `<name>_gather`, the embedding rows of a table decoded alone, for df11_embedding)."""
    source = _render("df11_decode.py.j2", header, kernel_name, gather=gather)
    return source + _WIDEN.format(name=kernel_name) if widen else source


def render_df11_gemv(header: str = "", kernel_name: str = GEMV_KERNEL_NAME) -> str:
    """Python source of the fused DF11 decode + GEMV kernel (strategy "fused"; decomposition in its docstring)."""
    return _render("df11_gemv.py.j2", header, kernel_name)


def _blocks_holding(output_positions: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """The stream block holding each output index (compile time: a host-side search of output_positions)."""
    pos = output_positions.cpu()
    return torch.searchsorted(pos[:-1], indices.to(pos.dtype), right=True) - 1


def df11_block_range(output_positions: torch.Tensor, lo: int, hi: int) -> tuple[int, int]:
    """(first block, block count) of the stream blocks holding outputs lo .. hi - 1; a compile-time table, so
    launches need no host read."""
    if hi <= lo:
        return 0, 0
    first, last = _blocks_holding(output_positions, torch.tensor([lo, hi - 1])).tolist()
    return int(first), int(last - first + 1)


def df11_row_blocks(output_positions: torch.Tensor, rows: int, dim: int) -> tuple[torch.Tensor, int]:
    """(row_blocks int32 [rows]: the first stream block holding each row of a [rows, dim] table, the most blocks
    one row spans): df11_embedding's compile-time tables."""
    starts = torch.arange(rows, dtype=torch.int64) * dim
    first = _blocks_holding(output_positions, starts)
    last = _blocks_holding(output_positions, starts + dim - 1)
    return first.to(torch.int32), int((last - first).max().item()) + 1 if rows else 1


def df11_gemv_params(unit: DF11Unit, start: int, out_features: int, in_features: int) -> dict[str, Any]:
    """Launch parameters of a fused GEMV over W = unit elements [start, start + out_features * in_features)."""
    first, count = df11_block_range(unit.output_positions, start, start + out_features * in_features)
    return {"start": start, "out_features": out_features, "in_features": in_features,
            "threads_per_block": unit.threads_per_block, "n_threads": unit.n_threads,
            "max_codes": unit.max_codes_per_window, "lut_levels": unit.lut_levels,
            "block_first": first, "block_count": count}


def df11_gemv_supported(max_codes: int, in_features: int) -> str | None:
    """Why the fused kernel cannot take W (None if it can): a decoder thread's weights must span <= 2 rows."""
    if max_codes > in_features:
        return f"in_features {in_features} < {max_codes} codes per window (a thread's weights would span > 2 rows)"
    return None


def df11_gemv_block_m(m: int) -> int:
    """Rows of x per program: all of a decode batch (<= 16) in one program, so each block decodes once."""
    return min(16, triton.next_power_of_2(max(1, m)))


def unit_stream(unit: DF11Unit) -> dict[str, torch.Tensor]:
    return {r: getattr(unit, r) for r in STREAM_ROLES}


def decode_params(unit: DF11Unit, dtype: str = "bfloat16", out_range: tuple[int, int, int] | None = None
                  ) -> dict[str, Any]:
    """Step params of a df11_decode launch over the whole unit, or over outputs [lo, hi) written at hi - base."""
    params = {"numel": unit.n_encoded_weights, "threads_per_block": unit.threads_per_block,
              "n_threads": unit.n_threads, "n_blocks": unit.n_blocks, "max_codes": unit.max_codes_per_window,
              "lut_levels": unit.lut_levels, "dtype": dtype}
    if out_range is not None:
        lo, hi, base = out_range
        first, count = df11_block_range(unit.output_positions, lo, hi)
        params.update(out_lo=lo, out_hi=hi, out_base=base, block_first=first, n_blocks=count, numel=hi - lo)
    return params


class DF11DecodeFamily(KernelFamily):
    """braze::df11_decode: a whole unit's BF16 bits in one launch (+ a widening launch for fp32/fp16 models)."""

    name = "df11_decode"
    templates = ("df11_decode.py.j2",)

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401

        return (torch.ops.braze.df11_decode.default,)

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.ops.schema import op_args
        from braze.runtime.plan import Step

        a = op_args(node)
        encoded, positions = a["encoded"].meta["val"], a["output_positions"].meta["val"]
        numel = int(a["sign_mantissa"].meta["val"].shape[0])  # the output holds numel weights in any shape
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a[r].name for r in STREAM_ROLES],
                    params={"roles": list(STREAM_ROLES), "numel": numel,
                            "threads_per_block": int(a["threads_per_block"]),
                            "n_threads": (int(encoded.shape[0]) - 4) // 8, "n_blocks": int(positions.shape[0]) - 1,
                            "max_codes": int(a["max_codes"]), "lut_levels": int(a["lut_levels"]),
                            "dtype": FLOAT_NAMES[a["dtype"]]})
        return render_df11_decode(kernel_name=name, widen=a["dtype"] != torch.bfloat16), step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        numel = int(params["numel"])
        bf16_out = params["dtype"] == "bfloat16"
        bits = out.view(torch.int16) if bf16_out else torch.empty(numel, dtype=torch.int16, device=out.device)
        lo, hi = int(params.get("out_lo", 0)), int(params.get("out_hi", numel))
        if params["n_threads"] > 0 and numel > 0:
            launch_kernel(getattr(module, name), (int(params["n_blocks"]),),
                          *(tensors[r] for r in STREAM_ROLES), bits, int(params["n_threads"]),
                          int(params.get("block_first", 0)), lo, hi, int(params.get("out_base", 0)),
                          int(params["max_codes"]), THREADS=int(params["threads_per_block"]),
                          N_LEVELS=int(params["lut_levels"]), **({} if device.interpret else {"num_warps": 4}))
        if not bf16_out and numel > 0:
            block = 1 << 16 if device.interpret else 1024
            launch_kernel(getattr(module, f"{name}_widen"), (triton.cdiv(numel, block),), bits, out, numel,
                          BLOCK=block)

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        numel = int(params["numel"])
        return int(params["n_threads"] > 0 and numel > 0) + int(params["dtype"] != "bfloat16" and numel > 0)


class DF11EmbeddingFamily(KernelFamily):
    """braze::df11_embedding: the rows of a DF11 embedding table a batch asks for, decoded straight into the output
    (one launch; programs = tokens x the most blocks a row spans), instead of the whole table then a gather."""

    name = "df11_embedding"
    templates = ("df11_decode.py.j2",)
    ROLES = ("ids", *STREAM_ROLES, "row_blocks")

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401

        return (torch.ops.braze.df11_embedding.default,)

    def supports(self, node: fx.Node) -> str | None:
        from braze.ops.schema import op_args

        a = op_args(node)
        if a["dtype"] not in FLOAT_NAMES:
            return f"df11_embedding dtype {a['dtype']} has no kernel"
        return None

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.ops.schema import op_args
        from braze.runtime.plan import Step

        a = op_args(node)
        encoded, positions = a["encoded"].meta["val"], a["output_positions"].meta["val"]
        params = {"roles": list(self.ROLES), "n_threads": (int(encoded.shape[0]) - 4) // 8,
                  "n_blocks": int(positions.shape[0]) - 1, "dtype": FLOAT_NAMES[a["dtype"]],
                  **{k: int(a[k]) for k in ("threads_per_block", "max_codes", "lut_levels", "dim",
                                            "blocks_per_row")}}
        step = Step(kind="template", launcher=self.name, outputs=[node.name],
                    inputs=[a[r].name for r in self.ROLES], params=params)
        return render_df11_decode(kernel_name=name, gather=True), step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec) -> None:
        ids = tensors["ids"].reshape(-1)
        if ids.numel() == 0:
            return
        bits = params["dtype"] == "bfloat16"
        launch_kernel(getattr(module, f"{name}_gather"), (ids.numel(), int(params["blocks_per_row"])),
                      ids if ids.is_contiguous() else ids.contiguous(), tensors["row_blocks"],
                      *(tensors[r] for r in STREAM_ROLES), out.view(torch.int16) if bits else out,
                      int(params["n_threads"]), int(params["n_blocks"]), int(params["dim"]),
                      int(params["max_codes"]), THREADS=int(params["threads_per_block"]),
                      N_LEVELS=int(params["lut_levels"]), OUT_BITS=bits,
                      **({} if device.interpret else {"num_warps": 4}))

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        tokens = 1
        for s in out_shape[:-1]:
            tokens *= int(s)
        return int(tokens > 0)


class DF11GemvFamily(KernelFamily):
    """braze::df11_linear (strategy "fused"): W's stream blocks decoded and multiplied with x in one launch; the
    launcher pre-fills the fp32 accumulator with the bias (or zeros) and the programs add into it atomically."""

    name = "df11_gemv"
    templates = ("df11_gemv.py.j2",)

    @property
    def ops(self) -> tuple[Any, ...]:  # type: ignore[override]
        import braze.ops  # noqa: F401

        return (torch.ops.braze.df11_linear.default,)

    def supports(self, node: fx.Node) -> str | None:
        from braze.ops.schema import op_args

        a = op_args(node)
        if a["x"].meta["val"].dtype not in FLOAT_NAMES:
            return f"df11_linear input dtype {a['x'].meta['val'].dtype} has no kernel"
        return df11_gemv_supported(int(a["max_codes"]), int(a["in_features"]))

    def lower(self, node: fx.Node, name: str) -> tuple[str, Step]:
        from braze.ops.schema import op_args
        from braze.runtime.plan import Step

        a = op_args(node)
        roles = [r for r in ("x", *STREAM_ROLES, "bias") if a[r] is not None]
        keys = ("start", "out_features", "in_features", "threads_per_block", "max_codes", "lut_levels",
                "block_first", "block_count")
        params = {"roles": roles, "n_threads": (int(a["encoded"].meta["val"].shape[0]) - 4) // 8,
                  "out_dtype": FLOAT_NAMES[node.meta["val"].dtype], **{k: int(a[k]) for k in keys}}
        step = Step(kind="template", launcher=self.name, outputs=[node.name], inputs=[a[r].name for r in roles],
                    params=params)
        return render_df11_gemv(kernel_name=name), step

    def launch(self, module: Any, name: str, tensors: dict[str, torch.Tensor], out: torch.Tensor,
               params: dict[str, Any], device: DeviceSpec, w_out: torch.Tensor | None = None) -> None:
        """y = x @ W^T (+ bias); fp32 accumulation into `out` itself when it is fp32, else into a temporary that
        is cast into `out`. `w_out` (fp32, N * K) is a test hook receiving W exactly as it enters the products."""
        x, bias = tensors["x"], tensors.get("bias")
        k, n = int(params["in_features"]), int(params["out_features"])
        x2 = x.reshape(-1, k)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        o = out.view(-1, n)
        acc = o if o.dtype == torch.float32 else torch.empty(o.shape, dtype=torch.float32, device=o.device)
        if bias is None:
            acc.zero_()
        else:
            acc.copy_(bias.to(torch.float32).expand_as(acc))
        device_op("fill")
        m = x2.shape[0]
        if m > 0 and int(params["block_count"]) > 0:
            start, bm = int(params["start"]), df11_gemv_block_m(m)
            launch_kernel(
                getattr(module, name), (int(params["block_count"]), triton.cdiv(m, bm)),
                x2, *(tensors[r] for r in STREAM_ROLES), acc, acc if w_out is None else w_out,
                m, int(params["n_threads"]), int(params["block_first"]), start, start + n * k, k, x2.stride(0),
                acc.stride(0), int(params["max_codes"]), THREADS=int(params["threads_per_block"]),
                N_LEVELS=int(params["lut_levels"]), BLOCK_M=bm, WRITE_W=w_out is not None,
                **({} if device.interpret else {"num_warps": 8}))
        if acc is not o:
            o.copy_(acc)
            device_op("cast")

    def launch_count(self, params: dict[str, Any], device: DeviceSpec, out_shape: Sequence[int]) -> int:
        rows = 1
        for s in out_shape[:-1]:
            rows *= int(s)
        kernel = int(rows > 0 and int(params["block_count"]) > 0)
        return 1 + kernel + int(params.get("out_dtype", "float32") != "float32")


DF11_DECODE = DF11DecodeFamily()
DF11_EMBEDDING = DF11EmbeddingFamily()
DF11_GEMV = DF11GemvFamily()


# ---- eager entry points over the same launchers (tests, benchmarks) ------------------------------------------
def _module(source: str) -> Any:
    from braze.runtime.kernel_loader import load_kernel_module

    return load_kernel_module(source)


def _as_int16(out: torch.Tensor, numel: int) -> torch.Tensor:
    if out.dtype not in (torch.int16, torch.bfloat16):
        raise TypeError(f"DF11 output buffer must be int16 or bfloat16, got {out.dtype}")
    if not out.is_contiguous() or out.numel() != numel:
        raise ValueError(f"DF11 output buffer must be contiguous with {numel} elements, got {tuple(out.shape)}")
    return out.view(torch.bfloat16)


def decode_df11_triton(unit: DF11Unit, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode the whole unit into one flat BF16 (or int16) buffer laid out as ``unit.offsets``."""
    if out is None:
        out = torch.empty(unit.num_weights, dtype=torch.bfloat16, device=unit.encoded.device)
    flat = _as_int16(out, unit.num_weights)
    n = unit.n_encoded_weights
    DF11_DECODE.launch(_module(render_df11_decode()), KERNEL_NAME, unit_stream(unit), flat[:n],
                       decode_params(unit), device_spec(out.device))
    for f in unit.fallbacks:
        o = unit.offsets[f.name]
        flat[o: o + f.tensor.numel()] = f.tensor.reshape(-1).view(torch.bfloat16)
    return out


def decode_df11_tensor_triton(unit: DF11Unit, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode one tensor of the unit alone (only the blocks covering it run); returns it in its shape."""
    index = unit.names.index(name)
    shape, numel, offset = unit.shapes[index], unit.numels[index], unit.offsets[name]
    if out is None:
        out = torch.empty(shape, dtype=torch.bfloat16, device=unit.encoded.device)
    flat = _as_int16(out, numel).reshape(-1)
    if index >= unit.n_encoded:
        flat.copy_(unit.fallbacks[index - unit.n_encoded].tensor.reshape(-1).view(torch.bfloat16))
    else:
        params = decode_params(unit, out_range=(offset, offset + numel, offset))
        DF11_DECODE.launch(_module(render_df11_decode()), KERNEL_NAME, unit_stream(unit), flat, params,
                           device_spec(out.device))
    return out


def df11_embedding_triton(unit: DF11Unit, name: str, ids: torch.Tensor, dtype: torch.dtype = torch.bfloat16
                          ) -> torch.Tensor:
    """F.embedding(ids, table) with table = tensor `name` of the unit [rows, dim] (its unit's only tensor, as the
    compiler makes embedding units), through the df11_embedding launcher: only the rows' blocks are decoded."""
    if unit.n_encoded != 1 or unit.names != [name]:
        raise ValueError(f"df11_embedding reads a one-tensor unit; this one holds {unit.names}")
    rows, dim = unit.shapes[0]
    row_blocks, per_row = df11_row_blocks(unit.output_positions, rows, dim)
    out = torch.empty((*ids.shape, dim), dtype=dtype, device=ids.device)
    params = {"n_threads": unit.n_threads, "n_blocks": unit.n_blocks, "dtype": FLOAT_NAMES[dtype],
              "threads_per_block": unit.threads_per_block, "max_codes": unit.max_codes_per_window,
              "lut_levels": unit.lut_levels, "dim": dim, "blocks_per_row": per_row}
    DF11_EMBEDDING.launch(_module(render_df11_decode(kernel_name=KERNEL_NAME, gather=True)), KERNEL_NAME,
                          {"ids": ids, "row_blocks": row_blocks.to(ids.device), **unit_stream(unit)}, out, params,
                          device_spec(ids.device))
    return out


def df11_linear_triton(unit: DF11Unit, name: str, x: torch.Tensor, bias: torch.Tensor | None = None,
                       w_out: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) in fp32 with W = tensor `name` of the unit [N, K], through the df11_gemv launcher.

    A raw-BF16 fallback tensor has no stream: it is multiplied as stored (widened exactly to fp32).
    """
    index = unit.names.index(name)
    n, k = unit.shapes[index]
    x2 = x.reshape(-1, k).to(torch.float32).contiguous()
    out = torch.empty((x2.shape[0], n), dtype=torch.float32, device=x.device)
    if index >= unit.n_encoded:
        w = unit.fallbacks[index - unit.n_encoded].tensor.to(torch.float32)
        if w_out is not None:
            w_out.copy_(w.reshape(-1))
        out = x2 @ w.T + (bias.to(torch.float32) if bias is not None else 0)
        return out.view(*x.shape[:-1], n)
    reason = df11_gemv_supported(unit.max_codes_per_window, k)
    if reason:
        raise ValueError(f"DF11 fused GEMV cannot take {name!r}: {reason}")
    tensors = {"x": x2, **unit_stream(unit), **({"bias": bias} if bias is not None else {})}
    DF11_GEMV.launch(_module(render_df11_gemv()), GEMV_KERNEL_NAME, tensors, out,
                     df11_gemv_params(unit, unit.offsets[name], n, k), device_spec(x.device), w_out=w_out)
    return out.view(*x.shape[:-1], n)

