"""`make demo`: compile the built-in SmolLM2-135M-Instruct, run a forward pass, print the report and the error."""

from __future__ import annotations

import time

import torch

import braze
from braze.models import load_smollm2


def main() -> None:
    t0 = time.perf_counter()
    model, tok = load_smollm2(torch.float32)
    print(f"loaded SmolLM2-135M-Instruct (dequantized Q4_1 GGUF) in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    compiled = braze.compile(model, max_seq=256, max_batch=4)
    print(f"compiled in {time.perf_counter() - t0:.1f} s\n")
    print(compiled.report)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, return_tensors="pt").input_ids
    t0 = time.perf_counter()
    logits = compiled(ids).logits
    took = time.perf_counter() - t0
    with torch.no_grad():
        ref = model(ids).logits
    err = (logits - ref).abs().max().item()
    next_tok = tok.decode(logits[0, -1].argmax())
    print(f"\nforward over {ids.shape[1]} prompt tokens ({compiled.executor_name} executor: the Triton interpreter on "
          f"CPU, {took:.1f} s; interpreter timings are not performance)")
    print(f"launches: {compiled.stats['launches']}, eager fallback ops: {compiled.stats['eager_ops']}")
    print(f"max |compiled - eager| logits: {err:.3e}   next token: {next_tok!r} (eager: "
          f"{tok.decode(ref[0, -1].argmax())!r})")
    if err > 1e-3:
        raise SystemExit(f"golden check failed: max error {err:.3e} > 1e-3")


if __name__ == "__main__":
    main()
