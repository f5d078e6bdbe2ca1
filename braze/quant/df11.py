"""DFloat11: lossless BF16 weight compression (Huffman-coded exponents, raw sign+mantissa bytes).

Why: a BF16 weight's 8-bit exponent carries only ~2.6 bits of entropy, so Huffman-coding it alone
shrinks weights to ~11 bits with bit-exact reconstruction, which a GPU can decode at load/run time.

Layout of a unit (one codebook shared by a group of tensors, concatenated in order):

* weight ``w`` (int16 bits): exponent ``e = (w >> 7) & 0xFF``,
  ``sign_mantissa = ((w >> 8) & 0x80) | (w & 0x7F)`` (one raw byte per weight).
* ``encoded``: canonical Huffman codes of all exponents, MSB-first, cut into 8-byte windows (one per
  decoder thread) plus 4 zero bytes so a thread may read 12 bytes to finish a code starting at bit 63.
* ``gaps``: 5 bits per window, MSB-first, packed into bytes (+1 pad byte): bit offset of the first code
  that starts inside the window (<= 31 because codes are at most 32 bits).
* ``output_positions[b]``: index of the first weight decoded by block ``b`` (``threads_per_block``
  windows); one extra final entry holds the number of encoded weights.
* ``luts``: ``(n_tables, 256)`` uint8, one table per byte of code prefix (root first). An entry < 240 is
  a decoded exponent; an entry ``v`` in 240..255 points to table ``256 - v`` for the next byte. Hence
  exponents >= 240 (|w| >= 2**113, inf, nan) cannot be encoded; such tensors stay raw BF16
  (:class:`RawBF16Fallback`). ``code_lengths[e]`` is the code length of exponent ``e``.
* The flat decoded buffer holds the encoded tensors first (``DF11Unit.offsets``), then raw fallbacks.
"""

from __future__ import annotations

import heapq
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

WINDOW_BYTES = 8
WINDOW_BITS = 8 * WINDOW_BYTES
READ_PAD_BYTES = 4  # a thread reads 12 bytes: its window plus the start of the next
GAP_BITS = 5
MAX_CODE_LEN = 32
POINTER_BASE = 240  # LUT entries >= this point to a sub-table
MAX_SUBTABLES = 256 - POINTER_BASE
DEFAULT_THREADS_PER_BLOCK = 256
FORMAT_VERSION = 1


class DF11EncodeError(ValueError):
    """The input cannot be DFloat11-encoded (wrong dtype, bad codebook request, ...)."""


@dataclass
class RawBF16Fallback:
    """A tensor kept as raw BF16 because some exponent is >= 240 (huge magnitudes, inf or nan)."""

    name: str
    tensor: torch.Tensor
    reason: str


@dataclass
class DF11Unit:
    """One DFloat11-encoded group of BF16 tensors; plain tensors so it can move devices and serialize."""

    names: list[str]  # encoded tensors (stream order) followed by fallback tensors
    shapes: list[tuple[int, ...]]
    n_encoded: int  # the first n_encoded names live in the Huffman stream
    luts: torch.Tensor  # uint8 (n_tables, 256)
    code_lengths: torch.Tensor  # uint8 (256,)
    encoded: torch.Tensor  # uint8 (8 * n_threads + 4,)
    sign_mantissa: torch.Tensor  # uint8 (n_encoded_weights,)
    gaps: torch.Tensor  # uint8, 5-bit fields packed MSB-first
    output_positions: torch.Tensor  # int64 (n_blocks + 1,)
    threads_per_block: int
    fallbacks: list[RawBF16Fallback] = field(default_factory=list)

    # ---- sizes and layout ----
    @property
    def numels(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def offsets(self) -> dict[str, int]:
        """Start of each tensor in the flat decoded buffer."""
        out, pos = {}, 0
        for name, n in zip(self.names, self.numels, strict=True):
            out[name] = pos
            pos += n
        return out

    @property
    def num_weights(self) -> int:
        return sum(self.numels)

    @property
    def n_encoded_weights(self) -> int:
        return int(self.sign_mantissa.numel())

    @property
    def n_threads(self) -> int:
        return (int(self.encoded.numel()) - READ_PAD_BYTES) // WINDOW_BYTES

    @property
    def n_blocks(self) -> int:
        return int(self.output_positions.numel()) - 1

    @property
    def fallback_names(self) -> list[str]:
        return [f.name for f in self.fallbacks]

    @property
    def lut_levels(self) -> int:
        """Byte-table levels a decoder must walk (ceil(max code length / 8))."""
        max_len = int(self.code_lengths.max()) if self.code_lengths.numel() else 0
        return max(1, -(-max_len // 8))

    @property
    def max_codes_per_window(self) -> int:
        """Upper bound on codes starting in one 64-bit window (loop bound for decoders)."""
        lengths = self.code_lengths[self.code_lengths > 0]
        if lengths.numel() == 0:
            return 0
        return -(-WINDOW_BITS // int(lengths.min()))

    @property
    def bits_per_weight(self) -> float:
        """Everything stored (stream, sign/mantissa, gaps, positions, LUTs, raw fallbacks) per weight."""
        tensors = [self.luts, self.code_lengths, self.encoded, self.sign_mantissa, self.gaps]
        tensors += [self.output_positions] + [f.tensor for f in self.fallbacks]
        total_bytes = sum(t.numel() * t.element_size() for t in tensors)
        return 8.0 * total_bytes / max(1, self.num_weights)

    # ---- helpers ----
    def to(self, device: torch.device | str) -> DF11Unit:
        """Copy of the unit with every tensor on `device` (e.g. before a GPU decode)."""
        def mv(t: torch.Tensor) -> torch.Tensor:
            return t.to(device)

        return DF11Unit(
            names=list(self.names), shapes=list(self.shapes), n_encoded=self.n_encoded,
            luts=mv(self.luts), code_lengths=mv(self.code_lengths), encoded=mv(self.encoded),
            sign_mantissa=mv(self.sign_mantissa), gaps=mv(self.gaps),
            output_positions=mv(self.output_positions), threads_per_block=self.threads_per_block,
            fallbacks=[RawBF16Fallback(f.name, mv(f.tensor), f.reason) for f in self.fallbacks],
        )

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views of a flat decoded buffer, one per tensor, with the original shapes."""
        if flat.numel() != self.num_weights:
            raise ValueError(f"flat buffer has {flat.numel()} elements, unit has {self.num_weights}")
        offsets = self.offsets
        return {
            name: flat[offsets[name]: offsets[name] + n].view(shape)
            for name, n, shape in zip(self.names, self.numels, self.shapes, strict=True)
        }

    # ---- serialization ----
    def to_state_dict(self, prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Flat tensor dict (safetensors-ready) plus small JSON-able metadata."""
        tensors = {
            f"{prefix}luts": self.luts, f"{prefix}code_lengths": self.code_lengths,
            f"{prefix}encoded": self.encoded, f"{prefix}sign_mantissa": self.sign_mantissa,
            f"{prefix}gaps": self.gaps, f"{prefix}output_positions": self.output_positions,
        }
        for f in self.fallbacks:
            tensors[f"{prefix}raw.{f.name}"] = f.tensor
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        meta = {
            "format": "df11", "version": FORMAT_VERSION, "names": list(self.names),
            "shapes": [list(s) for s in self.shapes], "n_encoded": self.n_encoded,
            "threads_per_block": self.threads_per_block,
            "fallback_reasons": {f.name: f.reason for f in self.fallbacks},
        }
        return tensors, meta

    @classmethod
    def from_state_dict(
        cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any] | str, prefix: str = ""
    ) -> DF11Unit:
        """Inverse of :meth:`to_state_dict`; `meta` may be the dict or its JSON string."""
        m = json.loads(meta) if isinstance(meta, str) else meta
        if m.get("format") != "df11" or int(m.get("version", -1)) != FORMAT_VERSION:
            raise ValueError(f"not a DF11 v{FORMAT_VERSION} unit: {m.get('format')!r} v{m.get('version')!r}")
        names = list(m["names"])
        n_enc = int(m["n_encoded"])
        reasons = dict(m.get("fallback_reasons", {}))
        return cls(
            names=names, shapes=[tuple(int(d) for d in s) for s in m["shapes"]], n_encoded=n_enc,
            luts=tensors[f"{prefix}luts"], code_lengths=tensors[f"{prefix}code_lengths"],
            encoded=tensors[f"{prefix}encoded"], sign_mantissa=tensors[f"{prefix}sign_mantissa"],
            gaps=tensors[f"{prefix}gaps"], output_positions=tensors[f"{prefix}output_positions"],
            threads_per_block=int(m["threads_per_block"]),
            fallbacks=[
                RawBF16Fallback(n, tensors[f"{prefix}raw.{n}"], reasons.get(n, "")) for n in names[n_enc:]
            ],
        )


# ---- codebook ----


def package_merge_lengths(counts: Mapping[int, int], max_len: int) -> dict[int, int]:
    """Optimal code lengths <= max_len (package-merge); one symbol gets length 1."""
    syms = sorted((s for s, c in counts.items() if c > 0), key=lambda s: (counts[s], s))
    if not syms:
        return {}
    if len(syms) == 1:
        return {syms[0]: 1}
    if (1 << max_len) < len(syms):
        raise DF11EncodeError(f"{len(syms)} symbols do not fit in codes of at most {max_len} bits")
    # item = (weight, tie, symbol or -1, left, right); packages keep their children so that
    # code lengths are counted at the end by walking the selected items
    leaves = [(counts[s], i, s, None, None) for i, s in enumerate(syms)]
    level = leaves
    for _ in range(max_len - 1):
        packages = [
            (level[i][0] + level[i + 1][0], len(syms) + i, -1, level[i], level[i + 1])
            for i in range(0, len(level) - 1, 2)
        ]
        level = list(heapq.merge(leaves, packages, key=lambda item: item[0]))
    lengths = dict.fromkeys(syms, 0)
    stack = list(level[: 2 * len(syms) - 2])
    while stack:
        _, _, sym, left, right = stack.pop()
        if sym >= 0:
            lengths[sym] += 1
        else:
            stack.append(left)
            stack.append(right)
    return lengths


def canonical_codes(lengths: Mapping[int, int]) -> dict[int, int]:
    """Canonical Huffman codes: shorter codes first, so the all-zero prefix is always a valid code."""
    codes: dict[int, int] = {}
    code, prev = 0, 0
    for sym in sorted(lengths, key=lambda s: (lengths[s], s)):
        code <<= lengths[sym] - prev
        prev = lengths[sym]
        codes[sym] = code
        code += 1
    return codes


def build_luts(lengths: Mapping[int, int], codes: Mapping[int, int]) -> list[list[int]] | None:
    """Byte-indexed decode tables (root first); None if more than 16 sub-tables would be needed."""
    tables = [[-1] * 256]
    order = sorted(lengths, key=lambda s: (lengths[s], s))
    for sym in order:
        remaining, code, table = lengths[sym], codes[sym], 0
        while remaining > 8:
            byte = (code >> (remaining - 8)) & 0xFF
            entry = tables[table][byte]
            if entry == -1:
                if len(tables) > MAX_SUBTABLES:
                    return None
                tables.append([-1] * 256)
                entry = 256 - (len(tables) - 1)
                tables[table][byte] = entry
            elif entry < POINTER_BASE:
                raise AssertionError("codes are not prefix-free")
            table, remaining = 256 - entry, remaining - 8
        first = (code & ((1 << remaining) - 1)) << (8 - remaining)
        for i in range(first, first + (1 << (8 - remaining))):
            tables[table][i] = sym
    # Unused entries (only a 1-symbol code has them) decode as a real symbol: no zero-length loops.
    filler = order[0] if order else 0
    return [[filler if v == -1 else v for v in t] for t in tables]


@dataclass
class _Codebook:
    lengths: dict[int, int]
    codes: dict[int, int]
    luts: list[list[int]]


def _build_codebook(counts: Sequence[int], max_code_len: int) -> _Codebook:
    hist = {s: int(c) for s, c in enumerate(counts) if c > 0}
    # Some histograms need > 16 sub-tables; take the longest limit that fits (8 bits: root table only).
    for limit in range(max_code_len, 7, -1):
        lengths = package_merge_lengths(hist, limit)
        codes = canonical_codes(lengths)
        luts = build_luts(lengths, codes)
        if luts is not None:
            return _Codebook(lengths, codes, luts)
    raise DF11EncodeError("could not build decode tables for this histogram")


# ---- encoder ----


def _named_items(
    tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
) -> list[tuple[str, torch.Tensor]]:
    if isinstance(tensors, Mapping):
        items = [(str(k), v) for k, v in tensors.items()]
    else:
        items = [(str(i), v) for i, v in enumerate(tensors)]
    if not items:
        raise DF11EncodeError("nothing to encode: empty tensor collection")
    for name, t in items:
        if not isinstance(t, torch.Tensor):
            raise DF11EncodeError(f"{name!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype != torch.bfloat16:
            raise DF11EncodeError(
                f"tensor {name!r} has dtype {t.dtype}; DFloat11 encodes torch.bfloat16 only"
            )
    return items


def _pack_gaps(gaps: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(GAP_BITS - 1, -1, -1, device=gaps.device)
    bits = ((gaps[:, None] >> shifts) & 1).reshape(-1)
    n_bytes = -(-bits.numel() // 8) + 1  # +1: a reader always loads two bytes
    bits = torch.nn.functional.pad(bits, (0, 8 * n_bytes - bits.numel()))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], device=gaps.device)
    return (bits.view(-1, 8) * weights).sum(1).to(torch.uint8)


# Weights per packing step: temporaries stay in cache, int32 bit offsets cannot overflow, and the ops stay
# under torch's parallel grain size, so a busy machine never stalls them on thread-pool barriers.
PACK_CHUNK = 1 << 15


def _pack_stream(
    exps: torch.Tensor, hist: torch.Tensor, book: _Codebook, threads_per_block: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorized bit packing: returns (encoded bytes, packed gaps, output_positions).

    Works chunk by chunk (a handful of tensor ops per chunk, no per-weight Python) with int32 bit offsets
    relative to the chunk's first 32-bit word; only the code values need int64.
    """
    dev, n = exps.device, exps.numel()
    len_tab = torch.zeros(256, dtype=torch.int32)
    code_tab = torch.zeros(256, dtype=torch.int64)
    for sym, length in book.lengths.items():
        len_tab[sym] = length
        code_tab[sym] = book.codes[sym]
    len_tab, code_tab = len_tab.to(dev), code_tab.to(dev)
    total_bits = int((hist.to(torch.int64) * len_tab.cpu().to(torch.int64)).sum())
    n_threads = -(-total_bits // WINDOW_BITS)
    n_words = 2 * n_threads + 1  # 32-bit words covering 8 * n_threads + 4 bytes

    # pair[j] holds words j-1 (high half) and j (low half); a code (<= 32 bits) whose last bit is in word j
    # lies in that pair. Codes never overlap, so adding them is an OR, and values stay below 2**63.
    pair = torch.zeros(n_words + 1, dtype=torch.int64, device=dev)
    gaps, firsts = [], []
    ext = torch.empty(min(n, PACK_CHUNK) + 1, dtype=torch.int32, device=dev)
    bit_base = 0
    for lo in range(0, n, PACK_CHUNK):
        e = exps[lo: lo + PACK_CHUNK].to(torch.int32)
        m = e.numel()
        word0 = bit_base >> 5
        # ext[k] = start of code k relative to bit 32 * word0; ext[m] = end of the chunk
        local = ext[: m + 1]
        offset = bit_base - 32 * word0
        local[0] = offset
        torch.cumsum(len_tab.index_select(0, e), 0, out=local[1:])
        local[1:] += offset
        ends = local[1:]
        shift = torch.bitwise_and(-ends, 31)
        pair[word0:].index_add_(0, (ends - 1) >> 5, code_tab.index_select(0, e) << shift)
        chunk_end = int(local[m])
        # windows whose first bit lies in this chunk's bit range find their first code start here
        t0, t1 = -(-bit_base // WINDOW_BITS), -(-(32 * word0 + chunk_end) // WINDOW_BITS)
        if t1 > t0:
            x = torch.arange(t0, t1, device=dev, dtype=torch.int64) * WINDOW_BITS - 32 * word0
            idx = torch.searchsorted(local, x.to(torch.int32))
            gaps.append(local[idx].to(torch.int64) - x)
            firsts.append(idx.to(torch.int64) + lo)
        bit_base = 32 * word0 + chunk_end
    assert bit_base == total_bits

    words = pair[:n_words] & 0xFFFFFFFF
    words |= pair[1:] >> 32
    shifts = torch.tensor([24, 16, 8, 0], device=dev)
    encoded = ((words[:, None] >> shifts) & 0xFF).to(torch.uint8).reshape(-1)
    gap_t = torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.int64, device=dev)
    first_t = torch.cat(firsts) if firsts else torch.zeros(0, dtype=torch.int64, device=dev)
    assert gap_t.numel() == n_threads and (n_threads == 0 or int(gap_t.max()) < (1 << GAP_BITS))
    positions = torch.cat([first_t[::threads_per_block], torch.tensor([n], device=dev, dtype=torch.int64)])
    return encoded, _pack_gaps(gap_t), positions


def encode_df11(
    tensors: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    *,
    threads_per_block: int = DEFAULT_THREADS_PER_BLOCK,
    max_code_len: int = MAX_CODE_LEN,
    symbol_counts: torch.Tensor | Sequence[int] | None = None,
    warn: bool = True,
) -> DF11Unit:
    """Encode BF16 tensors as one DFloat11 unit with a shared codebook.

    `threads_per_block` fixes the decoder's block size (power of two) because output_positions are per block.
    `symbol_counts` (256 exponent counts) builds the codebook from a sample or shared histogram instead of
    the data; every exponent present must have a nonzero count. Tensors containing exponents >= 240
    become :class:`RawBF16Fallback` entries (reported with a RuntimeWarning unless `warn=False`).
    A list input gets names "0", "1", ...
    """
    if threads_per_block <= 0 or threads_per_block & (threads_per_block - 1):
        raise DF11EncodeError(f"threads_per_block must be a power of two, got {threads_per_block}")
    if not 8 <= max_code_len <= MAX_CODE_LEN:
        raise DF11EncodeError(f"max_code_len must be in [8, {MAX_CODE_LEN}], got {max_code_len}")
    items = _named_items(tensors)
    device = items[0][1].device

    encoded_items, fallbacks = [], []
    for name, t in items:
        bits = t.detach().reshape(-1).view(torch.int16)
        # exponent >= 240  <=>  (bits & 0x7FFF) >= 240 << 7
        big = bits.numel() > 0 and bool((bits & 0x7FFF).max() >= POINTER_BASE << 7)
        if big:
            reason = "exponent >= 240 (|w| >= 2**113, inf or nan)"
            fallbacks.append(RawBF16Fallback(name, t.detach().clone(), reason))
        else:
            encoded_items.append((name, bits))
    if fallbacks and warn:
        warnings.warn(f"DF11: kept raw BF16 (unencodable exponent): {[f.name for f in fallbacks]}",
                      RuntimeWarning, stacklevel=2)

    if encoded_items:
        w = torch.cat([b.to(device) for _, b in encoded_items])
    else:
        w = torch.zeros(0, dtype=torch.int16, device=device)
    exps = (w >> 7) & 0xFF  # int16 arithmetic shift; the mask drops the sign copies
    sign_mantissa = (((w >> 8) & 0x80) | (w & 0x7F)).to(torch.uint8)
    del w
    hist = data_hist = torch.bincount(exps, minlength=256).cpu()
    if symbol_counts is not None:
        given = torch.as_tensor(symbol_counts, dtype=torch.int64).cpu()
        if given.numel() != 256 or bool(((hist > 0) & (given <= 0)).any()):
            raise DF11EncodeError("symbol_counts must have 256 entries, nonzero for every exponent present")
        if bool((given[POINTER_BASE:] > 0).any()):
            raise DF11EncodeError("symbol_counts must be zero for exponents >= 240")
        hist = given
    book = _build_codebook(hist.tolist(), max_code_len)
    encoded, gaps, positions = _pack_stream(exps, data_hist, book, threads_per_block)

    luts = torch.tensor(book.luts or [[0] * 256], dtype=torch.uint8, device=device)
    code_lengths = torch.zeros(256, dtype=torch.uint8)
    for sym, length in book.lengths.items():
        code_lengths[sym] = length
    names = [n for n, _ in encoded_items] + [f.name for f in fallbacks]
    shape_of = {n: tuple(t.shape) for n, t in items}
    return DF11Unit(
        names=names, shapes=[shape_of[n] for n in names], n_encoded=len(encoded_items), luts=luts,
        code_lengths=code_lengths.to(device), encoded=encoded, sign_mantissa=sign_mantissa, gaps=gaps,
        output_positions=positions, threads_per_block=threads_per_block, fallbacks=fallbacks,
    )


# ---- reference decoder ----


def _unpack_gaps(gaps: torch.Tensor, n: int) -> torch.Tensor:
    bitpos = torch.arange(n, device=gaps.device, dtype=torch.int64) * GAP_BITS
    byte = bitpos >> 3
    g = gaps.to(torch.int64)
    pair = (g[byte] << 8) | g[byte + 1]
    return (pair >> (16 - GAP_BITS - (bitpos & 7))) & ((1 << GAP_BITS) - 1)


def _decode_exponents(unit: DF11Unit) -> torch.Tensor:
    """All threads in lock-step, like the GPU kernel, but with a global scan instead of output_positions."""
    n_threads, dev = unit.n_threads, unit.encoded.device
    if n_threads == 0:
        return torch.zeros(0, dtype=torch.int64, device=dev)
    enc = unit.encoded.to(torch.int64)
    base = torch.arange(n_threads, device=dev, dtype=torch.int64) * WINDOW_BYTES
    w = [(enc[base + 4 * j] << 24) | (enc[base + 4 * j + 1] << 16) | (enc[base + 4 * j + 2] << 8)
         | enc[base + 4 * j + 3] for j in range(3)]
    luts = unit.luts.to(torch.int64).reshape(-1)
    lens = unit.code_lengths.to(torch.int64)
    p = _unpack_gaps(unit.gaps, n_threads)
    syms, active = [], []
    for _ in range(unit.max_codes_per_window):
        act = p < WINDOW_BITS
        first = (p >> 5) == 0
        r = p & 31
        a = torch.where(first, w[0], w[1])
        b = torch.where(first, w[1], w[2])
        bits = ((a << r) | (b >> (32 - r))) & 0xFFFFFFFF
        sym = luts[bits >> 24]
        for level in range(1, unit.lut_levels):
            nxt = sym >= POINTER_BASE
            idx = torch.where(nxt, (256 - sym) * 256 + ((bits >> (24 - 8 * level)) & 0xFF), 0)
            sym = torch.where(nxt, luts[idx], sym)
        p = torch.where(act, p + lens[sym], p)
        syms.append(sym.to(torch.uint8))
        active.append(act)
    act_mat = torch.stack(active, 1)
    counts = act_mat.sum(1)
    starts = torch.cumsum(counts, 0) - counts
    expected = unit.output_positions[:-1].to(dev)
    if not torch.equal(starts[:: unit.threads_per_block], expected):
        raise ValueError("DF11 unit is corrupt: output_positions disagree with the stream")
    return torch.stack(syms, 1)[act_mat][: unit.n_encoded_weights].to(torch.int64)


def assemble_bf16_bits(exps: torch.Tensor, sign_mantissa: torch.Tensor) -> torch.Tensor:
    """int16 weight bits: hi byte (s & 0x80) | (e >> 1), lo byte ((e & 1) << 7) | (s & 0x7F)."""
    s = sign_mantissa.to(torch.int32)
    e = exps.to(torch.int32)
    return (((s & 0x80) << 8) | (e << 7) | (s & 0x7F)).to(torch.int16)


def decode_df11_reference(unit: DF11Unit) -> dict[str, torch.Tensor]:
    """Plain-torch decode of the whole unit: {name: bf16 tensor}, bit-identical to the encoder input."""
    flat = torch.empty(unit.num_weights, dtype=torch.int16, device=unit.encoded.device)
    n_enc = unit.n_encoded_weights
    flat[:n_enc] = assemble_bf16_bits(_decode_exponents(unit), unit.sign_mantissa)
    offsets = unit.offsets
    for f in unit.fallbacks:
        flat[offsets[f.name]: offsets[f.name] + f.tensor.numel()] = f.tensor.reshape(-1).view(torch.int16)
    return unit.split(flat.view(torch.bfloat16))
