"""Tests for the suffix-automaton drafter (SuffixDecoding) and the prompt-lookup baseline.

The automaton replaced a depth-bounded counting suffix trie (kept as the reference oracle in benchmarks/drafter.py):
counts must equal a brute-force count of every substring, drafts must equal a brute-force drafter that applies the
documented rules (count ratios, min_token_prob, caps, longest match on ties, the most recent continuation among
equally frequent ones), and replays of fixed traces must yield at least the old drafter's tokens per step.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import drafter as bench
from braze.runtime.speculative import greedy_accept
from braze.runtime.suffix_tree import Draft, PromptLookupDrafter, SuffixAutomaton, SuffixDrafter


def brute_counts(seqs, max_depth):
    """Reference: count every substring of length <= max_depth of every sequence."""
    out: dict[tuple[int, ...], int] = {}
    for s in seqs:
        for j in range(len(s)):
            for n in range(1, min(max_depth, len(s) - j) + 1):
                key = tuple(s[j : j + n])
                out[key] = out.get(key, 0) + 1
    return out


def accept_known(draft: Draft, target: list[int]) -> list[int]:
    """Longest root-to-node path of the draft tree that spells a prefix of the known continuation."""
    path, cur = [], -1
    while len(path) < len(target):
        want = target[len(path)]
        nxt = next((i for i, p in enumerate(draft.parents) if p == cur and draft.tokens[i] == want), None)
        if nxt is None:
            break
        path.append(nxt)
        cur = nxt
    return path


def replay(drafter, prompt, response, req_id="r", **draft_kw) -> float:
    """Decode a known response: each step emits the accepted draft plus one target (bonus) token.

    Returns mean accepted draft tokens per step (bonus excluded); checks the output is exactly the response.
    """
    drafter.start_request(req_id, prompt)
    out: list[int] = []
    steps = accepted = 0
    while len(out) < len(response):
        draft = drafter.draft(req_id, **draft_kw)
        target = response[len(out) :]
        path = accept_known(draft, target)
        emitted = [draft.tokens[i] for i in path]
        if len(emitted) < len(target):
            emitted.append(target[len(emitted)])
        drafter.observe(req_id, emitted)
        out += emitted
        steps += 1
        accepted += len(path)
    drafter.finish_request(req_id)
    assert out == response
    return accepted / steps


def rand_tokens(rng, n, vocab=1000):
    return [rng.randrange(vocab) for _ in range(n)]


# ------------------------------------------------------------------------------------------ the automaton


def test_counts_and_match():
    auto = SuffixAutomaton(max_depth=3)
    auto.add_sequence("a", [1, 2, 3, 1, 2, 4])
    assert auto.counts() == brute_counts([[1, 2, 3, 1, 2, 4]], 3)
    chain = auto.match([9, 1, 2])  # "1 2" occurs twice, "9 1 2" never
    assert [auto.depth(c) for c in chain] == [1, 2]
    assert auto.count(chain[1]) == 2
    assert sorted((tok, cnt) for tok, cnt, _ in auto.children(chain[1])) == [(3, 1), (4, 1)]
    assert auto.match([7]) == []
    auto.remove_sequence("a")
    assert auto.counts() == {} and auto.node_count() == 1 and auto.count((0, 0)) == 0


op = st.tuples(st.integers(0, 3), st.lists(st.integers(0, 2), max_size=7), st.booleans())
ops = st.lists(op, max_size=14)


@settings(max_examples=300, deadline=None)
@given(max_depth=st.integers(1, 5), ops=ops)
def test_incremental_counts_equal_brute_force(max_depth, ops):
    """Interleaved extends/removals on a tiny alphabet (lots of shared and self-overlapping suffixes): dead states
    after removals, rebuilds once dead positions outnumber live ones."""
    auto = SuffixAutomaton(max_depth)
    seqs: dict[int, list[int]] = {}
    for sid, toks, remove in ops:
        if remove and sid in seqs:
            auto.remove_sequence(sid)
            del seqs[sid]
        else:
            auto.extend(sid, toks)
            seqs.setdefault(sid, []).extend(toks)
        auto.check()
        assert auto.counts() == brute_counts(seqs.values(), max_depth)
        for sid, s in seqs.items():  # the own-end chain equals a from-scratch match
            assert auto.tail_chain(sid) == auto.match(s)
            assert len(auto.tail_chain(sid)) == min(max_depth, len(s))


def test_count_updates_per_token_are_bounded():
    """Appending a token updates one count per distinct count among the text's suffixes of length <= max_depth:
    a few on ordinary text, never more than max_depth (a run of one token, the worst case, reaches it; the old
    trie paid max_depth on every token). States stay <= 2 per token."""
    depth = 16
    rng = random.Random(0)
    for toks, mean_bound in ((rand_tokens(rng, 3000), 3.0), ([rng.randrange(3) for _ in range(3000)], depth),
                             ([5] * 3000, depth)):
        auto = SuffixAutomaton(depth)
        worst = 0
        for t in toks:
            before = auto.touches
            auto.extend(0, [t])
            worst = max(worst, auto.touches - before)
        assert worst <= depth
        assert auto.touches <= mean_bound * len(toks)
        assert auto.node_count() <= 2 * len(toks)
    assert worst == depth  # the run of one token does hit the bound


def test_eviction_rebuilds_and_drops_dead_states():
    auto = SuffixAutomaton(8)
    rng = random.Random(6)
    live = []
    for i in range(40):
        seq = [rng.randrange(4) for _ in range(50)]
        auto.add_sequence(i, seq)
        live.append(seq)
        if len(live) > 3:
            auto.remove_sequence(i - 3)
            live.pop(0)
        assert auto.node_count() <= 2 * 2 * sum(map(len, live))  # rebuilt before dead states outnumber live ones
    assert auto.counts() == brute_counts(live, 8)


# ----------------------------------------------------------------------------------------- brute-force drafts


def brute_path_draft(seqs, order, context, max_depth, max_match, spec, factor, min_prob):
    """Path draft from first principles: seqs {id: tokens}, order = [(id, index)] in append order (the clock).

    For p = longest match .. 1 (p <= max_match): follow the continuation of the last p context tokens that occurs
    most often, the most recently appended one among equals, multiplying count ratios while >= min_prob, at most
    min(spec, int(p * factor)) tokens and max_depth - p deep; keep the first strictly best score."""
    clock = {pos: i for i, pos in enumerate(order)}

    def ends(s):  # end positions of occurrences of s
        n = len(s)
        return [(sid, j + n - 1) for sid, t in seqs.items() for j in range(len(t) - n + 1) if tuple(t[j:j + n]) == s]

    longest = 0
    for p in range(1, min(max_match, len(context)) + 1):
        if ends(tuple(context[-p:])):
            longest = p
    best = Draft()
    for p in range(longest, 0, -1):
        s = tuple(context[-p:])
        limit = min(spec, int(p * factor), max_depth - p)
        toks, probs, prob = [], [], 1.0
        while len(toks) < limit:
            occ = ends(s)
            kids: dict[int, list[int]] = {}
            for sid, e in occ:
                if e + 1 < len(seqs[sid]):
                    kids.setdefault(seqs[sid][e + 1], []).append(clock[(sid, e + 1)])
            if not kids:
                break
            tok = max(kids, key=lambda t: (len(kids[t]), max(kids[t])))
            prob *= len(kids[tok]) / len(occ)
            if prob < min_prob:
                break
            toks.append(tok)
            probs.append(prob)
            s = s + (tok,)
        if toks and sum(probs) > best.score:
            best = Draft(toks, list(range(-1, len(toks) - 1)), probs, sum(probs), p)
    return best


@settings(max_examples=200, deadline=None)
@given(data=st.data(), max_depth=st.integers(2, 9), spec=st.integers(1, 6), factor=st.sampled_from([0.5, 1.0, 3.0]),
       min_prob=st.sampled_from([0.05, 0.1, 0.4]))
def test_path_drafts_equal_brute_force(data, max_depth, spec, factor, min_prob):
    """Every draft of the automaton equals the brute-force drafter, on random interleaved sequences over a 3-token
    alphabet (ties everywhere), for contexts that do and do not occur, with and without a shorter match cap."""
    max_match = data.draw(st.integers(1, max_depth))
    auto = SuffixAutomaton(max_depth, max_match=max_match)
    seqs: dict[int, list[int]] = {}
    order = []
    for sid, toks in data.draw(st.lists(st.tuples(st.integers(0, 2), st.lists(st.integers(0, 2), max_size=12)),
                                        min_size=1, max_size=6)):
        auto.extend(sid, toks)
        for t in toks:
            seqs.setdefault(sid, []).append(t)
            order.append((sid, len(seqs[sid]) - 1))
    context = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=10))
    x, n = auto._locate(context)
    got = auto.draft_from(x, n, spec, factor, 0.0, min_prob, False, 0.0) or Draft()
    want = brute_path_draft({k: v for k, v in seqs.items() if v}, order, context, max_depth, max_match, spec,
                            factor, min_prob)
    assert (got.tokens, got.match_len) == (want.tokens, want.match_len)
    assert got.probs == pytest.approx(want.probs) and got.score == pytest.approx(want.score)


def test_ties_go_to_the_most_recent_continuation():
    """After "1 2" the history continues with 3 and with 4 equally often: the draft follows the one seen last,
    whichever it is; a more frequent continuation wins over a more recent one."""
    for first, second in (([3, 9], [4, 8]), ([4, 8], [3, 9])):
        drafter = SuffixDrafter()
        drafter.start_request("a", [1, 2, *first, 7, 1, 2, *second, 7, 1, 2, *first, 6, 1, 2, *second, 5, 1, 2])
        d = drafter.draft("a", max_spec_tokens=2, max_spec_factor=1.0)
        assert d.tokens == second and d.probs == [0.4, 0.4] and d.match_len == 2
    drafter.observe("a", [3, 9, 0, 1, 2])  # 3 now follows "1 2" three times, 4 twice
    assert drafter.draft("a", max_spec_tokens=2, max_spec_factor=1.0).tokens == [3, 9]


# ----------------------------------------------------------------------------------------- drafting


def test_replay_repeated_prompt_path_and_tree():
    rng = random.Random(1)
    prompt = rand_tokens(rng, 300)
    response = prompt[:150] + rand_tokens(rng, 20) + prompt[150:]  # copy with an insertion
    path_rate = replay(SuffixDrafter(), prompt, response, max_spec_tokens=8)
    tree_rate = replay(SuffixDrafter(), prompt, response, max_spec_tokens=8, tree=True)
    assert path_rate >= 2.5 and tree_rate >= 2.5
    # Unstructured output is still reproduced exactly (drafts only ever help, never change tokens).
    replay(SuffixDrafter(), prompt, rand_tokens(rng, 200))


def test_replay_with_greedy_accept_on_one_hot_logits():
    """End to end with the torch acceptance rule: the target 'model' knows the response."""
    rng = random.Random(2)
    vocab = 64
    prompt = rand_tokens(rng, 120, vocab)
    response = prompt[10:110]
    drafter = SuffixDrafter()
    drafter.start_request(0, prompt)
    out: list[int] = []
    steps = 0
    while len(out) < len(response):
        d = drafter.draft(0, max_spec_tokens=6, tree=True)
        # Logits after each node: one-hot on the true next token if the node's path is right, else token 0.
        depth, ok = [], []
        for i, p in enumerate(d.parents):
            depth.append(0 if p < 0 else depth[p] + 1)
            pos = len(out) + depth[i]
            ok.append((p < 0 or ok[p]) and pos < len(response) and response[pos] == d.tokens[i])
        logits = torch.zeros(len(d) + 1, vocab)
        logits[0, response[len(out)]] = 1.0
        for i in range(len(d)):
            nxt = len(out) + depth[i] + 1
            if ok[i] and nxt < len(response):
                logits[i + 1, response[nxt]] = 1.0
        path, bonus = greedy_accept(d.tokens, d.parents, logits)
        emitted = [d.tokens[i] for i in path] + [bonus]
        emitted = emitted[: len(response) - len(out)]
        drafter.observe(0, emitted)
        out += emitted
        steps += 1
    assert out == response
    assert len(response) / steps >= 3.5  # tokens per step including the bonus


def test_global_automaton_learns_from_finished_requests():
    rng = random.Random(3)
    response = rand_tokens(rng, 200)
    with_cache = SuffixDrafter(max_cached_sequences=8)
    replay(with_cache, rand_tokens(rng, 50), response, req_id="a")
    assert len(with_cache.global_trie) == 1
    new_prompt = rand_tokens(rng, 50)
    rate = replay(with_cache, new_prompt, response, req_id="b", max_spec_tokens=8)
    no_cache = SuffixDrafter(max_cached_sequences=0)
    replay(no_cache, rand_tokens(rng, 50), response, req_id="a")
    baseline = replay(no_cache, new_prompt, response, req_id="b", max_spec_tokens=8)
    assert rate >= 4.0 and baseline < 0.5
    with_cache.start_request("c", new_prompt + response[:20])
    d = with_cache.draft("c", max_spec_tokens=8)
    assert d.source == "global" and d.tokens == response[20:28] and d.is_path


def test_fifo_eviction_bound_and_consistent_counts():
    rng = random.Random(4)
    drafter = SuffixDrafter(max_depth=8, max_cached_sequences=3)
    responses = []
    for i in range(10):
        drafter.start_request(i, rand_tokens(rng, 5, vocab=4))
        resp = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        drafter.observe(i, resp)
        drafter.finish_request(i)
        responses.append(resp)
        g = drafter.global_trie
        assert len(g) == min(i + 1, 3)
        g.check()
        assert g.counts() == brute_counts(responses[-3:], g.max_depth)
    assert [drafter.global_trie.sequence(s) for s in drafter.global_trie.seq_ids] == responses[-3:]


def test_draft_limits_and_tree_shape():
    drafter = SuffixDrafter()
    # After "1 2" the history continues with 3 (x3) or 4 (x2): a branching point.
    hist = [1, 2, 3, 5, 6, 1, 2, 3, 5, 6, 1, 2, 4, 7, 8, 1, 2, 3, 5, 6, 1, 2, 4, 7, 8, 9]
    drafter.start_request("t", hist + [1, 2])
    path = drafter.draft("t", max_spec_tokens=4)
    assert path.tokens[0] == 3 and path.parents == list(range(-1, len(path) - 1))
    assert len(path) <= 2  # max_spec_factor=1.0 with a 2-token match
    assert abs(path.score - sum(path.probs)) < 1e-9
    assert all(a >= b for a, b in zip(path.probs, path.probs[1:], strict=False))
    longer = drafter.draft("t", max_spec_tokens=4, max_spec_factor=3.0)
    assert longer.tokens == [3, 5, 6, 1]
    tree = drafter.draft("t", max_spec_tokens=6, max_spec_factor=3.0, tree=True)
    assert {tree.tokens[i] for i, p in enumerate(tree.parents) if p == -1} == {3, 4}
    assert all(-1 <= p < i for i, p in enumerate(tree.parents)) and len(tree) <= 6
    assert tree.score >= longer.score
    for i, p in enumerate(tree.parents):
        assert tree.probs[i] >= 0.1 and (p < 0 or tree.probs[i] <= tree.probs[p])
    strict = drafter.draft("t", max_spec_tokens=6, max_spec_factor=3.0, min_token_prob=0.9)
    assert strict.tokens == []


def test_a_cached_short_match_does_not_outweigh_a_longer_own_match():
    """The global automaton does not hold the drafting request: where the request's own history matches a longer
    context, the context's own occurrence (continuation unseen) counts against the cache's shorter match, as in
    ArcticInference, whose global tree holds live responses. Without a longer own match the cache is taken as is."""
    rng = random.Random(8)
    cached, a, b = rand_tokens(rng, 40), rand_tokens(rng, 30), rand_tokens(rng, 30)
    t = cached[10:13]
    kw = dict(max_spec_tokens=16, max_spec_factor=8.0)
    drafter = SuffixDrafter()
    drafter.start_request("old", [0])
    drafter.observe("old", cached)
    drafter.finish_request("old")
    drafter.start_request("quote", a + t + b + [7] + a + t)  # quotes itself: "a t" continued with b before
    d = drafter.draft("quote", **kw)
    assert (d.source, d.match_len, d.tokens, d.probs) == ("request", 33, b[:16], [0.5] * 16)
    drafter.start_request("fresh", a + t)
    d = drafter.draft("fresh", **kw)
    assert (d.source, d.match_len, d.tokens, d.probs) == ("global", 3, cached[13:29], [1.0] * 16)


def test_count_depth_lets_long_matches_draft_in_full():
    """ArcticInference's depth-64 tree (count_depth=max_depth) gives a 64-token match no room to draft: it backs
    off to a 48-token match for 16 tokens. Counting deeper, the full 64-token match drafts them."""
    rng = random.Random(7)
    text = rand_tokens(rng, 200)
    for count_depth, match_len in ((64, 48), (None, 64)):
        drafter = SuffixDrafter(max_depth=64, count_depth=count_depth)
        drafter.start_request(0, text + text[:100])
        d = drafter.draft(0, max_spec_tokens=16)
        assert d.tokens == text[100:116] and d.match_len == match_len


# ------------------------------------------------------------------------------ old drafter on fixed traces

# The benchmark's trace generators at fixed seeds, replayed with path drafts (depth 64, min_token_prob 0.1) at two
# settings: max_spec_tokens 16 with ArcticInference's max_spec_factor 1.0, and 32 with the runner's 4.0.
FIXED = {"file_edits": lambda: bench.file_edits(0, 2, 3), "json_edits": lambda: bench.json_edits(1, 2, 4),
         "chat_requotes": lambda: bench.chat_requotes(2, 2)}
SETTINGS = ((16, 1.0), (32, 4.0))
# (tokens, steps) of the old trie drafter (bench.OldSuffixDrafter) on each: test_old_drafter_figures re-derives
# them (slow: the old drafter takes seconds per replay).
OLD = {("file_edits", 16, 1.0): (2127, 154), ("file_edits", 32, 4.0): (2127, 90),
       ("json_edits", 16, 1.0): (1941, 189), ("json_edits", 32, 4.0): (1941, 118),
       ("chat_requotes", 16, 1.0): (2883, 602), ("chat_requotes", 32, 4.0): (2883, 485)}


def _fixed_replays(make_drafter):
    out = {}
    for name, make in FIXED.items():
        trace = make()
        for spec, factor in SETTINGS:
            r = bench.replay(make_drafter(), trace, max_spec_tokens=spec, max_spec_factor=factor)
            out[name, spec, factor] = (r["tokens"], r["steps"])
    return out


def test_tokens_per_step_at_least_the_old_drafters():
    """Every response is reproduced exactly (replay asserts it). With ArcticInference's depth semantics
    (count_depth=64) the automaton drafts what the old trie drafted except on ties (recency instead of storage
    order), which moves a trace's tokens per step by a step or two either way; by default long matches also draft
    in full. Summed over the fixed traces the default drafter needs no more steps than the old one, and no trace
    loses more than 1% of its tokens per step."""
    for label, make in (("new", SuffixDrafter), ("new64", lambda: SuffixDrafter(count_depth=64))):
        got = _fixed_replays(make)
        for key, (tokens, steps) in got.items():
            old_tokens, old_steps = OLD[key]
            assert tokens == old_tokens
            assert tokens / steps >= 0.99 * old_tokens / old_steps, (label, key, steps, old_steps)
        steps, old_steps = sum(s for _, s in got.values()), sum(s for _, s in OLD.values())
        assert steps <= (old_steps if label == "new" else 1.005 * old_steps), (label, steps, old_steps)


@pytest.mark.slow
def test_old_drafter_figures():
    assert _fixed_replays(bench.OldSuffixDrafter) == OLD


# -------------------------------------------------------------------------------------- prompt lookup


def test_prompt_lookup_baseline():
    pl = PromptLookupDrafter(max_ngram=3)
    pl.start_request(0, [5, 6, 7, 8, 9, 5, 6, 7])
    d = pl.draft(0, max_spec_tokens=3)
    assert d.tokens == [8, 9, 5] and d.match_len == 3 and d.parents == [-1, 0, 1]
    pl.observe(0, [42])
    assert pl.draft(0).tokens == []
    pl.finish_request(0)
    rng = random.Random(5)
    prompt = rand_tokens(rng, 300)
    assert replay(PromptLookupDrafter(), prompt, prompt[:150] + prompt[150:], max_spec_tokens=8) >= 2.5
