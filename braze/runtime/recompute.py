"""generate() for a causal LM that has a forward plan but no KV-cache plans.

A compile keeps only the forward plan when braze cannot put the model's attention over a KV cache (an attention it
does not recognise: XGLM's clamp before its softmax, masks computed from activations; the report's `generation` line
names it). Generation still works: every step runs the forward plan over the whole sequence so far and takes the
last position's logits. That is exact (the forward plan is golden-checked) and quadratic in the sequence length, so
it is the slow path, and the report says which path a model got. The forward plan takes no attention mask, so rows
with left padding run one at a time on their own tokens. Sampling, EOS, stop strings, streamers and
output_logits are the Generator's; speculation and CUDA-graph replay need the KV-cache plans.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from braze.runtime.errors import ConfigError
from braze.runtime.generate import Generator, Prefilled


class RecomputeGenerator(Generator):
    """Generator whose prefill and decode steps re-run `forward(ids, positions) -> logits` over the sequence."""

    def __init__(self, executor: Any, forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], max_seq: int,
                 max_batch: int, device: torch.device, why: str, eos_token_id: Any = None,
                 pad_token_id: Any = None):
        super().__init__(executor, executor, [], max_seq, max_batch, device, eos_token_id, pad_token_id)
        self.run_forward = forward
        self.why = why
        self.rows: list[torch.Tensor] = []  # each row's tokens so far, without its left padding

    def generate(self, input_ids: torch.Tensor, **options: Any) -> Any:
        if options.get("speculate") or options.get("spec_tree"):
            raise ConfigError(f"speculative decoding needs KV-cache plans, which this model has none of ({self.why})")
        options["speculate"] = False
        return super().generate(input_ids, **options)

    def run_prefill(self, ids: torch.Tensor, positions: torch.Tensor, kv_start: torch.Tensor,
                    state: dict[str, torch.Tensor], max_new_tokens: int) -> Prefilled:
        starts = kv_start.tolist()
        self.rows = [ids[r, start:] for r, start in enumerate(starts)]
        return Prefilled(self._last_logits(), {}, ids.shape[1])

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, slot: int, kv_start: torch.Tensor,
                    state: dict[str, torch.Tensor]) -> torch.Tensor:
        self.rows = [torch.cat([row, tokens[r:r + 1]]) for r, row in enumerate(self.rows)]
        return self._last_logits()

    def _last_logits(self) -> torch.Tensor:
        """Logits [B, 1, V] at each row's last token: one batched forward when the rows are as long, else one
        forward per row."""
        if len({len(row) for row in self.rows}) == 1:
            ids = torch.stack(self.rows)
            return self._run(ids)
        return torch.cat([self._run(row[None]) for row in self.rows])

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids).contiguous()
        return self.run_forward(ids, positions)[:, -1:].clone()  # a clone: plans reuse their output buffers
