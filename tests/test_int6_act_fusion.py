"""W6A8 / W6A6 activation quantization fused into the kernel that produces the activation.

braze/passes/int6_act.py splits braze::int6_linear(x, act_bits in {8, 6}) into int6_act_scales + int6_act_codes
(the generic fused family; braze/codegen/fused.py) and int6_linear_q (the int8 matmul kernel alone).

Tolerance of the end-to-end comparison with the unfused W6A8 path (the old standalone quantizer): both paths
compute x with the same generated fused code and quantize it with the same fp32 ops (IEEE division, round half
to even), so the int8 codes and fp32 scales are identical and the int8 matmul kernel is the same; only the
RMSNorm reduction may be summed in another order when the region changes shape, which a later quantization
step can amplify to at most one code step. We assert 1e-5 on logits of magnitude ~1 (EXACT_TOL); measured 0.
Against the reference executor (torch ops) x itself may differ by an ulp (RMSNorm summed in another order), and
an ulp can flip a code that sits on a rounding tie: one code step is 1/127 of its group's absmax (A8), so one flip
moves that linear's output by absmax/127 x |w| (~1e-2 x 0.05 here) and the O(1) logits by ~1e-3 after the final
norm and lm_head (measured: 0 to 1.9e-3 depending on the library versions that draw the seeded weights). REF_TOL
= 1e-2 admits a few such flips; what this comparison guards against (a wrong group, scale, tail or dtype) moves
logits by O(0.1-1). The exact checks are EXACT_TOL above and the bit-level code/scale tests of test_int6.py.
"""

import pytest
import torch
import transformers

import braze
import braze.compiler.pipeline as pipeline
from braze.quant.int6 import quantize_activations_reference

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
EXACT_TOL = 1e-5
REF_TOL = 1e-2
GROUP = 128


def _llama(hidden: int, inter: int, layers: int = 1) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=inter,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def _compile_unfused(monkeypatch, model, **options):
    """The previous path: int6_linear quantizes its input in a launch of its own."""
    with monkeypatch.context() as mp:
        mp.setattr(pipeline, "PASSES", [p for p in pipeline.PASSES if p.name != "split_int6_act_quant"])
        return braze.compile(model, max_seq=32, **options)


def _quant_steps(plan):
    return [s for s in plan.steps if s.kind == "fused" and any(n.startswith("int6_act_codes") for n in s.nodes)]


def _producer(plan, buffer):
    return next(s for s in plan.steps if buffer in s.outputs)


# ---- end to end: launches, plan shape, logits ------------------------------------------------------------------
# (hidden, intermediate): K = 128 and 320 (1 and 3 groups, ragged), then 256 and 192 (2 and 2 groups, ragged)
@pytest.mark.parametrize("hidden,inter", [(128, 320), (256, 192)])
@pytest.mark.parametrize("act", ["a8", "mixed"])
def test_fused_quant_saves_launches_and_matches_unfused(monkeypatch, hidden, inter, act):
    model = _llama(hidden, inter)
    fused = braze.compile(model, max_seq=32, quant="int6", int6_act=act)
    unfused = _compile_unfused(monkeypatch, model, quant="int6", int6_act=act)
    ref = braze.compile(model, max_seq=32, quant="int6", int6_act=act, executor="reference")
    got, old, want = fused(IDS).logits, unfused(IDS).logits, ref(IDS).logits
    assert (got - old).abs().max().item() <= EXACT_TOL
    assert (got - want).abs().max().item() < REF_TOL
    assert fused.stats["eager_ops"] == 0 and not fused.report.fallbacks
    # per layer: the RMSNorm -> q/k/v, RMSNorm -> gate/up and SwiGLU -> down quantizers run in their producer's
    # kernel (3 launches saved); o_proj's input is the attention template's output, so its quantizer stays a
    # kernel of its own (a fused one now, same count)
    assert unfused.stats["launches"] - fused.stats["launches"] == 3
    assert fused.report.pass_count("split_int6_act_quant") == 4


def test_generation_plans_use_the_fused_quantizer(monkeypatch):
    """Prefill and decode plans (KV cache) are built from the same rewritten graph: same tokens as unfused."""
    model = _llama(128, 320)
    fused = braze.compile(model, max_seq=32, quant="int6", int6_act="mixed")
    unfused = _compile_unfused(monkeypatch, model, quant="int6", int6_act="mixed")
    for name, plan in fused.extra_plans.items():
        assert len(_quant_steps(plan)) == 4, name
        assert all(s.params["roles"][0] == "xq" for s in plan.steps if s.launcher == "int6_matmul"), name
    assert torch.equal(fused.generate(IDS[:1], max_new_tokens=4), unfused.generate(IDS[:1], max_new_tokens=4))


@pytest.mark.parametrize("act", ["a8", "mixed"])
def test_plan_has_no_standalone_quantizer_after_rmsnorm_or_swiglu(act):
    cm = braze.compile(_llama(128, 320), max_seq=32, quant="int6", int6_act=act)
    plan = cm.plan
    int6 = [s for s in plan.steps if s.launcher == "int6_matmul"]
    assert len(int6) == 4 and all(s.params["roles"][:2] == ["xq", "xs"] for s in int6)  # one launch each
    sources = []
    for s in int6:
        q, xs = _producer(plan, s.inputs[0]), _producer(plan, s.inputs[1])
        assert q is xs and q.kind == "fused"  # codes and scales come from one fused kernel
        sources.append(plan.kernels[q.kernel])
    assert len(_quant_steps(plan)) == 4
    rmsnorm = [src for src in sources if "tl.rsqrt(" in src]
    swiglu = [src for src in sources if "tl.sigmoid(" in src]
    assert len(rmsnorm) == 2 and len(swiglu) == 1  # before q/k/v and gate/up; before down_proj
    # the SwiGLU quantizer reads the gate/up matmul output directly: no buffer for silu(gate) * up
    down = _producer(plan, int6[3].inputs[0])
    assert any(_producer(plan, b).launcher == "int6_matmul" for b in down.inputs)


def test_smoothing_multiply_is_absorbed_into_the_quantizing_kernel(monkeypatch):
    """int6_method="awq" puts h = x * (1/s) between the producer and the linear: it runs in the same kernel."""
    from braze.quant.calibration import collect

    model = _llama(128, 320)
    with torch.no_grad():  # activation outliers, so the search picks a non-trivial smoothing
        model.model.layers[0].input_layernorm.weight[[5, 40]] = 12.0
        model.model.layers[0].post_attention_layernorm.weight[[9]] = 10.0
    ids = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(3))
    opts = dict(quant="int6", int6_act="a8", int6_method="awq",
                int6_calibration=collect(model, ids=ids, window=64, sample_rows=64))
    fused = braze.compile(model, max_seq=32, **opts)
    unfused = _compile_unfused(monkeypatch, model, **opts)
    plan = fused.plan
    smoothed = [s for s in _quant_steps(plan) if any("inv_smooth" in b for b in s.inputs)]
    assert smoothed and all("tl.rsqrt(" in plan.kernels[s.kernel] or "tl.sigmoid(" in plan.kernels[s.kernel]
                            for s in smoothed)
    assert (fused(IDS).logits - unfused(IDS).logits).abs().max().item() <= EXACT_TOL
    assert unfused.stats["launches"] - fused.stats["launches"] == 3


# ---- the fused epilogue itself: bit-exact codes and scales --------------------------------------------------------
class _Producer(torch.nn.Module):
    """x -> h (a pointwise / RMSNorm / SwiGLU region) -> int6 activation codes and scales of h."""

    def __init__(self, kind: str, k: int, bits: int, w: torch.Tensor):
        super().__init__()
        self.kind, self.k, self.bits = kind, k, bits
        self.w = torch.nn.Parameter(w, requires_grad=False)

    def forward(self, x):
        if self.kind == "smooth":
            h = x * self.w
        elif self.kind == "rmsnorm":
            h = self.w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        else:
            h = torch.nn.functional.silu(x[..., : self.k]) * x[..., self.k:]
        s = torch.ops.braze.int6_act_scales(h, GROUP, self.bits)
        q = torch.ops.braze.int6_act_codes(h, s, GROUP, self.bits)
        return (q, s) if self.kind == "smooth" else (q, s, h)


def _activations(m: int, k: int, bits: int, seed: int) -> torch.Tensor:
    """Random rows plus an all-zero row, an all-zero group and a row of exact rounding ties."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)) * 3
    x[1] = 0
    x[2, GROUP: 2 * GROUP] = 0
    qmax = 127 if bits == 8 else 31
    ties = torch.arange(k, dtype=torch.float32) % (2 * qmax) - qmax + 0.5  # x / scale hits k + 0.5
    ties[::GROUP] = qmax  # absmax qmax -> scale exactly 1
    x[3] = ties
    return x


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("k", [64, 128, 192, 320, 512])
def test_fused_pointwise_quant_is_bit_exact(bits, k):
    """h = x * w (a smoothing multiply, exact in both): codes / scales equal the torch reference bit for bit."""
    _check_smooth(bits, k, torch.float32)


@pytest.mark.parametrize("k", [64, 192])
def test_fused_pointwise_quant_fp16_is_bit_exact(k):
    """A 16-bit h is rounded to fp16 in the region, then quantized in fp32, as the reference does."""
    _check_smooth(8, k, torch.float16)


def _check_smooth(bits: int, k: int, dtype: torch.dtype) -> None:
    w = 2.0 ** torch.randint(-2, 3, (k,), generator=torch.Generator().manual_seed(k)).float()
    w[: min(k, GROUP)] = 1.0  # keep the tie row's first group exact ties
    cm = braze.compile(_Producer("smooth", k, bits, w.to(dtype)))
    x = _activations(6, k, bits, seed=k + bits).to(dtype)
    q, s = cm(x)
    rq, rs = quantize_activations_reference(x * w.to(dtype), bits, GROUP)
    assert q.dtype == torch.int8 and q.shape == (6, -(-k // GROUP) * GROUP)
    assert torch.equal(q, rq)
    assert torch.equal(s.view(torch.int32), rs.view(torch.int32))
    assert bool((q[1] == 0).all()) and bool((s[1] == 0).all())  # all-zero row: scale 0, no NaN
    if k > GROUP:
        assert bool((q[2, GROUP: 2 * GROUP] == 0).all()) and s[2, 1].item() == 0.0
    # the tie row tells half-to-even from half-up rounding
    assert not torch.equal(q[3, :GROUP], torch.floor(x[3, :GROUP].float() + 0.5).to(torch.int8))
    steps = cm.compiled.plan.steps
    assert [s.kind for s in steps] == ["fused"] and cm.compiled.stats["eager_ops"] == 0  # one kernel, mul inside


@pytest.mark.parametrize("kind", ["rmsnorm", "swiglu"])
@pytest.mark.parametrize("k", [64, 192, 512])
def test_fused_norm_and_swiglu_quant_is_bit_exact(kind, k):
    """The region also stores h (a graph output): its codes / scales equal the reference applied to that h."""
    bits = 6 if k == 192 else 8
    w = torch.randn(k, generator=torch.Generator().manual_seed(1)) + 1.0
    cm = braze.compile(_Producer(kind, k, bits, w))
    x = _activations(5, k if kind == "rmsnorm" else 2 * k, bits, seed=k)
    q, s, h = cm(x)
    rq, rs = quantize_activations_reference(h, bits, GROUP)
    assert torch.equal(q, rq)
    assert torch.equal(s.view(torch.int32), rs.view(torch.int32))
    fused = [st for st in cm.compiled.plan.steps if st.kind == "fused"]
    assert len(fused) == 1 and cm.compiled.stats["eager_ops"] == 0  # norm / SwiGLU, h and quantization: one kernel
