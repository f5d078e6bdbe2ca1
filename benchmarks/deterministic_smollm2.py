"""Deterministic mode on the full SmolLM2-135M-Instruct (30 layers, the 49152-token lm_head), fp16 through LayerCast.

A chat prompt generated greedily alone (batch 1) and in row 1 of a left-padded batch of 2 beside a longer random
prompt: the logits at every generated position must be bitwise equal (compared as int32 bit patterns), and so must
the tokens; with --speculate, speculative decoding (suffix drafts, the second call drafting the first's
continuation) must emit the same tokens from the same logits bits. The pytest suite checks the real weights cut to
one layer and 2048 vocabulary rows (tests/test_deterministic.py); this is the whole model, too slow for the suite
under the Triton interpreter (minutes per forward on 2 cores), so it runs here and its result is committed.

    .venv/bin/python benchmarks/deterministic_smollm2.py [--new 2] [--speculate] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import braze  # noqa: E402
from braze.models import load_smollm2  # noqa: E402


def _bits_differ(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.float().view(torch.int32) != b.float().view(torch.int32)).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new", type=int, default=2, help="tokens generated per request (default 2)")
    p.add_argument("--speculate", action="store_true", help="also check speculative decoding (two more calls)")
    p.add_argument("--out", help="also write the report to this file")
    args = p.parse_args()
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    model, tok = load_smollm2(torch.float32)
    model = model.to(torch.float16).eval()
    cfg = model.config
    t0 = time.perf_counter()
    cm = braze.compile(model, max_seq=48, max_batch=2, deterministic=True)
    say(f"SmolLM2-135M-Instruct fp16, {cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}; deterministic compile "
        f"in {time.perf_counter() - t0:.1f} s; {cm.report.extra['deterministic'][:80]}...")
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True,
                                   tokenize=False)
    prompt = torch.tensor(tok(text)["input_ids"])
    other = torch.randint(3, cfg.vocab_size, (len(prompt) + 5,), generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(2, len(other), dtype=torch.long)
    mask = torch.zeros_like(ids)
    ids[0], mask[0] = other, 1
    ids[1, -len(prompt):], mask[1, -len(prompt):] = prompt, 1
    kw = dict(max_new_tokens=args.new, eos_token_id=None, pad_token_id=0, output_logits=True)

    def run(name: str, **extra) -> tuple[torch.Tensor, torch.Tensor]:
        t = time.perf_counter()
        if extra.pop("batch", 1) == 1:
            out = cm.generate(prompt[None], **kw, **extra)
            seq, logits = out.sequences[0, len(prompt):], out.logits[0]
        else:
            out = cm.generate(ids, attention_mask=mask, **kw, **extra)
            seq, logits = out.sequences[1, ids.shape[1]:], out.logits[1]
        say(f"{name}: tokens {seq.tolist()} ({tok.decode(seq)!r}) in {time.perf_counter() - t:.0f} s")
        return seq, logits

    alone_seq, alone = run("alone (batch 1)")
    batched_seq, batched = run("row 1 of a left-padded batch of 2", batch=2)
    diff_batch = _bits_differ(alone, batched)
    say(f"logits bits differing, batch 2 vs alone: {diff_batch} of {alone.numel()}")
    ok = diff_batch == 0 and torch.equal(alone_seq, batched_seq)
    if args.speculate:
        for attempt in (1, 2):  # the second call drafts the first's cached continuation
            spec_seq, spec = run(f"speculative, call {attempt}", speculate=True)
        accepted = cm.generator.stats.extra["speculation"]["accepted_drafts"]
        diff_spec = _bits_differ(alone, spec)
        say(f"speculative (call 2, {accepted} drafts accepted) vs alone: {diff_spec} logits bits differ")
        ok = ok and diff_spec == 0 and torch.equal(alone_seq, spec_seq)
    say("batch-invariant: " + ("yes" if ok else "NO"))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
