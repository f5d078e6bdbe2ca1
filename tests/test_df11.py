"""DFloat11 codec: bit-exact round trips through the reference and the Triton (interpreter) decoder."""

import json

import pytest
import torch

from braze.kernels.df11 import (
    decode_df11_tensor_triton,
    decode_df11_triton,
    df11_embedding_triton,
    render_df11_decode,
)
from braze.quant.df11 import (
    DF11EncodeError,
    DF11Unit,
    canonical_codes,
    decode_df11_reference,
    encode_df11,
    package_merge_lengths,
)


def _normal(shape, seed=0, std=0.02):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(torch.bfloat16)


def _signs(n, g):
    return torch.randint(0, 2, (n,), generator=g) << 15


def _from_bits(bits):
    return bits.to(torch.int16).view(torch.bfloat16)


def _assert_bits_equal(got, want):
    assert got.shape == want.shape
    g, w = got.reshape(-1).view(torch.int16), want.reshape(-1).view(torch.int16)
    bad = (g != w).nonzero()
    if bad.numel():
        i = bad[0].item()
        raise AssertionError(f"{bad.numel()} mismatches, first at {i}: {g[i].item()} != {w[i].item()}")


def _check_unit(unit, tensors, triton=True):
    ref = decode_df11_reference(unit)
    assert list(ref) == unit.names
    for name, t in tensors.items():
        _assert_bits_equal(ref[name], t)
    if triton:
        flat = decode_df11_triton(unit)
        got = unit.split(flat)
        for name, t in tensors.items():
            _assert_bits_equal(got[name], t)


def test_bits_per_weight_normal_and_reference_roundtrip():
    x = _normal((512, 1024))
    unit = encode_df11({"w": x})
    bpw = unit.bits_per_weight
    print(f"DF11 N(0, 0.02) 512x1024: {bpw:.3f} bits/weight")
    assert bpw <= 11.0, f"{bpw:.3f} bits/weight > 11.0"
    _check_unit(unit, {"w": x}, triton=False)


def test_triton_roundtrip_normal():
    x = _normal((256, 256), seed=1)
    _check_unit(encode_df11({"w": x}, threads_per_block=1024), {"w": x})


def test_triton_many_small_blocks():
    # many blocks: exercises output_positions seeding and block boundaries inside the stream
    x = _normal((16384,), seed=2)
    unit = encode_df11([x], threads_per_block=64)
    assert unit.n_blocks >= 8
    _check_unit(unit, {"0": x})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_embedding_rows_decode_alone_bit_exact(dtype):
    """df11_embedding: rows gathered straight from the stream equal F.embedding of the table bit for bit (bf16
    bits, or exactly widened to fp32), with small blocks so rows straddle two blocks, and the first / last rows and
    repeats among the ids."""
    from braze.kernels.df11 import df11_row_blocks

    table = _normal((300, 96), seed=7)
    unit = encode_df11({"emb": table}, threads_per_block=32)
    first, per_row = df11_row_blocks(unit.output_positions, 300, 96)
    assert unit.n_blocks >= 10 and per_row == 2 and int(first[-1]) == unit.n_blocks - 1 and int(first[0]) == 0
    ids = torch.tensor([[0, 299, 5, 5], [150, 1, 298, 77]])
    got = df11_embedding_triton(unit, "emb", ids, dtype)
    want = torch.nn.functional.embedding(ids, table).to(dtype)
    assert torch.equal(got.view(torch.int16) if dtype == torch.bfloat16 else got.view(torch.int32),
                       want.view(torch.int16) if dtype == torch.bfloat16 else want.view(torch.int32))


def test_triton_into_given_int16_buffer():
    x = _normal((3000,), seed=3)
    unit = encode_df11([x], threads_per_block=1024)
    out = torch.full((3000,), -1, dtype=torch.int16)
    assert decode_df11_triton(unit, out=out) is out
    _assert_bits_equal(out, x.view(torch.int16))


def test_zeros_and_negative_zeros_single_symbol():
    g = torch.Generator().manual_seed(4)
    signs = torch.randint(0, 2, (5000,), generator=g)
    x = _from_bits(signs * -32768)  # +0.0 / -0.0 only: one exponent, a 1-symbol Huffman tree
    unit = encode_df11({"z": x}, threads_per_block=1024)
    assert int((unit.code_lengths > 0).sum()) == 1
    _check_unit(unit, {"z": x})


def test_zeros_mixed_with_normals():
    x = _normal((4000,), seed=5)
    x[::3] = 0.0
    x[1::7] = -0.0
    _check_unit(encode_df11({"x": x}, threads_per_block=1024), {"x": x})


def test_one_distinct_exponent():
    g = torch.Generator().manual_seed(6)
    bits = (127 << 7) | torch.randint(0, 128, (6000,), generator=g) | _signs(6000, g)
    x = _from_bits(bits)  # every |x| in [1, 2)
    unit = encode_df11({"x": x}, threads_per_block=1024)
    assert unit.code_lengths.nonzero().flatten().tolist() == [127]
    _check_unit(unit, {"x": x})


def test_subnormals():
    g = torch.Generator().manual_seed(7)
    bits = torch.randint(1, 128, (5000,), generator=g) | _signs(5000, g)
    x = _from_bits(bits)  # exponent 0, nonzero mantissa
    x[::4] = _normal((1250,), seed=8)
    _check_unit(encode_df11({"x": x}, threads_per_block=1024), {"x": x})


def test_all_encodable_exponents_random_bits():
    g = torch.Generator().manual_seed(9)
    exps = torch.randint(0, 240, (8000,), generator=g)
    bits = (exps << 7) | torch.randint(0, 128, (8000,), generator=g) | _signs(8000, g)
    x = _from_bits(bits)
    _check_unit(encode_df11({"x": x}, threads_per_block=1024), {"x": x})


def test_32_bit_codes_and_four_table_levels():
    # A geometric histogram gives a unary-like tree: codes reach the 32-bit cap and need root + 3 levels.
    counts = torch.zeros(256, dtype=torch.int64)
    counts[60:110] = torch.tensor([2 ** max(0, 45 - i) for i in range(50)])
    g = torch.Generator().manual_seed(10)
    exps = torch.randint(60, 110, (6000,), generator=g)
    x = _from_bits((exps << 7) | torch.randint(0, 128, (6000,), generator=g))
    unit = encode_df11({"x": x}, threads_per_block=1024, symbol_counts=counts)
    assert int(unit.code_lengths.max()) == 32 and unit.lut_levels == 4 and unit.luts.shape[0] > 3
    _check_unit(unit, {"x": x})


def test_histogram_needing_too_many_subtables_gets_shorter_codes():
    # 200 mid-frequency symbols would spread 10-11 bit codes over > 16 root prefixes
    counts = torch.zeros(256, dtype=torch.int64)
    counts[:28], counts[28:228] = 10**6, 25000
    g = torch.Generator().manual_seed(22)
    x = _from_bits((torch.randint(0, 228, (5000,), generator=g) << 7) | _signs(5000, g))
    unit = encode_df11({"x": x}, threads_per_block=1024, symbol_counts=counts)
    assert unit.luts.shape[0] <= 17
    _check_unit(unit, {"x": x})


@pytest.mark.parametrize("n", [1, 2, 63, 65, 1000, 4097])
def test_sizes_not_multiple_of_window_or_block(n):
    x = _normal((n,), seed=100 + n)
    _check_unit(encode_df11({"x": x}, threads_per_block=1024), {"x": x})


def test_multi_tensor_unit_whole_and_per_tensor():
    tensors = {
        "q": _normal((128, 96), seed=11),
        "k": _normal((1000,), seed=12, std=0.05),
        "empty": torch.zeros((0, 4), dtype=torch.bfloat16),
        "v": _normal((7, 9, 11), seed=13, std=0.01),
    }
    unit = encode_df11(tensors, threads_per_block=64)
    assert unit.names == list(tensors) and unit.n_blocks > 2
    assert unit.offsets == {"q": 0, "k": 12288, "empty": 13288, "v": 13288}
    _check_unit(unit, tensors)
    for name in ["v", "k", "q"]:  # tensor boundaries fall inside blocks
        _assert_bits_equal(decode_df11_tensor_triton(unit, name), tensors[name])


def test_inf_nan_and_huge_fall_back_to_raw_bf16():
    bad = _normal((300,), seed=14)
    bad[5], bad[17], bad[40] = float("inf"), float("-inf"), float("nan")
    huge = _normal((200,), seed=15)
    huge[3] = 2.0**120  # finite but exponent 247 >= 240
    tensors = {"a": _normal((500,), seed=16), "bad": bad, "huge": huge, "c": _normal((77,), seed=17)}
    with pytest.warns(RuntimeWarning, match="bad"):
        unit = encode_df11(tensors, threads_per_block=1024)
    assert unit.fallback_names == ["bad", "huge"]
    assert unit.names == ["a", "c", "bad", "huge"]  # encoded tensors first, raw fallbacks after
    assert "240" in unit.fallbacks[0].reason
    _check_unit(unit, tensors)
    _assert_bits_equal(decode_df11_tensor_triton(unit, "bad"), bad)
    _assert_bits_equal(decode_df11_tensor_triton(unit, "c"), tensors["c"])


def test_everything_falls_back():
    x = torch.full((10,), float("nan"), dtype=torch.bfloat16)
    unit = encode_df11({"x": x}, warn=False)
    assert unit.n_encoded == 0 and unit.n_threads == 0
    _check_unit(unit, {"x": x})


def test_state_dict_roundtrip_through_safetensors(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    tensors = {"w1": _normal((64, 64), seed=18), "w2": _normal((333,), seed=19)}
    tensors["w2"][0] = float("nan")
    unit = encode_df11(tensors, threads_per_block=1024, warn=False)
    flat, meta = unit.to_state_dict(prefix="blk0.")
    path = tmp_path / "unit.safetensors"
    safetensors_torch.save_file(flat, str(path), metadata={"df11": json.dumps(meta)})
    loaded = safetensors_torch.load_file(str(path))
    with safetensors_torch.safe_open(str(path), framework="pt") as f:
        meta_json = f.metadata()["df11"]
    back = DF11Unit.from_state_dict(loaded, meta_json, prefix="blk0.")
    assert back.names == unit.names and back.shapes == unit.shapes
    assert back.bits_per_weight == unit.bits_per_weight
    _check_unit(back, tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_bf16_input_is_rejected_with_dtype(dtype):
    with pytest.raises(DF11EncodeError, match=rf"'w2'.*{dtype}"):
        encode_df11({"w1": _normal((4,)), "w2": torch.zeros(4, dtype=dtype)})


def test_package_merge_limits_lengths_and_is_complete():
    g = torch.Generator().manual_seed(20)
    for max_len in (8, 12, 32):
        counts = {s: int(c) for s, c in enumerate(torch.randint(1, 1 << 20, (200,), generator=g))}
        counts.update({200 + i: 2**i for i in range(30)})
        lengths = package_merge_lengths(counts, max_len)
        assert max(lengths.values()) <= max_len
        assert sum(2.0 ** -n for n in lengths.values()) == 1.0  # Kraft equality: a full tree
        codes = canonical_codes(lengths)
        assert codes[min(lengths, key=lambda s: (lengths[s], s))] == 0  # zero padding decodes as a real code
    assert package_merge_lengths({7: 5}, 32) == {7: 1}


def test_corrupt_positions_are_detected_by_reference():
    unit = encode_df11([_normal((5000,), seed=21)], threads_per_block=32)
    unit.output_positions[1] += 1
    with pytest.raises(ValueError, match="corrupt"):
        decode_df11_reference(unit)


def test_rendered_kernel_has_header_and_parses():
    import ast

    src = render_df11_decode(header="# generated for test")
    assert src.startswith("# generated for test")
    ast.parse(src)
