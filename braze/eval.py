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

from braze.cli.common import plural

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


AGREEMENT_PROMPT = "Write a short story about a robot who learns to paint."


@torch.no_grad()
def greedy_continuation(model_or_compiled: Any, prompt_ids: torch.Tensor, max_new_tokens: int = 64) -> torch.Tensor:
    """`max_new_tokens` greedy tokens after `prompt_ids` [S] (EOS ignored, so every variant yields the same count),
    from an eager HF model or a braze CompiledModel."""
    ids = prompt_ids.reshape(1, -1)
    if hasattr(model_or_compiled, "generator"):
        out = model_or_compiled.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None)
    else:
        out = model_or_compiled.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                                         do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].cpu()


@torch.no_grad()
def greedy_agreement(model_or_compiled: Any, prompt_ids: torch.Tensor, reference: torch.Tensor,
                     own: torch.Tensor | None = None) -> dict[str, Any]:
    """How closely a variant follows a reference greedy continuation.

    `first_divergence`: tokens its own greedy generation shares with `reference` before the first difference;
    `teacher_forced`: the fraction of positions where, fed the reference prefix, its argmax is the reference token
    (one divergence does not decide the rest, unlike comparing free-running generations position by position).
    """
    if own is None:  # the variant's own greedy continuation (given when already generated)
        own = greedy_continuation(model_or_compiled, prompt_ids, reference.numel())
    diff = (own != reference).nonzero()
    first = int(diff[0]) if diff.numel() else reference.numel()
    seq = torch.cat([prompt_ids.reshape(-1), reference]).unsqueeze(0)
    logits = _logits(model_or_compiled, seq)[0, prompt_ids.numel() - 1: -1]
    forced = (logits.argmax(-1).cpu() == reference).float().mean().item()
    return {"first_divergence": first, "teacher_forced": forced, "tokens": int(reference.numel())}


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


DEFAULT_VARIANTS = ("eager", "eager-bf16", "braze", "df11", "int6", "int6-a8", "int6-mixed")


def quant_perplexity_table(model: Any = None, tokenizer: Any = None, text: str | None = None, window: int = 128,
                           executor: str = "reference", variants: tuple[str, ...] = DEFAULT_VARIANTS,
                           max_tokens: int | None = None, batch: int = 1,
                           agreement_tokens: int = 0) -> list[dict[str, Any]]:
    """Perplexity of FP, DFloat11 and INT6 variants of one causal LM on one text.

    Defaults: SmolLM2-135M-Instruct (fp32) on braze/data/eval_text.txt, compiled variants on the `reference`
    executor (torch ops; fast on CPU). Variants: "eager" (the model), "eager-bf16" (weights rounded to BF16:
    the model DFloat11 stores), "braze" (compiled, no quant), "df11" (the BF16-rounded model, quant="df11"),
    "int6" (W6A16, the default int6 method: activation-aware smoothing), "int6-rtn" (W6A16, plain round to
    nearest), "int6-gptq" (W6A16, GPTQ rounding), "int6-a8" (W6A8), "int6-a6" (W6A6 asked for every linear;
    the sensitivity pass keeps A8 where A6 hurts), "int6-mixed" (A6 or A8 per linear by sensitivity). Every
    int6 variant shares one calibration over braze/data/calib_text.txt, never the evaluated text.
    agreement_tokens > 0 adds each variant's greedy agreement with the first variant on AGREEMENT_PROMPT (chat
    template) over that many tokens (greedy_agreement).
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
    from braze.quant.calibration import collect  # calibrated on braze/data/calib_text.txt, never on `text`

    rounded = None
    calibration = None
    rows: list[dict[str, Any]] = []
    opts = dict(max_seq=window, max_batch=max(1, batch), executor=executor)

    def int6(act: str, method: str = "auto") -> Any:
        nonlocal calibration
        if calibration is None:
            calibration = collect(model, tokenizer)
        return braze.compile(model, quant="int6", int6_act=act, int6_method=method, int6_calibration=calibration,
                             **opts)

    builders = {
        "eager": lambda: model,
        "eager-bf16": lambda: rounded,
        "braze": lambda: braze.compile(model, **opts),
        "df11": lambda: braze.compile(rounded, quant="df11", cast_bf16=True, **opts),
        "int6": lambda: int6("a16"),
        "int6-rtn": lambda: int6("a16", "rtn"),
        "int6-gptq": lambda: int6("a16", "gptq"),
        "int6-a8": lambda: int6("a8"),
        "int6-a6": lambda: int6("a6"),
        "int6-mixed": lambda: int6("mixed"),
    }
    unknown = sorted(set(variants) - set(builders))
    if unknown:
        raise ValueError(f"unknown variant(s) {', '.join(unknown)}; valid: {', '.join(builders)}")
    base = None
    prompt_ids = reference = None
    if agreement_tokens:
        if getattr(tokenizer, "chat_template", None):
            prompt_ids = torch.tensor(tokenizer.apply_chat_template(
                [{"role": "user", "content": AGREEMENT_PROMPT}], add_generation_prompt=True, tokenize=True,
                return_dict=True)["input_ids"], dtype=torch.long)
        else:
            prompt_ids = torch.tensor(tokenizer(AGREEMENT_PROMPT).input_ids, dtype=torch.long)
        opts["max_seq"] = max(window, prompt_ids.numel() + agreement_tokens)
    for name in variants:
        if name in ("eager-bf16", "df11") and rounded is None:
            rounded = bf16_rounded(model)
        start = time.perf_counter()
        runner = builders[name]()
        ppl = perplexity(runner, ids, window, batch)
        base = ppl if base is None else base
        agree = None
        if prompt_ids is not None:
            own = None
            if reference is None:  # the first variant is the reference: generate its continuation once
                reference = own = greedy_continuation(runner, prompt_ids, agreement_tokens)
            agree = greedy_agreement(runner, prompt_ids, reference, own)
        rows.append({
            "agreement": agree,
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
    agree = any(r.get("agreement") for r in rows)
    head = "| variant | executor | perplexity | delta vs first | bits/weight (compressed tensors) |"
    head += " greedy: first divergence / teacher-forced agreement |" if agree else ""
    lines = [head + " seconds |", "|---" * (7 if agree else 6) + "|"]
    for r in rows:
        bits = "-" if r["bits_per_weight"] is None else f"{r['bits_per_weight']:.3f}"
        line = f"| {r['variant']} | {r['executor']} | {r['perplexity']:.4f} | {r['delta_pct']:+.3f}% | {bits} |"
        if agree:
            a = r.get("agreement")
            line += f" {a['first_divergence']}/{a['tokens']} / {100 * a['teacher_forced']:.1f}% |" if a else " - |"
        lines.append(line + f" {r['seconds']:.1f} |")
    if rows:
        lines.append(f"\n{plural(rows[0]['tokens'], 'token')}")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m braze.eval
    print(format_table(quant_perplexity_table()))
