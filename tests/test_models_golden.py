"""Golden checks: compiled (generated Triton kernels under the interpreter) vs eager, fp32, several shapes."""

import pytest
import torch

import braze
from braze.models import tiny_causal_lm

TOL = 1e-4  # fp32 kernels vs fp32 eager: only summation order differs (measured ~2e-7 on these configs)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral"])
def compiled_lm(request):
    model = tiny_causal_lm(request.param)
    return model, braze.compile(model, max_seq=64, max_batch=4)


@pytest.mark.parametrize("batch,seq", [(1, 1), (1, 7), (3, 16), (4, 33)])
def test_causal_lm_logits_match_eager(compiled_lm, batch, seq):
    model, cm = compiled_lm
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seq))
    before = cm.stats["launches"]
    got = cm(ids).logits
    with torch.no_grad():
        want = model(ids).logits
    err = (got - want).abs().max().item()
    assert err < TOL, f"max |compiled - eager| = {err:.3e}"
    assert cm.stats["launches"] > before, "no generated kernel ran"
    assert cm.stats["eager_ops"] == 0 and not cm.report.fallbacks, cm.report.fallbacks


def test_llama_layer_launch_budget():
    """Fusion depth: each Llama decoder layer runs in <= 8 launches (forward at seq 16)."""
    launches = {}
    for layers in (1, 2):
        cm = braze.compile(tiny_causal_lm("llama", layers=layers), max_seq=32)
        cm(torch.randint(0, 256, (1, 16)))
        launches[layers] = cm.stats["launches"]
    per_layer = launches[2] - launches[1]
    assert per_layer <= 8, f"{per_layer} launches per decoder layer"
    assert per_layer == 5  # qkv(+norm), attention(+rope), o_proj(+residual), gate/up(+norm, swiglu), down(+residual)


def test_eager_attention_form_is_recognized():
    model = tiny_causal_lm("llama", attn="eager")
    cm = braze.compile(model, max_seq=32)
    assert cm.report.pass_count("substitute_attention") == 2
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        err = (cm(ids).logits - model(ids).logits).abs().max().item()
    assert err < TOL


def test_pass_report_counts():
    cm = braze.compile(tiny_causal_lm("llama"), max_seq=32)
    r = cm.report
    assert r.pass_count("recognize_rms_norm") == 5  # 2 per layer + final norm
    assert r.pass_count("recognize_rope") == 4
    assert r.pass_count("recognize_glu") == 2
    assert r.pass_count("merge_sibling_linears") == 2  # q/k/v per layer
    assert r.pass_count("fuse_rope_into_attention") == 2
    text = str(r)
    assert "matmul" in text and "attention" in text and "eager fallbacks: none" in text


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(24)
        self.up = torch.nn.Linear(24, 48)
        self.down = torch.nn.Linear(48, 24)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def test_mlp_matches_eager():
    torch.manual_seed(0)
    model = MLP().eval()
    cm = braze.compile(model)
    for b in (3, 5, 1):
        x = torch.randn(b, 24)
        with torch.no_grad():
            assert (cm(x) - model(x)).abs().max().item() < TOL
    assert cm.compiled.stats["eager_ops"] == 0


def test_bidirectional_encoder_matches_eager():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = BertModel(cfg, add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, ids):
            return self.m(input_ids=ids).last_hidden_state

    enc = Encoder(model)
    cm = braze.compile(enc)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        err = (cm(ids) - enc(ids)).abs().max().item()
    assert err < TOL
    report = cm.compiled.report
    assert report.pass_count("substitute_attention") == 2
    # without an attention_mask, BERT's SDPA mask is `arange >= 0` expanded over the batch: every key visible, so
    # it is dropped and every op runs as a kernel
    assert report.fallbacks == []
    assert any("every query see every key" in note for p in report.passes for note in p.notes)


def test_encoder_with_a_padding_mask_attends_through_the_kernel():
    """BERT with an attention_mask (a padded batch): HF's SDPA mask is read by the flash kernel tile by tile, so no
    attention runs eagerly; the padded row's real tokens match eager (fp32: summation order)."""
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    cm = braze.compile(model)
    with torch.no_grad():
        got = cm(input_ids=ids, attention_mask=mask).last_hidden_state
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, want, atol=TOL, rtol=TOL)
    assert not [why for _, why in cm.report.fallbacks if "attention" in why]
    assert "attention" in {family for _, family, _ in cm.report.kernels}


class TinyEncoder(torch.nn.Module):
    """A bidirectional encoder block (no mask): embedding, SDPA self-attention, LayerNorm, GELU MLP."""

    def __init__(self, vocab=50, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.emb = torch.nn.Embedding(vocab, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, ids):
        x = self.emb(ids)
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        x = self.norm(x + self.out(a.transpose(1, 2).reshape(b, s, d)))
        return x + self.mlp(x)


def test_encoder_runs_flash_attention_kernel():
    torch.manual_seed(0)
    enc = TinyEncoder().eval()
    cm = braze.compile(enc)
    for shape in ((2, 12), (1, 12), (3, 12)):
        ids = torch.randint(0, 50, shape)
        with torch.no_grad():
            assert (cm(ids) - enc(ids)).abs().max().item() < TOL
    report = cm.compiled.report
    assert any(k[1] == "attention" for k in report.kernels)
    assert not report.fallbacks, report.fallbacks


def test_per_pass_golden():
    """After every pass the partly rewritten graph, run eagerly, matches the model."""
    from braze.compiler.capture import capture_causal_lm
    from braze.compiler.config import CompileConfig
    from braze.compiler.pipeline import compile_captured

    model = tiny_causal_lm("qwen2")
    ids = torch.randint(0, 256, (2, 10))
    pos = torch.arange(10).repeat(2, 1)
    with torch.no_grad():
        want = model(ids).logits
    checked = []

    def check(name, gm, weights):
        args = [weights[n.name] if n.name in weights else {"input_ids": ids, "position_ids": pos}[n.name]
                for n in gm.graph.nodes if n.op == "placeholder"]
        with torch.no_grad():
            (got,) = torch.fx.Interpreter(gm).run(*args)
        assert (got - want).abs().max().item() < TOL, f"after pass {name}"
        checked.append(name)

    cap = capture_causal_lm(model, 4, 32)
    compile_captured(cap, CompileConfig(), after_pass=check)
    assert len(checked) >= 10


def test_reference_executor_matches():
    model = tiny_causal_lm("llama")
    cm = braze.compile(model, max_seq=32, executor="reference")
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        assert (cm(ids).logits - model(ids).logits).abs().max().item() < TOL
