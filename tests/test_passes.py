"""Unit checks of individual rewrites and of the scheduler's rules (match counts, ops before/after, numerics)."""

import networkx as nx
import pytest
import torch
import torch.nn.functional as F

import braze
from braze.codegen.schedule import _creates_cycle


class GeGLU(torch.nn.Module):
    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.gate = torch.nn.Linear(dim, hidden, bias=False)
        self.up = torch.nn.Linear(dim, hidden, bias=False)
        self.down = torch.nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x))


def _two_matmul_mlp(module_cls):
    """Compile a seeded MLP, check it against eager, and check it became exactly two matmul kernels (the
    activation in the first one's epilogue)."""
    torch.manual_seed(0)
    m = module_cls().eval()
    cm = braze.compile(m)
    x = torch.randn(3, 32)
    with torch.no_grad():
        assert (cm(x) - m(x)).abs().max().item() < 1e-5
    assert [k[1] for k in cm.compiled.report.kernels] == ["matmul", "matmul"]
    return cm


def test_geglu_becomes_one_gated_matmul():
    cm = _two_matmul_mlp(GeGLU)  # gate/up/gelu/mul in one, down in the other
    assert cm.compiled.report.pass_count("recognize_glu") == 1
    ops = {n.target for n in cm.compiled.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.braze.linear_glu.default in ops and torch.ops.aten.gelu.default not in ops


class Diamond(torch.nn.Module):
    """y feeds a matmul and, beside it, the add that consumes the matmul: fusing y's kernel with the add's
    would put the matmul inside a cycle, so the scheduler must keep them apart."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        y = torch.sin(x) * 2.0
        return y * self.lin(y)


def test_merge_that_would_create_a_cycle_is_refused():
    torch.manual_seed(0)
    m = Diamond().eval()
    cm = braze.compile(m)
    x = torch.randn(4, 16)
    with torch.no_grad():
        assert (cm(x) - m(x)).abs().max().item() < 1e-5
    kernels = cm.compiled.report.kernels
    assert [k[1] for k in kernels] == ["fused", "matmul", "fused"]
    assert kernels[0][2] != kernels[2][2]  # y's kernel and the product's kernel stayed separate regions


def test_cycle_check_on_region_graph():
    g = nx.DiGraph([(0, "tmpl"), ("tmpl", 1), (0, 1)])
    assert _creates_cycle(g, 0, 1)  # 0 -> tmpl -> 1 goes through a third node
    g2 = nx.DiGraph([(0, 1), (1, 2)])
    assert not _creates_cycle(g2, 0, 1)


def test_interleaved_rope_is_half_split_rope_over_permuted_dims():
    """The identity fuse_interleaved_rope rests on, for arbitrary (not pair-repeated) angles: rotating the pairs
    (2j, 2j+1) and permuting [evens, odds] equals permuting first and rotating the pairs (j, j + D/2)."""
    from braze.ops.library import interleaved_rope_reference, rope_reference

    g = torch.Generator().manual_seed(0)
    x, cos, sin = torch.randn(2, 3, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8,
                                                                                                       generator=g)
    perm = [0, 2, 4, 6, 1, 3, 5, 7]
    want = interleaved_rope_reference(x, cos, sin)
    assert torch.allclose(rope_reference(x[..., perm], cos[..., perm], sin[..., perm]), want[..., perm], atol=1e-6)
    assert not torch.allclose(rope_reference(x, cos, sin), want, atol=1e-3)  # the two conventions do differ
    # and it is what HF's GPT-J computes (sin / cos repeated per pair)
    from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb

    c, s = cos[..., ::2], sin[..., ::2]
    hf = apply_rotary_pos_emb(x.transpose(1, 2), s, c).transpose(1, 2)
    assert torch.allclose(hf, interleaved_rope_reference(x, c.repeat_interleave(2, -1), s.repeat_interleave(2, -1)),
                          atol=1e-6)


class ReluSquaredMLP(torch.nn.Module):
    """Nemotron / Persimmon's non-gated MLP: down(relu(up(x))^2)."""

    def __init__(self, dim=32, hidden=64):
        super().__init__()
        self.up = torch.nn.Linear(dim, hidden)
        self.down = torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(torch.square(F.relu(self.up(x))))


def test_squared_relu_fuses_into_the_matmul_epilogue():
    cm = _two_matmul_mlp(ReluSquaredMLP)  # relu and the square in the first matmul's epilogue
    from braze.ops.schema import op_args

    acts = [op_args(n)["activation"] for n in cm.compiled.graph_module.graph.nodes
            if n.target is torch.ops.braze.linear.default]
    assert acts == ["relu2", "none"], acts


def _normed_fp32(x):
    """The fp32 statistics every HF RMSNorm shares: x.float() * rsqrt(mean(x^2) + eps)."""
    h = x.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)


class GemmaNorm(torch.nn.Module):
    """HF Gemma's RMSNorm then a linear: the scale (1 + w) in fp32, one rounding to the input's dtype."""

    def __init__(self, dim=64):
        super().__init__()
        self.weight = torch.nn.Parameter(0.3 * torch.randn(dim))
        self.lin = torch.nn.Linear(dim, 48, bias=False)

    def forward(self, x):
        h = _normed_fp32(x)
        return self.lin((h * (1.0 + self.weight.float())).type_as(x))


class MixedLlamaNorm(torch.nn.Module):
    """Llama's form with an fp32 weight on fp16 input: HF returns fp32 (the scale promotes), not braze::rms_norm's
    Gemma form, so the recognizer must leave it alone."""

    def __init__(self, dim=64):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.3 * torch.randn(dim))

    def forward(self, x):
        h = _normed_fp32(x)
        return self.weight * h.to(x.dtype)


def test_gemma_form_rms_norm_in_16_bit_becomes_the_matmul_prologue():
    """fp16 Gemma norm: recognized as braze::rms_norm with the folded fp32 weight (1 + w), which scales in fp32
    and rounds once; it folds into the linear's prologue (one matmul kernel, the weight's fold at compile time),
    and its reference is bitwise HF's module. Within 1 fp16 ulp at |y| ~ 4 of eager (the matmul sums in another
    order); Llama's form with an fp32 weight (an fp32 result) stays unrecognized and still matches eager."""
    torch.manual_seed(0)
    m = GemmaNorm().half().eval()
    x = torch.randn(3, 64).half()
    cm = braze.compile(m)
    with torch.no_grad():
        want = m(x)
        got = cm(x)
        assert got.dtype == torch.float16
        assert cm.compiled.report.pass_count("recognize_rms_norm") == 1
        assert [k[1] for k in cm.compiled.report.kernels] == ["matmul"]
        torch.testing.assert_close(got.float(), want.float(), atol=4e-3, rtol=2e-3)
        ref = torch.ops.braze.rms_norm(x, (1.0 + m.weight.float()), 1e-6)
        assert ref.dtype == torch.float16
        assert torch.equal(ref, (_normed_fp32(x) * (1.0 + m.weight.float())).half())
    mixed = MixedLlamaNorm().half().eval()
    mixed.weight.data = mixed.weight.data.float()
    cm = braze.compile(mixed)
    with torch.no_grad():
        got, want = cm(x), mixed(x)
    assert cm.compiled.report.pass_count("recognize_rms_norm") == 0
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


class OlmoNorm(torch.nn.Module):
    """HF OLMo 2's RMSNorm: a 16-bit weight times the fp32 normed value (promoted: the scale in fp32), then one
    rounding: Gemma's form with the weight upcast exactly."""

    def __init__(self, dim=64):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.3 * torch.randn(dim))

    def forward(self, x):
        h = _normed_fp32(x)
        return (self.weight * h).to(x.dtype)


def test_olmo_form_rms_norm_in_16_bit_is_recognized():
    """fp16 OLMo 2 norm: recognized as braze::rms_norm over an fp32 copy of the weight (made at compile time), and
    bitwise equal to eager (one fused reduction kernel computes it as the reference does: fp32 statistics, the
    scale in fp32, one rounding; the statistics' summation order may differ, so allow 1 fp16 ulp)."""
    torch.manual_seed(0)
    m = OlmoNorm().half().eval()
    x = torch.randn(3, 64).half()
    cm = braze.compile(m)
    with torch.no_grad():
        got, want = cm(x), m(x)
    assert cm.compiled.report.pass_count("recognize_rms_norm") == 1
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=1e-3)


class CohereNorm(torch.nn.Module):
    """HF Cohere's hand-written LayerNorm (no bias): mean, the centred variance by pow(2).mean, fp32 throughout."""

    def __init__(self, dim=64):
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.3 * torch.randn(dim))

    def forward(self, x):
        h = x.to(torch.float32)
        mean = h.mean(-1, keepdim=True)
        var = (h - mean).pow(2).mean(-1, keepdim=True)
        h = (h - mean) * torch.rsqrt(var + 1e-5)
        return (self.weight.to(torch.float32) * h).to(x.dtype)


class LayerNormLinears(torch.nn.Module):
    """A LayerNorm read by two linears (Falcon / Phi's shared norm) and, in `leaky`, by an add as well."""

    def __init__(self, norm: torch.nn.Module, leaky: bool = False, dim=64):
        super().__init__()
        self.norm, self.leaky = norm, leaky
        self.a = torch.nn.Linear(dim, 48)
        self.b = torch.nn.Linear(dim, 32)

    def forward(self, x):
        h = self.norm(x)
        out = (self.a(h), self.b(h))
        return (*out, h + 1) if self.leaky else out


@pytest.mark.parametrize("norm", ["nn", "cohere"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_norm_becomes_the_prologue_of_every_linear_reading_it(norm, dtype):
    """nn.LayerNorm (weight and bias, as torch decomposes it) and Cohere's hand-written form (no bias) -> one
    braze::layer_norm -> the LayerNorm prologue of both linears (merged: one matmul kernel, no norm kernel). fp32:
    1e-5 (summation order); fp16: 1 ulp at |y| ~ 2 (the kernel rounds the normed row once, as eager does, but sums
    in another order). A LayerNorm something else reads too stays decomposed (its own fused kernel), still equal."""
    torch.manual_seed(0)
    make = (lambda: torch.nn.LayerNorm(64)) if norm == "nn" else CohereNorm
    m = LayerNormLinears(make()).to(dtype).eval()
    if norm == "nn":
        torch.nn.init.normal_(m.norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(m.norm.bias, 0.0, 0.5)
    x = (torch.randn(3, 5, 64) + 4.0).to(dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=4e-3, rtol=2e-3)
    cm = braze.compile(m)
    with torch.no_grad():
        got, want = cm(x), m(x)
    assert cm.compiled.report.pass_count("recognize_layer_norm") == 1
    assert [k[1] for k in cm.compiled.report.kernels] == ["matmul"]
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w.float(), **tol)
    leaky = LayerNormLinears(make(), leaky=True).to(dtype).eval()
    cm = braze.compile(leaky)
    with torch.no_grad():
        got, want = cm(x), leaky(x)
    assert cm.compiled.report.pass_count("recognize_layer_norm") == 0
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.float(), w.float(), **tol)


class ParallelLayer(torch.nn.Module):
    """Phi / GPT-NeoX's parallel layer: x + attn_out(ln(x)) + fc2(gelu(fc1(ln(x)))), summed (attn + mlp) + x, with
    q / k / v linears beside fc1 on the same normed input."""

    def __init__(self, dim=64):
        super().__init__()
        self.ln = torch.nn.LayerNorm(dim)
        self.q, self.k, self.v = (torch.nn.Linear(dim, dim) for _ in range(3))
        self.dense = torch.nn.Linear(dim, dim)
        self.fc1, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

    def forward(self, x, heads=None):
        h = self.ln(x)
        b, s, dim = x.shape
        q, k, v = (t if heads is None else t.view(b, s, heads, -1).transpose(1, 2) for t in (self.q(h), self.k(h),
                                                                                         self.v(h)))
        attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        attn = attn if heads is None else attn.transpose(1, 2).reshape(b, s, dim)
        mlp = self.fc2(torch.nn.functional.gelu(self.fc1(h), approximate="tanh"))
        return self.dense(attn) + mlp + x


def test_parallel_residual_sums_in_linear_epilogues():
    """(attention + MLP) + x is summed as MLP + (attention + x): o_proj adds x in its epilogue, fc2 adds o_proj's
    result in its own, so no add kernel is left; fc1 (gelu in its epilogue) is not merged with q / k / v (merged:
    one matmul). Equal to eager within fp32 summation order (the reassociation rounds once a linear, as the
    eager sum rounds once an add)."""
    torch.manual_seed(0)
    m = ParallelLayer().eval()
    x = torch.randn(2, 5, 64)
    cm = braze.compile(m)
    with torch.no_grad():
        got, want = cm(x, heads=4), m(x, heads=4)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    notes = next(p.notes for p in cm.compiled.report.passes if p.name == "fuse_linear_epilogue")
    assert any("parallel residual" in n for n in notes)
    kinds = [k[1] for k in cm.compiled.report.kernels]
    assert kinds.count("matmul") == 4 and "fused" not in kinds  # q|k|v, fc1 + gelu, dense + x, fc2 + dense
    assert "attention" in kinds


def test_three_dimensional_sdpa_stays_torchs():
    """scaled_dot_product_attention on [B, S, D] (no head dim: torch takes it) is not an attention kernel's input:
    it stays torch's op inside the plan, and the compile matches eager."""
    torch.manual_seed(0)
    m = ParallelLayer().eval()
    x = torch.randn(2, 5, 64)
    cm = braze.compile(m)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), m(x), atol=1e-5, rtol=1e-5)
    assert "attention" not in [k[1] for k in cm.compiled.report.kernels]


class CausalCross(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


@pytest.mark.parametrize("sq, skv", [(3, 5), (5, 3)])
def test_causal_sdpa_over_unequal_lengths_keeps_torchs_alignment(sq, skv):
    """torch's is_causal aligns the mask top-left when the query and key lengths differ (query i sees keys 0..i);
    braze's causal flag is the KV cache's bottom-right one, so such a call stays torch's op, with the reason."""
    q, k, v = torch.randn(1, 2, sq, 8), torch.randn(1, 2, skv, 8), torch.randn(1, 2, skv, 8)
    cm = braze.compile(CausalCross())
    torch.testing.assert_close(cm(q, k, v), CausalCross()(q, k, v), atol=1e-6, rtol=1e-6)
    (_, why), = cm.report.fallbacks
    assert "top-left" in why


class ScaledQuery(torch.nn.Module):
    """OPT's attention input: q_proj(x) * head_dim ** -0.5 (a power of two for head dims 4, 16, 64, 256), or any
    other scale."""

    def __init__(self, scale: float, dim=64):
        super().__init__()
        self.q = torch.nn.Linear(dim, dim)
        self.scale = scale

    def forward(self, x):
        return self.q(x) * self.scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_power_of_two_scale_folds_into_the_linear_exactly(dtype):
    """A power-of-two scale after a linear folds into its weight and bias (exact in every float format): one matmul
    kernel, bitwise the linear of the scaled weights; 0.3 (not a power of two) stays a multiply after it."""
    torch.manual_seed(0)
    x = torch.randn(3, 64).to(dtype)
    m = ScaledQuery(0.125).to(dtype).eval()
    cm = braze.compile(m)
    with torch.no_grad():
        got = cm(x)
        want = torch.ops.braze.linear(x, m.q.weight * 0.125, m.q.bias * 0.125)
    assert [k[1] for k in cm.compiled.report.kernels] == ["matmul"]
    assert torch.equal(torch.ops.braze.linear(x, m.q.weight, m.q.bias) * 0.125, want)  # the fold is exact
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(got, want, **tol)
    other = ScaledQuery(0.3).to(dtype).eval()
    cm = braze.compile(other)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), other(x), **tol)
    assert [k[1] for k in cm.compiled.report.kernels] == ["matmul", "fused"]


class BloomMLP(torch.nn.Module):
    """Bloom's MLP: its gelu written out as x * 0.5 * (1 + tanh(0.79788456 * x * (1 + 0.044715 * x * x)))."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(32, 64)
        self.down = torch.nn.Linear(64, 32)

    def forward(self, x):
        from transformers.models.bloom.modeling_bloom import bloom_gelu_forward

        return self.down(bloom_gelu_forward(self.up(x)))


def test_bloom_gelu_becomes_the_matmul_epilogue():
    """Bloom's arrangement of the tanh GELU is recognized as gelu(approximate="tanh") (its constant rounds to
    sqrt(2 / pi)'s fp32 value) and moves into the up projection's epilogue: two matmuls, within 1e-5 of eager."""
    cm = _two_matmul_mlp(BloomMLP)
    assert cm.compiled.report.pass_count("recognize_gelu_tanh") == 1
    ops = {n.target for n in cm.compiled.graph_module.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.tanh.default not in ops


@pytest.mark.parametrize("leak", [False, True], ids=["private", "read elsewhere"])
def test_a_per_head_norm_commutes_with_the_head_dim_permutation(leak):
    """Cohere's / Persimmon's q / k LayerNorm sits between the projection and the (permuted) rotary: its region (the
    centring, the variance, the weight [H, D]) is found from the head-swapped output back to the projection's view,
    so the permutation goes into the projection weights and the norm's weight; and the permutation applied to the
    view's columns and the weight's last dim gives the norm's output permuted. A centred value read elsewhere would
    see permuted columns: then no region."""
    from braze.passes.context import PassContext
    from braze.passes.fusion import _head_norm_region

    class HeadNorm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(32, 32, bias=False)
            self.w = torch.nn.Parameter(torch.randn(2, 16))

        def forward(self, x):
            h = self.proj(x).view(1, 3, 2, 16)
            c = h - h.mean(-1, keepdim=True)
            out = (c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5) * self.w).permute(0, 2, 1, 3)
            return (out, c * 2) if leak else out

    torch.manual_seed(0)
    model, x = HeadNorm(), torch.randn(1, 3, 32)
    gm = torch.export.export(model, (x,)).graph_module
    ctx = PassContext(config=None, weights={"p_w": model.w.detach()}, fake_mode=None)
    end = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.permute.default)
    region = _head_norm_region(end, ctx)
    if leak:
        assert region is None
        return
    src, nodes, consts = region
    assert src.target is torch.ops.aten.view.default and [c.name for c in consts] == ["p_w"]
    assert len(nodes) >= 6 and end not in nodes
    perm = torch.randperm(16)
    with torch.no_grad():  # the norm of permuted columns with a permuted weight = the norm's output permuted
        h = model.proj(x).view(1, 3, 2, 16)

        def norm(h, w):
            c = h - h.mean(-1, keepdim=True)
            return c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-5) * w

        torch.testing.assert_close(norm(h[..., perm], model.w[..., perm]), norm(h, model.w)[..., perm])


def test_rotary_frequencies_built_in_the_forward_fold_to_a_weight():
    """PhiMoE builds its rotary frequencies on every call: 1 / theta ** (arange(0, D, 2) / D), a pow with a scalar
    base (no kernel lowers it). Made from a static arange only, the chain folds at compile time into one weight
    holding torch's own values: no eager step, the angles bitwise equal to eager (their cosines within Triton's cos
    rounding). An arange of the sequence length (symbolic) is not static and stays a kernel's index."""
    class Rotary(torch.nn.Module):
        def forward(self, pos):
            inv = 1.0 / (1e6 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
            ang = pos[..., None].float() * inv
            return ang, ang.cos(), torch.arange(pos.shape[-1]) * 2

    pos = torch.arange(7)[None].expand(2, 7)
    cm = braze.compile(Rotary(), dynamic_shapes={"pos": {1: torch.export.Dim("s", min=2, max=64)}})
    (ang, cos, idx), (want_ang, want_cos, want_idx) = cm(pos), Rotary()(pos)
    assert torch.equal(ang, want_ang) and torch.equal(idx, want_idx)
    torch.testing.assert_close(cos, want_cos, rtol=0, atol=1e-6)
    assert not [s for s in cm.plan.steps if s.kind == "eager"]
    assert [p.rewrites for p in cm.report.passes if p.name == "fold_constants"][0] >= 3  # / 16, pow, 1 / x, ...
    short = pos[:, :5]  # the symbolic arange follows the length
    assert torch.equal(cm(short)[2], Rotary()(short)[2])


def test_slice_assignment_is_a_cat():
    """Slice assignment, functionalized to copy + slice_scatter: into new_empty piece by piece (MLA's keys: the
    empty base is then read by nothing), with a broadcast source, and into part of a computed tensor. Each is a cat
    of the pieces: exact, no eager step (the empty, the copies and the scatters ran eagerly)."""
    class Assign(torch.nn.Module):
        def forward(self, a, b, y):
            k = a.new_empty(*a.shape[:-1], 24)
            k[..., :16].copy_(a)
            k[..., 16:].copy_(b.expand(-1, 4, -1, -1))
            z = y * 2
            z[:, :, 2:5] = a[:, :, :, :3].transpose(2, 3)[:, :, :3] + 1
            z[..., -2:] = z[..., :2] * 3  # negative bounds
            return k * 2, z

    cm = braze.compile(Assign())
    a, b, y = torch.randn(2, 4, 5, 16), torch.randn(2, 1, 5, 8), torch.randn(2, 4, 8, 5)
    for got, want in zip(cm(a, b, y), Assign()(a, b, y)):
        assert torch.equal(got, want)
    assert not [s.target for s in cm.plan.steps if s.kind == "eager"]


def test_attention_with_unequal_head_dims_pads_to_one():
    """sdpa with values narrower than queries and keys (MLA: 24 vs 16): the kernels tile all four with one head
    dim, so the values are padded with zeros and the output sliced back (it wrote past a 16-column output before);
    with wider values (MiMo-V2 at a small head dim) the queries and keys are padded instead (zero columns add
    nothing to q . k; the scale stays the unpadded one). Both within fp32 reassociation of eager, no eager step; a
    kernel asked for unequal head dims refuses with the reason."""
    from braze.kernels.attention import _attention_mask_reason

    class Mla(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True) * 2

    q, k = torch.randn(2, 4, 6, 24), torch.randn(2, 4, 6, 24)
    narrow, wide = torch.randn(2, 4, 6, 16), torch.randn(2, 4, 6, 32)
    cm = braze.compile(Mla())
    torch.testing.assert_close(cm(q, k, narrow), Mla()(q, k, narrow), rtol=1e-5, atol=1e-5)
    assert not [s for s in cm.plan.steps if s.kind == "eager"]
    assert any("padded with zeros to the query's 24" in n for p in cm.report.passes for n in p.notes)
    wider = braze.compile(Mla())
    torch.testing.assert_close(wider(q, k, wide), Mla()(q, k, wide), rtol=1e-5, atol=1e-5)
    assert not [s for s in wider.plan.steps if s.kind == "eager"]
    assert any("queries and keys of head dim 24 padded with zeros to the values' 32" in n
               for p in wider.report.passes for n in p.notes)
    gm = torch.fx.symbolic_trace(lambda q, k, v: torch.ops.braze.attention.default(q, k, v, 0.2, True))
    for node, t in zip(gm.graph.nodes, (q, k, narrow)):
        node.meta["val"] = t
    op = next(n for n in gm.graph.nodes if n.op == "call_function")
    op.meta["val"] = torch.empty(2, 4, 6, 16)
    assert _attention_mask_reason(op) == "value head dim 16 != query head dim 24 runs eagerly"


def test_eager_attention_that_subtracts_the_row_max_is_attention():
    """MiMo-V2's eager attention subtracts each row's max before the softmax (which subtracts it anyway): still the
    attention kernel, no eager step, within fp32 reassociation. (It ran eagerly, and its causal LM generated by
    recomputing the forward: 'softmax over attention scores that braze did not recognize'.)"""
    class Shifted(torch.nn.Module):
        def forward(self, q, k, v):
            scores = torch.matmul(q, k.transpose(2, 3)) * 0.25
            scores = scores - scores.max(dim=-1, keepdim=True).values
            return torch.matmul(torch.softmax(scores, dim=-1), v)

    q, k, v = (torch.randn(2, 4, 6, 16) for _ in range(3))
    cm = braze.compile(Shifted())
    torch.testing.assert_close(cm(q, k, v), Shifted()(q, k, v), rtol=1e-5, atol=1e-5)
    assert not [s for s in cm.plan.steps if s.kind == "eager"]
    assert "attention" in [s.launcher for s in cm.plan.steps]
