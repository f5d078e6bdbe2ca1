"""Tensor parallelism (braze.compile(model, tp=N), braze/passes/tensor_parallel.py) across gloo ranks on CPU.

One spawn per world size runs every check on each rank and hands the results back; the tp=1 baselines are
compiled here, in the test process. Models: tiny Llama (4 heads, 2 KV heads: at tp=4 fewer KV heads than
ranks), tiny Qwen2 (Q/K/V biases), a Llama with one KV head (MQA: fewer KV heads than ranks at tp=2) and tiny Phi
(partial rotary, GELU MLP, biased o_proj / fc2).
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import pytest
import torch

import braze
from braze import ConfigError
from braze.distributed import spawn
from tests.test_deterministic import _OracleTreeDrafter

MAX_NEW = 6
LAYERS = 2
IDS = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0))
MASK = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])  # row 1 left-padded
PADDED = IDS.masked_fill(MASK == 0, 0)


# quantized compiles: a Llama whose row-parallel inputs split into whole int6 groups of 128 (hidden 256 and
# intermediate 512 over 2 ranks), so each rank's shard quantizes exactly as the whole weight does; df11 on bf16 values
QUANT = {"wide-int6": dict(quant="int6", int6_method="rtn"), "wide-df11": dict(quant="df11", cast_bf16=True)}


def make_model(name: str, layers: int = LAYERS):
    """Tiny seeded causal LMs: the tiny_causal_lm archs plus Llama variants by KV / attention head count."""
    from braze.models import tiny_causal_lm

    if name in ("llama", "qwen2", "phi"):
        return tiny_causal_lm(name, layers=layers)
    import transformers

    if name in QUANT:
        from braze.eval import bf16_rounded

        cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=1,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        return bf16_rounded(transformers.AutoModelForCausalLM.from_config(cfg).eval())
    heads = {"mqa": (4, 1), "heads3": (3, 3)}[name]
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=16 * heads[0], intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=heads[0],
                                   num_key_value_heads=heads[1], max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def run_model(compiled) -> dict:
    """Logits, greedy generations (batch 1, left-padded batch 2) and collectives counted per step."""
    from braze.ops.collectives import COUNTS

    out = {"logits": compiled(IDS).logits}
    COUNTS.clear()
    out["gen1"] = compiled.generate(IDS[:1], max_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=0)
    out["forwards"] = 1 + compiled.generator.stats.decode_steps
    out["counts"] = dict(COUNTS)
    out["gen2"] = compiled.generate(PADDED, attention_mask=MASK, max_new_tokens=MAX_NEW, eos_token_id=None,
                                    pad_token_id=0)
    out["weight_bytes"] = sum(t.numel() * t.element_size() for t in compiled.weights.values())
    decode = compiled.generator.decode.checker.plan  # the reference executor checks inputs against the plan
    op_of = {"braze.ops.collectives.all_reduce_in_place": "braze.all_reduce.default"}  # the in-place plan form
    targets = [op_of.get(s.target, s.target) for s in decode.steps]
    out["decode_collectives"] = [t for t in targets if t and "braze.all_" in t]
    reduced = {o for s, t in zip(decode.steps, targets) if t == "braze.all_reduce.default" for o in s.outputs}
    out["ops_after_reduce"] = sorted({s.launcher or s.target for s in decode.steps if set(s.inputs) & reduced})
    return out


class _RankZeroDrafter(_OracleTreeDrafter):
    """Drafts plain decoding's continuation (a path) on rank 0 and fails on any other rank: under tensor
    parallelism only rank 0 drafts, the others verify what it broadcasts."""

    def __init__(self, continuations: dict, rank: int):
        super().__init__(continuations, 256, branching=False)
        self.rank = rank

    def draft(self, req, max_spec_tokens, **kw):
        assert self.rank == 0, f"rank {self.rank} drafted: only rank 0 drafts under tensor parallelism"
        return super().draft(req, max_spec_tokens, **kw)


def spec_checks(rank: int, compiled) -> dict:
    """Speculative greedy decoding on this rank's shard, batch 1 (one row's loop) and the left-padded batch (one
    verify forward per step): rank 0 drafts and broadcasts (_RankZeroDrafter)."""
    from braze.runtime.speculate import SpeculativeRunner

    out = {}
    for key, ids, mask in (("spec1", IDS[:1], torch.ones_like(IDS[:1])), ("spec2", PADDED, MASK)):
        plain = compiled.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=None,
                                  pad_token_id=0)
        cont = {tuple(ids[b][mask[b].bool()].tolist()): plain[b, ids.shape[1]:].tolist() for b in range(len(ids))}
        runner = compiled.generator.spec = SpeculativeRunner(compiled.generator, adaptive=False)
        runner.drafter = _RankZeroDrafter(cont, rank)
        out[key] = compiled.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=None,
                                     pad_token_id=0, speculate=True, max_spec_tokens=3)
        out[key + "_accepted"] = runner.stats.accepted_drafts
    return out


def rank_checks(rank: int, world: int, names: tuple[str, ...], package: str | None) -> dict:
    """Every check one rank runs (spawned by braze.distributed.spawn): reference-executor compiles of
    `names`; with `package` (a directory), a 1-layer Llama on the generated kernels, saved as a sharded package,
    loaded back and run, and loaded with the ranks' shards swapped; (rank 0, world 2) the refused configs."""
    import warnings

    # the vocab-parallel embedding's masked_fill (inserted after capture) once cast its mask to fp32 for tl.where
    warnings.filterwarnings("error", "tl.where with a non-boolean condition")
    results = {}
    for name in names:
        compiled = braze.compile(make_model(name), tp=world, executor="reference", max_seq=32, max_batch=2,
                                 **QUANT.get(name, {}))
        results[name] = run_model(compiled)
        results[name]["notes"] = [n for p in compiled.report.passes if p.name == "shard_tensor_parallel"
                                  for n in p.notes]
        if name == "llama":
            results[name].update(spec_checks(rank, compiled))
    if package:
        compiled = braze.compile(make_model("llama", layers=1), tp=world, executor="interpret", max_seq=32,
                                 max_batch=2)
        results["interpret"] = run_interpret(compiled)
        results["reduce_steps"] = [(s.target, s.params.get("in_place")) for s in compiled.generator.decode.plan.steps
                                   if "all_reduce" in (s.target or "")]
        for policy in KV_POLICIES:  # KV-cache compression per rank: each compresses its own kv heads
            results[f"kv_{policy}"] = run_compressed(policy, world)
        results.update(package_checks(rank, compiled, Path(package)))
    if rank == 0 and world == 2:  # refused before any collective: one rank is enough
        for key, name, tp in (("world", "llama", 2 * world), ("heads", "heads3", world)):
            try:
                braze.compile(make_model(name, layers=1), tp=tp, executor="reference", max_seq=32, max_batch=2)
                results[key] = None
            except ConfigError as e:
                results[key] = str(e)
    return results


def package_checks(rank: int, compiled, root: Path) -> dict:
    """Save each rank's shard, load it back and run it; then refuse a copy whose rank directories are swapped."""
    import torch.distributed as dist

    compiled.save(root / "pkg")
    loaded = braze.load(root / "pkg", executor="interpret")
    out = {"package": run_interpret(loaded), "package_files": sorted(p.name for p in (root / "pkg").iterdir()),
           "package_bytes": sum(t.numel() * t.element_size() for t in loaded.weights.values())}
    from braze.runtime.speculate import SpeculativeRunner

    runner = loaded.generator.spec = SpeculativeRunner(loaded.generator, adaptive=False)  # a loaded shard knows its tp
    runner.drafter = _RankZeroDrafter({tuple(IDS[0].tolist()): out["package"]["gen1"][0, IDS.shape[1]:].tolist()}, rank)
    out["package_spec"] = loaded.generate(IDS[:1], max_new_tokens=3, eos_token_id=None, pad_token_id=0,
                                          speculate=True, max_spec_tokens=2)
    out["package_spec_accepted"] = runner.stats.accepted_drafts
    outside = IDS.clone()
    outside[0, 1] = loaded.model_config.vocab_size  # the whole vocabulary's bound, not the rank's shard's
    try:
        loaded(outside)
        out["outside_vocab"] = None
    except braze.InputMismatchError as e:
        out["outside_vocab"] = str(e)
    if rank == 0:
        shutil.copytree(root / "pkg", root / "swapped")
        for a, b in (("rank0", "tmp"), ("rank1", "rank0"), ("tmp", "rank1")):
            (root / "swapped" / a).rename(root / "swapped" / b)
    dist.barrier()
    try:
        braze.load(root / "swapped", executor="interpret")
        out["swapped"] = None
    except braze.PackageError as e:
        out["swapped"] = str(e)
    return out


KV_POLICIES = ("keydiff", "rkv")  # per-head policies (adakv / chunkkv select across heads: refused under tp > 1)


def run_compressed(policy: str, world: int) -> torch.Tensor:
    """Greedy tokens of a 1-layer Llama on the generated kernels with kv_compression (rkv: budget 16 + decode
    re-compression twice in 18 tokens)."""
    compiled = braze.compile(make_model("llama", layers=1), tp=world, executor="interpret", max_seq=48, max_batch=2,
                             kv_compression=policy, kv_budget=16 if policy == "rkv" else 0.5, kv_window=4)
    ids = torch.randint(3, 200, (2, 30), generator=torch.Generator().manual_seed(0))
    return compiled.generate(ids, max_new_tokens=18 if policy == "rkv" else 6, eos_token_id=None, pad_token_id=0)


def run_interpret(compiled) -> dict:
    return {"logits": compiled(IDS).logits,
            "gen1": compiled.generate(IDS[:1], max_new_tokens=3, eos_token_id=None, pad_token_id=0)}


@functools.cache
def baseline(name: str) -> dict:
    """The tp=1 compile's results."""
    if name.startswith("kv_"):
        return run_compressed(name.removeprefix("kv_"), 1)
    if name == "interpret":
        compiled = braze.compile(make_model("llama", layers=1), executor="interpret", max_seq=32, max_batch=2)
        return {**run_interpret(compiled), "weight_bytes": sum(t.nbytes for t in compiled.weights.values())}
    return run_model(braze.compile(make_model(name), executor="reference", max_seq=32, max_batch=2,
                                   **QUANT.get(name, {})))


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    return spawn(2, rank_checks, ("llama", "qwen2", "mqa", "phi", *QUANT), str(tmp_path_factory.mktemp("tp2")))


@pytest.fixture(scope="module")
def world4():
    return spawn(4, rank_checks, ("llama",), None)


def _same_as_tp1(ranks: list[dict], name: str) -> None:
    base = baseline(name)
    for r in ranks:
        got = r[name]
        torch.testing.assert_close(got["logits"], base["logits"], atol=1e-5, rtol=1e-5)
        assert torch.equal(got["gen1"], base["gen1"])
        assert torch.equal(got["gen2"], base["gen2"])


@pytest.mark.parametrize("name", ["llama", "qwen2", "mqa", "phi"])
def test_tp2_logits_and_greedy_generation_match_tp1(world2, name):
    """phi: partial rotary (q / k sliced and concatenated along head dims), a GELU MLP, and biases on the
    row-parallel linears (added once, after the all-reduce)."""
    _same_as_tp1(world2, name)
    notes = world2[0][name]["notes"]
    assert sum("row-parallel + all_reduce" in n for n in notes) == 2 * LAYERS, notes
    assert any("logits all-gathered" in n for n in notes) and any("vocab-parallel embedding" in n for n in notes)


@pytest.mark.parametrize("name", sorted(QUANT))
def test_tp2_quantized_matches_tp1_quantized(world2, name):
    """int6 (rtn) and DFloat11 under tp=2: each rank quantizes / compresses its own shard (the passes run after
    sharding), and the logits equal the tp=1 quantized compile's within 1e-5, greedy tokens identical; each rank
    holds about half the quantized weight bytes."""
    _same_as_tp1(world2, name)
    for r in world2:
        assert r[name]["weight_bytes"] < 0.6 * baseline(name)["weight_bytes"], name


def test_tp4_logits_and_greedy_generation_match_tp1(world4):
    """Tiny Llama has 2 KV heads: at tp=4 each rank keeps the one its query head reads."""
    _same_as_tp1(world4, "llama")


def test_speculation_drafts_on_rank_zero_and_matches_tp1(world2, world4):
    """Speculative decoding under tp=2 and tp=4: rank 0 drafts and broadcasts (another rank's drafter fails the
    test if called), drafts are accepted, and every rank emits the tp=1 greedy tokens (batch 1, padded batch)."""
    base = baseline("llama")
    for ranks in (world2, world4):
        for r in ranks:
            got = r["llama"]
            assert torch.equal(got["spec1"], base["gen1"]) and torch.equal(got["spec2"], base["gen2"])
        accepted = {(r["llama"]["spec1_accepted"], r["llama"]["spec2_accepted"]) for r in ranks}
        assert len(accepted) == 1 and min(accepted.pop()) > 0, accepted


def test_collectives_per_decode_step_two_per_layer_plus_embedding(world2, world4):
    for r in world2 + world4:
        got = r["llama"]
        # o_proj and down_proj per layer, plus the embedding's rows; the logits are all-gathered
        assert got["counts"] == {"all_reduce": (2 * LAYERS + 1) * got["forwards"], "all_gather": got["forwards"]}
        assert sorted(got["decode_collectives"]) == (["braze.all_gather.default"]
                                                     + ["braze.all_reduce.default"] * (2 * LAYERS + 1))
        # the residual add is folded into rank 0's partial product: a reduced hidden state goes straight into
        # the next linears (norm prologue, residual epilogue; on rank 0, whose o_proj / down_proj carry the
        # residual, the decode layer's attention and MLP blocks), never through an add
        allowed = {"matmul", "attention_block", "mlp_block"}
        assert "matmul" in got["ops_after_reduce"] and set(got["ops_after_reduce"]) <= allowed, got["ops_after_reduce"]


def _sharded_bytes(model) -> int:
    """Bytes of the weights tensor parallelism splits (projections, lm_head, token embeddings; not norms)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if n.endswith(("proj.weight", "proj.bias", "embed_tokens.weight")) or n.startswith("lm_head"))


def test_each_rank_holds_its_shard_of_the_weights(world2, world4):
    """Every projection, the lm_head and the token embeddings are split 1/N (KV heads exactly so where N divides
    them); norms are replicated."""
    model = make_model("llama")
    total = baseline("llama")["weight_bytes"]
    split = _sharded_bytes(model)
    for ranks, world in ((world2, 2), (world4, 4)):
        kv_extra = 0
        if world == 4:  # 2 KV heads over 4 ranks: each keeps a whole KV head (1/2 of K and V, not 1/4)
            kv = sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                     if n.endswith(("k_proj.weight", "v_proj.weight")))
            kv_extra = kv // 2 - kv // 4
        for r in ranks:
            assert r["llama"]["weight_bytes"] == total - split + split // world + kv_extra
    assert world2[0]["llama"]["weight_bytes"] < 0.51 * total
    assert world4[0]["llama"]["weight_bytes"] < 0.28 * total  # 1/4, plus the whole KV heads and the norms


def test_bad_tp_is_one_line_config_error(world2):
    world_err, heads_err = world2[0]["world"], world2[0]["heads"]
    assert world_err and "\n" not in world_err and "tp=4" in world_err and "world size (2)" in world_err
    assert heads_err and "\n" not in heads_err and "3 attention heads" in heads_err
    with pytest.raises(ConfigError, match="initialized torch.distributed process group") as e:
        braze.compile(make_model("llama", layers=1), tp=2)
    assert "\n" not in str(e.value)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ConfigError, match="tp must be a positive integer"):
            braze.compile(make_model("llama", layers=1), tp=bad)


def test_generated_kernels_under_the_interpreter(world2):
    """The interpret executor runs each rank's plan: its generated kernels, the collectives as plan steps."""
    base = baseline("interpret")
    for r in world2:
        torch.testing.assert_close(r["interpret"]["logits"], base["logits"], atol=1e-5, rtol=1e-5)
        assert torch.equal(r["interpret"]["gen1"], base["gen1"])


@pytest.mark.parametrize("policy", KV_POLICIES)
def test_kv_compression_per_rank_matches_tp1(world2, policy):
    """Each rank compresses its own kv heads' caches with the kv_compress kernels (prefill; rkv also during
    decoding): greedy tokens equal tp=1's."""
    base = baseline(f"kv_{policy}")
    for r in world2:
        assert torch.equal(r[f"kv_{policy}"], base)


def test_all_reduces_sum_in_place_of_their_input(world2):
    """Each decode all-reduce (embedding, then o_proj and down_proj of the 1-layer model) reads a kernel's output
    that nothing else reads, so the plan sums into that buffer (no copy): the interpret runs above prove the
    memory plan keeps it alive (their logits and tokens equal tp=1's)."""
    for r in world2:
        assert r["reduce_steps"] == [("braze.ops.collectives.all_reduce_in_place", True)] * 3


def test_sharded_package_loads_and_runs_per_rank(world2):
    """`compiled.save` on each rank writes rank<r>/ and the shard index; `braze.load` on each rank reads its own."""
    base = baseline("interpret")
    for rank, r in enumerate(world2):
        assert r["package_files"] == ["rank0", "rank1", "shards.json"]
        torch.testing.assert_close(r["package"]["logits"], base["logits"], atol=1e-5, rtol=1e-5)
        assert torch.equal(r["package"]["gen1"], base["gen1"])
        # speculation on a loaded shard: rank 0 drafts (the shard's compile options say tp=2), drafts accepted
        assert torch.equal(r["package_spec"], base["gen1"]) and r["package_spec_accepted"] > 0
        assert r["package_bytes"] < 0.51 * base["weight_bytes"]
        vocab = int(r["outside_vocab"].split("holds id ")[1].split(",")[0])
        assert r["outside_vocab"].endswith(f"outside the embedding table's rows [0, {vocab})")
        other = 1 - rank
        assert r["swapped"] == (f"rank {rank}: {r['swapped'].split(': ')[1].split(' is not')[0]} is not the shard "
                                f"shards.json lists for rank {rank} (it is rank {other}'s shard)")
        assert f"rank{rank}/manifest.json" in r["swapped"] and "\n" not in r["swapped"]
