"""What one generate() call measured; its own module so the generator and the speculative runner both fill it
without importing each other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class GenerationStats:
    time_to_first_token_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    decode_steps: int = 0
    launches_per_decode_step: float = 0.0
    kv_cache_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
