"""Tests for the suffix-trie drafter (SuffixDecoding) and the prompt-lookup baseline."""

from __future__ import annotations

import random

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from braze.runtime.speculative import greedy_accept
from braze.runtime.suffix_tree import Draft, PromptLookupDrafter, SuffixDrafter, SuffixTrie


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


# ------------------------------------------------------------------------------------------ the trie


def test_trie_counts_and_match():
    trie = SuffixTrie(max_depth=3)
    trie.add_sequence("a", [1, 2, 3, 1, 2, 4])
    assert trie.counts() == brute_counts([[1, 2, 3, 1, 2, 4]], 3)
    chain = trie.match([9, 1, 2])  # "1 2" occurs twice, "9 1 2" never
    assert [trie.depth(c) for c in chain] == [1, 2]
    assert trie.count(chain[1]) == 2
    assert sorted((tok, cnt) for tok, cnt, _ in trie.children(chain[1])) == [(3, 1), (4, 1)]
    assert trie.match([7]) == []
    trie.remove_sequence("a")
    assert trie.counts() == {} and trie.node_count() == 1 and trie.root.count == 0


op = st.tuples(st.integers(0, 3), st.lists(st.integers(0, 2), max_size=7), st.booleans())
ops = st.lists(op, max_size=14)


@settings(max_examples=300, deadline=None)
@given(max_depth=st.integers(1, 5), ops=ops)
def test_incremental_counts_equal_brute_force(max_depth, ops):
    """Interleaved extends/removals on a tiny alphabet (lots of shared and self-overlapping suffixes)."""
    trie = SuffixTrie(max_depth)
    seqs: dict[int, list[int]] = {}
    for sid, toks, remove in ops:
        if remove and sid in seqs:
            trie.remove_sequence(sid)
            del seqs[sid]
        else:
            trie.extend(sid, toks)
            seqs.setdefault(sid, []).extend(toks)
        trie.check()
        assert trie.counts() == brute_counts(seqs.values(), max_depth)
        for sid, s in seqs.items():  # the O(depth) own-end chain equals a from-scratch match
            assert trie.tail_chain(sid) == trie.match(s)
            assert len(trie.tail_chain(sid)) == min(max_depth, len(s))


def test_incremental_cost_is_bounded_by_depth():
    """Appending a token touches <= max_depth + 1 nodes however long the sequence, and repetitive text
    (the worst case: every suffix stays explicit) hits but never exceeds that bound."""
    depth = 16
    rng = random.Random(0)
    for toks in (rand_tokens(rng, 3000), [rng.randrange(3) for _ in range(3000)]):
        trie = SuffixTrie(depth)
        worst = 0
        for t in toks:
            before = trie.touches
            trie.extend(0, [t])
            worst = max(worst, trie.touches - before)
        assert worst <= depth + 1
        assert trie.touches <= (depth + 1) * len(toks)
    # Lazy tails: random text (mostly unique suffixes) needs O(L) nodes, not O(L * depth).
    trie = SuffixTrie(64)
    trie.add_sequence(0, rand_tokens(rng, 4000, vocab=50_000))
    assert trie.node_count() <= 2 * 4000


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


def test_global_tree_learns_from_finished_requests():
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
        assert g.counts() == brute_counts(responses[-3:], 8)
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
