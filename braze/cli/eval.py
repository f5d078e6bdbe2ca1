"""`braze eval MODEL`: perplexity (and greedy agreement) of FP vs DFloat11 vs INT6 variants (braze.eval)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from braze.kvcompress.policy import POLICIES

from .common import UsageError, device_for, int_at_least, nonneg_int, positive_int
from .models import MODEL_HELP

KV_WINDOW = 16  # recent tokens every policy keeps in the KV table (kv_compression_table's kv_window)
# perplexity predicts each token from the ones before it: a window or a text needs two tokens to predict one
PERPLEXITY_TOKENS = int_at_least(2, "an integer >= 2 (perplexity predicts a token from the ones before it)")


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("eval", parents=parents, help="perplexity of FP vs df11 vs int6 variants",
                       description="Perplexity of a causal LM on braze's shipped evaluation text (or --text FILE), "
                       "FP vs DFloat11 vs INT6, as a table. Compiled variants run on the reference executor by "
                       "default (torch ops: quick on a CPU; the figures are the same math as the kernels).",
                       epilog=f"MODEL is {MODEL_HELP}.")
    p.add_argument("model", metavar="MODEL", help="a causal LM")
    p.add_argument("--quant", nargs="+", default=["df11", "int6"],
                   choices=("df11", "int6", "int6-rtn", "int6-gptq", "int6-a8", "int6-a6", "int6-mixed"),
                   help="variants besides FP (default: df11 int6)")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="a UTF-8 text file (default: braze/data/eval_text.txt)")
    p.add_argument("--window", type=PERPLEXITY_TOKENS, default=256, metavar="N",
                   help="tokens per window, at least 2 (default 256)")
    p.add_argument("--max-tokens", type=PERPLEXITY_TOKENS, default=None, metavar="N",
                   help="evaluate only the first N tokens (N >= 2)")
    p.add_argument("--agreement-tokens", type=nonneg_int, default=0, metavar="N",
                   help="also compare N greedy tokens of each variant with FP on a chat prompt (default 0: off)")
    p.add_argument("--executor", choices=("reference", "interpret", "cuda"), default="reference",
                   help="executor for the compiled variants (default reference)")
    p.add_argument("--kv-compression", nargs="+", default=None, metavar="POLICY",
                   choices=POLICIES,
                   help="instead of the quant table: the full KV cache vs these compression policies (perplexity of "
                   "a continuation after the compressed context, next-token agreement, greedy divergence, needles)")
    p.add_argument("--kv-budgets", nargs="+", type=float, default=None, metavar="F",
                   help="with --kv-compression: shares of the context kept, each in (0, 1) (default 0.5 0.25 0.125)")
    p.add_argument("--kv-context", type=positive_int, default=None, metavar="N",
                   help=f"with --kv-compression: context tokens, at least {2 * KV_WINDOW} (default 448; 64 "
                   "continuation tokens follow)")
    p.set_defaults(func=main)


def check_kv_options(args: argparse.Namespace) -> None:
    """The KV-table options belong to --kv-compression and must leave the policies something to choose."""
    given = [flag for flag, value in (("--kv-budgets", args.kv_budgets), ("--kv-context", args.kv_context))
             if value is not None]
    if given and not args.kv_compression:
        raise UsageError(f"{' and '.join(given)} set(s) the KV-compression table: give --kv-compression POLICY ...")
    bad = [b for b in args.kv_budgets or () if not 0.0 < b < 1.0]
    if bad:
        raise UsageError(f"--kv-budgets {bad[0]:g}: a budget is the share of the context kept, in (0, 1)")
    if args.kv_context is not None and args.kv_context < 2 * KV_WINDOW:
        raise UsageError(f"--kv-context {args.kv_context}: every policy keeps the {KV_WINDOW} most recent tokens; "
                         f"give at least {2 * KV_WINDOW} so a budget has older tokens to choose from")


def _check_text_length(args: argparse.Namespace, tokenizer: Any, text: str | None) -> None:
    """A --text file of one token leaves perplexity nothing to predict: a usage error, not braze.eval's
    ValueError after the compiles."""
    if text is not None and len(tokenizer(text).input_ids) < 2:
        raise UsageError(f"--text {args.text}: tokenizes to fewer than 2 tokens; perplexity needs at least 2")


def main(args: argparse.Namespace) -> int:
    from braze.eval import format_table, quant_perplexity_table

    from .models import resolve_model

    check_kv_options(args)
    if args.executor == "cuda":
        device_for("cuda")
    text = None
    if args.text is not None:
        try:
            text = Path(args.text).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"--text {args.text}: not a readable UTF-8 text file ({e})") from None
        if not text.strip():
            raise UsageError(f"--text {args.text}: the file is empty")
    loaded = resolve_model(args.model)
    if not loaded.causal_lm:
        raise UsageError(f"{args.model}: eval needs a causal LM; this is a {type(loaded.model).__name__}")
    if loaded.tokenizer is None:
        raise UsageError(f"{args.model}: eval needs a model that comes with a tokenizer")
    if args.kv_compression:
        from braze.kvcompress.quality import format_kv_table, kv_compression_table

        context = 448 if args.kv_context is None else args.kv_context
        rows = kv_compression_table(loaded.model, loaded.tokenizer, tuple(args.kv_compression),
                                    tuple(args.kv_budgets or (0.5, 0.25, 0.125)), context=context,
                                    executor=args.executor, kv_window=KV_WINDOW)
        print(format_kv_table(rows, context, 64))
        return 0
    _check_text_length(args, loaded.tokenizer, text)
    variants = ["eager", "braze"] + (["eager-bf16"] if "df11" in args.quant else []) + list(dict.fromkeys(args.quant))
    rows = quant_perplexity_table(loaded.model, loaded.tokenizer, text=text, window=args.window,
                                  executor=args.executor, variants=tuple(variants), max_tokens=args.max_tokens,
                                  agreement_tokens=args.agreement_tokens)
    print(format_table(rows))
    return 0
