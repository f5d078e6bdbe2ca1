"""Perplexity, and the FP vs DFloat11 vs INT6 table on the text that ships with braze.

    from braze.eval import perplexity, quant_perplexity_table, format_table
    ppl = perplexity(model_or_compiled, token_ids, window=128)
    print(format_table(quant_perplexity_table()))          # SmolLM2, braze/data/eval_text.txt

Whatever runs the compiled variants is named in the table (`executor`): the `reference` executor runs the braze
ops' torch implementations, the `interpret` / `cuda` executors run the generated kernels.
"""

from __future__ import annotations

import copy
import math
import re
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

EVAL_TEXT = Path(__file__).resolve().parent / "data" / "eval_text.txt"


def eval_text() -> str:
    """The English prose shipped for perplexity checks (written for braze; no download)."""
    return EVAL_TEXT.read_text()


def _logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def perplexity(model_or_compiled: Any, token_ids: Any, window: int = 128, batch: int = 1) -> float:
    """exp(mean next-token NLL) over `token_ids` (1-D), in windows of `window` tokens.

    Consecutive windows overlap by one token, so every token after the first is predicted exactly once, from at
    most `window - 1` tokens of context. Works on an eager HF model or a braze CompiledModel (whose max_seq must
    be >= window); `batch` full windows are run together (<= the compiled max_batch).
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1)
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    if ids.numel() < 2:
        raise ValueError("need at least 2 tokens")
    step = window - 1
    starts = list(range(0, ids.numel() - 1, step))
    chunks = [ids[s: s + window] for s in starts]
    device = getattr(model_or_compiled, "device", None)
    if device is None:
        p = next(iter(model_or_compiled.parameters()), None) if hasattr(model_or_compiled, "parameters") else None
        device = p.device if p is not None else torch.device("cpu")
    nll, count = 0.0, 0
    i = 0
    while i < len(chunks):
        group = [chunks[i]]
        while (len(group) < batch and i + len(group) < len(chunks)
               and chunks[i + len(group)].numel() == chunks[i].numel()):
            group.append(chunks[i + len(group)])
        x = torch.stack(group).to(device)
        logits = _logits(model_or_compiled, x).float()
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += x[:, 1:].numel()
        i += len(group)
    return math.exp(nll / count)


def bf16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose floating-point parameters are rounded to BF16 and back (same dtype as before):
    the model DFloat11 reproduces exactly once it is stored as BF16."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.is_floating_point():
                p.copy_(p.to(torch.bfloat16).to(p.dtype))
    return rounded


def compressed_bits_per_weight(compiled: Any) -> float | None:
    """Bits/weight of the weights a quant pass compressed, from its compile-report note (None: no quant)."""
    report = getattr(compiled, "report", None)
    for p in getattr(report, "passes", []):
        if p.name.startswith("quantize_"):
            for note in p.notes:
                m = re.search(r"total: .*?([\d.]+) bits/weight", note)
                if m:
                    return float(m.group(1))
    return None


DEFAULT_VARIANTS = ("eager", "eager-bf16", "braze", "df11", "int6", "int6-mixed")


def quant_perplexity_table(model: Any = None, tokenizer: Any = None, text: str | None = None, window: int = 128,
                           executor: str = "reference", variants: tuple[str, ...] = DEFAULT_VARIANTS,
                           max_tokens: int | None = None, batch: int = 1) -> list[dict[str, Any]]:
    """Perplexity of FP, DFloat11 and INT6 variants of one causal LM on one text.

    Defaults: SmolLM2-135M-Instruct (fp32) on braze/data/eval_text.txt, compiled variants on the `reference`
    executor (torch ops; fast on CPU). Variants: "eager" (the model), "eager-bf16" (weights rounded to BF16:
    the model DFloat11 stores), "braze" (compiled, no quant), "df11" (the BF16-rounded model, quant="df11"),
    "int6" (W6A16), "int6-gptq" (W6A16, GPTQ rounding calibrated on
    braze/data/calib_text.txt), "int6-a8" (W6A8), "int6-mixed" (FlexQ: down_proj W6A8, the rest W6A6).
    """
    import braze

    if model is None:
        from braze.models import load_smollm2

        model, loaded_tok = load_smollm2()
        tokenizer = tokenizer or loaded_tok
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to tokenize the text")
    ids = torch.tensor(tokenizer(text if text is not None else eval_text()).input_ids, dtype=torch.long)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    from braze.quant.gptq import calibrate  # int6-gptq: calibrated on braze/data/calib_text.txt, not `text`

    rounded = None
    rows: list[dict[str, Any]] = []
    opts = dict(max_seq=window, max_batch=max(1, batch), executor=executor)
    builders = {
        "eager": lambda: model,
        "eager-bf16": lambda: rounded,
        "braze": lambda: braze.compile(model, **opts),
        "df11": lambda: braze.compile(rounded, quant="df11", cast_bf16=True, **opts),
        "int6": lambda: braze.compile(model, quant="int6", int6_act="a16", **opts),
        "int6-a8": lambda: braze.compile(model, quant="int6", int6_act="a8", **opts),
        "int6-mixed": lambda: braze.compile(model, quant="int6", int6_act="mixed", **opts),
        "int6-gptq": lambda: braze.compile(model, quant="int6", int6_act="a16", int6_method="gptq",
                                           int6_calibration=calibrate(model, tokenizer), **opts),
    }
    unknown = sorted(set(variants) - set(builders))
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(builders)}")
    base = None
    for name in variants:
        if name in ("eager-bf16", "df11") and rounded is None:
            rounded = bf16_rounded(model)
        start = time.perf_counter()
        runner = builders[name]()
        ppl = perplexity(runner, ids, window, batch)
        base = ppl if base is None else base
        rows.append({
            "variant": name,
            "executor": "eager" if name.startswith("eager") else executor,
            "perplexity": ppl,
            "delta_pct": 100.0 * (ppl / base - 1.0),
            "bits_per_weight": compressed_bits_per_weight(runner) if not name.startswith("eager") else None,
            "tokens": int(ids.numel()),
            "seconds": time.perf_counter() - start,
        })
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of quant_perplexity_table rows (delta relative to the first row)."""
    lines = ["| variant | executor | perplexity | delta vs first | bits/weight (compressed tensors) | seconds |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        bits = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        lines.append(f"| {r['variant']} | {r['executor']} | {r['perplexity']:.4f} | {r['delta_pct']:+.3f}% | {bits} "
                     f"| {r['seconds']:.1f} |")
    if rows:
        lines.append(f"\n{rows[0]['tokens']} tokens")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m braze.eval
    print(format_table(quant_perplexity_table()))
