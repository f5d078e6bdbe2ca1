"""KV-cache compression (kv_compression=...): each policy's kept set against a plain loop oracle of its paper's rule
on random K/V, compaction, per-head starts in the decode kernel, and generation over the compressed cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import braze
from braze.kvcompress import compact, select_keep
from braze.kvcompress.policy import ADAKV_SAFEGUARD, CHUNK, POLICIES, POOL_KERNEL
from braze.models import tiny_causal_lm
from braze.runtime.errors import ConfigError, ShapeOutOfRangeError

B, HQ, HKV, P, D, WINDOW = 2, 4, 2, 60, 16, 8
PAD = (0, 7)  # left padding per row


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(B, HKV, P, D, generator=g)
    q_win = torch.randn(B, HQ, WINDOW, D, generator=g)
    valid = torch.arange(P)[None] >= torch.tensor(PAD)[:, None]
    return keys, q_win, valid


# ---- oracles: one row and head at a time, the papers' rules written out -------------------------------------------
def _oracle_keydiff(keys, b, h):
    real = keys[b, h, PAD[b]:]
    anchor = torch.stack([k / k.norm() for k in real]).mean(0)
    return {PAD[b] + i: -float(k @ anchor / (k.norm() * anchor.norm())) for i, k in enumerate(real)}


def _oracle_snapkv(keys, q_win, b, h):
    """Window queries' causal softmax over the real keys, averaged over real queries, max-pooled, GQA-averaged."""
    group = HQ // HKV
    per_head = []
    for qh in range(h * group, (h + 1) * group):
        acc = [0.0] * P
        votes = 0
        for i in range(WINDOW):
            pos = P - WINDOW + i
            if pos < PAD[b]:
                continue
            votes += 1
            logits = {j: float(q_win[b, qh, i] @ keys[b, h, j]) / math.sqrt(D) for j in range(PAD[b], pos + 1)}
            top = max(logits.values())
            z = sum(math.exp(v - top) for v in logits.values())
            for j, v in logits.items():
                acc[j] += math.exp(v - top) / z
        acc = [a / max(votes, 1) for a in acc]
        r = POOL_KERNEL // 2
        cut = P - WINDOW  # pooled over the keys before the window
        per_head.append([max(acc[max(0, j - r):min(cut, j + r + 1)]) if j < cut else acc[j] for j in range(P)])
    return {j: sum(s[j] for s in per_head) / group for j in range(PAD[b], P)}


def _top(scores: dict, keep: int, forced: set) -> set:
    rest = sorted((j for j in scores if j not in forced), key=lambda j: (-scores[j], j))
    return forced | set(rest[:keep - len(forced)])


def _recent(b):
    return {j for j in range(P - WINDOW, P) if j >= PAD[b]}


def _mask_of(kept: dict) -> torch.Tensor:
    m = torch.zeros(B, HKV, P, dtype=torch.bool)
    for (b, h), js in kept.items():
        m[b, h, sorted(js)] = True
    return m


def _select(policy, keys, q_win, valid, keep, end=None):
    t = torch.tensor([keep])
    return select_keep(policy, keys, valid, t, torch.tensor([end or keep]), WINDOW, q_win, D ** -0.5)


@pytest.mark.parametrize("keep", [12, 30])
def test_keydiff_keeps_the_oracles_tokens(keep):
    keys, q_win, valid = _inputs(1)
    kept = {(b, h): _top(_oracle_keydiff(keys, b, h), min(keep, P - PAD[b]), _recent(b))
            for b in range(B) for h in range(HKV)}
    assert torch.equal(_select("keydiff", keys, None, valid, keep), _mask_of(kept))


def _oracle_rkv(keys, q_win, b, h):
    """R-KV's rule on the row's real keys (the reference code's update_kv, unpadded): importance (window logits
    averaged over the GQA group, softmax over the keys before the window, mean over the window, max-pool 7) * 0.1
    - redundancy (key cosine similarities, each key's last near-duplicate above 0.5 zeroed, mean, softmax) * 0.9."""
    real = keys[b, h, PAD[b]:]
    n, group = real.shape[0], HQ // HKV
    logits = (q_win[b, h * group:(h + 1) * group] @ real.T).mean(0) / math.sqrt(D)  # [W, n]
    probs = torch.softmax(logits[:, : n - WINDOW], dim=-1).mean(0)
    importance = F.max_pool1d(probs[None], kernel_size=7, stride=1, padding=3)[0]
    unit = real / (real.norm(dim=-1, keepdim=True) + 1e-8)
    sim = unit @ unit.T
    sim.fill_diagonal_(0.0)
    last = torch.where(sim > 0.5, torch.arange(n), torch.zeros(n, n, dtype=torch.long)).max(-1).values
    sim[torch.arange(n), last] = 0.0
    redundancy = sim.mean(0).softmax(-1)[: n - WINDOW]
    score = importance * 0.1 - redundancy * 0.9
    return {PAD[b] + j: float(score[j]) for j in range(n - WINDOW)}


@pytest.mark.parametrize("keep", [12, 30])
def test_rkv_keeps_the_oracles_tokens(keep):
    keys, q_win, valid = _inputs(7)
    keys[:, :, 20:26] = keys[:, :, 30:31] + 0.05 * keys[:, :, 20:26]  # near-duplicates: the redundancy term bites
    kept = {(b, h): _top(_oracle_rkv(keys, q_win, b, h), min(keep, P - PAD[b]), _recent(b))
            for b in range(B) for h in range(HKV)}
    got = _select("rkv", keys, q_win, valid, keep)
    assert torch.equal(got, _mask_of(kept))
    assert not got[:, :, 20:26].all()  # some duplicates dropped


def test_rkv_query_rings_hold_the_latest_window_in_cache_slot_order():
    """Prefill writes the window's queries (RoPE applied) at ring slot (cache slot % window) of the compacted
    cache; each decode step at cache_len % window: the ring always holds the last `window` queries."""
    from braze.ops.kv_compress import kv_compress_reference, record_query_reference
    from braze.ops.library import rope_reference

    torch.manual_seed(3)
    w, end, p = 4, 10, 14
    q, k = torch.randn(1, HQ, p, D), torch.randn(1, HKV, 16, D)
    cos, sin = torch.randn(1, p, D), torch.randn(1, p, D)
    ring = torch.zeros(1, HQ, w, D)
    ck, cv, starts = torch.zeros(1, HKV, 16, D), torch.zeros(1, HKV, 16, D), torch.zeros(1, HKV, dtype=torch.int32)
    kv_compress_reference(q, k, k.clone(), torch.zeros(1, dtype=torch.int32), ck, cv, torch.tensor([end, end]),
                          starts, D ** -0.5, "rkv", w, cos, sin, ring)
    roped = rope_reference(q, cos, sin)
    for j in range(w):  # prompt position p - w + j sits in cache slot end - w + j
        assert torch.equal(ring[0, :, (end - w + j) % w], roped[0, :, p - w + j])
    qd, cd, sd = torch.randn(1, HQ, 1, D), torch.randn(1, 1, D), torch.randn(1, 1, D)
    record_query_reference(qd, ring, torch.tensor([end]), cd, sd)
    assert torch.equal(ring[0, :, end % w], rope_reference(qd, cd, sd)[0, :, 0])
    assert torch.equal(ring[0, :, (end + 1) % w], roped[0, :, p - w + 1])  # the oldest but one is still there


@pytest.mark.parametrize("keep", [12, 30])
def test_snapkv_keeps_the_oracles_tokens(keep):
    keys, q_win, valid = _inputs(2)
    kept = {(b, h): _top(_oracle_snapkv(keys, q_win, b, h), min(keep, P - PAD[b]), _recent(b))
            for b in range(B) for h in range(HKV)}
    assert torch.equal(_select("snapkv", keys, q_win, valid, keep), _mask_of(kept))


@pytest.mark.parametrize("keep, cap", [(12, 24), (20, 22), (50, 55)])
def test_adakv_allocates_the_budget_across_heads_like_the_oracle(keep, cap):
    """Ada-KV: each head keeps its window and top safeguard share; the rest of the row's budget (heads x keep)
    goes to the highest scores over all heads jointly, a head holding at most `cap` tokens."""
    keys, q_win, valid = _inputs(3)
    mask = _select("adakv", keys, q_win, valid, keep, cap)
    safe = max(WINDOW, int(keep * ADAKV_SAFEGUARD))  # per head: the window, or the top alpha share if more
    for b in range(B):
        scores = {h: _oracle_snapkv(keys, q_win, b, h) for h in range(HKV)}
        kept = {h: set(_recent(b)) for h in range(HKV)}
        for h in range(HKV):
            kept[h] = _top(scores[h], max(len(kept[h]), safe), kept[h])
        pool = sorted(((scores[h][j], -j, h, j) for h in range(HKV) for j in scores[h] if j not in kept[h]),
                      reverse=True)
        total = HKV * min(keep, P - PAD[b])
        for _, _, h, j in pool:
            if sum(map(len, kept.values())) == total:
                break
            if len(kept[h]) < cap:
                kept[h].add(j)
        for h in range(HKV):
            assert set(torch.nonzero(mask[b, h]).flatten().tolist()) == kept[h], (b, h)
    counts = mask.sum(-1)
    assert counts.max() <= cap and (counts[0] != counts[0, 0]).any()  # heads hold different lengths


@pytest.mark.parametrize("keep", [WINDOW + CHUNK, WINDOW + 2 * CHUNK - 5])
def test_chunkkv_keeps_whole_chunks_like_the_oracle(keep):
    """ChunkKV: chunks of CHUNK tokens from the first real token, scored by the mean over the chunk of the SnapKV
    scores summed over heads; best chunks first (the last one that fits partly: its first tokens), same set in every
    head; the recent window always."""
    keys, q_win, valid = _inputs(4)
    mask = _select("chunkkv", keys, q_win, valid, keep)
    for b in range(B):
        summed = {j: sum(_oracle_snapkv(keys, q_win, b, h)[j] for h in range(HKV)) for j in range(PAD[b], P)}
        chunks = {}
        for j in summed:
            chunks.setdefault((j - PAD[b]) // CHUNK, []).append(j)
        order = sorted(chunks, key=lambda c: -sum(summed[j] for j in chunks[c]) / len(chunks[c]))
        kept = set(_recent(b))
        for c in order:
            for j in chunks[c]:
                if len(kept) < keep:
                    kept.add(j)
        for h in range(HKV):
            assert set(torch.nonzero(mask[b, h]).flatten().tolist()) == kept


def test_compact_right_aligns_kept_tokens_and_returns_starts():
    torch.manual_seed(5)
    full = torch.randn(B, HKV, P + 4, D)  # the prefill cache is larger than the prompt
    keep = torch.rand(B, HKV, P) < 0.3
    dest = torch.full((B, HKV, 40, D), float("nan"))
    end = int(keep.sum(-1).max()) + 2
    start = compact(full, keep, dest, torch.tensor([end]))
    for b in range(B):
        for h in range(HKV):
            idx = torch.nonzero(keep[b, h]).flatten()
            s = end - len(idx)
            assert int(start[b, h]) == s
            assert torch.equal(dest[b, h, s:end], full[b, h, idx])
            assert torch.count_nonzero(dest[b, h, :s]) == 0 and torch.count_nonzero(dest[b, h, end:]) == 0


@pytest.mark.parametrize("policy", POLICIES)
def test_compressed_attention_equals_attention_over_the_kept_tokens(policy):
    """braze::kv_compress + decode over the compacted cache = attention over the full cache with the dropped tokens
    masked (per row and, for adakv, per head)."""
    from braze.ops.kv_compress import kv_compress_reference
    from braze.ops.library import cached_attention_reference

    torch.manual_seed(6)
    s_max, cap, keep = 80, 40, 20
    k_cache, v_cache = torch.randn(B, HKV, s_max, D), torch.randn(B, HKV, s_max, D)
    q = torch.randn(B, HQ, P, D)
    cos, sin = torch.ones(B, P, D), torch.zeros(B, P, D)
    kv_start = torch.tensor(PAD, dtype=torch.int32)
    ck, cv = torch.zeros(B, HKV, cap, D), torch.zeros(B, HKV, cap, D)
    starts = torch.zeros(B, HKV, dtype=torch.int32)
    end = cap - 4 if policy == "adakv" else keep
    kv_compress_reference(q, k_cache, v_cache, kv_start, ck, cv, torch.tensor([keep, end]), starts, D ** -0.5,
                          policy, WINDOW, cos, sin)
    valid = torch.arange(P)[None] >= kv_start[:, None]
    mask = select_keep(policy, k_cache[:, :, :P], valid, torch.tensor([keep]), torch.tensor([end]), WINDOW,
                       q[:, :, -WINDOW:], D ** -0.5)
    qd, kd, vd = torch.randn(B, HQ, 1, D), torch.randn(B, HKV, 1, D), torch.randn(B, HKV, 1, D)
    cd, sd = torch.ones(B, 1, D), torch.zeros(B, 1, D)
    out = cached_attention_reference(qd, kd, vd, cd, sd, ck, cv, torch.tensor([end]), starts, D ** -0.5)
    keys = torch.cat([k_cache[:, :, :P], kd], 2).repeat_interleave(HQ // HKV, 1)
    values = torch.cat([v_cache[:, :, :P], vd], 2).repeat_interleave(HQ // HKV, 1)
    seen = torch.cat([mask, torch.ones(B, HKV, 1, dtype=torch.bool)], 2).repeat_interleave(HQ // HKV, 1)
    scores = (qd @ keys.transpose(-1, -2)) * D ** -0.5
    want = torch.softmax(scores.masked_fill(~seen[:, :, None], -math.inf), -1) @ values
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [1, 3])
def test_decode_kernel_per_head_start_matches_masked_reference(splits):
    """The split-KV decode kernel with head_start (adakv: kv_start [B, Hkv]) under the interpreter."""
    from braze.kernels import INTERPRETER
    from braze.kernels.attention import DecodeAttentionSpec, render_decode_attention, split_kv_decode
    from braze.runtime.kernel_loader import load_kernel_module

    torch.manual_seed(7)
    s_max = 48
    q = torch.randn(B, HQ, D)
    kc, vc = torch.randn(B, HKV, s_max, D), torch.randn(B, HKV, s_max, D)
    cache_len = torch.tensor([39])
    kv_start = torch.tensor([[3, 30], [17, 0]], dtype=torch.int32)
    spec = DecodeAttentionSpec("dec", has_kv_start=True, out_dtype="float32", from_cache_len=True, head_start=True)
    out = torch.full((B, HQ, D), float("nan"))
    split_kv_decode(load_kernel_module(render_decode_attention(spec)), "dec", q, kc, vc, out, cache_len, kv_start,
                    D ** -0.5, INTERPRETER, splits=splits, from_cache_len=True, head_start=True)
    start = kv_start.long().repeat_interleave(HQ // HKV, 1)
    pos = torch.arange(s_max)
    seen = (pos[None, None] >= start[..., None]) & (pos <= 39)
    keys, values = kc.repeat_interleave(HQ // HKV, 1), vc.repeat_interleave(HQ // HKV, 1)
    scores = torch.einsum("bhd,bhsd->bhs", q, keys) * D ** -0.5
    want = torch.einsum("bhs,bhsd->bhd", torch.softmax(scores.masked_fill(~seen, -math.inf), -1), values)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("splits, head_start", [(1, False), (3, False), (1, True), (3, True)])
def test_tree_decode_kernel_matches_the_reference(splits, head_start):
    """The deterministic verify's tree form of the split-KV decode kernel (tree_decode) under the interpreter = the
    op's reference: rows at different cache lengths, left padding per row or per kv head, a branching tree whose
    node 3's ancestors (0, 2, 3) are not consecutive slots, and a padding node (not under the pending token) that
    outputs 0; the KV axis in 1 or 3 splits."""
    from braze.kernels import INTERPRETER
    from braze.kernels.attention import DecodeAttentionSpec, render_decode_attention, tree_decode
    from braze.ops.library import _expand_kv, _masked_attention
    from braze.runtime.kernel_loader import load_kernel_module

    torch.manual_seed(5)
    s_max, sq = 48, 5
    q = torch.randn(B, HQ, sq, D)
    kc, vc = torch.randn(B, HKV, s_max, D), torch.randn(B, HKV, s_max, D)
    past = torch.tensor([20, 33])
    kv_start = torch.tensor([[3, 12], [0, 25]] if head_start else [5, 0], dtype=torch.int32)
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 1]],
                        dtype=torch.bool).expand(B, sq, sq)
    spec = DecodeAttentionSpec("tv", has_kv_start=True, out_dtype="float32", from_cache_len=True,
                               head_start=head_start, tree=True)
    out = torch.full_like(q, float("nan"))
    tree_decode(load_kernel_module(render_decode_attention(spec)), "tv", q, kc, vc, out, past, kv_start, tree,
                D ** -0.5, INTERPRETER, head_start=head_start, splits=splits)
    assert torch.equal(out[:, :, 4], torch.zeros(B, HQ, D))  # the padding node
    starts = kv_start if head_start else kv_start[:, None].expand(B, HKV)
    for b in range(B):
        n = int(past[b])
        visible = torch.zeros(sq - 1, n + sq, dtype=torch.bool)
        visible[:, :n] = True
        visible[:, n:] = tree[b, :4]
        keys, values = _expand_kv(kc[b:b + 1, :, :n + sq], vc[b:b + 1, :, :n + sq], HQ)
        want = _masked_attention(q[b:b + 1, :, :4], keys, values, visible, starts[b:b + 1], D ** -0.5)
        torch.testing.assert_close(out[b:b + 1, :, :4], want, atol=1e-5, rtol=1e-5)


def test_tree_verify_kernel_per_head_start_matches_the_reference():
    """The flash kernel in tree mode with kv_start [B, Hkv] (adakv's verify) under the interpreter = the op's
    reference (braze::tree_cached_attention), rows at different cache lengths, a branching tree."""
    from braze.kernels import INTERPRETER
    from braze.kernels.attention import AttentionSpec, flash_attention, render_attention
    from braze.ops.library import _expand_kv, _masked_attention
    from braze.runtime.kernel_loader import load_kernel_module

    torch.manual_seed(3)
    s_max, sq = 48, 4
    q = torch.randn(B, HQ, sq, D)
    kc, vc = torch.randn(B, HKV, s_max, D), torch.randn(B, HKV, s_max, D)
    past = torch.tensor([20, 33])
    kv_start = torch.tensor([[3, 12], [0, 25]], dtype=torch.int32)
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool).expand(B, sq, sq)
    module = load_kernel_module(render_attention(AttentionSpec("tv", has_kv_start=True, tree_mask=True,
                                                               out_dtype="float32")))
    out = torch.full_like(q, float("nan"))
    flash_attention(module.tv, q, kc, vc, out, D ** -0.5, INTERPRETER, kv_start=kv_start, tree_mask=tree,
                    past=past)
    for b in range(B):
        n = int(past[b])
        visible = torch.zeros(sq, n + sq, dtype=torch.bool)
        visible[:, :n] = True
        visible[:, n:] = tree[b]
        keys, values = _expand_kv(kc[b:b + 1, :, :n + sq], vc[b:b + 1, :, :n + sq], HQ)
        want = _masked_attention(q[b:b + 1], keys, values, visible, kv_start[b:b + 1], D ** -0.5)
        torch.testing.assert_close(out[b:b + 1], want, atol=1e-5, rtol=1e-5)


# ---- generation ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    model = tiny_causal_lm("llama", layers=1)
    ids = torch.randint(3, 200, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    base = braze.compile(model, max_seq=48, max_batch=2, executor="reference")
    return model, ids, mask, base.generate(ids, attention_mask=mask, max_new_tokens=6)


@pytest.mark.parametrize("policy", POLICIES)
def test_full_budget_reproduces_uncompressed_generation(lm, policy):
    model, ids, mask, want = lm
    cm = braze.compile(model, max_seq=48, max_batch=2, executor="reference", kv_compression=policy, kv_budget=1.0)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=6), want)


def test_cache_bytes_shrink_by_the_budget_and_the_report_says_so(lm):
    model, ids, mask, _ = lm
    cm = braze.compile(model, max_seq=48, max_batch=2, executor="reference", kv_compression="keydiff",
                       kv_budget=0.25, kv_window=4)
    out = cm.generate(ids, attention_mask=mask, max_new_tokens=4)
    assert out.shape == (2, 34)
    stats = cm.generator.stats
    assert stats.kv_cache_bytes * 4 == stats.extra["kv_cache_bytes_uncompressed"]  # measured on the tensors
    line = cm.report.extra["kv compression"]
    assert line.startswith("keydiff, budget 0.25 -> 12 of 48") and "25.0% kept" in line, line
    with pytest.raises(ShapeOutOfRangeError, match="kv_window"):
        cm.generate(ids, attention_mask=mask, max_new_tokens=9)  # 12 - 9 slots left for the prompt < kv_window


@pytest.mark.parametrize("policy", ["keydiff", "adakv", "rkv"])
def test_packages_and_the_compile_cache_hold_compression(lm, policy, tmp_path, monkeypatch):
    """A compressed compile saved as a package, and a compile-cache hit, generate what the compile did, with the
    same (compressed) cache bytes; adakv also round-trips its per-head starts."""
    model, ids, mask, _ = lm
    opts = dict(max_seq=48, max_batch=2, kv_compression=policy, kv_budget=0.5)
    cm = braze.compile(model, **opts)
    want = cm.generate(ids, attention_mask=mask, max_new_tokens=5)
    cm.save(tmp_path / "pkg")
    loaded = braze.load(tmp_path / "pkg")
    assert loaded.generator.compression == cm.generator.compression
    assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=5), want)
    assert loaded.generator.stats.kv_cache_bytes == cm.generator.stats.kv_cache_bytes
    monkeypatch.setenv("BRAZE_CACHE", "1")
    monkeypatch.setenv("BRAZE_CACHE_DIR", str(tmp_path / "cache"))
    assert braze.compile(model, **opts).report.extra["cache"].startswith("miss; stored as ")
    hit = braze.compile(model, **opts)
    assert hit.report.extra["cache"].startswith("hit: loaded "), hit.report.extra["cache"]
    assert torch.equal(hit.generate(ids, attention_mask=mask, max_new_tokens=5), want)
    # the package's verify plan reads the compressed cache too (rkv: and records the draft nodes' queries)
    assert torch.equal(loaded.generate(ids, attention_mask=mask, max_new_tokens=5, speculate=True), want)
    assert hit.generator.stats.kv_cache_bytes == cm.generator.stats.kv_cache_bytes
    assert hit.generator.stats.extra == cm.generator.stats.extra  # the uncompressed size it is measured against


@pytest.mark.parametrize("policy", ["snapkv", "adakv"])
def test_kernel_plans_match_the_reference_executor(lm, policy):
    """The interpreter plans (decode kernel over the compressed cache; adakv: per-head starts) = the reference."""
    model, ids, mask, _ = lm
    opts = dict(max_seq=48, max_batch=2, kv_compression=policy, kv_budget=0.5)
    ref = braze.compile(model, executor="reference", **opts).generate(ids, attention_mask=mask, max_new_tokens=5)
    cm = braze.compile(model, executor="interpret", **opts)
    assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=5), ref)
    assert "decode eager steps" not in cm.report.extra


def test_rkv_recompresses_during_decoding_and_kernels_match_the_reference(lm):
    """rkv, budget 16 + an interval of 8 decode slots: the 30-token prompt is compressed to 16 after prefill, and
    every 8 generated tokens the cache goes back to 16 (two times in 17 decode steps). The interpreter plans (decode
    kernels over the small cache, the queries recorded by a kernel, the re-compression by the prefill plan's
    kv_compress kernels) generate what the reference executor does."""
    from braze.kernels import recording_launches

    model, ids, mask, _ = lm
    opts = dict(max_seq=48, max_batch=2, kv_compression="rkv", kv_budget=16, kv_window=4)
    ref = braze.compile(model, executor="reference", **opts)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=18)
    cm = braze.compile(model, executor="interpret", **opts)
    with recording_launches() as seen:
        assert torch.equal(cm.generate(ids, attention_mask=mask, max_new_tokens=18), want)
    compactions = [launch for launch in seen if launch.name.endswith("_compact")]
    assert len(compactions) == 1 * (1 + 2)  # one layer: after prefill, then at each re-compression
    stats = cm.generator.stats
    assert stats.extra["kv_recompressions"] == 2 == ref.generator.stats.extra["kv_recompressions"]
    assert stats.kv_cache_bytes * 2 == stats.extra["kv_cache_bytes_uncompressed"]  # 24 of 48 slots, measured
    assert "every 8 tokens" in cm.report.extra["kv compression"]
    assert "decode eager steps" not in cm.report.extra  # the query ring is recorded by a kernel


@pytest.mark.parametrize("policy, tree, executor", [
    ("keydiff", False, "reference"), ("snapkv", True, "reference"), ("chunkkv", True, "reference"),
    ("adakv", True, "reference"), ("keydiff", True, "interpret"), ("adakv", False, "interpret"),
])
def test_speculation_over_the_compressed_cache_is_exact(lm, policy, tree, executor):
    """Speculative decoding verifies drafts over the compacted cache (the verify plan's caches are declared at the
    compressed capacity; positions continue the prompt's while slots continue the kept tokens): greedy tokens equal
    plain decoding over the same compressed cache, with drafts accepted (path, and trees whose accepted nodes
    are compacted), in a left-padded batch; the runner holds the compressed cache (bytes measured). The
    interpreter case pads to CUDA-graph shapes (batch and draft buckets) as a GPU does."""
    from braze.runtime.speculate import K_BUCKETS, SpeculativeRunner
    from tests.test_deterministic import _OracleTreeDrafter

    model, ids, mask, _ = lm
    cm = braze.compile(model, max_seq=48, max_batch=2, executor=executor, kv_compression=policy, kv_budget=0.5,
                       kv_window=4)
    plain = cm.generate(ids, attention_mask=mask, max_new_tokens=10)
    compressed_bytes = cm.generator.stats.kv_cache_bytes
    full_bytes = cm.generator.stats.extra["kv_cache_bytes_uncompressed"]
    runner = cm.generator.spec = SpeculativeRunner(cm.generator, adaptive=False)
    if executor == "interpret":
        runner.pad_batches, runner.k_buckets = True, K_BUCKETS
    cont = {tuple(ids[b][mask[b].bool()].tolist()): plain[b, ids.shape[1]:].tolist() for b in range(2)}
    runner.drafter = _OracleTreeDrafter(cont, 256, branching=tree)
    spec = cm.generate(ids, attention_mask=mask, max_new_tokens=10, speculate=True, spec_tree=tree,
                       max_spec_tokens=4)
    assert torch.equal(spec, plain)
    stats = runner.stats
    assert stats.verify_steps > 0 and stats.accepted_drafts >= stats.verify_steps, stats
    assert stats.tree_steps > 0 if tree else stats.tree_steps == 0
    # adakv's heads may hold up to twice the mean budget: its cache has twice the slots
    assert runner.kv_cache_bytes == compressed_bytes == full_bytes // (1 if policy == "adakv" else 2)


@pytest.mark.parametrize("tree, executor", [(False, "reference"), (True, "reference"), (True, "interpret")])
def test_rkv_speculation_recompresses_rows_where_decoding_does(lm, tree, executor, monkeypatch):
    """rkv under speculation (budget 16, re-compressed every 8 slots, window 4): rows of the left-padded batch
    fill their caches at different steps, and each is compacted back to the budget when full, at the slot where
    plain decoding compacts it, scored with the same ring of queries (the verify records every node's, the runner
    keeps the accepted ones at their slots); drafts (paths, or trees whose accepted nodes are compacted) are
    accepted and the tokens equal plain decoding's."""
    import braze.runtime.kv_compression as kvc
    from braze.runtime.speculate import SpeculativeRunner
    from tests.test_deterministic import _OracleTreeDrafter

    rings: dict[int, list] = {}  # row -> the query rings each of its re-compressions scored with, in order
    real = kvc.recompress

    def spy(spec, call, kv_start, row=None):
        for b in range(kv_start.shape[0]) if row is None else [row]:
            rings.setdefault(b, []).append(torch.cat([q[b] for q in call.queries.values()]).clone())
        return real(spec, call, kv_start, row)

    monkeypatch.setattr(kvc, "recompress", spy)
    model, ids, mask, _ = lm
    cm = braze.compile(model, max_seq=48, max_batch=2, executor=executor, kv_compression="rkv", kv_budget=16,
                       kv_window=4)
    plain = cm.generate(ids, attention_mask=mask, max_new_tokens=18)
    assert cm.generator.stats.extra["kv_recompressions"] == 2
    want, rings = rings, {}
    runner = cm.generator.spec = SpeculativeRunner(cm.generator, adaptive=False)
    cont = {tuple(ids[b][mask[b].bool()].tolist()): plain[b, ids.shape[1]:].tolist() for b in range(2)}
    runner.drafter = _OracleTreeDrafter(cont, 256, branching=tree)
    spec = cm.generate(ids, attention_mask=mask, max_new_tokens=18, speculate=True, spec_tree=tree,
                       max_spec_tokens=4)
    assert torch.equal(spec, plain)
    # row by row: once or twice each (a row whose last token is a bonus never needs the second), each scored with
    # the queries plain decoding recorded (the rejected nodes' queries are not left in the ring)
    assert 2 < cm.generator.stats.extra["kv_recompressions"] <= 4
    for b in range(2):
        assert rings.get(b), f"row {b} was never re-compressed"
        assert len(rings[b]) <= len(want[b])
        for got, ref in zip(rings[b], want[b]):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert runner.stats.accepted_drafts >= runner.stats.verify_steps > 0
    assert runner.stats.tree_steps > 0 if tree else runner.stats.tree_steps == 0


def test_deterministic_adakv_speculation_is_bitwise_plain_decoding(lm):
    """deterministic=True with adakv (per-head cache lengths): the verify plan's tree decode kernel starts each kv
    head at its own kv_start, so branching-tree speculation over the compressed cache emits plain decoding's
    tokens from bitwise the same logits, drafts accepted, in a left-padded batch (interpreter)."""
    from braze.runtime.speculate import SpeculativeRunner
    from tests.test_deterministic import _OracleTreeDrafter, _same_bits

    model, ids, mask, _ = lm
    cm = braze.compile(model, max_seq=48, max_batch=2, kv_compression="adakv", kv_budget=0.5, kv_window=4,
                       deterministic=True)
    assert cm.generator.compression.per_head
    kw = dict(attention_mask=mask, max_new_tokens=10, output_logits=True)
    plain = cm.generate(ids, **kw)
    runner = cm.generator.spec = SpeculativeRunner(cm.generator, adaptive=False)
    cont = {tuple(ids[b][mask[b].bool()].tolist()): plain.sequences[b, ids.shape[1]:].tolist() for b in range(2)}
    runner.drafter = _OracleTreeDrafter(cont, 256, branching=True)
    spec = cm.generate(ids, **kw, speculate=True, spec_tree=True, max_spec_tokens=4)
    assert torch.equal(spec.sequences, plain.sequences)
    assert _same_bits(spec.logits, plain.logits)
    assert runner.stats.tree_steps > 0 and runner.stats.accepted_drafts >= runner.stats.verify_steps > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_deterministic_compression_is_batch_invariant(lm, policy):
    """deterministic=True over a compressed cache: a request's logits (bitwise) and tokens are the same alone and
    left-padded in a batch with a longer companion, for prompts shorter than the budget (15 tokens) and than the
    window's safeguard (3). rkv (budget 16, 8 decode slots): the 20-token companion pads both to past the budget,
    yet each row is re-compressed at the steps where it is alone (twice in 24 tokens); adakv: the short row's
    padding is never in its heads' safeguard."""
    model = lm[0]
    rkv = policy == "rkv"
    cm = braze.compile(model, max_seq=48, max_batch=3, kv_compression=policy, kv_budget=16 if rkv else 0.5,
                       kv_window=4, deterministic=True)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 200, (n,), generator=g) for n in (15, 3, 20)]
    ids = torch.zeros(3, 20, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, 20 - p.numel():], mask[b, 20 - p.numel():] = p, 1
    kw = dict(max_new_tokens=24 if rkv else 8, output_logits=True, eos_token_id=None, pad_token_id=0)
    batch = cm.generate(ids, attention_mask=mask, **kw)
    if rkv:
        assert cm.generator.stats.extra["kv_recompressions"] == 2
    for b, p in enumerate(prompts[:2]):
        alone = cm.generate(p[None], **kw)
        if rkv:
            assert cm.generator.stats.extra["kv_recompressions"] == 2
        assert torch.equal(batch.sequences[b, 20:], alone.sequences[0, p.numel():]), (policy, p.numel())
        same = batch.logits[b].view(torch.int32) == alone.logits[0].view(torch.int32)
        assert bool(same.all()), (policy, p.numel(), "first different step", int((~same.all(-1)).nonzero()[0]))


@pytest.mark.parametrize("options, match", [
    ({"kv_compression": "h2o"}, "kv_compression='h2o' is not valid"),
    ({"kv_compression": "rkv", "kv_budget": 8, "kv_window": 8}, "not more than kv_window"),
    ({"kv_compression": "keydiff", "kv_budget": 0.0}, "fraction must be in"),
    ({"kv_compression": "keydiff", "kv_budget": 1000}, "token count must be in"),
    ({"kv_compression": "keydiff", "kv_budget": "half"}, "kv_budget must be"),
    ({"kv_compression": "keydiff", "kv_window": 0}, "kv_window must be"),
    ({"kv_compression": "adakv", "tp": 2}, "selects across all kv heads, which tp=2 splits"),
    ({"kv_compression": "chunkkv", "tp": 4}, "with tp > 1 use 'keydiff', 'snapkv' or 'rkv'"),
    # a budget the always-kept recent tokens fill (it compiled, then refused every prompt of 4+ tokens)
    ({"kv_compression": "snapkv", "kv_budget": 4}, "leaves 4 slots, not more than kv_window=16"),
    ({"kv_compression": "keydiff", "kv_window": 600}, "kv_window=600 is more than max_seq=64"),
    # options that only mean something with another one were silently ignored without it
    ({"kv_budget": 0.5}, "kv_budget=0.5 only applies with kv_compression, which is not set"),
    ({"df11_strategy": "fused"}, "df11_strategy='fused' only applies with quant='df11'"),
    ({"quant": "int6", "cast_bf16": True}, "cast_bf16=True only applies with quant='df11'"),
    ({"int6_act": "a8"}, "int6_act='a8' only applies with quant='int6'"),
    ({"target_check": "warn"}, "target_check='warn' only applies with targets"),
    # the report said both "fp32 atomics" (the fused DF11 GEMV) and "no float atomics" (deterministic)
    ({"quant": "df11", "df11_strategy": "fused", "deterministic": True}, "deterministic=True rules out"),
    ({"deterministic": "yes"}, "deterministic must be True or False, got 'yes'"),
])
def test_bad_options_are_one_line_config_errors(options, match):
    with pytest.raises(ConfigError, match=match) as e:
        braze.compile(torch.nn.Linear(2, 2), max_seq=64, **options)
    assert "\n" not in str(e.value)


def test_eval_cli_prints_the_kv_compression_table(capsys):
    from braze.cli import main

    assert main(["eval", "tests.tiny_factory:tiny_llama", "--kv-compression", "keydiff", "--kv-budgets", "0.5",
                 "--kv-context", "40"]) == 0
    out = capsys.readouterr().out
    assert "| full cache | 40/40 (100.0%) |" in out and "| keydiff | 20/40 (50.0%) |" in out
    assert "needles" in out and "(100.0%)" in out


def test_keydiff_and_snapkv_on_smollm2_layer_kv_match_kvpress_formulas():
    """SmolLM2's real post-RoPE keys and window queries of one layer: the kept sets equal kvpress's score formulas
    (KeyDiffPress.score; SnapKVPress.compute_window_attention + score, with max pooling) followed by a top-k."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from tests.smollm2_layer import smollm2_layer_kv

    layer = smollm2_layer_kv(3, 160)
    keys, cfg, hd = layer.keys, layer.config, layer.head_dim
    p, w, keep = keys.shape[2], WINDOW, 40
    q = layer.q[:, :, -w:]
    cos, sin = layer.cos, layer.sin
    q, _ = apply_rotary_pos_emb(q, q, cos[:, -w:], sin[:, -w:])
    valid = torch.ones(1, p, dtype=torch.bool)

    def topk_mask(scores):
        scores = scores.clone()
        scores[..., -w:] = float("inf")
        top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]  # max-pool ties: by position
        return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)

    anchor = F.normalize(keys, p=2, dim=-1).mean(dim=2, keepdim=True)  # kvpress KeyDiffPress.score
    want = topk_mask(-F.cosine_similarity(keys, anchor, dim=-1))
    got = select_keep("keydiff", keys, valid, torch.tensor([keep]), torch.tensor([keep]), w)
    assert torch.equal(got, want)

    group = cfg.num_attention_heads // cfg.num_key_value_heads  # kvpress SnapKVPress, max-pooled
    logits = q @ keys.repeat_interleave(group, 1).transpose(2, 3) / math.sqrt(hd)
    logits = logits + torch.triu(torch.full_like(logits, float("-inf")), diagonal=p - w + 1)
    weights = torch.softmax(logits, dim=-1, dtype=torch.float32)[..., :-w].mean(dim=-2)
    weights = F.max_pool1d(weights, kernel_size=POOL_KERNEL, padding=POOL_KERNEL // 2, stride=1)
    scores = F.pad(weights.view(1, cfg.num_key_value_heads, group, p - w).mean(2), (0, w), value=0.0)
    got = select_keep("snapkv", keys, valid, torch.tensor([keep]), torch.tensor([keep]), w, q, hd ** -0.5)
    assert torch.equal(got, topk_mask(scores))


def test_rkv_speculation_needs_a_verify_plan_that_records_queries():
    """Packages built before the verify plan recorded the draft nodes' queries would re-compress with stale rings:
    generate refuses speculation over them (one line); plans that record, or executors running the compiled graph
    (no plan object), pass."""
    from types import SimpleNamespace

    from braze.runtime.generate import _records_draft_queries

    def plan(*targets):
        return SimpleNamespace(plan=SimpleNamespace(steps=[SimpleNamespace(target=t) for t in targets]))

    assert not _records_draft_queries(plan(None, "braze.all_reduce.default"))
    assert _records_draft_queries(plan(None, "braze.kv_record_query.default"))
    kernel_step = SimpleNamespace(target=None, launcher="kv_compress", params={"record": True})
    assert _records_draft_queries(SimpleNamespace(plan=SimpleNamespace(steps=[kernel_step])))
    prefill_step = SimpleNamespace(target=None, launcher="kv_compress", params={"policy": "rkv"})
    assert not _records_draft_queries(SimpleNamespace(plan=SimpleNamespace(steps=[prefill_step])))
    assert _records_draft_queries(SimpleNamespace())


def test_a_package_lowered_for_an_older_kernel_interface_is_refused_in_one_line(lm, tmp_path, monkeypatch):
    """A package's kv_compress steps record the launcher interface they were lowered for (KernelFamily.abi): when
    this braze's launcher passes other arguments, loading refuses it in one line instead of failing in a kernel."""
    from braze.kernels.kv_compress import KV_COMPRESS

    model, ids, mask, _ = lm
    cm = braze.compile(model, max_seq=48, max_batch=2, executor="interpret", kv_compression="keydiff", kv_budget=0.5)
    cm.save(tmp_path / "pkg")
    assert braze.load(tmp_path / "pkg", executor="interpret").generate(ids, attention_mask=mask,
                                                                          max_new_tokens=2) is not None
    monkeypatch.setattr(KV_COMPRESS, "abi", KV_COMPRESS.abi + 1)
    with pytest.raises(braze.PackageError, match="recompile the package") as e:
        braze.load(tmp_path / "pkg", executor="interpret").generate(ids, attention_mask=mask, max_new_tokens=2)
    assert "\n" not in str(e.value) and "kv_compress kernels of interface 2" in str(e.value)
