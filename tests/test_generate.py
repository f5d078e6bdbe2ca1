"""Generation: greedy equals HF generate token for token; sampling matches; launch budget; bad input."""

import math

import pytest
import torch

import braze
from braze.models import tiny_causal_lm
from braze.runtime.sampling import process_logits, select_next

NEW_TOKENS = 64


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def lm(request):
    model = tiny_causal_lm(request.param)
    return model, braze.compile(model, max_seq=96, max_batch=4)


def _hf_greedy(model, ids, mask=None, n=NEW_TOKENS):
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None,
                              pad_token_id=0)


def test_greedy_batch1_matches_hf(lm):
    model, cm = lm
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    out = cm.generate(ids, max_new_tokens=NEW_TOKENS)
    assert out.shape == (1, 7 + NEW_TOKENS)
    assert torch.equal(out, _hf_greedy(model, ids))
    stats = cm.generation_stats
    assert stats.decode_steps == NEW_TOKENS - 1 and stats.kv_cache_bytes > 0


def test_greedy_padded_batch_matches_hf(lm):
    model, cm = lm
    ids = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[1, :2] = 0
    ids[mask == 0] = 0
    out = cm.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS)
    assert torch.equal(out, _hf_greedy(model, ids, mask))


def test_decode_launches_per_layer_within_budget():
    per_model = {}
    for layers in (1, 2):
        cm = braze.compile(tiny_causal_lm("llama", layers=layers), max_seq=32)
        cm.generate(torch.randint(3, 256, (1, 5)), max_new_tokens=3)
        per_model[layers] = cm.generation_stats.launches_per_decode_step
    per_layer = per_model[2] - per_model[1]
    # qkv(+norm); attention block (RoPE, cache write, attention, o_proj, residual); MLP block (norm, gate/up,
    # SwiGLU, down, residual)
    assert per_layer == 3, per_layer


def test_eos_stops_and_pads_like_hf():
    model = tiny_causal_lm("llama")
    cm = braze.compile(model, max_seq=64, max_batch=2)
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(3))
    free = cm.generate(ids, max_new_tokens=12)
    eos = int(free[0, 8])  # a token row 0 emits: make it the stop token
    out = cm.generate(ids, max_new_tokens=12, eos_token_id=eos, pad_token_id=1)
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(out, ref)


def test_sampling_is_seeded_and_reproducible():
    cm = braze.compile(tiny_causal_lm("llama"), max_seq=32)
    ids = torch.randint(3, 256, (1, 4))
    a = cm.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, seed=7)
    b = cm.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, seed=7)
    c = cm.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sampling_distribution_matches_eager():
    """First-token distribution: braze's sampler on compiled logits vs HF's warpers on eager logits.

    20k draws each over a 256-token vocab: the total variation of two samples from the same distribution is
    ~0.03-0.05 here (sqrt(V / N) scale); a wrong warper order or temperature shifts it by > 0.15.
    """
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    model = tiny_causal_lm("llama")
    cm = braze.compile(model, max_seq=32)
    ids = torch.randint(3, 256, (1, 6), generator=torch.Generator().manual_seed(4))
    ours = cm(ids).logits[:, -1]
    with torch.no_grad():
        eager = model(ids).logits[:, -1]
    temp, top_k, top_p = 0.7, 40, 0.9
    warp = LogitsProcessorList([TemperatureLogitsWarper(temp), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)])
    hf_probs = warp(ids, eager.clone()).softmax(-1)[0]
    our_probs = process_logits(ours, temp, top_k, top_p).softmax(-1)[0]
    assert (hf_probs - our_probs).abs().max().item() < 1e-5
    n = 20000
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([select_next(ours, True, temp, top_k, top_p, g) for _ in range(200)]).flatten()
    draws = torch.cat([draws, torch.multinomial(our_probs, n - draws.numel(), replacement=True, generator=g)])
    hf_draws = torch.multinomial(hf_probs, n, replacement=True, generator=torch.Generator().manual_seed(1))
    ours_hist = torch.bincount(draws, minlength=256).float() / n
    hf_hist = torch.bincount(hf_draws, minlength=256).float() / n
    tv = 0.5 * (ours_hist - hf_hist).abs().sum().item()
    assert tv < 0.05, f"total variation {tv:.3f}"


@pytest.fixture(scope="module")
def small():
    return braze.compile(tiny_causal_lm("llama", layers=1), max_seq=16, max_batch=2)


def test_prompt_longer_than_cache(small):
    with pytest.raises(braze.ShapeOutOfRangeError, match=r"prompt of 17 tokens exceeds max_seq=16; compile with"):
        small.generate(torch.ones(1, 17, dtype=torch.long), max_new_tokens=1)


def test_new_tokens_past_cache(small):
    with pytest.raises(braze.ShapeOutOfRangeError, match=r"prompt \(10\) \+ max_new_tokens \(10\) = 20 exceeds"):
        small.generate(torch.ones(1, 10, dtype=torch.long), max_new_tokens=10)


def test_batch_over_max_batch(small):
    with pytest.raises(braze.ShapeOutOfRangeError, match="a batch of 3 prompts exceeds max_batch=2"):
        small.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)


def test_empty_prompt(small):
    with pytest.raises(braze.InputMismatchError, match="empty prompt"):
        small.generate(torch.ones(1, 0, dtype=torch.long), max_new_tokens=2)


def test_unknown_generate_option(small):
    with pytest.raises(braze.ConfigError, match="unknown generate option.*num_beams.*valid:.*max_new_tokens"):
        small.generate(torch.ones(1, 3, dtype=torch.long), num_beams=4)


def test_token_ids_outside_the_vocabulary_are_refused(small):
    """An id past the embedding table made the gather kernel read outside it (a segfault under the interpreter,
    a fault on a GPU) where HF raises; the forward, generate and speculation now name the id."""
    good = torch.tensor([[3, 4, 5]])
    for bad, id_ in ((torch.tensor([[3, 256, 5]]), 256), (torch.tensor([[3, -1, 5]]), -1)):
        with pytest.raises(braze.InputMismatchError, match=rf"input 'input_ids' holds id {id_}, outside the "
                                                           r"embedding table's rows \[0, 256\)"):
            small(bad)
        for speculate in (False, True):
            with pytest.raises(braze.InputMismatchError, match=f"holds id {id_}"):
                small.generate(bad, max_new_tokens=2, speculate=speculate)
    assert small.generate(good, max_new_tokens=2).shape == (1, 5)


def test_int32_ids_and_hf_generation_config_are_taken(small):
    from transformers import GenerationConfig

    ids = torch.tensor([[3, 4, 5, 6]])
    ref = small.generate(ids, max_new_tokens=3)
    assert torch.equal(small.generate(ids.int(), max_new_tokens=3), ref)
    torch.testing.assert_close(small(ids.int()).logits, small(ids).logits, rtol=0, atol=0)
    assert torch.equal(small.generate(ids, generation_config=GenerationConfig(max_new_tokens=3)), ref)
    sampled = GenerationConfig(do_sample=True, top_k=5, max_new_tokens=3)
    assert torch.equal(small.generate(ids, generation_config=sampled, seed=2),
                       small.generate(ids, do_sample=True, top_k=5, max_new_tokens=3, seed=2))
    # keyword arguments win over the config's fields, as in HF
    assert small.generate(ids, generation_config=sampled, max_new_tokens=1).shape == (1, 5)
    with pytest.raises(braze.ConfigError, match="generation_config sets num_beams, which braze's generate does not"):
        small.generate(ids, generation_config=GenerationConfig(num_beams=2))


def test_forward_input_ids_shape_and_inputs_embeds_errors(small):
    with pytest.raises(braze.InputMismatchError, match=r"input_ids must be an integer tensor of token ids \[batch, "
                                                       r"seq\], got a 1-dim int64 tensor"):
        small(torch.tensor([3, 4]))
    with pytest.raises(braze.InputMismatchError, match=r"needs input_ids .* \(got inputs_embeds="):
        small(inputs_embeds=torch.zeros(1, 2, 64))


def test_return_sequences_past_max_batch_names_the_copies(small):
    with pytest.raises(braze.ShapeOutOfRangeError, match=r"2 prompt\(s\) x num_return_sequences=2 = 4 rows exceeds "
                                                          "max_batch=2"):
        small.generate(torch.ones(2, 3, dtype=torch.long), max_new_tokens=2, do_sample=True, num_return_sequences=2)


@pytest.mark.parametrize("padding", ["left", "right"])
def test_padded_forward_matches_hf_at_real_positions(lm, padding):
    """cm(ids, attention_mask=mask) refused any padding before; right padding now runs the forward plan (no real
    token sees the pads after it), left padding the prefill plan over a scratch KV cache (kv_start masks them)."""
    model, cm = lm
    ids = torch.randint(3, 256, (3, 9), generator=torch.Generator().manual_seed(5))
    lengths = [9, 7, 3]
    mask = torch.zeros(3, 9, dtype=torch.long)
    for row, n in enumerate(lengths):
        if padding == "left":
            mask[row, 9 - n:] = 1
        else:
            mask[row, :n] = 1
    got = cm(ids, attention_mask=mask).logits
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
    real = mask.bool()
    assert real.sum() == sum(lengths)
    torch.testing.assert_close(got[real], ref[real], rtol=1e-4, atol=1e-4)
    assert bool(torch.isfinite(got).all())
    with pytest.raises(braze.InputMismatchError, match="neither all before nor all after"):
        cm(ids, attention_mask=torch.tensor([[1] * 9, [1, 0] + [1] * 7, [1] * 9]))


def test_forward_with_labels_gives_hf_loss_and_refuses_what_it_would_ignore(lm):
    """labels= and HF's no-op arguments were silently ignored before (no .loss; output_hidden_states=True gave no
    hidden states); now the loss is HF's and an argument that would change the output is a one-line error."""
    model, cm = lm
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(6))
    labels = ids.clone()
    labels[1, :3] = -100
    with torch.no_grad():
        ref = model(ids, labels=labels)
    out = cm(ids, labels=labels, use_cache=False, return_dict=True)
    torch.testing.assert_close(out.loss, ref.loss.float(), rtol=1e-5, atol=1e-5)
    loss, logits = out[0], out[1]  # HF's tuple order
    assert loss is out.loss and logits is out.logits
    assert cm(ids, logits_to_keep=1).logits.shape == (2, 1, ref.logits.shape[-1])
    for kwargs in ({"output_hidden_states": True}, {"inputs_embeds": torch.zeros(2, 9, 4)}):
        with pytest.raises(braze.InputMismatchError, match=f"does not take {next(iter(kwargs))}="):
            cm(ids, **kwargs)


def test_repetition_penalty_and_min_new_tokens_match_hf(lm):
    model, cm = lm
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])  # the padded row's pad-position tokens are not penalized
    plain = cm.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=None)
    ours = cm.generate(ids, attention_mask=mask, max_new_tokens=20, repetition_penalty=1.5, eos_token_id=None)
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=20, repetition_penalty=1.5, do_sample=False,
                            eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours, hf) and not torch.equal(ours, plain)
    eos = [int(plain[0, 6]), int(plain[1, 6])]  # each row's first greedy token: without min_new_tokens it stops
    assert cm.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0).shape[1] == 7
    ours = cm.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=4, eos_token_id=eos, pad_token_id=0)
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=4, do_sample=False,
                            eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ours, hf) and ours.shape[1] >= 6 + 4
    spec = cm.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=4, eos_token_id=eos, pad_token_id=0,
                       speculate=True)  # (test_speculation: at every verify node)
    assert torch.equal(spec, ours)
    with pytest.raises(braze.ConfigError, match="repetition_penalty must be a finite number > 0"):
        cm.generate(ids, max_new_tokens=2, repetition_penalty=0)
    with pytest.raises(braze.ConfigError, match="min_new_tokens must be an integer >= 0"):
        cm.generate(ids, max_new_tokens=2, min_new_tokens=-1)


def test_max_length_counts_the_prompt_like_hf(lm):
    model, cm = lm
    ids = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    out = cm.generate(ids, attention_mask=mask, max_length=12)
    with torch.no_grad():
        hf = model.generate(ids, attention_mask=mask, max_length=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0)
    assert out.shape == (2, 12) and torch.equal(out, hf)
    assert cm.generate(ids, attention_mask=mask, max_length=12, max_new_tokens=3).shape == (2, 8)  # HF: new wins
    with pytest.raises(braze.ConfigError, match="max_length=5 leaves no room for new tokens after the 5-token"):
        cm.generate(ids, max_length=5)


def test_num_return_sequences_repeats_each_prompt_and_samples_the_copies():
    model = tiny_causal_lm("llama", layers=1)
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 3, 4, 5]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    for deterministic in (False, True):
        cm = braze.compile(model, max_seq=32, max_batch=8, deterministic=deterministic)
        out = cm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, num_return_sequences=3, seed=7)
        assert out.shape == (6, 13)
        assert torch.equal(out[:3, :5], ids[:1].expand(3, -1)) and torch.equal(out[3:, :5], ids[1:].expand(3, -1))
        assert len({tuple(r) for r in out[:3, 5:].tolist()}) > 1, "the copies of a prompt were not sampled apart"
        if deterministic:  # keyed sampling: copy 0 draws with the request's own seed
            alone = cm.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=True, seed=7)
            assert torch.equal(out[::3], alone)
    with pytest.raises(braze.ConfigError, match="num_return_sequences=2 needs do_sample=True"):
        cm.generate(ids, num_return_sequences=2)


def test_right_padding_is_refused(small):
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(braze.InputMismatchError, match="right padding"):
        small.generate(torch.ones(1, 3, dtype=torch.long), attention_mask=mask, max_new_tokens=2)


def test_stop_strings_stop_like_hf():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(256)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    model = tiny_causal_lm("llama")
    cm = braze.compile(model, max_seq=64)
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(5))
    free = cm.generate(ids, max_new_tokens=12, eos_token_id=None)
    stop = tok.decode(free[0, 9:10])  # the text of the 4th new token
    out = cm.generate(ids, max_new_tokens=12, eos_token_id=None, pad_token_id=0, stop_strings=[stop], tokenizer=tok)
    assert torch.equal(out[0, :10], free[0, :10])  # everything up to and including the stop text is kept
    assert bool((out[0, 10:] == 0).all())  # then padding, as HF does for finished rows


def test_batch_bucket_padding_gives_the_same_tokens():
    """CUDA-graph decode pads a batch to its bucket (here 3 -> 4) with dummy rows; the real rows are unchanged."""
    model = tiny_causal_lm("llama")
    cm = braze.compile(model, max_seq=64, max_batch=4)
    ids = torch.randint(3, 256, (3, 6), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[2, :2] = 0
    plain = cm.generate(ids, attention_mask=mask, max_new_tokens=10)
    cm.generator.bucket_batches = True
    padded = cm.generate(ids, attention_mask=mask, max_new_tokens=10)
    assert padded.shape == plain.shape and torch.equal(padded, plain)
    per_row = sum(math.prod(shape) * 4 for _, shape, _ in cm.kv_inputs)
    assert cm.generation_stats.kv_cache_bytes == 4 * per_row  # the cache was allocated for the bucket of 4


def test_generation_plans_reference_only_their_own_symbols():
    """Every size a plan step reads is one of the plan's declared symbols: the decode plan re-specialized to one
    token must not keep the capture's seq symbol in a reshape (torch 2.11 left it there: NameError on CUDA)."""
    import dataclasses
    import json
    import re

    gen = braze.compile(tiny_causal_lm("llama", layers=1), max_seq=32, max_batch=2).generator
    for name in ("prefill", "decode", "verify"):
        plan = getattr(gen, name).plan
        declared = {s.name for s in plan.symbols}
        for step in plan.steps:
            used = set(re.findall(r'"sym": "([^"]*)"', json.dumps(dataclasses.asdict(step), default=str)))
            names = {m for expr in used for m in re.findall(r"\bs\d+\b", expr)}
            assert names <= declared, (name, step.outputs, names - declared)


def test_fake_propagation_records_sizes_that_became_constants():
    import torch.fx as fx
    from torch._subclasses.fake_tensor import FakeTensorMode

    from braze.passes.fake_memo import MemoFakeTensorProp

    g = fx.Graph()
    x = g.placeholder("x")
    size = g.call_function(torch.ops.aten.sym_size.int, (x, 1))
    g.output(g.call_function(torch.ops.aten.reshape.default, (x, [-1, size])))
    gm = fx.GraphModule(torch.nn.Module(), g)
    size.meta["val"] = "stale"  # as a captured graph's symbolic size before re-specialization
    mode = FakeTensorMode()
    with mode:
        fake = torch.empty(2, 1)
    MemoFakeTensorProp(gm, mode).propagate_dont_convert_inputs(fake)
    assert size.meta["val"] == 1


def _broadcast_sum_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention with scores as a broadcast product summed over the head dim: a form braze does not recognise
    as attention (no matmul of q and k^T), standing in for any custom attention a model may bring."""
    from transformers.models.llama.modeling_llama import repeat_kv

    k, v = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    scores = (query[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs


def test_unrecognised_attention_generates_by_recomputing(monkeypatch, tmp_path, capsys):
    """A compile never fails on a model eager runs: attention braze cannot put over a KV cache leaves the forward
    plan (exact: the kernels and the eager attention ops), the report says why there are no KV-cache plans, and
    generate() / `braze run` re-run the forward plan over the sequence each step (runtime/recompute.py): HF's
    tokens, greedy and for a left-padded batch, in the compiled model and in its package."""
    import transformers.models.llama.modeling_llama as modeling_llama

    from braze.cli import main
    from braze.runtime.errors import ConfigError

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", _broadcast_sum_attention)
    model = tiny_causal_lm("llama", layers=1)
    model.set_attn_implementation("eager")
    cm = braze.compile(model, max_seq=32, max_batch=2)
    ids = torch.randint(3, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(cm(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
        want = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        mask = torch.ones_like(ids)
        mask[1, :3] = 0  # row 1 is a 6-token prompt, left-padded
        want_padded = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    report = str(cm.report)
    assert "generation: recompute: no KV-cache plans" in report and "did not recognize as attention" in report
    assert torch.equal(cm.generate(ids, max_new_tokens=4), want)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=4)[1, 9:], want_padded[1, 9:])
    sampled = cm.generate(ids, max_new_tokens=4, do_sample=True, temperature=0.9, seed=3)
    assert torch.equal(sampled, cm.generate(ids, max_new_tokens=4, do_sample=True, temperature=0.9, seed=3))
    with pytest.raises(ConfigError, match="needs KV-cache plans.*did not recognize as attention"):
        cm.generate(ids, max_new_tokens=2, speculate=True)
    cm.save(tmp_path / "pkg")
    loaded = braze.load(tmp_path / "pkg")
    assert torch.equal(loaded.generate(ids, max_new_tokens=4), want)
    capsys.readouterr()
    assert main(["run", str(tmp_path / "pkg"), "--prompt-ids", " ".join(map(str, ids[0].tolist())),
                 "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert out.split()[-4:] == [str(t) for t in want[0, 9:].tolist()]
    assert "no KV-cache plans" in err and "re-runs the forward plan" in err


def _tiny_llama4(layers=2):
    import transformers

    cfg = transformers.AutoConfig.for_model(
        "llama4_text", vocab_size=256, hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_a_graph_that_pins_the_decode_batch_pads_up_to_max_batch(monkeypatch):
    """Llama 4's complex RoPE (torch.polar) pinned the batch when the graph was re-traced at one token, until
    lower_complex turned it into real ops; without that pass it still does, which gives this test its graph. The
    decode plan is built at max_batch rows and smaller batches are padded up to it (it failed with 'input_ids dim
    0 is 1, expected 2'); greedy tokens equal HF's at every batch size, the report says so, and an explicit
    speculative request, which needs a batch-dynamic decode plan, is refused in one line."""
    from braze.compiler import pipeline

    monkeypatch.setattr(pipeline, "PASSES", [p for p in pipeline.PASSES if p.name != "lower_complex"])
    model = _tiny_llama4()
    cm = braze.compile(model, max_seq=32, max_batch=3)
    assert "fixed at max_batch=3" in cm.report.extra["decode batch"]
    assert cm.generator.static_decode_batch == 3
    ids = torch.randint(3, 256, (3, 6), generator=torch.Generator().manual_seed(1))
    for b in (1, 2, 3):
        want = model.generate(ids[:b], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(cm.generate(ids[:b], max_new_tokens=4), want), b
    with pytest.raises(braze.InputMismatchError, match="takes exactly 3 rows"):
        cm.generate(ids[:1], max_new_tokens=3, speculate=True)


def test_llama4_decodes_at_any_batch_with_its_rope_as_real_ops():
    """With lower_complex (the default pipeline) Llama 4's decode plan follows the batch: no padding, greedy tokens
    equal HF's at batch 1 and 3, and speculation is accepted. Its MoE runs in kernels too: no eager step in any plan
    (the router's scatter of its top-k logits is a comparison select, the token repeat a view, the experts' bmm a
    grouped matmul)."""
    model = _tiny_llama4()
    cm = braze.compile(model, max_seq=32, max_batch=3)
    assert "decode batch" not in cm.report.extra and not cm.generator.static_decode_batch
    for plan in (cm.plan, *cm.extra_plans.values()):
        assert not [s.target for s in plan.steps if s.kind == "eager" and s.target != "_operator.getitem"], plan.name
    assert sum(s.launcher == "grouped_matmul" for s in cm.extra_plans["decode"].steps) == 4  # 2 layers x 2
    ids = torch.randint(3, 256, (3, 6), generator=torch.Generator().manual_seed(1))
    for b in (1, 3):
        want = model.generate(ids[:b], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(cm.generate(ids[:b], max_new_tokens=4), want), b
    want = model.generate(ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(ids[:1], max_new_tokens=4, speculate=True), want)


def test_generation_past_a_learned_position_table_is_refused():
    """GPT-2's positions index a learned table (n_positions rows): a compile with max_seq past it says so in the
    report, and generate refuses a prompt + new tokens that would need a row past the table (it generated garbage:
    the plans' gathers do not bound-check, as the forward's API check does). Within the table it matches HF."""
    model = tiny_causal_lm("gpt2", layers=1, vocab=64)
    rows = model.config.n_positions
    cm = braze.compile(model, max_seq=rows + 32, max_batch=1)
    assert f"generation stops at {rows} tokens" in cm.report.extra["positions"]
    ids = torch.randint(3, 64, (1, rows - 2), generator=torch.Generator().manual_seed(1))
    with pytest.raises(braze.ShapeOutOfRangeError, match=f"exceeds the model's learned position table \\({rows} "):
        cm.generate(ids, max_new_tokens=4)
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(ids, max_new_tokens=2), want)


def _tiny_held_out(arch, **overrides):
    import transformers

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, head_dim=16)
    common.update(overrides)
    cfg = transformers.AutoConfig.for_model(arch, **common)
    for k, v in common.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch, note", [("gpt_oss", "attention sinks"), ("xglm", "KV cache 4 tensors"),
                                        ("openai-gpt", "KV cache 4 tensors"), ("granite_swa", "attention sinks")])
def test_held_out_attention_forms_generate_over_the_kv_cache(arch, note):
    """Attention forms braze did not recognise, so these models re-ran the whole forward every step; they now
    generate over the KV cache. gpt-oss: attention sinks (one more softmax logit per head:
    softmax(cat([scores, sinks]) - max)[..., :-1]) in sliding-window and full layers, run by the general cached
    attention; its one-sided clamp (clamp(x, None, limit)) fuses too (it failed: "literal None"). XGLM: a softmax
    over the heads-merged [B*H, S, S] view of max(scores + mask, finfo.min), q scaled before the bmm: the
    cached-attention kernel. GPT-1: its causal buffer b as w * b - 1e4 * (1 - b) (-1e4 acts as -inf: exp
    underflows to 0) and k^T as permute(0, 2, 3, 1) of [B, S, H, D] keys: the cached-attention kernel.
    Granite-SWA: softmax attention scaled by sigmoid(logsumexp(scores) - sink) per head, the same sink logit as
    gpt-oss's (its 12 eager steps were the scores' matmul kept alive by the logsumexp, and the packed-sequence
    mask that matmul still read). No eager step in any plan."""
    model = _tiny_held_out(arch)
    cm = braze.compile(model, max_seq=32, max_batch=2)
    assert cm.generation_missing is None and note in str(cm.report)
    for plan in (cm.plan, *cm.extra_plans.values()):
        assert not [s.target for s in plan.steps if s.kind == "eager" and s.target != "_operator.getitem"], plan.name
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(cm(ids).logits, want, rtol=0, atol=1e-5)  # fp32, reassociation only
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0), want)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, speculate=True), want)


def test_a_softmax_over_a_fixed_size_is_not_unrecognized_attention():
    """DeepSeek V4 mixes its hyper-connection streams with a softmax over a [.., 4, 4] matrix (Sinkhorn): not
    attention (its size does not grow with the sequence), so it no longer keeps the model from its KV-cache plans
    (it generated by recomputing the whole forward every step). Greedy tokens equal HF's."""
    model = _tiny_held_out("deepseek_v4")
    cm = braze.compile(model, max_seq=32, max_batch=2)
    assert cm.generation_missing is None, cm.generation_missing
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(ids, max_new_tokens=5, pad_token_id=0), want)


@pytest.mark.parametrize("arch", ["deepseek_v3", "minicpm3"])
def test_mla_attention_generates_through_kernels(arch):
    """Multi-head latent attention (DeepSeek V3, MiniCPM3): keys of head dim nope + rope (24) built by slice
    assignment into new_empty, values of 16. The attention kernels tile q, k, v and the output with one head dim:
    they wrote 24 columns into a 16-column output (heap corruption under the interpreter, wrong logits). The values
    are now padded with zeros to 24 and the output sliced back, and a kernel refuses unequal head dims; the slice
    assignment is a cat. Forward within fp32 reassociation, greedy tokens of a left-padded batch equal HF's (plain
    and speculative), no eager step in any plan."""
    model = _tiny_held_out(arch, head_dim=8, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, kv_lora_rank=32,
                           q_lora_rank=32, num_key_value_heads=4)
    cm = braze.compile(model, max_seq=32, max_batch=2)
    assert "padded with zeros to the query's 24" in str(cm.report)
    for plan in (cm.plan, *cm.extra_plans.values()):
        assert not [s.target for s in plan.steps if s.kind == "eager" and s.target != "_operator.getitem"], plan.name
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(cm(ids).logits, want, rtol=0, atol=1e-5)
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0), want)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=0, speculate=True), want)


@pytest.mark.parametrize("arch, overrides, missing", [
    # MoE routing through .tolist() of expert counts: data-dependent sizes run eagerly in the forward plan, bound
    # from the eager results (it failed in normalize, then in memory planning)
    ("jetmoe", {}, "data-dependent sizes"),
])
def test_held_out_architectures_compile_and_say_what_runs_eagerly(arch, overrides, missing):
    """A compile never fails on a model eager PyTorch runs: the forward plan is exact, the report says why there is
    no KV-cache generation, and generate() gives HF's tokens by recomputing."""
    model = _tiny_held_out(arch, **overrides)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    cm = braze.compile(model, max_seq=32, max_batch=2)
    with torch.no_grad():
        want = model(ids).logits
    torch.testing.assert_close(cm(ids).logits, want, rtol=0, atol=1e-5)  # fp32, reassociation only
    assert missing in cm.generation_missing and missing in cm.report.extra["generation"]
    with torch.no_grad():  # generation re-runs the forward plan each step (runtime/recompute.py)
        want = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(cm.generate(ids, max_new_tokens=3, pad_token_id=0), want)


@pytest.mark.parametrize("arch, features", [("gemma2", ["softcap 50", "sliding window 8"]),
                                            ("mistral_swa", ["sliding window 8"]), ("bloom", ["ALiBi"]),
                                            ("mpt", ["ALiBi"])])
def test_softcap_and_sliding_window_generate_through_kernels(arch, features):
    """Gemma 2's softcapped, sliding-window attention, Mistral's sliding window and Bloom / MPT's ALiBi run the
    attention kernels with those features in every plan (they ran the reference eagerly): forward, prefill, decode
    and the tree verify have no eager step. Past the window (prompt 12 + 10 new tokens, window 8), greedy tokens of a
    left-padded batch equal HF's, plain and speculative with draft trees; fp32 logits within 1e-5 (reassociation
    only)."""
    model = tiny_causal_lm(arch, layers=2, vocab=128)
    cm = braze.compile(model, max_seq=40, max_batch=2)
    notes = str(cm.report)
    assert all(f in notes for f in features), notes
    for name, plan in {"forward": cm.plan, **cm.extra_plans}.items():
        assert not [s.target for s in plan.steps if s.kind == "eager" and s.target != "_operator.getitem"], name
    assert any(s.launcher == "general_cached_attention" for s in cm.extra_plans["verify"].steps)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(cm(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        want = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
    kw = dict(attention_mask=mask, max_new_tokens=10, eos_token_id=None, pad_token_id=0)
    assert torch.equal(cm.generate(ids, **kw), want)
    accepted = 0
    for _ in range(2):  # the second call drafts the first's continuation: drafts verified and accepted
        assert torch.equal(cm.generate(ids, **kw, speculate=True, spec_tree=True), want)
        accepted += cm.generator.stats.extra["speculation"]["accepted_drafts"]
    assert accepted > 0


def test_only_convolutions_across_positions_keep_a_model_from_the_kv_cache():
    """LFM2's short conv with 3 taps carries state across positions; with 1 tap it is a per-position map. The
    3-tap conv is causal and depthwise, so the conv cache carries its state (it is not refused); a conv the cache
    does not cover (here the same conv without its causal slice) is refused."""
    from braze.compiler.capture import capture_causal_lm
    from braze.passes.conv_state import causal_convs
    from braze.passes.kv_cache import _sequence_mixing

    found, cached = {}, {}
    for taps in (1, 3):
        model = _tiny_held_out("lfm2", layer_types=["conv", "full_attention"], conv_L_cache=taps)
        gm = capture_causal_lm(model, 2, 16).gm
        convs = causal_convs(gm)
        cached[taps] = [(c.conv.name, c.taps) for c in convs]
        mixing = _sequence_mixing(gm, frozenset(c.conv for c in convs))  # (before the passes: attention's softmax)
        found[taps] = [m for m in mixing if m.startswith("convolution")]
        if taps == 3:
            conv = convs[0].conv
            convs[0].output.replace_all_uses_with(conv)  # drop the slice: a centred conv, reading later positions
            assert causal_convs(gm) == []
            assert [m for m in _sequence_mixing(gm) if m.startswith("convolution")] == [
                "convolution (a convolution over the sequence)"]
    assert found == {1: [], 3: []} and cached == {1: [], 3: [("convolution", 3)]}


def test_short_conv_hybrid_decodes_over_a_conv_cache():
    """LFM2 (a 3-tap causal depthwise conv layer, then attention) generated by recomputing the whole prefix every
    token (its conv state was not in the KV cache). Its conv now reads and writes a conv cache by slot: prefill,
    decode and the tree verify launch braze::cached_conv1d's kernel (LFM2's B and C gates inside it: the conv
    layer decodes in 4 launches, 6 without), no plan has an eager step, and a left-padded batch's greedy tokens
    (12 new, past the conv's reach) equal HF's, plain and speculative (path and tree drafts, drafts accepted); the
    forward within fp32 reassociation. kv_compression would misalign the conv cache: refused in one line."""
    model = _tiny_held_out("lfm2", layer_types=["conv", "full_attention"], initializer_range=0.2)
    cm = braze.compile(model, max_seq=32, max_batch=2)
    assert cm.generation_missing is None
    assert ("1 causal convolutions (3 taps) read and write a conv cache of 32 positions; 2 gating multiplies in "
            "their kernels") in str(cm.report)
    for name, plan in {"forward": cm.plan, **cm.extra_plans}.items():
        assert not [s.target for s in plan.steps if s.kind == "eager" and s.target != "_operator.getitem"], name
        if name != "forward":  # B * x and C * conv(...) inside the conv's launch: in_proj, conv, out_proj
            (conv,) = [s for s in plan.steps if s.launcher == "cached_conv"]
            assert {"gate_in", "gate_out"} <= set(conv.params["roles"]), name
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(cm(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    mask = torch.tensor([[1] * 7, [0, 0] + [1] * 5])
    ids[mask == 0] = 0
    kw = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        want = model.generate(ids, do_sample=False, **kw)
    assert len(set(want[0, 7:].tolist())) > 3  # tokens that vary: a state mix-up would show
    assert torch.equal(cm.generate(ids, **kw), want)
    for tree in (False, True):
        accepted = 0
        for _ in range(2):  # the second call drafts the first's continuation
            assert torch.equal(cm.generate(ids, **kw, speculate=True, spec_tree=tree), want), tree
            accepted += cm.generator.stats.extra["speculation"]["accepted_drafts"]
        assert accepted > 0, tree
    with pytest.raises(braze.ConfigError, match="causal convolutions read their inputs by cache slot"):
        braze.compile(model, max_seq=32, max_batch=2, kv_compression="snapkv", kv_budget=0.5, kv_window=4)
