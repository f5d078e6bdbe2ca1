"""Tests for lossless draft acceptance (greedy and sampled), tree masks and positions."""

from __future__ import annotations

import pytest
import torch

from braze.runtime.speculative import (
    compact_accepted,
    draft_positions,
    greedy_accept,
    greedy_accept_batched,
    greedy_accept_paths,
    node_depths,
    sample_accept,
    sample_accept_paths,
    target_probs,
    tree_attention_mask,
)

V = 5
# Statistical threshold: with N = 20k draws over 5 tokens, sampling noise gives E[TV] =
# 0.5 * sum_i sqrt(2 p_i (1 - p_i) / (pi N)) ~= 0.006 (sd ~0.002), so TV < 0.03 fails a correct sampler
# essentially never (and seeds are fixed). The classic bug -- resampling from p instead of p with the rejected
# token removed -- inflates p(x) by (1 - p(x)) p(x), a TV of >= 0.09 for every draft token used below.
N = 20_000
TV_MAX = 0.03


def logits_for(*rows):
    return torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in rows]).log()


def onehot_logits(tokens):
    x = torch.full((len(tokens), V), -10.0)
    x[torch.arange(len(tokens)), torch.tensor(tokens)] = 10.0
    return x


def tv(counts: torch.Tensor, p: torch.Tensor) -> float:
    return 0.5 * (counts / counts.sum() - p).abs().sum().item()


# --------------------------------------------------------------------------------- masks and positions


def test_tree_mask_and_positions():
    parents = [-1, 0, 0, 1, -1]
    mask = tree_attention_mask(parents)
    expect = torch.tensor(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 0, 1, 0, 0],
            [1, 1, 0, 1, 0],
            [0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expect)
    assert node_depths(parents) == [0, 1, 1, 2, 0]
    assert draft_positions(torch.tensor(parents), 100).tolist() == [100, 101, 101, 102, 100]
    path = tree_attention_mask([-1, 0, 1])
    assert torch.equal(path, torch.ones(3, 3, dtype=torch.bool).tril())
    assert tree_attention_mask([]).shape == (0, 0)
    with pytest.raises(ValueError):
        tree_attention_mask([0])  # a node cannot be its own parent


# ------------------------------------------------------------------------------------------------ greedy


def test_greedy_accept_path():
    draft = [1, 2, 3]
    assert greedy_accept(draft, [-1, 0, 1], onehot_logits([1, 2, 4, 0])) == ([0, 1], 4)
    assert greedy_accept(draft, [-1, 0, 1], onehot_logits([1, 2, 3, 0])) == ([0, 1, 2], 0)
    assert greedy_accept(draft, [-1, 0, 1], onehot_logits([0, 2, 3, 4])) == ([], 0)
    # A later match after a miss does not count: acceptance stops at the first mismatch.
    assert greedy_accept(draft, [-1, 0, 1], onehot_logits([1, 0, 3, 4])) == ([0], 0)
    assert greedy_accept([], [], onehot_logits([3])) == ([], 3)


def test_greedy_accept_tree():
    # root children 1 (node 0) and 2 (node 1); node 1 has children 3 (node 2) and 4 (node 3); node 3 -> 0.
    tokens = [1, 2, 3, 4, 0]
    parents = [-1, -1, 1, 1, 3]
    # target: after context -> 2, after "2" -> 4, after "2 4" -> 0, after "2 4 0" -> 3
    rows = [2, 0, 4, 0, 0, 3]  # row i+1 belongs to node i; rows for off-path nodes are arbitrary
    assert greedy_accept(tokens, parents, onehot_logits(rows)) == ([1, 3, 4], 3)
    rows[4] = 1  # after "2 4" the target wants 1: stop at node 3
    assert greedy_accept(torch.tensor(tokens), parents, onehot_logits(rows)) == ([1, 3], 1)


def test_greedy_accept_paths_batched_matches_scalar():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4, V, generator=g)
    draft = logits[:, :3].argmax(-1)
    draft[torch.rand(64, 3, generator=g) < 0.3] = 0  # corrupt some positions
    n, bonus = greedy_accept_paths(draft, logits)
    for b in range(64):
        path, bon = greedy_accept(draft[b], [-1, 0, 1], logits[b])
        assert (len(path), bon) == (n[b].item(), bonus[b].item())


def _random_tree(k: int, gen: torch.Generator) -> list[int]:
    return [int(torch.randint(-1, i, (1,), generator=gen)) for i in range(k)]


def test_greedy_accept_batched_matches_scalar_on_padded_trees():
    """Rows of different real lengths padded to one k: same answer as the scalar rule on the real nodes."""
    g = torch.Generator().manual_seed(1)
    bsz, k = 48, 6
    logits = torch.randn(bsz, k + 1, V, generator=g)
    lengths = torch.randint(0, k + 1, (bsz,), generator=g)
    parents = torch.tensor([_random_tree(k, g) for _ in range(bsz)])
    argmax = logits.argmax(-1)
    drafts = argmax.gather(1, parents + 1)  # every node matches its parent's argmax...
    drafts[torch.rand(bsz, k, generator=g) < 0.25] = V - 1  # ...except some (V - 1 may match by chance)
    n, path, bonus = greedy_accept_batched(drafts, parents, lengths, logits)
    assert int(n.max()) >= 2  # deep paths were exercised
    for b in range(bsz):
        kb = int(lengths[b])
        want, want_bonus = greedy_accept(drafts[b, :kb], parents[b, :kb], logits[b, : kb + 1])
        assert path[b, : n[b]].tolist() == want and int(bonus[b]) == want_bonus


def test_padding_nodes_are_never_accepted():
    """A padding node whose token equals the target argmax still is not accepted: only lengths[b] nodes count."""
    logits = onehot_logits([1, 2, 3, 4])[None]  # after context -> 1, after node 0 -> 2, ...
    drafts = torch.tensor([[1, 2, 3]])
    parents = torch.tensor([[-1, 0, 1]])
    for real, want_bonus in ((3, 4), (1, 2), (0, 1)):
        n, path, bonus = greedy_accept_batched(drafts, parents, torch.tensor([real]), logits)
        assert (int(n), path[0, :real].tolist(), int(bonus)) == (real, list(range(real)), want_bonus)


def test_compact_accepted_moves_each_rows_path():
    """Row 0 accepted nodes 1, 3 (a branch) at offset 2; row 1 nothing at offset 0: only row 0's slots move."""
    cache = torch.arange(2 * 1 * 8 * 1, dtype=torch.float32).reshape(2, 1, 8, 1)
    before = cache.clone()
    compact_accepted([cache], torch.tensor([2, 0]), torch.tensor([[1, 3, 0], [0, 0, 0]]), torch.tensor([2, 0]))
    assert cache[0, 0, :, 0].tolist() == [0, 1, 2, 4, 6, 5, 6, 7]  # slots 3, 4 <- nodes 1, 3 (slots 4, 6)
    assert torch.equal(cache[1], before[1])


# ---------------------------------------------------------------------------------------------- sampling

P0 = torch.tensor([0.1, 0.2, 0.3, 0.25, 0.15])
P1 = torch.tensor([0.4, 0.05, 0.05, 0.3, 0.2])
P2 = torch.tensor([0.2, 0.2, 0.2, 0.2, 0.2])


@pytest.mark.parametrize("x", [0, 2, 4])
def test_sample_accept_paths_distribution(x):
    """First emitted token ~ P0 whatever the draft token; after an accepted x the next one ~ P1."""
    g = torch.Generator().manual_seed(100 + x)
    logits = logits_for(P0, P1, P2).expand(N, 3, V)
    draft = torch.tensor([x, 3]).expand(N, 2)
    n, bonus = sample_accept_paths(draft, logits, generator=g)
    first = torch.where(n > 0, draft[:, 0], bonus)
    assert tv(torch.bincount(first, minlength=V).float(), P0) < TV_MAX
    second = torch.where(n > 1, draft[:, 1], bonus)[n > 0]
    assert tv(torch.bincount(second, minlength=V).float(), P1) < TV_MAX
    assert abs((n > 0).float().mean().item() - P0[x].item()) < 0.02


@pytest.mark.parametrize("real", [0, 1])
def test_sample_accept_paths_padding_is_neither_accepted_nor_removed(real):
    """Draft [2, 3] with only `real` tokens real: never more than `real` accepted, and the token after the real
    ones ~ the full target row (a padding token removed from it would move TV by ~0.3)."""
    g = torch.Generator().manual_seed(11 + real)
    logits = logits_for(P0, P1, P2).expand(N, 3, V)
    draft = torch.tensor([2, 3]).expand(N, 2)
    n, bonus = sample_accept_paths(draft, logits, generator=g, lengths=torch.full((N,), real))
    assert int(n.max()) == real
    at_end = bonus[n == real]
    assert tv(torch.bincount(at_end, minlength=V).float(), [P0, P1][real]) < TV_MAX


@pytest.mark.parametrize(
    "tokens,parents",
    [
        ([2, 0], [-1, 0]),  # path through the scalar API
        ([2, 3, 1], [-1, -1, -1]),  # three siblings tried in order
        ([1, 1, 4], [-1, -1, 0]),  # duplicate sibling plus a grandchild
    ],
)
def test_sample_accept_tree_distribution(tokens, parents):
    g = torch.Generator().manual_seed(7)
    rows = [P0] + [P1 if p < 0 else P2 for p in parents]  # after a root child -> P1, deeper -> P2
    logits = logits_for(*rows)
    first = torch.zeros(V)
    for _ in range(N):
        path, bonus = sample_accept(tokens, parents, logits, generator=g)
        first[tokens[path[0]] if path else bonus] += 1
    assert tv(first, P0) < TV_MAX


def test_sample_accept_respects_filters_and_temperature():
    logits = logits_for(P0, P1)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(300):
        path, bonus = sample_accept([2], [-1], logits, generator=g, top_k=2)
        seen.add(2 if path else bonus)
    assert seen <= {2, 3}  # top-2 of P0
    assert sample_accept([2], [-1], logits, temperature=0.0) == ([0], 0)  # greedy: argmax P0 then P1
    probs = target_probs(logits_for(P0), top_p=0.5)
    assert (probs[0] > 0).tolist() == [False, False, True, True, False]  # 0.3 + 0.25 covers 0.5
    assert torch.allclose(probs.sum(), torch.tensor(1.0))
    assert target_probs(logits_for(P0), top_k=1).argmax().item() == 2
