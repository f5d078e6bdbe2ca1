"""Tests for the speculation policy (runtime/spec_policy.py): cost-model decisions, back-off and recovery, and
replays of known responses through the policy-gated suffix drafter."""

from __future__ import annotations

import math
import random

from braze.runtime.spec_policy import PRIOR_ACCEPT, PolicyDrafter, SpecPolicy, default_costs
from braze.runtime.suffix_tree import Draft, SuffixDrafter

# SmolLM2-135M-Instruct (Q4_1 GGUF, greedy) on the refine_email workload: the previous answer is in the context and
# the model rewrites it with the requested change (room 4B -> 5A) and some rephrasing.
EMAIL_PROMPT = [
    1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712, 8182, 2,
    198, 1, 4093, 198, 19161, 253, 1890, 4106, 288, 957, 2299, 4976, 260, 4751, 7488, 288, 14963, 418, 216, 33, 32,
    744, 281, 3589, 216, 36, 50, 30, 2, 198, 1, 520, 9531, 198, 26652, 42, 20071, 4935, 288, 14963, 198, 198, 26843,
    2299, 28, 198, 198, 504, 11438, 4751, 314, 4935, 288, 14963, 418, 216, 33, 32, 744, 281, 3589, 216, 36, 50, 30,
    8765, 2635, 260, 36039, 1378, 284, 260, 8044, 6050, 26337, 30, 48652, 523, 325, 2711, 990, 260, 4751, 30, 198,
    198, 21707, 15472, 28, 198, 46484, 2, 198, 1, 4093, 198, 23417, 260, 3589, 288, 216, 37, 49, 284, 2965, 260,
    2444, 4106, 1163, 30, 2, 198, 1, 520, 9531, 198
]
EMAIL_RESPONSE = [
    26652, 42, 20071, 4935, 288, 14963, 198, 198, 35097, 2299, 28, 198, 198, 504, 14561, 4751, 314, 13831, 288,
    1188, 1379, 335, 14963, 418, 216, 33, 32, 744, 281, 3589, 216, 37, 49, 30, 8765, 2381, 338, 346, 2635, 260,
    36039, 1378, 284, 8044, 6050, 26337, 30, 198, 198, 21707, 15472, 28, 198, 46484, 2
]


def path_draft(tokens: list[int], match_len: int, prob: float = 1.0) -> Draft:
    probs = [prob ** (i + 1) for i in range(len(tokens))]
    return Draft(list(tokens), list(range(-1, len(tokens) - 1)), probs, sum(probs), match_len, "request")


def step(policy: SpecPolicy, draft: Draft, emitted: list[int]) -> bool:
    """One runner step: decide, then report the emitted tokens. True if the step speculated."""
    chosen = policy.decide(draft)
    policy.observe(emitted)
    return chosen is not None


def replay(drafter, prompt, response, max_spec_tokens=16, max_spec_factor=4.0):
    """Decode a known response as the runner would (the target emits the accepted draft plus one token).

    Returns (output, verify steps, accepted draft tokens, verify steps that accepted nothing)."""
    drafter.start_request(0, prompt)
    out = [response[0]]
    drafter.observe(0, out)
    verify = accepted = wasted = 0
    while len(out) < len(response):
        room = min(max_spec_tokens, len(response) - len(out) - 1)
        d = drafter.draft(0, max_spec_tokens=room, max_spec_factor=max_spec_factor) if room > 0 else Draft()
        target = response[len(out):]
        n = 0
        while n < len(d) and n < len(target) - 1 and d.tokens[n] == target[n]:
            n += 1
        new = target[: n + 1]
        if len(d):
            verify, accepted, wasted = verify + 1, accepted + n, wasted + (n == 0)
        drafter.observe(0, new)
        out += new
    drafter.finish_request(0)
    return out, verify, accepted, wasted


# ------------------------------------------------------------------------------------------- decisions


def test_draft_is_cut_where_a_token_stops_paying_for_itself():
    """With per-token acceptance r and cost c per verified token, token i is worth verifying while r**i > c."""
    policy = SpecPolicy(verify_step_cost=0.5, verify_token_cost=0.06)
    draft = path_draft(list(range(16)), match_len=5)  # bucket 4-7
    r = policy.accept_rate(5)
    assert r == PRIOR_ACCEPT[2]
    chosen = policy.decide(draft)
    assert chosen is not None
    assert len(chosen) == max(i for i in range(1, 17) if r**i > 0.06)
    assert chosen.tokens == draft.tokens[: len(chosen)] and chosen.parents == list(range(-1, len(chosen) - 1))
    assert math.isclose(chosen.score, sum(chosen.probs))
    long = policy.decide(path_draft(list(range(16)), match_len=40))  # a long match: a copy in progress
    assert long is not None and len(long) == 16


def test_short_matches_need_evidence_and_costs_decide():
    """A one-token match is a poor predictor a priori; a cheap verify (GPU costs) still makes it worth a try."""
    draft = path_draft([7, 8, 9, 10], match_len=1)
    assert SpecPolicy(**default_costs("cpu")).decide(draft) is None
    assert SpecPolicy(**default_costs("cuda")).decide(draft) is not None
    assert SpecPolicy().decide(Draft()) is None and SpecPolicy().decide(None) is None


def test_backs_off_after_rejections_and_recovers_when_drafts_would_succeed():
    policy = SpecPolicy(verify_step_cost=0.5, verify_token_cost=0.06)
    draft = path_draft([1, 2, 3, 4, 5, 6, 7, 8], match_len=10)
    on = [step(policy, draft, [99]) for _ in range(12)]  # the target keeps disagreeing with the first token
    assert on[0] and not on[-1]
    off_at = on.index(False)
    assert all(not s for s in on[off_at:])  # once off it stays off while the drafts keep failing
    assert policy.accept_rate(10) < 0.5
    # Speculation is off, yet each declined draft is scored against the token the plain step produced.
    back = [step(policy, draft, [1]) for _ in range(12)]
    assert not back[0] and back[-1]
    # Evidence is per match length: drafts from much longer matches were never penalised.
    assert policy.accept_rate(40) == PRIOR_ACCEPT[-1]


def test_verified_drafts_are_scored_by_the_accepted_prefix():
    policy = SpecPolicy(keep=1.0)
    draft = path_draft([1, 2, 3, 4], match_len=20)
    assert policy.decide(draft) is not None
    policy.observe([1, 2])  # two accepted ...
    policy.observe([5])  # ... then the bonus token differs from draft token 3: one rejection
    rate = policy.by_len[4]
    assert (rate.hits, rate.misses) == (2, 1)
    assert policy.decide(draft) is not None
    policy.observe([1, 2, 3, 4])  # fully accepted: no rejection observed
    policy.decide(None)
    assert (rate.hits, rate.misses) == (6, 1)


# -------------------------------------------------------------------------------------------- replays


def test_replay_known_smollm2_response_through_the_policy():
    """The recorded refine_email answer is reproduced exactly; the policy keeps >= 2.5 tokens per verify step
    and verifies fewer drafts that accept nothing than the ungated drafter."""
    out, verify, accepted, wasted = replay(PolicyDrafter(SuffixDrafter(), **default_costs("cpu")), EMAIL_PROMPT,
                                           EMAIL_RESPONSE)
    assert out == EMAIL_RESPONSE
    assert (accepted + verify) / verify >= 2.5
    out, verify_raw, _, wasted_raw = replay(SuffixDrafter(), EMAIL_PROMPT, EMAIL_RESPONSE)
    assert out == EMAIL_RESPONSE
    assert wasted < wasted_raw


def test_policy_turns_speculation_off_on_unstructured_text():
    """A response unrelated to the prompt: the ungated drafter keeps verifying one-token matches; the policy
    does not, and on a copied response it speculates nearly all the way."""
    rng = random.Random(0)
    prompt = [rng.randrange(50) for _ in range(300)]
    noise = [rng.randrange(50) for _ in range(200)]
    _, _, _, wasted_raw = replay(SuffixDrafter(), prompt, noise)
    out, verify, _, wasted = replay(PolicyDrafter(SuffixDrafter(), **default_costs("cpu")), prompt, noise)
    assert out == noise and wasted_raw >= 20 and wasted <= wasted_raw // 4
    copy = prompt[40:140] + [7, 7, 7] + prompt[140:240]
    out, verify, accepted, _ = replay(PolicyDrafter(SuffixDrafter(), **default_costs("cpu")), prompt, copy)
    assert out == copy and (accepted + verify) / verify >= 6.0


def test_policy_drafter_passes_through_and_cleans_up():
    drafter = PolicyDrafter(SuffixDrafter(max_cached_sequences=4))
    drafter.start_request("a", [1, 2, 3, 1, 2, 3, 1, 2])
    assert drafter.context("a") == [1, 2, 3, 1, 2, 3, 1, 2]
    drafter.observe("a", [3])
    drafter.finish_request("a")
    assert drafter.policies == {} and len(drafter.global_trie) == 1


def test_policy_drafter_times_itself():
    """The runner splits the policy's host time from the drafter's (generation_stats): the policy drafter counts
    the time of its decisions and of its learning from emitted tokens, and nothing else."""
    drafter = PolicyDrafter(SuffixDrafter(), **default_costs("cpu"))
    assert drafter.decide_seconds == 0.0 and drafter.learn_seconds == 0.0
    out, verify, _, _ = replay(drafter, EMAIL_PROMPT, EMAIL_RESPONSE)
    assert out == EMAIL_RESPONSE and verify > 0
    assert drafter.decide_seconds > 0 and drafter.learn_seconds > 0
