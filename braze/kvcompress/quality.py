"""KV-compression quality: a compressed-cache model against the full cache on the shipped text.

For each (policy, budget): perplexity of a continuation teacher-forced after a compressed context, agreement of
its next-token argmax with the full cache's (teacher-forced), the first divergence of free-running greedy
generation, and needle retrieval (a passcode sentence planted in the context, asked for at its end). The budget
here is the share of the context kept: kv_budget = that many tokens + the continuation's decode slots.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F

from braze.kvcompress.policy import DURING_DECODE

NEEDLES = (("4817", 0.15), ("9352", 0.35), ("2604", 0.55), ("7139", 0.75))  # (passcode, depth in the context)
NEEDLE = " The secret passcode is {}. Remember it."
QUESTION = " What is the secret passcode? The secret passcode is"


@torch.no_grad()
def continuation_logits(compiled: Any, context: torch.Tensor, continuation: torch.Tensor) -> torch.Tensor:
    """Logits [T, V] predicting continuation[t] from context + continuation[:t]: one prefill over the context (the
    cache compressed after it when compiled with kv_compression), then teacher-forced decode steps."""
    from braze.runtime.kv_compression import compressed_buffers, decode_state, next_slot, plan_call, prefill_inputs

    gen = compiled.generator
    dev = gen.device
    s, t = context.numel(), continuation.numel()
    gen.check(1, s, t)
    caches = gen.new_caches(1)
    kv_start = torch.zeros(1, dtype=torch.int32, device=dev)
    values = {"input_ids": context[None].to(dev), "position_ids": torch.arange(s, device=dev)[None],
              "cache_len": torch.zeros(1, dtype=torch.int64, device=dev), "kv_start": kv_start, **caches}
    base, extra = s, {}
    comp = None
    if gen.compression is not None:
        comp = plan_call(gen.compression, s, t, gen.max_seq, compressed_buffers(gen.compression, 1, dev))
        values.update(prefill_inputs(comp, dev))
    (logits,) = gen.prefill.run(gen._ordered(gen.prefill, values))
    out = [logits[0, -1].float()]
    if comp is not None:
        caches, base = comp.caches, comp.end
        kv_start, extra = decode_state(gen.compression, comp, kv_start)
    slot = base
    for i in range(t - 1):
        if comp is not None:  # rkv: a full cache is compressed back to the budget first
            slot = next_slot(gen.compression, comp, slot, kv_start)
        values = {"input_ids": continuation[i].reshape(1, 1).to(dev),
                  "position_ids": torch.tensor([[s + i]], device=dev),
                  "cache_len": torch.tensor([slot], dtype=torch.int64, device=dev), "kv_start": kv_start,
                  **caches, **extra}
        (logits,) = gen.decode.run(gen._ordered(gen.decode, values))
        out.append(logits[0, -1].float())
        slot += 1
    return torch.stack(out).cpu()


def _needle_prompts(tokenizer: Any, text_ids: torch.Tensor, context: int) -> list[tuple[str, torch.Tensor]]:
    q = torch.tensor(tokenizer(QUESTION, add_special_tokens=False).input_ids)
    prompts = []
    for code, depth in NEEDLES:
        n = torch.tensor(tokenizer(NEEDLE.format(code), add_special_tokens=False).input_ids)
        body = text_ids[: context - n.numel() - q.numel()]
        cut = int(depth * body.numel())
        prompts.append((code, torch.cat([body[:cut], n, body[cut:], q])))
    return prompts


@torch.no_grad()
def kv_compression_table(model: Any = None, tokenizer: Any = None, policies: tuple[str, ...] = ("keydiff", "snapkv",
                         "adakv", "chunkkv"), budgets: tuple[float, ...] = (0.5, 0.25, 0.125), context: int = 448,
                         continuation: int = 64, executor: str = "reference", kv_window: int = 16,
                         needles: bool = False, on_row: Any = None) -> list[dict[str, Any]]:
    """Rows: the full cache first, then each budget x policy (see the module docstring); on_row(row) is called as
    each row completes. needles: off by default (SmolLM2-135M retrieves none of them even with the full cache)."""
    import braze

    if model is None:
        from braze.models import load_smollm2

        model, tokenizer = load_smollm2()
    from braze.eval import eval_text

    ids = torch.tensor(tokenizer(eval_text()).input_ids, dtype=torch.long)
    ctx, cont = ids[:context], ids[context: context + continuation]
    prompts = _needle_prompts(tokenizer, ids, context) if needles else []
    max_seq = context + continuation
    rows: list[dict[str, Any]] = []
    ref_logits = ref_greedy = None
    for policy, budget in [(None, 1.0)] + [(p, b) for b in budgets for p in policies]:
        start = time.perf_counter()
        opts: dict[str, Any] = {"max_seq": max_seq, "max_batch": 1, "executor": executor}
        kept = context
        if policy is not None:
            kept = max(kv_window, round(budget * context))
            # rkv's budget is all it keeps (it re-compresses during decoding); the others keep room for the continuation
            opts.update(kv_compression=policy, kv_budget=kept if policy in DURING_DECODE else kept + continuation,
                        kv_window=kv_window)
        cm = braze.compile(model, **opts)
        logits = continuation_logits(cm, ctx, cont)
        greedy = cm.generate(ctx[None], max_new_tokens=continuation, do_sample=False, eos_token_id=None)[0, context:]
        if ref_logits is None:
            ref_logits, ref_greedy = logits, greedy
        diff = (greedy.cpu() != ref_greedy.cpu()).nonzero()
        hits = 0
        for code, prompt in prompts:
            new = cm.generate(prompt[None], max_new_tokens=4, do_sample=False, eos_token_id=None)[0, prompt.numel():]
            hits += code in tokenizer.decode(new)
        stats = cm.generator.stats
        rows.append({
            "policy": policy or "full cache", "budget": budget, "kept": kept,
            "perplexity": math.exp(F.cross_entropy(logits, cont).item()),
            "agreement": (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item(),
            "first_divergence": int(diff[0]) if diff.numel() else continuation,
            "needles": f"{hits}/{len(prompts)}" if prompts else "-",
            "cache_bytes": stats.kv_cache_bytes,
            "cache_bytes_full": stats.extra.get("kv_cache_bytes_uncompressed", stats.kv_cache_bytes),
            "seconds": time.perf_counter() - start,
        })
        if on_row is not None:
            on_row(rows[-1])
    return rows


KV_TABLE_HEAD = ("| policy | context kept | perplexity | next-token agreement vs full | greedy first divergence | "
                 "needles | decode KV cache bytes (vs full) | seconds |\n" + "|---" * 8 + "|")


def format_kv_row(r: dict[str, Any], context: int, continuation: int) -> str:
    return (f"| {r['policy']} | {r['kept']}/{context} ({r['kept'] / context:.1%}) | {r['perplexity']:.3f} | "
            f"{100 * r['agreement']:.1f}% | {r['first_divergence']}/{continuation} | {r['needles']} | "
            f"{r['cache_bytes']} ({r['cache_bytes'] / r['cache_bytes_full']:.1%}) | {r['seconds']:.1f} |")


def format_kv_table(rows: list[dict[str, Any]], context: int, continuation: int) -> str:
    return "\n".join([KV_TABLE_HEAD] + [format_kv_row(r, context, continuation) for r in rows])
