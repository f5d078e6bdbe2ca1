"""Models torch.export refuses compile through Dynamo (braze/compiler/dynamo_fallback.py), and models that write
their buffers or arguments in place keep those writes (Captured.state / mutations), through plans and packages."""

import warnings

import pytest
import torch
import transformers

import braze
from braze.compiler.dynamo_fallback import DynamoCompiled
from braze.runtime.package import save_package


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.export cannot take it
            return x * 2 + 1
        return x - 1


class Accumulates(torch.nn.Module):
    """Writes a buffer on every call (a running sum), as a cache or a step counter would."""

    def __init__(self):
        super().__init__()
        self.register_buffer("acc", torch.zeros(3))

    def forward(self, x):
        self.acc.add_(x.sum(0))
        return x * 2 + self.acc


class ScalesArgument(torch.nn.Module):
    def forward(self, x, y):
        y.mul_(2)
        return x + y


class CountsTokens(torch.nn.Module):
    """Keeps a Python int of the tokens seen (an HF sliding-window cache's `cumulative_length += seq_len`): Dynamo
    hands the new count out of the graph as an int output."""

    def __init__(self):
        super().__init__()
        self.seen = 0
        self.weight = torch.nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        self.seen += x.shape[1]
        if x.sum() > 1e9:  # data-dependent control flow: torch.export cannot take it
            return x
        return torch.nn.functional.linear(x, self.weight)


def _fallback(model, *args, **options):
    with pytest.warns(UserWarning, match="compiling through Dynamo instead"):
        compiled = braze.compile(model, **options)
        out = compiled(*args)
    return compiled, out


def test_data_dependent_branch_compiles_through_dynamo():
    x = torch.randn(2, 3).abs()
    lazy, out = _fallback(DataDependent(), x)
    assert isinstance(lazy.compiled, DynamoCompiled)
    assert torch.equal(out, x * 2 + 1)
    assert torch.equal(lazy(-x), -x - 1)  # the other branch: another graph, compiled when first reached
    y = torch.randn(4, 5).abs()
    assert torch.equal(lazy(y), y * 2 + 1)  # a new shape: one more static plan
    report = lazy.report
    assert "Dynamo fallback (torch.export could not capture DataDependent" in report.extra["capture"]
    assert len(lazy.compiled.backend.graphs) >= 3 and report.launches >= 3
    assert "Dynamo fallback" in str(report)


def test_python_ints_a_graph_updates_keep_their_values():
    model = CountsTokens()
    x = torch.randn(1, 3, 4)
    lazy, out = _fallback(model, x)
    torch.testing.assert_close(out, x @ model.weight.T)
    for length in (5, 7, 7):  # the second length makes Dynamo's graph dynamic in it: the count is an int output
        y = torch.randn(1, length, 4)
        torch.testing.assert_close(lazy(y), y @ model.weight.T)
    assert model.seen == 3 + 5 + 7 + 7
    assert lazy.report.launches >= 3  # the linear ran as braze kernels, not as the eager graph


def test_capture_export_keeps_the_capture_error():
    with pytest.raises(braze.CaptureError, match="torch.export could not capture DataDependent") as info:
        braze.compile(DataDependent(), capture="export")(torch.randn(2, 3))
    assert "\n" not in str(info.value)


def test_fallback_refuses_options_that_need_one_plan():
    with pytest.raises(braze.CaptureError, match="without deterministic") as info:
        braze.compile(DataDependent(), deterministic=True)(torch.randn(2, 3))
    assert "\n" not in str(info.value)


def test_fallback_cannot_be_packaged(tmp_path):
    lazy, _ = _fallback(DataDependent(), torch.randn(2, 3))
    with pytest.raises(braze.PackageError, match="compiled through Dynamo"):
        lazy.compiled.save(tmp_path / "pkg")
    with pytest.raises(braze.PackageError, match="compiled through Dynamo"):
        save_package(lazy, tmp_path / "pkg")  # what `braze compile` calls
    assert not (tmp_path / "pkg").exists()


def test_bare_decorator_on_a_class_compiles_instances():
    @braze.compile
    class Branchy(DataDependent):
        pass

    x = torch.randn(2, 3).abs()
    with pytest.warns(UserWarning, match="compiling through Dynamo"):
        m = Branchy()
        out = m(x)
    assert torch.equal(out, x * 2 + 1)
    assert isinstance(m.__dict__["_braze_compiled"], DynamoCompiled)


def test_torch_compile_backend_across_shapes():
    """Dynamo makes a dim dynamic after a second shape; the backend then gets sizes as int arguments and runs a
    static plan per size."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    compiled = torch.compile(model, backend="braze")
    with torch.no_grad():
        for batch in (2, 3, 5):
            x = torch.randn(batch, 8)
            assert (compiled(x) - model(x)).abs().max().item() < 1e-5


def test_buffer_writes_land_in_the_model_and_the_plan():
    eager, model = Accumulates(), Accumulates()
    compiled = braze.compile(model)
    x = torch.randn(2, 3)
    for _ in range(3):  # the state carries from call to call
        assert torch.equal(compiled(x), eager(x))
    assert torch.equal(model.acc, eager.acc)  # the module's own buffer, as eager PyTorch leaves it
    assert "state" in compiled.report.extra["in-place writes"]


def test_argument_writes_land_in_the_callers_tensor():
    x, y = torch.randn(2, 3), torch.randn(2, 3)
    y_eager = y.clone()
    out = braze.compile(ScalesArgument())(x, y)
    ref = ScalesArgument()(x, y_eager)
    assert torch.equal(out, ref) and torch.equal(y, y_eager)


def test_state_travels_in_packages(tmp_path):
    model = Accumulates()
    compiled = braze.compile(model)
    x = torch.randn(2, 3)
    compiled(x)
    compiled.compiled.save(tmp_path / "pkg")
    loaded = braze.load(tmp_path / "pkg")
    assert torch.equal(loaded.state["b_acc"], model.acc)  # the state as saved
    assert torch.equal(loaded(x), compiled(x))  # both step from the same state
    assert torch.equal(loaded.state["b_acc"], model.acc)


@pytest.fixture(scope="module")
def mamba():
    cfg = transformers.MambaConfig(vocab_size=128, hidden_size=32, state_size=8, num_hidden_layers=2,
                                   expand=2, conv_kernel=4, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return transformers.MambaForCausalLM(cfg).eval()


def test_mamba_compiles_and_generates_through_dynamo(mamba, monkeypatch):
    """Mamba's selective scan loops over the sequence in Python, which pins torch.export to one length. braze
    captures HF's scan function as one op (compiler/hf_functions.py), so Mamba exports; with that substitution
    off, the model stands for any whose recurrence is Python the export cannot take: it compiles through Dynamo and
    generates through HF's loop."""
    from braze.compiler import hf_functions
    from braze.runtime.compiled import CompiledModel

    assert isinstance(braze.compile(mamba, max_seq=64), CompiledModel)
    monkeypatch.setattr(hf_functions, "SUBSTITUTIONS", {})
    ids = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = braze.compile(mamba, max_seq=64)
        with torch.no_grad():
            ref = mamba(ids).logits
            hf = mamba.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
            torch.manual_seed(7)
            hf_sampled = mamba.generate(ids, max_new_tokens=5, do_sample=True, top_k=0, top_p=1.0,
                                        temperature=0.8, pad_token_id=0)
        assert isinstance(compiled, DynamoCompiled)
        assert (compiled(ids).logits - ref).abs().max().item() < 1e-5  # fp32: reassociation only
        assert torch.equal(compiled.generate(ids, max_new_tokens=5, pad_token_id=0), hf)
        out = compiled.generate(ids, max_new_tokens=5, pad_token_id=0, output_logits=True)
        assert torch.equal(out.sequences, hf) and out.logits.shape == (1, 5, 128)
        with torch.no_grad():
            hf_logits = mamba.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
                                       return_dict_in_generate=True).logits
        torch.testing.assert_close(out.logits, torch.stack(list(hf_logits), dim=1), atol=1e-5, rtol=0)
        sampled = compiled.generate(ids, max_new_tokens=5, do_sample=True, temperature=0.8, seed=7, pad_token_id=0)
        assert torch.equal(sampled, hf_sampled)
        # HF's length and config arguments reach HF's loop (max_length counts the prompt)
        assert torch.equal(compiled.generate(ids, max_length=11, pad_token_id=0), hf)
        config = transformers.GenerationConfig(max_new_tokens=5, pad_token_id=0)
        assert torch.equal(compiled.generate(ids, generation_config=config), hf)
    assert "forward" not in mamba.__dict__  # generate put the model's own forward back
    assert compiled.backend.graphs, "no graph was compiled by braze"
    with pytest.raises(braze.ConfigError, match="speculation needs braze's own generation plans"):
        compiled.generate(ids, max_new_tokens=2, speculate=True)


def test_causal_lm_that_writes_a_buffer_generates_by_recomputing():
    """A causal LM whose forward writes its own state (a call counter here) keeps the write; the KV-cache plans do
    not carry such state, so generation re-runs the forward plan, which does: one count per forward, as eager."""
    from braze.models import tiny_causal_lm

    base = tiny_causal_lm("llama", layers=1)

    class CountingForCausalLM(type(base)):
        def __init__(self, config):
            super().__init__(config)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, *args, **kwargs):
            self.calls.add_(1)
            return super().forward(*args, **kwargs)

    model = CountingForCausalLM(base.config).eval()
    model.load_state_dict(base.state_dict(), strict=False)
    compiled = braze.compile(model, max_seq=32, max_batch=2)
    assert "writes b_model_calls in place" in compiled.generation_missing
    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        torch.testing.assert_close(compiled(ids).logits, base(ids).logits, atol=1e-5, rtol=0)
    assert model.calls.item() == 1
    assert torch.equal(compiled.generate(ids, max_new_tokens=3, pad_token_id=0), want)
    assert model.calls.item() == 4  # prefill and two decode steps


def test_a_non_contiguous_example_input_is_read_right():
    """Plans index inputs as contiguous (the executor makes them so): a transposed example (Dynamo hands over
    transposed KV caches) must not leave its strides in the kernels (Falcon-H1's decode read its cache wrongly)."""
    class Mix(torch.nn.Module):
        def forward(self, x, y):
            return torch.cat([x, y], dim=-2) * 2

    x = torch.randn(1, 7, 2, 16).transpose(1, 2)  # [1, 2, 7, 16] with the seq and head strides swapped
    y = torch.randn(1, 2, 1, 16)
    compiled = braze.compile(Mix())
    torch.testing.assert_close(compiled(x, y), Mix()(x, y), atol=0, rtol=0)
    torch.testing.assert_close(compiled(x.contiguous(), y), Mix()(x, y), atol=0, rtol=0)
