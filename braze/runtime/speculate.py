"""Speculative generation: SuffixDecoding drafts verified by the cached-attention graph, lossless acceptance.

A batch of B rows is verified in ONE forward per step through the verify plan: row b feeds [pending, its draft,
padding] at its own cache offset (the verify plan takes a per-row `cache_len` [B] and tree mask [B, S, S]), so
rows that accepted different numbers of drafts simply hold different cache lengths; left padding stays masked by
kv_start. Drafts are padded to a common k with padding nodes that see only themselves (and the cache), that no
real node sees, and that acceptance never takes: they change no real logit, and their K/V, like a rejected
draft's, sits past the row's new length and is overwritten before anything reads it. Row i of a row's logits is
the target distribution after node i; greedy keeps the deepest draft path equal to the target argmax plus one
bonus token, sampling accepts d with probability p(d) and resamples from p without d (runtime/speculative.py),
so outputs equal plain decoding exactly (greedy) or in distribution (sampling). Acceptance runs on device for
the whole batch with one host read per step (sampled trees: one per row), and accepted tree nodes' K/V are
compacted to consecutive slots per row on device. A step where no row drafts and every live row holds the same
length is a plain decode step (decode plan, CUDA graph on GPU).

On CUDA (the generator captures decode graphs) verify steps are padded to fixed draft sizes (K_BUCKETS) and
batch buckets and replayed from one CUDA graph per (batch bucket, k bucket); padded batch rows own their own cache
rows and start finished. Without a verify plan (packages) rows run one at a time, path drafts through prefill.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
import torch.distributed as dist

from braze.runtime.sampling import KeyedNoise, LogitsRules
from braze.runtime.spec_policy import PolicyDrafter, default_costs
from braze.runtime.speculative import (
    compact_accepted,
    greedy_accept_batched,
    sample_accept,
    sample_accept_paths,
    tree_attention_mask,
)
from braze.runtime.suffix_tree import Draft, SuffixDrafter

K_BUCKETS = (4, 8, 16)  # verify draft sizes captured as CUDA graphs


HOST_PHASES = ("draft", "policy", "append", "build", "accept", "compact", "emit")
"""Host-side phases of a speculative step (``<phase>_seconds`` in SpeculationStats), disjoint: drafting (suffix
drafter), the speculation policy (decide + learn), appending emitted tokens to the drafter, building the step's inputs
(draft layout, masks, host->device copies), enqueueing acceptance (and sampling) ops, K/V compaction launches, and
per-row bookkeeping (EOS/budget cuts, row state, counters)."""


@dataclass
class SpeculationStats:
    """Counters over rows (a row's verify step is one row verifying a draft in a batched verify forward) and host
    time per phase, summed over steps (a step is one batched forward after prefill).

    Besides the HOST_PHASES, ``forward_seconds`` is the forward call (on a GPU an asynchronous launch or graph
    replay; on a CPU the whole computation) and ``sync_seconds`` the step's one host read of the results, which on a
    GPU waits for the device: so per step, device-bound time ~ forward + sync and host overhead = ``host_seconds``.
    """

    verify_steps: int = 0  # (row, step) pairs that verified a draft
    tree_steps: int = 0  # of those, drafts that were trees (branching), verified with tree attention
    plain_steps: int = 0  # (row, step) pairs that advanced one token without a draft
    accepted_drafts: int = 0  # draft tokens accepted over all rows' verify steps
    forward_steps: int = 0  # batched forwards after prefill (verify or decode), one per step for the whole batch
    rows: int = 0  # requests generated
    tokens: int = 0  # new tokens over all rows
    seconds: float = 0.0  # wall time of generation calls, prefill included
    prefill_seconds: float = 0.0  # prefill forwards and first-token selection
    ingest_seconds: float = 0.0  # per request, not per step: prompts into the drafter, responses into its cache
    step_seconds: float = 0.0  # wall time of the steps (drafting, forward, acceptance, bookkeeping)
    verify_seconds: float = 0.0  # of that, the part after drafting
    draft_seconds: float = 0.0
    policy_seconds: float = 0.0
    append_seconds: float = 0.0
    build_seconds: float = 0.0
    accept_seconds: float = 0.0
    compact_seconds: float = 0.0
    emit_seconds: float = 0.0
    forward_seconds: float = 0.0
    sync_seconds: float = 0.0

    @property
    def accepted_per_verify(self) -> float:
        """Mean tokens one row's verify step yields: accepted draft tokens plus the bonus token."""
        return (self.accepted_drafts + self.verify_steps) / self.verify_steps if self.verify_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def host_seconds(self) -> float:
        """Host overhead of the steps: every HOST_PHASES phase (not the forward call, not the host read)."""
        return sum(getattr(self, f"{p}_seconds") for p in HOST_PHASES)

    def per_step_ms(self) -> dict[str, float]:
        """Milliseconds per step (batched forward): each host phase, their sum (``host``), the forward call, the host
        read, and the wall time of a step (``step``: drafting plus the rest)."""
        n = max(self.forward_steps, 1)
        out = {p: getattr(self, f"{p}_seconds") * 1e3 / n for p in HOST_PHASES}
        out["host"] = self.host_seconds * 1e3 / n
        out["forward"] = self.forward_seconds * 1e3 / n
        out["sync"] = self.sync_seconds * 1e3 / n
        out["step"] = self.step_seconds * 1e3 / n
        return out

    def since(self, before: SpeculationStats) -> SpeculationStats:
        """The counters accumulated after the snapshot ``before`` (a copy taken earlier)."""
        return SpeculationStats(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in fields(self)})

    def snapshot(self) -> SpeculationStats:
        return replace(self)


@dataclass
class RowState:
    """One request of a speculative batch. Cache slot j holds position j - kv_start."""

    row: int
    req: int
    budget: int  # max new tokens
    pending: int  # last emitted token, not in the cache yet
    cached: int  # cache slots in use (the next write offset), left padding included
    kv_start: int
    out: list[int] = field(default_factory=list)
    done: bool = False
    logits: list[torch.Tensor] | None = None  # record_logits: the logits each emitted token was chosen from

    @property
    def position(self) -> int:
        return self.cached - self.kv_start


@dataclass
class VerifyBatch:
    """Inputs of one batched verify forward plus what acceptance needs; K = S - 1 draft slots per row."""

    ids: torch.Tensor  # [B, S]
    positions: torch.Tensor  # [B, S]
    cache_len: torch.Tensor  # [B] int64, each row's write offset
    tree_mask: torch.Tensor  # [B, S, S] bool
    drafts: torch.Tensor  # [B, K]
    parents: torch.Tensor  # [B, K]
    lengths: torch.Tensor  # [B] real draft nodes per row (the rest are padding)


def bucket_size(n: int, buckets: Sequence[int], cap: int) -> int:
    """Smallest bucket >= n that fits under cap, else n itself (an uncaptured shape)."""
    return next((b for b in buckets if n <= b <= cap), n)


def batch_bucket(batch: int, max_batch: int) -> int:
    """Power-of-two batch bucket, as the decode CUDA graphs use."""
    return min(max_batch, 1 << (batch - 1).bit_length())


def _row_layout(draft: Draft | None, k: int) -> tuple[list[int], list[int], list[int], torch.Tensor]:
    """(node tokens [k], parents [k], depths [1+k], mask [1+k, 1+k]) of one row: node 0 is the pending token, draft
    node i is i+1; a node sees itself and its ancestors; padding nodes see only themselves."""
    n = len(draft) if draft is not None else 0
    tokens = (list(draft.tokens) if n else []) + [0] * (k - n)
    parents = (list(draft.parents) if n else []) + [-1] * (k - n)
    mask = torch.eye(k + 1, dtype=torch.bool)
    depth = [0] * (k + 1)
    if n:
        mask[1 : n + 1, 0] = True
        mask[1 : n + 1, 1 : n + 1] = tree_attention_mask(draft.parents)
        for i, p in enumerate(draft.parents):
            depth[i + 1] = depth[p + 1] + 1
    return tokens, parents, depth, mask


def build_verify_batch(rows: Sequence[RowState], drafts: Sequence[Draft | None], k: int, max_seq: int,
                       device: Any) -> VerifyBatch:
    """Pad every row's draft to k nodes. Finished rows feed only padding at an offset clamped so that their
    writes stay inside their own cache row; live rows must satisfy cached + 1 + k <= max_seq."""
    ids, pos, lens, offsets, toks, pars, masks = [], [], [], [], [], [], []
    for r, d in zip(rows, drafts):
        tokens, parents, depth, mask = _row_layout(None if r.done else d, k)
        offset = min(r.cached, max_seq - k - 1) if r.done else r.cached
        if offset + k + 1 > max_seq:
            raise ValueError(f"row {r.row}: {k + 1} verify slots from {offset} overflow max_seq={max_seq}")
        base = max(offset - r.kv_start, 0)
        ids.append([r.pending] + tokens)
        pos.append([base + t for t in depth])
        lens.append(len(d) if d is not None and not r.done else 0)
        offsets.append(offset)
        toks.append(tokens)
        pars.append(parents)
        masks.append(mask)

    def t(x: Any) -> torch.Tensor:
        return torch.tensor(x, dtype=torch.long).reshape(len(rows), -1).to(device)

    return VerifyBatch(t(ids), t(pos), t(offsets)[:, 0], torch.stack(masks).to(device), t(toks), t(pars),
                       t(lens)[:, 0])


class SpeculativeRunner:
    """Speculative loop over a Generator's executors: one batched verify forward per step."""

    def __init__(self, generator: Any, max_spec_tokens: int = 8, min_score: float = 0.5,
                 max_spec_factor: float = 4.0, min_token_prob: float = 0.1, adaptive: bool = True,
                 policy: dict[str, Any] | None = None):
        self.gen = generator
        self.drafter: Any = SuffixDrafter()
        if adaptive:  # a per-request cost model decides whether and how far to speculate (runtime/spec_policy.py)
            interpreted = bool(getattr(getattr(generator.decode, "spec", None), "interpret", False))
            costs = default_costs(generator.device, interpreted) if policy is None else policy
            self.drafter = PolicyDrafter(self.drafter, **costs)
        self.max_spec_tokens = max_spec_tokens
        self.min_score = min_score
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob
        self.stats = SpeculationStats()
        self.tree = False  # draft trees verified with tree attention (else path drafts)
        # generate(output_logits=True): per row, the logits [n, V] each new token was chosen from (`recorded`)
        self.record_logits = False
        self.recorded: list[torch.Tensor] = []
        self.streamer: Any = None  # generate(streamer=...) at batch 1: put() gets row 0's tokens as they are emitted
        # generate's repetition_penalty / min_new_tokens (HF's logits processors); one LogitsRules per request batch
        self.rule_options: dict[str, Any] = {}
        self.stops: tuple[Any, list[str]] | None = None  # generate's (tokenizer, stop_strings)
        self._rules: LogitsRules | None = None
        self._next_request = 0
        graphs = getattr(generator, "graphs", None) is not None
        # padding to fixed shapes only pays where shapes are captured (CUDA graphs); tests turn it on to check it
        self.k_buckets: tuple[int, ...] = K_BUCKETS if graphs else ()
        self.pad_batches = graphs
        self.verify_graphs = self.decode_graphs = None
        verify = getattr(generator, "verify", None)
        if graphs and verify is not None:
            from braze.runtime.cuda_graphs import CudaGraphRunner

            # own graph runners over the generator's per-bucket state (graphs capture it by identity)
            state = generator.STATE_PREFIXES
            self.verify_graphs = CudaGraphRunner(generator.verify, static_prefixes=state)
            self.decode_graphs = CudaGraphRunner(generator.decode, static_prefixes=state)
        self._state: dict[int, dict[str, torch.Tensor]] = {}
        self._extra: dict[str, torch.Tensor] = {}  # decode / verify inputs beyond the caches (kv_compression)
        self._call: Any = None  # kv_compression: this batch's CompressedCall (rkv re-compresses rows through it)

    # ---------------------------------------------------------------------------------------------- drafting

    def _draft_for(self, row: RowState, limit: int) -> Draft | None:
        """Whether row `row` drafts this step, and its draft: None = a plain (one-token) step for this row.
        `limit` caps the draft length for the batch (every row's verify slots must fit in the cache)."""
        room = min(self.max_spec_tokens, row.budget - len(row.out) - 1, self.gen.cache_slots - row.cached - 1, limit)
        if room <= 0:
            return None
        draft = self.drafter.draft(row.req, max_spec_tokens=room, max_spec_factor=self.max_spec_factor,
                                   min_token_prob=self.min_token_prob, tree=self.tree)
        if draft is None or len(draft) == 0 or draft.score < self.min_score:
            return None  # speculation turns itself off when the trees predict poorly
        return draft

    def _drafts(self, rows: Sequence[RowState], limit: int) -> list[Draft | None]:
        """This step's draft per row (None: a plain step for the row). Under tensor parallelism rank 0 drafts and
        broadcasts them (torch.distributed): every rank must verify the same drafts, since its plans' collectives
        meet the other ranks' shape for shape, whatever a drafter would decide on its own."""
        tp = getattr(self.gen, "tp_world", 1) > 1
        drafts = None
        if not tp or dist.get_rank() == 0:
            drafts = [None if r.done else self._draft_for(r, limit) for r in rows]
        if tp:
            box = [drafts]
            dist.broadcast_object_list(box, src=0)
            drafts = box[0]
        return drafts

    # ------------------------------------------------------------------------------------------ batch state

    def _buffers(self, batch: int) -> dict[str, torch.Tensor]:
        """The generator's decode state for a batch (kv_start, the caches: compressed ones under kv_compression);
        kept per batch size when shapes are padded to buckets (graphs capture the state by identity)."""
        if batch not in self._state:
            state = self.gen._buffers(batch)
            if not self.pad_batches:
                return state
            self._state[batch] = state
        return self._state[batch]

    def _emit(self, row: RowState, accepted: list[int], bonus: int | None, eos: set[int],
              sources: torch.Tensor | None = None) -> list[int]:
        """Append a step's tokens to a row (cut at the first EOS and at the budget); returns the accepted drafts
        kept. `sources` [len(accepted) + 1, V]: the logits each token (accepted drafts, then the bonus) was chosen
        from, kept when recording."""
        if eos & set(accepted):  # stop at the first accepted EOS, exactly as plain decoding would
            accepted = accepted[: next(i for i, t in enumerate(accepted) if t in eos) + 1]
            bonus = None
        new = (accepted + ([bonus] if bonus is not None else []))[: row.budget - len(row.out)]
        stopped = False
        if self.stops is not None:  # cut after the token whose text completes a stop string, as plain decoding
            cut = next((i + 1 for i in range(len(new)) if self._stopped(row.out + new[: i + 1])), None)
            stopped = cut is not None
            new = new[:cut]
        if row.logits is not None and sources is not None:
            row.logits.extend(sources[: len(new)])
        row.cached += 1 + len(accepted)
        row.out.extend(new)
        if self._rules is not None:
            self._rules.add_to_row(row.row, new)
        self._stream(row.row, new)
        row.pending = new[-1]
        row.done = len(row.out) >= row.budget or row.pending in eos or stopped
        t0 = time.perf_counter()
        self.drafter.observe(row.req, new if not row.done else new[:-1])  # the last token only if it continues
        self.stats.append_seconds += time.perf_counter() - t0
        return accepted

    def _stopped(self, tokens: list[int]) -> bool:
        """Whether a row's new tokens hold a stop string (generate's stop_strings; plain decoding's test)."""
        if self.stops is None:
            return False
        tokenizer, strings = self.stops
        text = tokenizer.decode(tokens)
        return any(st in text for st in strings)

    def _stream(self, row: int, tokens: list[int]) -> None:
        if self.streamer is not None and row == 0 and tokens:
            self.streamer.put(torch.tensor(tokens))

    # ---------------------------------------------------------------------------------------- logits rules

    def _start_rules(self, ids: torch.Tensor, mask: torch.Tensor, eos_ids: torch.Tensor) -> None:
        self._rules = LogitsRules(ids, mask, eos_ids=eos_ids, **self.rule_options) if self.rule_options else None

    def _ruled(self, logits: torch.Tensor, rows: Sequence[RowState], drafts: Sequence[Draft | None] | None = None
               ) -> torch.Tensor:
        """The logits acceptance and sampling read: HF's repetition penalty and min_new_tokens applied as plain
        decoding would at each position. Logits [B, V] (a plain step) or [B, 1 + K, V] (verify nodes: a node sees
        the tokens on its draft path as generated), so the verify stays lossless against plain decoding."""
        if self._rules is None or not self._rules.active:
            return logits
        if logits.dim() == 2:
            return self._rules(logits, torch.tensor([len(r.out) for r in rows]))
        generated = torch.tensor([[len(r.out)] * logits.shape[1] for r in rows])
        marks = []
        for b, (r, d) in enumerate(zip(rows, drafts or [None] * len(rows))):
            for i in range(len(d) if d is not None and not r.done else 0):
                j = i
                while j >= 0:  # node i + 1 and its ancestors back to the pending token
                    marks.append((b, i + 1, d.tokens[j]))
                    generated[b, i + 1] += 1
                    j = d.parents[j]
        return self._rules(logits, generated, marks)

    def _first_tokens(self, last: torch.Tensor, sample: dict[str, Any], positions: torch.Tensor) -> torch.Tensor:
        """The token each row picks from its prefill logits [B, V] (positions: the token's position, for keyed
        sampling); the logits rules then count it as generated."""
        from braze.runtime.sampling import select_next

        ruled = last if self._rules is None else self._rules(last, 0)
        first = select_next(ruled, sample["do_sample"], sample["temperature"], sample["top_k"], sample["top_p"],
                            sample["generator"], positions)
        if self._rules is not None:
            self._rules.add(first)
        return first

    # ---------------------------------------------------------------------------------------------- stepping

    def _decode_step(self, rows: list[RowState], cached: int, kv_start: torch.Tensor,
                     caches: dict[str, torch.Tensor], sample: dict[str, Any], eos: set[int]) -> None:
        """Every live row holds `cached` slots and none drafts: one plain decode step for the batch."""
        from braze.runtime.sampling import select_next

        g = self.gen
        st = self.stats
        t0 = time.perf_counter()
        ids = torch.tensor([[r.pending] for r in rows], device=g.device)
        pos = torch.tensor([[max(min(cached, g.cache_slots - 1) - r.kv_start, 0)] for r in rows], device=g.device)
        values = {"input_ids": ids, "position_ids": pos, "kv_start": kv_start,
                  "cache_len": torch.tensor([cached], dtype=torch.int64, device=g.device), **caches, **self._extra}
        inputs = g._ordered(g.decode, values)
        t1 = time.perf_counter()
        (logits,) = self.decode_graphs.run(inputs) if self.decode_graphs else g.decode.run(inputs)
        t2 = time.perf_counter()
        nxt = select_next(self._ruled(logits[:, -1], rows), sample["do_sample"], sample["temperature"],
                          sample["top_k"], sample["top_p"], sample["generator"], pos[:, 0] + 1)
        t3 = time.perf_counter()
        nxt = nxt.tolist()
        t4 = time.perf_counter()
        st.build_seconds += t1 - t0
        st.forward_seconds += t2 - t1
        st.accept_seconds += t3 - t2
        st.sync_seconds += t4 - t3
        appended = st.append_seconds
        for r in rows:
            if not r.done:
                self._emit(r, [], int(nxt[r.row]), eos, logits[r.row, -1:].clone() if r.logits is not None else None)
                st.plain_steps += 1
        st.emit_seconds += time.perf_counter() - t4 - (st.append_seconds - appended)

    def _run_verify(self, batch: VerifyBatch, kv_start: torch.Tensor, caches: dict[str, torch.Tensor]
                    ) -> torch.Tensor:
        g = self.gen
        values = {"input_ids": batch.ids, "position_ids": batch.positions, "cache_len": batch.cache_len,
                  "kv_start": kv_start, "tree_mask": batch.tree_mask, **caches, **self._extra}
        inputs = g._ordered(g.verify, values)
        captured = batch.drafts.shape[1] in self.k_buckets and self.verify_graphs is not None
        (logits,) = self.verify_graphs.run(inputs) if captured else g.verify.run(inputs)
        return logits

    def _accept(self, batch: VerifyBatch, logits: torch.Tensor, rows: list[RowState], drafts: list[Draft | None],
                caches: dict[str, torch.Tensor], sample: dict[str, Any]) -> list[tuple[list[int], int]]:
        """(accepted node indices, bonus) per row, from the verify nodes' (ruled) logits. Greedy, and sampling of
        path drafts: on device for the whole batch, then one host read; sampling of trees: row by row (recursive
        rejection over siblings, one host read per row)."""
        bsz, k = batch.drafts.shape
        st = self.stats
        trees = any(d is not None and not d.is_path for d in drafts)
        t0 = time.perf_counter()
        keyed = sample["do_sample"] and isinstance(sample["generator"], KeyedNoise)
        if not sample["do_sample"] or not trees or keyed:
            if keyed:  # the keyed sample at each node's next position: greedy acceptance on perturbed scores
                scores = sample["generator"].scores(logits, batch.positions + 1, sample["temperature"],
                                                    sample["top_k"], sample["top_p"])
                n, path, bonus = greedy_accept_batched(batch.drafts, batch.parents, batch.lengths, scores)
            elif sample["do_sample"]:
                n, bonus = sample_accept_paths(batch.drafts, logits, sample["generator"], sample["temperature"],
                                               sample["top_k"], sample["top_p"], lengths=batch.lengths)
                path = torch.arange(k, device=n.device).expand(bsz, k)
            else:
                n, path, bonus = greedy_accept_batched(batch.drafts, batch.parents, batch.lengths, logits)
            t1 = time.perf_counter()
            if trees:
                compact_accepted(list(caches.values()), batch.cache_len, path, n)
            t2 = time.perf_counter()
            host = torch.cat([n, bonus, path.reshape(-1)]).tolist()  # the one host sync of the step
            st.accept_seconds += t1 - t0
            st.compact_seconds += t2 - t1
            st.sync_seconds += time.perf_counter() - t2
            return [(host[2 * bsz + b * k: 2 * bsz + b * k + host[b]], host[bsz + b]) for b in range(bsz)]
        result = []
        for b, (r, d) in enumerate(zip(rows, drafts)):  # (each row's acceptance reads the device: no sync split)
            kb = len(d) if d is not None and not r.done else 0
            result.append(sample_accept(d.tokens[:kb] if kb else [], d.parents[:kb] if kb else [],
                                        logits[b, : kb + 1], sample["generator"], sample["temperature"],
                                        sample["top_k"], sample["top_p"]))
        t1 = time.perf_counter()
        if trees:
            path = torch.tensor([p + [0] * (k - len(p)) for p, _ in result], device=logits.device).reshape(bsz, k)
            n = torch.tensor([len(p) for p, _ in result], device=logits.device)
            compact_accepted(list(caches.values()), batch.cache_len, path, n)
        st.accept_seconds += t1 - t0
        st.compact_seconds += time.perf_counter() - t1
        return result

    def _verify_step(self, rows: list[RowState], drafts: list[Draft | None], limit: int, kv_start: torch.Tensor,
                     caches: dict[str, torch.Tensor], sample: dict[str, Any], eos: set[int]) -> None:
        g = self.gen
        st = self.stats
        t0 = time.perf_counter()
        k = bucket_size(max(len(d) if d is not None else 0 for d in drafts), self.k_buckets, limit)
        batch = build_verify_batch(rows, drafts, k, g.cache_slots, g.device)
        t1 = time.perf_counter()
        rings = {n: t.clone() for n, t in self._extra.items() if n.startswith("kvq_")} if self._rkv() else {}
        logits = self._run_verify(batch, kv_start, caches)
        t2 = time.perf_counter()
        st.build_seconds += t1 - t0
        st.forward_seconds += t2 - t1
        results = self._accept(batch, self._ruled(logits, rows, drafts), rows, drafts, caches, sample)
        if rings:
            self._keep_accepted_queries(rings, rows, results)
        t3 = time.perf_counter()
        appended = st.append_seconds
        for r, d, (path, bonus) in zip(rows, drafts, results):
            if r.done:
                continue
            sources = logits[r.row, [0] + [i + 1 for i in path]] if r.logits is not None else None
            if d is None:
                self._emit(r, [], bonus, eos, sources)
                st.plain_steps += 1
                continue
            accepted = self._emit(r, [d.tokens[i] for i in path], bonus, eos, sources)
            st.verify_steps += 1
            st.tree_steps += not d.is_path
            st.accepted_drafts += len(accepted)
        st.emit_seconds += time.perf_counter() - t3 - (st.append_seconds - appended)

    def _rkv(self) -> Any:
        """The CompressionSpec when the cache is re-compressed during decoding (kv_compression="rkv"), else None."""
        from braze.kvcompress.policy import DURING_DECODE

        spec = self.gen.compression
        return spec if spec is not None and spec.policy in DURING_DECODE else None

    def _recompress_full_rows(self, spec: Any, rows: list[RowState], kv_start: torch.Tensor) -> None:
        """rkv: a row whose cache is full is compacted back to the budget before its next step, at the slot (and so
        the position) where plain decoding compacts it; its positions continue (slot j holds j - kv_start)."""
        from braze.runtime.kv_compression import recompress

        for r in rows:
            if not r.done and r.cached >= spec.capacity:
                slot = recompress(spec, self._call, kv_start, r.row)
                r.kv_start += slot - r.cached
                r.cached = slot

    def _keep_accepted_queries(self, before: dict[str, torch.Tensor], rows: list[RowState],
                               results: list[tuple[list[int], int]]) -> None:
        """rkv: the verify recorded every node's query at ring slot (cache_len + node) % window; the ring keeps
        what it held before the step plus the accepted nodes' queries at the slots they now hold (cache_len + i,
        as decoding would have recorded them). Rows are fixed before _emit moves their cache_len."""
        for name, fixed in before.items():  # `before` holds this step's private copies
            ring = self._extra[name]
            window = ring.shape[2]
            for r, (path, _) in zip(rows, results):
                if r.done:
                    continue
                nodes = torch.tensor([0] + [i + 1 for i in path], device=ring.device)
                dst = (r.cached + torch.arange(len(nodes), device=ring.device)) % window
                fixed[r.row, :, dst] = ring[r.row, :, (r.cached + nodes) % window]
            ring.copy_(fixed)

    def _step(self, rows: list[RowState], kv_start: torch.Tensor, caches: dict[str, torch.Tensor],
              sample: dict[str, Any], eos: set[int]) -> None:
        rkv = self._rkv()
        if rkv is not None:
            self._recompress_full_rows(rkv, rows, kv_start)
        live = [r for r in rows if not r.done]
        limit = self.gen.cache_slots - 1 - max(r.cached for r in live)  # every live row's verify slots must fit
        if rkv is not None:  # a step's nodes record their queries in distinct ring slots
            limit = min(limit, rkv.window - 1)
        t0 = time.perf_counter()
        drafts = self._drafts(rows, limit)
        t1 = time.perf_counter()
        self.stats.draft_seconds += t1 - t0
        lengths = {r.cached for r in live}
        if all(d is None for d in drafts) and len(lengths) == 1:
            self._decode_step(rows, lengths.pop(), kv_start, caches, sample, eos)
        else:
            self._verify_step(rows, drafts, limit, kv_start, caches, sample, eos)
        self.stats.forward_steps += 1
        t2 = time.perf_counter()
        self.stats.verify_seconds += t2 - t1
        self.stats.step_seconds += t2 - t0

    # ---------------------------------------------------------------------------------------------- requests

    def generate_batch(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, do_sample: bool,
                       temperature: float, top_k: int, top_p: float, generator: torch.Generator | None,
                       eos_ids: torch.Tensor) -> list[list[int]]:
        """New tokens per row of a left-padded batch ids/mask [B, S] (mask 0 = padding)."""

        g = self.gen
        real = ids.shape[0]
        bsz = batch_bucket(real, g.max_batch) if self.pad_batches else real
        if bsz > real:  # dummy rows (copies of row 0) own their own cache rows and start finished
            ids = torch.cat([ids, ids[:1].expand(bsz - real, -1)])
            mask = torch.cat([mask, mask[:1].expand(bsz - real, -1)])
        state = self._buffers(bsz)
        kv_start = state["kv_start"]
        kv_start.copy_((mask == 0).sum(-1).to(torch.int32))
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        st = self.stats
        start = time.perf_counter()
        pre = g.run_prefill(ids, positions, kv_start, state, max_new_tokens)
        logits, caches, base, self._extra, self._call = pre.logits, pre.caches, pre.base, pre.extra, pre.call
        real_lens = (mask != 0).sum(-1).tolist()
        self.kv_cache_bytes = sum(c.numel() * c.element_size() for c in caches.values())
        sample = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                  "generator": generator}
        self._start_rules(ids, mask, eos_ids)
        first = self._first_tokens(logits[:, -1], sample, positions[:, -1] + 1).tolist()
        t0 = time.perf_counter()
        st.prefill_seconds += t0 - start
        eos = set(eos_ids.tolist())
        rows = []
        for b in range(bsz):  # a row's cache slot base + i holds its token at position real_lens[b] + i
            row = RowState(b, self._next_request, max_new_tokens, int(first[b]), base, base - real_lens[b],
                           [int(first[b])], logits=[logits[b, -1].clone()] if self.record_logits else None)
            row.done = b >= real or row.pending in eos or max_new_tokens <= 1 or self._stopped(row.out)
            self._next_request += 1
            if b < real:
                self._stream(b, row.out)
                self.drafter.start_request(row.req, ids[b][mask[b].bool()].tolist())
                self.drafter.observe(row.req, [row.pending])
            rows.append(row)
        st.ingest_seconds += time.perf_counter() - t0
        policy = self._policy_clock()
        while any(not r.done for r in rows):
            self._step(rows, kv_start, caches, sample, eos)
        self._split_policy(policy)
        t0 = time.perf_counter()
        for r in rows[:real]:
            self.drafter.finish_request(r.req)
        st.ingest_seconds += time.perf_counter() - t0
        st.rows += real
        st.tokens += sum(len(r.out[:max_new_tokens]) for r in rows[:real])
        st.seconds += time.perf_counter() - start
        if self.record_logits:
            self.recorded = [torch.stack(r.logits[:max_new_tokens]) for r in rows[:real]]
        return [r.out[:max_new_tokens] for r in rows[:real]]

    def _policy_clock(self) -> tuple[float, float]:
        """The policy's own time in drafting and in learning from emitted tokens (runtime/spec_policy.py)."""
        return getattr(self.drafter, "decide_seconds", 0.0), getattr(self.drafter, "learn_seconds", 0.0)

    def _split_policy(self, before: tuple[float, float]) -> None:
        """Move the policy's share out of the draft and append timings (which time the drafter calls whole)."""
        decide, learn = (a - b for a, b in zip(self._policy_clock(), before))
        self.stats.draft_seconds -= decide
        self.stats.append_seconds -= learn
        self.stats.policy_seconds += decide + learn

    def generation_stats(self, before: SpeculationStats) -> Any:
        """GenerationStats of the generation since the snapshot ``before``: the usual fields plus, under
        ``extra["speculation"]``, the step counters and the host time per step by phase (``ms_per_step``; see
        SpeculationStats.per_step_ms), so a GPU run can subtract and attribute the host overhead."""
        from braze.runtime.generation_stats import GenerationStats

        st = self.stats.since(before)
        decode_s = st.seconds - st.prefill_seconds
        spec = {k: getattr(st, k) for k in ("rows", "tokens", "forward_steps", "verify_steps", "plain_steps",
                                             "tree_steps", "accepted_drafts")}
        spec["accepted_per_verify"] = st.accepted_per_verify
        spec["ms_per_step"] = st.per_step_ms()
        spec["ingest_ms_per_request"] = st.ingest_seconds * 1e3 / max(st.rows, 1)
        prefills = st.rows if self.gen.verify is None else 1  # without a verify plan rows prefill one at a time
        extra: dict[str, Any] = {"speculation": spec}
        if self._call is not None and self._call.recompressions:  # rkv: row re-compressions of the last batch
            extra["kv_recompressions"] = self._call.recompressions
        return GenerationStats(time_to_first_token_s=st.prefill_seconds / max(prefills, 1),
                               decode_tokens_per_s=(st.tokens - st.rows) / decode_s if decode_s > 0 else 0.0,
                               decode_steps=st.forward_steps, kv_cache_bytes=getattr(self, "kv_cache_bytes", 0),
                               extra=extra)

    def generate_row(self, ids: torch.Tensor, max_new_tokens: int, do_sample: bool, temperature: float, top_k: int,
                     top_p: float, generator: torch.Generator | None, eos_ids: torch.Tensor) -> list[int]:
        """New tokens for one unpadded prompt [1, S] without a verify plan (packages): path drafts verify through
        the prefill plan, whose cache offset is one for the batch."""
        from braze.runtime.speculative import greedy_accept

        g = self.gen
        st = self.stats
        caches, kv_start = g.new_caches(1), torch.zeros(1, dtype=torch.int32, device=g.device)
        self.kv_cache_bytes = sum(c.numel() * c.element_size() for c in caches.values())
        start = time.perf_counter()
        logits = g.forward(g.prefill, ids, torch.arange(ids.shape[1], device=g.device)[None], 0, kv_start, caches)
        self._start_rules(ids, torch.ones_like(ids), eos_ids)
        sample = {"do_sample": do_sample, "temperature": temperature, "top_k": top_k, "top_p": top_p,
                  "generator": generator}
        first = int(self._first_tokens(logits[:, -1], sample, torch.tensor([ids.shape[1]], device=g.device))[0])
        t0 = time.perf_counter()
        st.prefill_seconds += t0 - start
        row = RowState(0, self._next_request, max_new_tokens, first, ids.shape[1], 0, [first],
                       logits=[logits[0, -1].clone()] if self.record_logits else None)
        self._next_request += 1
        self._stream(0, row.out)
        self.drafter.start_request(row.req, ids[0].tolist())
        self.drafter.observe(row.req, [row.pending])
        st.ingest_seconds += time.perf_counter() - t0
        eos = set(eos_ids.tolist())
        row.done = row.pending in eos or max_new_tokens <= 1 or self._stopped(row.out)
        tree, self.tree = self.tree, False
        policy = self._policy_clock()
        try:
            while not row.done:
                t0 = time.perf_counter()
                draft = self._drafts([row], g.max_seq)[0]
                t1 = time.perf_counter()
                toks = [row.pending] + (draft.tokens if draft is not None else [])
                pos = torch.arange(row.cached, row.cached + len(toks), device=g.device)[None]
                plan = g.decode if draft is None else g.prefill
                t2 = time.perf_counter()
                logits = g.forward(plan, torch.tensor([toks], device=g.device), pos, row.cached, kv_start, caches)[0]
                t3 = time.perf_counter()
                parents = draft.parents if draft is not None else []
                ruled = self._ruled(logits[None], [row], [draft])[0]
                if isinstance(generator, KeyedNoise) and do_sample:  # path drafts: node i at position + i + 1
                    scores = generator.scores(ruled, pos[0] + 1, temperature, top_k, top_p)
                    path, bonus = greedy_accept(toks[1:], parents, scores)
                elif do_sample:  # (acceptance reads the device: its wait counts here, not as sync)
                    path, bonus = sample_accept(toks[1:], parents, ruled, generator, temperature, top_k, top_p)
                else:
                    path, bonus = greedy_accept(toks[1:], parents, ruled)
                t4 = time.perf_counter()
                appended = st.append_seconds
                accepted = self._emit(row, [toks[1 + i] for i in path], bonus, eos,
                                      logits[[0] + [i + 1 for i in path]] if row.logits is not None else None)
                if draft is None:
                    st.plain_steps += 1
                else:
                    st.verify_steps += 1
                    st.accepted_drafts += len(accepted)
                st.forward_steps += 1
                t5 = time.perf_counter()
                st.draft_seconds += t1 - t0
                st.build_seconds += t2 - t1
                st.forward_seconds += t3 - t2
                st.accept_seconds += t4 - t3
                st.emit_seconds += t5 - t4 - (st.append_seconds - appended)
                st.verify_seconds += t5 - t1
                st.step_seconds += t5 - t0
        finally:
            self.tree = tree
        self._split_policy(policy)
        t0 = time.perf_counter()
        self.drafter.finish_request(row.req)
        st.ingest_seconds += time.perf_counter() - t0
        st.rows += 1
        st.tokens += len(row.out[:max_new_tokens])
        st.seconds += time.perf_counter() - start
        if self.record_logits:
            self.recorded.append(torch.stack(row.logits[:max_new_tokens]))
        return row.out[:max_new_tokens]
