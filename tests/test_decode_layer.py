"""The decode layer in three launches (passes/decode_layer.py, kernels/decode_layer.py; issue #14).

The kernels against their references are in test_kernel_families.py (interpreter and GPU configurations, the
split merge, per-head starts, the workspace left at zero); greedy generation equal to HF for Llama and Qwen2
through the folded decode plan is test_generate.py. Here: what the pass folds and why it leaves a layer alone,
the launch budget per layer on the interpreter and the GPU targets, the 16-bit paths (fp16, bf16) against HF,
and the executor's workspace across calls.
"""

import re

import pytest
import torch

import braze
import braze.runtime.generate as generate_mod
from braze.kernels import INTERPRETER, TARGETS, launch_count
from braze.models import tiny_causal_lm


def _launchers(plan):
    return [s.launcher for s in plan.steps if s.kind == "template"]


def _fold_notes(cm):
    return next(p.notes for p in cm.report.passes if p.name == "fold_decode_layers")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mistral_swa", "gemma2", "gemma3_text"])
def test_three_launches_per_decode_layer_on_every_target(arch):
    """Launches per layer = the difference between a 2-layer and a 1-layer compile, as each target counts them
    (the GPU descriptions used to add the split-KV combine: now merged inside the attention block). Qwen3's
    per-head q_norm / k_norm (two fused kernels, 5 launches a layer) run inside the attention block, and so does
    Mistral's sliding window (the general cached attention kernel and o_proj apart: 4). Gemma 2 / 3: the softcap
    and window, Gemma 3's q / k norms and both post-norms (o_proj, the post-attention norm + residual, down and the
    post-feedforward norm + residual apart: 7 and 9) inside the blocks too."""
    per_layer = {}
    for layers in (1, 2):
        cm = braze.compile(tiny_causal_lm(arch, layers=layers), max_seq=600, max_batch=4)
        decode = cm.generator.decode.plan
        for name, device in (("interpreter", INTERPRETER), *TARGETS.items()):
            for batch in (1, 4):
                per_layer.setdefault((name, batch), []).append(launch_count(decode, device, {
                    s.name: batch for s in decode.symbols}))
    assert {k: v[1] - v[0] for k, v in per_layer.items()} == {k: 3 for k in per_layer}
    assert _launchers(decode).count("attention_block") == 2 and _launchers(decode).count("mlp_block") == 2
    assert "cached_attention" not in _launchers(decode)
    assert _fold_notes(cm)[0] == "decode plan: 2 attention blocks, 2 MLP blocks (one launch each)"
    normed = ("decode plan: 2 attention blocks normalize q / k (2 per head, 0 over the whole projection: q_norm / "
              "k_norm folded in)")
    assert (normed in _fold_notes(cm)) == (arch in ("qwen3", "gemma3_text"))
    post = "decode plan: 2 attention blocks, 2 MLP blocks normalize their output before the residual add (post-norms)"
    assert (post in _fold_notes(cm)) == arch.startswith("gemma")


# LayerNorm families: decode launches a layer (attention block with o_proj's bias, MLP block with the LayerNorm;
# GPT-2 / OPT's plain MLP with its biases); Phi / GPT-NeoX / Falcon / GPT-J (parallel attention + MLP) too, their
# (attention + MLP) + x summed as MLP + (attention + x)
LAYER_NORM_LAUNCHES = {"gpt2": 3, "stablelm": 3, "nemotron": 3, "cohere": 3, "opt": 3, "phi": 3, "gpt_neox": 3,
                       "falcon": 3, "gptj": 3, "cohere_qknorm": 3, "persimmon": 3}


@pytest.mark.parametrize("arch", list(LAYER_NORM_LAUNCHES))
def test_layer_norm_families_fold_their_decode_layers(arch):
    """The LayerNorm is the QKV matmul's prologue and the MLP block's (centred rows, weight, shift), o_proj's bias
    is added by the attention block's projecting programs, GPT-2 / OPT's plain MLP (up + bias, gelu / relu, down +
    bias) is one MLP block: GPT-2 decode 7 -> 3 launches a layer, OPT 8 -> 3 (its q scaling, a power of two, folds
    into q_proj's weights),
    StableLM 6 -> 3, Nemotron 6 -> 3, Cohere 5 -> 3. The parallel layers (Phi, GPT-NeoX, Falcon, GPT-J: 5-6) chain
    their halves once the residual sum is reassociated (passes/fusion.py: _parallel_residual) and their fc1 stays
    apart from QKV: 3. Cohere with q / k norms and Persimmon (7): their per-head LayerNorms commute with the rotary's
    head-dim permutation, which goes into the projection and norm weights, and then run inside the attention block
    (Cohere's weight a row per head, Persimmon's with a bias): 3. Greedy decoding through the folded plan gives HF's
    tokens."""
    launches = []
    for layers in (1, 2):
        model = tiny_causal_lm(arch, layers=layers)
        cm = braze.compile(model, max_seq=64, max_batch=2)
        decode = cm.generator.decode.plan
        launches.append(launch_count(decode, INTERPRETER, {s.name: 2 for s in decode.symbols}))
    assert launches[1] - launches[0] == LAYER_NORM_LAUNCHES[arch]
    assert _launchers(decode).count("attention_block") == 2 and _launchers(decode).count("mlp_block") == 2
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(5))
    want = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(cm.generate(ids, max_new_tokens=6), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_olmo2_folds_its_post_normed_halves(dtype):
    """OLMo 2 has no norms before attention or the MLP, only after (residual + norm(o_proj / down)), and q / k
    norms over whole projections: both halves fold with their post-norms (the MLP block reading x without a
    norm) and the q / k norms go inside the attention block, which sums each row's squares over all its heads:
    9 -> 3 launches a layer. In bf16 too: its norms (a bf16 weight times the fp32 normed value) and its RoPE (an
    fp32 table, rounded to bf16 after) are recognized, so the rotation runs inside the attention block (bf16 was 11
    a layer). Numerics against HF: test_16bit_decode_matches_hf[olmo2] and test_olmo2_decodes_hfs_tokens."""
    launches = []
    for layers in (1, 2):
        cm = braze.compile(tiny_causal_lm("olmo2", layers=layers, dtype=dtype), max_seq=64, max_batch=2)
        launches.append(launch_count(cm.generator.decode.plan, INTERPRETER, {
            s.name: 2 for s in cm.generator.decode.plan.symbols}))
    assert launches[1] - launches[0] == 3
    assert _launchers(cm.generator.decode.plan).count("mlp_block") == 2
    assert _launchers(cm.generator.decode.plan).count("attention_block") == 2
    assert "decode plan: 2 attention blocks, 2 MLP blocks normalize their output before the residual add " \
           "(post-norms)" in _fold_notes(cm)
    assert "decode plan: 2 attention blocks normalize q / k (0 per head, 2 over the whole projection: q_norm / " \
           "k_norm folded in)" in _fold_notes(cm)


def test_olmo2_decodes_hfs_tokens():
    """Greedy decoding through OLMo 2's folded blocks (fp32) gives HF's tokens."""
    model = tiny_causal_lm("olmo2", layers=2)
    cm = braze.compile(model, max_seq=64, max_batch=2)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(5))
    want = model.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
    assert torch.equal(cm.generate(ids, max_new_tokens=6), want)


def test_rkv_decode_records_its_queries_inside_the_attention_block():
    """kv_compression="rkv": the decode plan's query recording folds into the attention block
    (braze::attention_block_recording), so a compressed R-KV decode layer is 3 launches too, on every target."""
    per_layer = {}
    for layers in (1, 2):
        cm = braze.compile(tiny_causal_lm("llama", layers=layers), max_seq=128, max_batch=2, kv_compression="rkv",
                           kv_budget=32, kv_window=8)
        decode = cm.generator.decode.plan
        for name, device in (("interpreter", INTERPRETER), *TARGETS.items()):
            per_layer.setdefault(name, []).append(launch_count(decode, device, {s.name: 1 for s in decode.symbols}))
    assert {k: v[1] - v[0] for k, v in per_layer.items()} == {k: 3 for k in per_layer}
    assert _launchers(decode).count("attention_block") == 2 and "kv_compress" not in _launchers(decode)
    assert not any("kv_record_query" in (s.target or "") for s in decode.steps)
    assert _fold_notes(cm)[0] == "decode plan: 2 attention blocks, 2 MLP blocks (one launch each)"


def test_verify_folds_its_mlps_and_prefill_nothing():
    cm = braze.compile(tiny_causal_lm("llama", layers=2), max_seq=64)
    assert not {"attention_block", "mlp_block"} & set(_launchers(cm.generator.prefill.plan))
    verify = _launchers(cm.generator.verify.plan)
    assert verify.count("mlp_block") == 2 and "attention_block" not in verify
    assert [p.notes[0] for p in cm.report.passes if p.name == "fold_decode_layers"] == [
        "decode plan: 2 attention blocks, 2 MLP blocks (one launch each)",
        "verify plan: 0 attention blocks, 2 MLP blocks (one launch each)"]


@pytest.mark.parametrize("device", ["interpreter", "sm_90"])
def test_deterministic_mode_folds_both_blocks(device):
    """deterministic=True: both blocks (no float atomics; batch-invariant tiles, LayerCast gate/up), the attention
    block in decode and, as a tree block after the verify's rope_write, in verify (so an accepted node keeps
    decode's bits: test_deterministic.py checks tokens and logits). Decode 3 launches per layer (was 4 with the
    MLP's two matmuls, 5 before the attention block), verify 4."""
    per_layer = {}
    for layers in (1, 2):
        cm = braze.compile(tiny_causal_lm("llama", layers=layers), max_seq=600, max_batch=4, deterministic=True)
        target = INTERPRETER if device == "interpreter" else TARGETS[device]
        for name in ("decode", "verify"):
            plan = getattr(cm.generator, name).plan
            per_layer.setdefault(name, []).append(launch_count(plan, target, {s.name: 2 for s in plan.symbols}))
    assert {k: v[1] - v[0] for k, v in per_layer.items()} == {"decode": 3, "verify": 4}
    decode, verify = cm.generator.decode.plan, cm.generator.verify.plan
    for plan in (decode, verify):
        assert _launchers(plan).count("attention_block") == 2 and _launchers(plan).count("mlp_block") == 2
        blocks = [s for s in plan.steps if s.launcher in ("attention_block", "mlp_block")]
        assert all(s.params.get("deterministic") for s in blocks)
        # atomics on the int32 tickets only: every atomic_add in the kernels adds 1 (a ticket) or 0 (a read)
        added = [v for s in blocks for v in re.findall(r"tl\.atomic_add\([^,]+, ([^,)]+)", plan.kernels[s.kernel])]
        assert added and set(added) <= {"1", "0"}
    assert all(s.params.get("tree") for s in verify.steps if s.launcher == "attention_block")
    assert [p.notes[0] for p in cm.report.passes if p.name == "fold_decode_layers"] == [
        "decode plan: 2 attention blocks, 2 MLP blocks (one launch each)",
        "verify plan: 2 attention blocks, 2 MLP blocks (one launch each)"]


def test_verify_workspace_grows_past_its_initial_size():
    """The verify plan's blocks size their workspace for up to 16 rows per batch row at construction; a step with
    more draft nodes (a batch of 2 with 20-token drafts: 42 rows) grows it once (the old buffers stay alive for
    graphs captured over them) and still verifies
    exactly: speculative greedy tokens equal plain greedy with 20-token drafts."""
    from braze.runtime.executor import WORKSPACE_DIM_CAP
    from braze.runtime.speculate import SpeculativeRunner
    from tests.test_plan_purity import FixedDrafter

    class LongDrafter(FixedDrafter):
        def draft(self, req, max_spec_tokens, **_):
            from braze.runtime.suffix_tree import Draft

            n = min(20, max_spec_tokens)
            return Draft(tokens=[7] * n, parents=list(range(-1, n - 1)), probs=[1.0] * n, score=float(n))

    cm = braze.compile(tiny_causal_lm("llama", layers=1), max_seq=96, max_batch=2)
    verify = cm.generator.verify
    before = verify.workspace["scratch_float32"].numel()
    assert before == 2 * WORKSPACE_DIM_CAP * 128  # the MLP block's intermediate: rows x I
    ids = torch.randint(3, 256, (2, 6), generator=torch.Generator().manual_seed(5))  # 2 x 21 rows > 2 x 16
    plain = cm.generate(ids, max_new_tokens=30)
    cm.generator.spec = SpeculativeRunner(cm.generator, adaptive=False)
    cm.generator.spec.drafter = LongDrafter()
    out = cm.generate(ids, max_new_tokens=30, speculate=True, max_spec_tokens=20)
    assert torch.equal(out, plain)
    assert verify.workspace["scratch_float32"].numel() > before and verify._retired
    assert not verify.workspace["int32"].any()


def test_quantized_mlp_stays_unfused_and_says_why():
    cm = braze.compile(tiny_causal_lm("llama", layers=1), max_seq=32, quant="int6", int6_method="rtn")
    launchers = _launchers(cm.generator.decode.plan)
    assert "mlp_block" not in launchers and "attention_block" not in launchers
    notes = _fold_notes(cm)
    assert notes[0] == "decode plan: 0 attention blocks, 0 MLP blocks (one launch each)"
    assert notes[1] == ("attention kept unfused, first case: cached_attention_default: the attention output feeds "
                        "int6_linear.default, not one plain linear")


def _decode_logits(cm, ids, n):
    seen, real = [], generate_mod.select_next

    def spy(logits, *args, **kwargs):
        seen.append(logits.detach().clone())
        return real(logits, *args, **kwargs)

    generate_mod.select_next = spy
    try:
        out = cm.generate(ids, max_new_tokens=n)
    finally:
        generate_mod.select_next = real
    return out, torch.stack(seen[1:], 1)  # the decode steps' logits [B, n - 1, V]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "gemma3_text", "olmo2", "gpt2", "stablelm",
                                  "cohere_qknorm", "persimmon"])
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 2e-2), (torch.bfloat16, 1.25e-1)], ids=["fp16", "bf16"])
def test_16bit_decode_matches_hf(dtype, atol, arch):
    """The 16-bit path: decode logits of the folded plan against HF in the same dtype on the same tokens (bf16
    computes as on a GPU under the interpreter: braze/kernels/interpreter_bf16.py). Both round the attention
    output, the MLP intermediate and the residual stream to 16 bits at the same places and sum in fp32; they differ
    in summation order only, so the logits (|x| <= ~4) agree to a few ulps of the dtype at 4: fp16 2e-2, bf16
    (8x coarser) 1.25e-1, while a wrong head order or a lost split is O(1). Qwen3: the q / k norms inside the
    block round where HF's do (the normed value, then times the weight, in the model's dtype). Gemma 2 / 3: their
    norms scale by (1 + w) in fp32 and round once (braze::rms_norm with an fp32 weight), the post-norms and
    Gemma 3's q / k norms inside the blocks round the same way; Gemma 2 softcaps inside the attention block. GPT-2 /
    StableLM: the LayerNorm computes in fp32 and rounds once, as nn.LayerNorm does on 16-bit input; Cohere's /
    Persimmon's per-head q / k LayerNorms inside the attention block too."""
    model = tiny_causal_lm(arch, layers=2, dtype=dtype)
    cm = braze.compile(model, max_seq=64, max_batch=2)
    assert _launchers(cm.generator.decode.plan).count("attention_block") == 2
    assert _launchers(cm.generator.decode.plan).count("mlp_block") == 2
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(4))
    out, logits = _decode_logits(cm, ids, 8)
    with torch.no_grad():
        ref = model(out).logits[:, 7:14].float()  # position t's logits predict token t + 1
    torch.testing.assert_close(logits.float(), ref, atol=atol, rtol=0)


def test_workspace_stays_zero_between_calls():
    """The blocks' counters are allocated once per decode executor and left at zero by every launch: a second
    identical request gives identical tokens, and the counters are all zero after each. The blocks share one
    scratch (they run one after another), sized for the larger of the attention block's merged attention
    (max_batch x Hq * D = 3 x 64) and the MLP block's intermediate (max_batch x I = 3 x 128); it is written
    before it is read."""
    cm = braze.compile(tiny_causal_lm("qwen2", layers=2), max_seq=64, max_batch=3)
    ws = cm.generator.decode.workspace
    assert set(ws) == {"int32", "scratch_float32"}
    assert ws["scratch_float32"].numel() == 3 * 128
    assert ws["int32"].numel() == 3 + 3 * 2  # three tickets, then one per (row, kv head)
    ids = torch.randint(3, 256, (3, 5), generator=torch.Generator().manual_seed(9))
    first = cm.generate(ids, max_new_tokens=6)
    assert ws["scratch_float32"].any() and not ws["int32"].any()
    assert torch.equal(cm.generate(ids, max_new_tokens=6), first)
    assert not ws["int32"].any()
