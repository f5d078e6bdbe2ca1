"""Convolutions too wide to unroll (more than CONV_UNROLL_LIMIT products per output) in whole models: each becomes
braze::conv (passes/convolution.py), launched by the implicit-GEMM `conv` family (kernels/conv.py) instead of
running as torch's op inside the plan; the narrow ones (a 3-channel stem, a 1x1 over 32 channels) stay in fused
kernels. Under the Triton interpreter; the cross-compile test checks the kernels against sm_80 / sm_86 / sm_90.

Tolerances: fp32 compares with eager at 1e-4 (the kernels accumulate in fp32 like torch and differ in summation
order, ~1e-6 on outputs of O(1) after up to 576-term sums; an indexing or padding bug is O(0.1)).
"""

import torch
import torch.nn.functional as F

import braze
from braze.kernels import recording_launches

TOL = {"atol": 1e-4, "rtol": 1e-4}


class TinyResNet(torch.nn.Module):
    """A ResNet-style net: 3-channel stem (27 products: unrolled in a fused kernel), a basic block (two 3x3 convs
    over 32 channels with eval BatchNorm, relu and the residual), a strided 3x3 conv beside a strided 1x1
    projection (32 products: fused), global average pooling and a linear classifier."""

    def __init__(self, width: int = 32):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.bn0 = torch.nn.Conv2d(3, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width)
        self.conv1, self.bn1 = torch.nn.Conv2d(width, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width)
        self.conv2, self.bn2 = torch.nn.Conv2d(width, width, 3, padding=1, bias=False), torch.nn.BatchNorm2d(width)
        self.down = torch.nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.proj = torch.nn.Conv2d(width, 2 * width, 1, stride=2)
        self.fc = torch.nn.Linear(2 * width, 10)
        for bn in (self.bn0, self.bn1, self.bn2):  # statistics away from the identity, so the norm is checked too
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.2, 0.2)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(h)))
        x = F.relu(self.down(x) + self.proj(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


WIDE_CONVS = 3  # conv1, conv2, down


def _conv_steps(plan):
    return [s for s in plan.steps if s.kind == "template" and s.launcher == "conv"]


def test_a_resnet_block_runs_its_wide_convs_as_kernels():
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 8, 8)
    compiled = braze.compile(model)
    with recording_launches() as seen:
        got = compiled(x)
    torch.testing.assert_close(got, model(x), **TOL)
    plan = compiled.plan
    # of the five convs, the three wide ones are braze::conv; the stem (27 products) and the 1x1 projection (32)
    # stay aten.convolution, unrolled in fused kernels: no step runs torch's op
    assert [s.target for s in plan.steps if s.kind == "eager"] == []
    assert compiled.report.fallbacks == []
    assert compiled.report.pass_count("recognize_convolution") == WIDE_CONVS
    assert len(_conv_steps(plan)) == WIDE_CONVS
    conv_kernels = {s.kernel for s in _conv_steps(plan)}
    assert sum(launch.name in conv_kernels for launch in seen) == WIDE_CONVS


class TemporalConvs(torch.nn.Module):
    """A 1-D conv stack over a [N, L, C] sequence (a TCN / audio front end): a dilated conv1d over 64 channels read
    as the sequence's transpose, a grouped one, a pointwise one over 128 channels."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv1d(64, 128, 3, padding=2, dilation=2)
        self.grouped = torch.nn.Conv1d(128, 128, 5, padding=2, groups=4)
        self.pointwise = torch.nn.Conv1d(128, 48, 1)

    def forward(self, seq):
        h = F.gelu(self.conv(seq.transpose(1, 2)))
        return self.pointwise(h + self.grouped(h)).transpose(1, 2)


def test_conv1d_stack_runs_as_kernels():
    model = TemporalConvs().eval()
    seq = torch.randn(2, 13, 64)
    compiled = braze.compile(model)
    torch.testing.assert_close(compiled(seq), model(seq), **TOL)
    assert compiled.report.fallbacks == [] and len(_conv_steps(compiled.plan)) == 3


def test_deterministic_convs_are_batch_invariant():
    """deterministic=True: a sample's output is bitwise the same alone and in a batch (tiles never depend on the
    batch; under the interpreter per-row sums instead of tl.dot)."""
    model = TinyResNet().eval()
    compiled = braze.compile(model, deterministic=True)
    x = torch.randn(3, 3, 8, 8)
    batched, alone = compiled(x), compiled(x[1:2])
    assert torch.equal(batched[1:2].view(torch.int32), alone.view(torch.int32))
    assert all(s.params.get("deterministic") for s in _conv_steps(compiled.plan))


def test_conv_kernels_cross_compile_without_spills():
    """fp16 ResNet block cross-compiled (ptxas, no GPU): no compile error, shared memory or register issue, and no
    spill in any kernel, the conv family's included."""
    targets = ["sm_80", "sm_86", "sm_90"]
    model = TinyResNet().eval().to(torch.float16)
    compiled = braze.compile(model, targets=targets)
    compiled(torch.randn(2, 3, 8, 8, dtype=torch.float16))
    build = compiled.compiled.target_build
    assert build.results and not build.issues, [str(i) for i in build.issues]
    assert all(r.spills == 0 for r in build.results)
    assert {r.spec.target for r in build.results if r.spec.family == "conv"} == set(targets)


def test_a_causal_lms_wide_conv_over_the_sequence_keeps_it_from_the_kv_cache():
    """In a causal LM a conv reading other positions of the sequence is state the KV-cache plans do not carry: as
    braze::conv (its kernel in the forward plan) it is still found by passes/kv_cache.py, which keeps the model on
    its forward plan; a 1x1 conv (a per-position map) is not state."""
    from torch.export import Dim, export

    from braze.passes.context import PassContext
    from braze.passes.convolution import recognize_convolution
    from braze.passes.kv_cache import _sequence_mixing

    class ConvLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(50, 64)
            self.conv, self.pointwise = torch.nn.Conv1d(64, 64, 3, padding=1), torch.nn.Conv1d(64, 64, 1)

        def forward(self, input_ids):
            return self.pointwise(self.conv(self.embed(input_ids).transpose(1, 2)))

    ids = torch.randint(0, 50, (2, 8))
    ep = export(ConvLM(), (ids,), dynamic_shapes=({1: Dim("seq", min=2, max=64)},)).run_decompositions()
    gm = ep.graph_module
    weights = {ph: ep.state_dict[p] for ph, p in ep.graph_signature.inputs_to_parameters.items()}
    fake_mode = next(n.meta["val"].fake_mode for n in gm.graph.nodes if n.op == "placeholder")
    ctx = PassContext(config=None, weights=weights, fake_mode=fake_mode, causal_lm=True)
    assert recognize_convolution(gm, ctx) == 2
    convs = [n for n in gm.graph.nodes if n.target is torch.ops.braze.conv.default]
    assert len(convs) == 2
    assert _sequence_mixing(gm) == [f"{convs[0].name} (a convolution over the sequence)"]
