"""Speculative decoding on a code-editing prompt: the answer re-emits most of the prompt, so suffix-tree drafts
are accepted several tokens at a time, and the output is exactly what plain greedy decoding produces.

A tiny seeded Llama keeps this fast on a CPU; with SmolLM2 run benchmarks/speculative.py.

    python examples/speculative_code_edit.py
"""

import torch

import braze
from braze.models import tiny_causal_lm


def main() -> None:
    model = tiny_causal_lm("llama")
    compiled = braze.compile(model, max_seq=128, speculate="suffix")  # generate() speculates by default now
    code = torch.randint(3, 256, (16,), generator=torch.Generator().manual_seed(0))
    prompt = torch.cat([code, code, code])[None]  # a "file" the model is asked to repeat with edits
    spec = compiled.generate(prompt, max_new_tokens=32)
    plain = compiled.generate(prompt, max_new_tokens=32, speculate=False)
    stats = compiled.generator.spec.stats
    with torch.no_grad():
        eager = model.generate(prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    mismatch = (spec != eager).sum().item()
    print(f"speculative == plain greedy: {torch.equal(spec, plain)}; tokens per verify step: "
          f"{stats.accepted_per_verify:.2f} over {stats.verify_steps} verify and {stats.plain_steps} plain steps")
    print(f"max |braze - eager| = {mismatch} differing tokens vs HF generate")
    assert torch.equal(spec, plain) and mismatch == 0


if __name__ == "__main__":
    main()
