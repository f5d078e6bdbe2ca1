"""Next-token selection on device, in HF's order: temperature -> top-k -> top-p, then a seeded multinomial.

The one sampling implementation: plain decoding (runtime/generate.py), the speculative runner's decode steps and
the `braze run` command all select tokens here. (runtime/speculative.py computes the same filtered distribution for
lossless acceptance of drafts.)

Options as generate takes them: `top_k` 0 or None is off, `top_p` 1.0 or None is off, `temperature` > 0 when
sampling. `check_sampling` validates them once, with errors that name the option and its valid range.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from braze.runtime.errors import ConfigError, SamplingError


def check_sampling(do_sample: bool, temperature: Any, top_k: Any, top_p: Any) -> tuple[float, int, float]:
    """(temperature, top_k, top_p) with None turned into "off" (top_k 0, top_p 1.0); a bad value is a ConfigError.

    Greedy decoding (do_sample False) ignores temperature / top_k / top_p, as HF generate does, but they must still
    be well-formed numbers.
    """
    if top_k is None:
        top_k = 0
    if top_p is None:
        top_p = 1.0
    if temperature is None:
        temperature = 1.0
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ConfigError(f"top_k must be an integer >= 0 (0 or None: off), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be a number in (0, 1] (1.0 or None: off), got {top_p!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ConfigError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not isinstance(do_sample, bool):
        raise ConfigError(f"do_sample must be True or False, got {do_sample!r}")
    if do_sample and temperature == 0:
        raise ConfigError("temperature must be > 0 when sampling (do_sample=True); for greedy decoding pass "
                          "do_sample=False")
    ignored = [f"{name}={value!r}" for name, value, off in (("temperature", temperature, 1.0), ("top_k", top_k, 0),
                                                            ("top_p", top_p, 1.0)) if value != off]
    if not do_sample and ignored:  # HF generate warns too: the caller probably meant to sample
        warnings.warn(f"do_sample=False: greedy decoding ignores {', '.join(ignored)}; pass do_sample=True to "
                      "sample", UserWarning, stacklevel=3)
    return float(temperature), int(top_k), float(top_p)


class LogitsRules:
    """HF's RepetitionPenaltyLogitsProcessor and MinNewTokensLengthLogitsProcessor, applied on device to the fp32
    logits before the temperature / top-k / top-p warpers (HF's order). The penalty covers every token of the rows
    so far but the prompt's padding (as HF generate: a left-padded row penalizes what it would alone): a seen
    token's logit is divided by the penalty when positive, multiplied when negative. Until `min_new_tokens` tokens
    are out, the EOS tokens are at -inf."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor, repetition_penalty: Any, min_new_tokens: Any,
                 eos_ids: torch.Tensor):
        if isinstance(repetition_penalty, bool) or not isinstance(repetition_penalty, numbers.Real) \
                or not math.isfinite(repetition_penalty) or repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty must be a finite number > 0 (1.0: off), got {repetition_penalty!r}")
        if isinstance(min_new_tokens, bool) or not isinstance(min_new_tokens, numbers.Integral) or min_new_tokens < 0:
            raise ConfigError(f"min_new_tokens must be an integer >= 0, got {min_new_tokens!r}")
        self.penalty = float(repetition_penalty)
        self.min_new_tokens = int(min_new_tokens)
        self.eos_ids = eos_ids
        self.ids, self.mask = ids, mask
        self.seen: torch.Tensor | None = None  # [B, V] bool, made at the first logits (V is known then)

    @property
    def active(self) -> bool:
        return self.penalty != 1.0 or self.min_new_tokens > 0

    def __call__(self, logits: torch.Tensor, generated: int | torch.Tensor,
                 marks: Sequence[tuple[int, int, int]] = ()) -> torch.Tensor:
        """The logits [B, V] of the next token after `generated` new tokens. Speculative verify scores every node
        of a draft at once: logits [B, S, V], `generated` [B, S] (the row's tokens plus the node's depth) and
        `marks` (row, node, token): the draft tokens on the node's path, seen there as if already emitted."""
        if not self.active:
            return logits
        scores = logits.float()
        if self.penalty != 1.0:
            if self.seen is None:  # padding positions scatter into an extra column, dropped
                vocab = scores.shape[-1]
                seen = torch.zeros((scores.shape[0], vocab + 1), dtype=torch.bool, device=scores.device)
                seen.scatter_(1, self.ids.long().masked_fill(self.mask == 0, vocab), True)
                self.seen = seen[:, :vocab]
            seen = self.seen
            if scores.dim() == 3:
                seen = seen[:, None].expand(scores.shape).clone()
                if marks:
                    rows, nodes, tokens = (torch.tensor(x, device=scores.device) for x in zip(*marks))
                    seen[rows, nodes, tokens] = True
            penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
            scores = torch.where(seen, penalized, scores)
        if self.min_new_tokens and len(self.eos_ids):
            if isinstance(generated, int):
                if generated < self.min_new_tokens:
                    scores = scores.index_fill(-1, self.eos_ids, float("-inf"))
            else:  # per row (and node): only those still short of min_new_tokens
                short = (generated.to(scores.device) < self.min_new_tokens)[..., None]
                eos = scores.index_select(-1, self.eos_ids)
                scores = scores.index_copy(-1, self.eos_ids, eos.masked_fill(short, float("-inf")))
        return scores

    def add(self, tokens: torch.Tensor) -> None:
        """Tokens [B] appended to the rows (pad for finished rows, as HF appends)."""
        if self.seen is not None:
            self.seen.scatter_(1, tokens.long()[:, None], True)

    def add_to_row(self, row: int, tokens: Sequence[int]) -> None:
        """Tokens appended to one row (speculation emits a row's accepted tokens together)."""
        if self.seen is not None and tokens:
            self.seen[row, torch.tensor(list(tokens), device=self.seen.device)] = True


def check_seed(seed: Any, batch: int, keyed: bool) -> int | list[int]:
    """generate's seed: an int, (keyed sampling, deterministic=True) one int per prompt, or None: one drawn from
    torch's global RNG, so torch.manual_seed reproduces a call as in HF (and calls without a seed differ)."""
    if seed is None:
        return int(torch.randint(0, 2**63 - 1, (1,)).item())
    if isinstance(seed, numbers.Integral) and not isinstance(seed, bool):
        if not -(2**63) <= int(seed) < 2**64:
            raise ConfigError(f"seed={int(seed)} does not fit in 64 bits")
        return int(seed)
    if isinstance(seed, torch.Tensor) and seed.dim() == 1 and not seed.dtype.is_floating_point:
        seed = seed.tolist()
    if isinstance(seed, (list, tuple)) and seed and all(isinstance(s, numbers.Integral) and not isinstance(s, bool)
                                                        and -(2**63) <= int(s) < 2**64 for s in seed):
        if not keyed:
            raise ConfigError("a seed per prompt needs keyed sampling (braze.compile(..., deterministic=True)); "
                              "give one int seed")
        if len(seed) != batch:
            raise ConfigError(f"seed has {len(seed)} values for a batch of {batch} prompts (one per prompt)")
        return [int(s) for s in seed]
    raise ConfigError(f"seed must be an int (or, with deterministic=True, a list of one int per prompt), got {seed!r}")


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = 0,
                   top_p: float | None = 1.0) -> torch.Tensor:
    """Apply HF's TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper (fp32, [B, V]).

    top_k 0/None and top_p 1.0/None are off."""
    scores = logits.float()
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        k = min(top_k, scores.shape[-1])
        kth = torch.topk(scores, k, dim=-1).values[..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(-1, sorted_idx, remove), -float("inf"))
    return scores


def _not_a_distribution(logits: torch.Tensor) -> SamplingError:
    """The error for logits multinomial refused, naming what is wrong with them (called only on failure)."""
    x = logits.float()
    if bool(torch.isnan(x).any()):
        what = "NaN"
    elif bool(torch.isposinf(x).any()):
        what = "+inf"
    elif bool(torch.isneginf(x).all(dim=-1).any()):
        what = "-inf for every token"
    else:
        what = "no finite probability mass"
    return SamplingError(f"cannot sample the next token: the model's logits contain {what} (a numerical problem "
                         f"in the model or its weights; greedy decoding would pick an arbitrary token)")


_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xorshift-multiply rounds) on int64 tensors holding values in [0, 2^32); the
    multipliers are < 2^31 so no product leaves int64."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    return x ^ (x >> 16)


class KeyedNoise:
    """Seeded sampling whose randomness is a function of (seed, position, token) only: the token at position p is
    argmax over v of (filtered logits[v] + Gumbel(seed, p, v)) (the Gumbel-max trick: exactly a sample of the
    filtered softmax). Nothing depends on the batch, the row, or how many draws came before, so a request samples
    the same tokens alone or in any batch, and speculative decoding, which accepts a draft token when it equals the
    keyed sample at its position (greedy acceptance on the perturbed scores: lossless), emits plain decoding's
    tokens exactly. deterministic=True compiles sample with it. One seed is shared by every row (two rows at the same
    position with the same logits sample the same token); a list gives each row its own (rows past the list, a
    batch bucket's padding, take the first)."""

    def __init__(self, seed: int | Sequence[int]):
        seeds = [seed] if isinstance(seed, int) else list(seed)
        self.seeds = torch.tensor([int(s) & _MASK32 for s in seeds], dtype=torch.int64)

    def _row_seeds(self, positions: torch.Tensor) -> torch.Tensor:
        """Seeds broadcastable against `positions` (rows along its first dimension)."""
        seeds = self.seeds.to(positions.device)
        if len(seeds) == 1 or positions.dim() == 0:
            return seeds[0]
        rows = positions.shape[0]
        seeds = torch.cat([seeds, seeds[:1].expand(max(0, rows - len(seeds)))])[:rows]
        return seeds.reshape(rows, *[1] * (positions.dim() - 1))

    def gumbel(self, positions: torch.Tensor, vocab: int) -> torch.Tensor:
        """Gumbel noise float64 [*positions.shape, vocab] for the token positions (int tensor)."""
        seeds = torch.broadcast_to(self._row_seeds(positions), positions.shape)
        key = _mix32(_mix32(seeds.to(torch.int64)) ^ (positions.long() & _MASK32))
        v = torch.arange(vocab, device=positions.device, dtype=torch.int64)
        h = _mix32(_mix32(key[..., None] ^ v) ^ 0x5BD1E995)
        u = (h.double() + 0.5) / 2.0**32
        return -torch.log(-torch.log(u))

    def scores(self, logits: torch.Tensor, positions: torch.Tensor, temperature: float, top_k: int | None,
               top_p: float | None) -> torch.Tensor:
        """Perturbed scores [..., V] whose argmax is the keyed sample at each position ([...] = positions.shape)."""
        flat = process_logits(logits.reshape(-1, logits.shape[-1]), temperature, top_k, top_p)
        return flat.reshape(logits.shape).double() + self.gumbel(positions, logits.shape[-1])

    def select(self, logits: torch.Tensor, positions: torch.Tensor, temperature: float, top_k: int | None,
               top_p: float | None) -> torch.Tensor:
        scores = self.scores(logits, positions, temperature, top_k, top_p)
        if bool(torch.isneginf(scores).all(dim=-1).any()) or bool(torch.isnan(scores).any()):
            raise _not_a_distribution(logits)
        return scores.argmax(dim=-1)


def select_next(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | KeyedNoise | None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """The next token per row of logits [B, V]: argmax, or a seeded sample of the filtered distribution.

    `generator` a KeyedNoise (deterministic compiles): the keyed sample at `positions` [B] (the positions of the
    tokens being chosen). Logits with NaN or +inf (or every token at -inf) cannot be sampled from: a SamplingError
    says so. The check costs nothing on the good path (multinomial validates its input and we only diagnose when it
    refuses)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    if isinstance(generator, KeyedNoise):
        if positions is None:
            raise ValueError("keyed sampling needs the positions of the tokens it chooses")
        return generator.select(logits, positions.reshape(-1), temperature, top_k, top_p)
    probs = process_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    try:
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    except RuntimeError as e:
        if "probability tensor" in str(e) or "invalid multinomial distribution" in str(e):
            raise _not_a_distribution(logits) from None
        raise
