"""Calibration statistics for INT6: what each linear of an eager model reads on the shipped calibration text.

    stats = collect(model, tokenizer)            # or collect(model, ids=token_ids)
    stats.hessians["model.layers.0.mlp.down_proj.weight"]   # H = 2 X^T X / n  [K, K]   (GPTQ)
    stats.samples["model.layers.0.mlp.down_proj.weight"]    # X rows [R, K]            (smoothing, sensitivity)

Calibration runs the eager HF model in fp32 on CPU over braze/data/calib_text.txt (never the evaluation text)
with forward pre-hooks on every nn.Linear. Linears that read the same input tensor (q/k/v, gate/up) share one
Hessian and one sample tensor (the compiler merges them into one matmul, so they must be treated alike). The
Hessian uses every calibration token; `samples` keeps `sample_rows` evenly spaced rows, enough to measure each
linear's output error under activation quantization without holding all activations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

CALIB_TEXT = Path(__file__).resolve().parent.parent / "data" / "calib_text.txt"


def calib_text() -> str:
    """The calibration text shipped with braze (distinct from the evaluation text)."""
    return CALIB_TEXT.read_text()


def calibration_ids(tokenizer: Any, text: str | None = None, max_tokens: int = 1024) -> Tensor:
    ids = torch.tensor(tokenizer(text if text is not None else calib_text()).input_ids, dtype=torch.long)
    return ids[:max_tokens]


def find_tokenizer(model: Any) -> Any:
    """The tokenizer stored next to a HF model (a directory, or a directory holding one GGUF file); local only."""
    from transformers import AutoTokenizer

    path = getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "")
    if not path or not Path(path).is_dir():
        return None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:
        pass
    ggufs = sorted(Path(path).glob("*.gguf"))
    if len(ggufs) == 1:
        try:
            return AutoTokenizer.from_pretrained(path, gguf_file=ggufs[0].name, local_files_only=True)
        except Exception:
            return None
    return None


@dataclass
class Calibration:
    """Per-linear input statistics keyed by weight name (siblings reading one input share the tensors)."""

    hessians: dict[str, Tensor] = field(default_factory=dict)
    samples: dict[str, Tensor] = field(default_factory=dict)
    tokens: int = 0


class _Recorder:
    """Forward pre-hooks that accumulate X^T X and keep every `stride`-th row of each distinct linear input."""

    def __init__(self, stride: int, hessians: bool = True):
        self.stride = stride
        self.hessians = hessians
        self.alias: dict[str, str] = {}
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.rows: dict[str, list[Tensor]] = {}
        self.last: tuple[Any, str | None] = (None, None)

    def hook(self, name: str):
        def pre(_mod: torch.nn.Module, args: tuple) -> None:
            x = args[0]
            if name not in self.alias:  # first sighting: share with the previous linear if it read the same tensor
                prev_x, prev_name = self.last
                self.alias[name] = self.alias[prev_name] if x is prev_x and prev_name is not None else name
            self.last = (x, name)
            if self.alias[name] != name:
                return
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            if self.hessians:
                self.sums[name] = self.sums.get(name, 0) + x2.T @ x2
            self.counts[name] = self.counts.get(name, 0) + x2.shape[0]
            self.rows.setdefault(name, []).append(x2[:: self.stride].clone())
        return pre

    def new_window(self) -> None:
        self.last = (None, None)


@torch.no_grad()
def collect(model: torch.nn.Module, tokenizer: Any = None, ids: Tensor | None = None, max_tokens: int = 1024,
            window: int = 256, sample_rows: int = 256, hessians: bool = True) -> Calibration:
    """Hessians and input samples of every nn.Linear of an eager causal LM over `ids` (default: the shipped
    calibration text, tokenized with `tokenizer` or the one found next to the model), in windows of `window`.
    hessians=False: input samples only (what AWQ smoothing and the A6 checks read; GPTQ needs the Hessians)."""
    if ids is None:
        tokenizer = tokenizer if tokenizer is not None else find_tokenizer(model)
        if tokenizer is None:
            raise ValueError("calibration needs token ids or a tokenizer (none was found next to the model)")
        ids = calibration_ids(tokenizer, max_tokens=max_tokens)
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)[:max_tokens]
    p = next(model.parameters())
    run = model if p.dtype == torch.float32 and p.device.type == "cpu" else copy.deepcopy(model).float().cpu()
    linears = {name: m for name, m in run.named_modules() if isinstance(m, torch.nn.Linear)}
    rec = _Recorder(stride=max(1, ids.numel() // max(1, sample_rows)), hessians=hessians)
    handles = [m.register_forward_pre_hook(rec.hook(name)) for name, m in linears.items()]
    was_training = run.training
    run.eval()
    try:
        for s in range(0, ids.numel(), window):
            chunk = ids[s:s + window]
            if chunk.numel() < 2:
                continue
            run(chunk.unsqueeze(0))
            rec.new_window()
    finally:
        for h in handles:
            h.remove()
        run.train(was_training)
    hess = {name: 2.0 * rec.sums[name] / max(1, rec.counts[name]) for name in rec.sums}
    rows = {name: torch.cat(r)[:sample_rows] for name, r in rec.rows.items()}
    stats = Calibration(tokens=int(ids.numel()))
    for name in linears:
        leader = rec.alias.get(name)
        if leader in rows:
            stats.samples[f"{name}.weight"] = rows[leader]
        if leader in hess:
            stats.hessians[f"{name}.weight"] = hess[leader]
    return stats
