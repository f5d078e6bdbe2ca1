"""Speculative decoding on a code-editing prompt with SmolLM2: the answer re-emits most of the prompt, so
suffix-tree drafts are accepted several tokens at a time, and the output is exactly plain greedy decoding's.

On a CPU this runs the `reference` executor (braze ops' torch implementations) to stay fast; on a GPU, kernels.

    python examples/speculative_code_edit.py
"""

import json
from importlib import resources

import torch

import braze
from braze.models import load_smollm2


def main() -> None:
    model, tok = load_smollm2()
    executor = "cuda" if torch.cuda.is_available() else "reference"
    model.to("cuda" if executor == "cuda" else "cpu")
    compiled = braze.compile(model, max_seq=384, max_batch=1, executor=executor, speculate="suffix")
    work = json.loads(resources.files("braze").joinpath("data/spec_workloads.json").read_text())
    prompt = next(w["prompt"] for w in work["repetitive"] if w["name"] == "code_edit_rename")
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids.to(model.device)
    spec = compiled.generate(ids, max_new_tokens=24, max_spec_tokens=16)  # speculate="suffix" made it the default
    stats = compiled.generator.spec.stats
    plain = compiled.generate(ids, max_new_tokens=24, speculate=False)
    with torch.no_grad():
        eager = model.generate(ids, max_new_tokens=24, do_sample=False)
    n = min(spec.shape[1], eager.shape[1])
    print(tok.decode(spec[0, ids.shape[1]:], skip_special_tokens=True))
    print(f"\nmax |braze - eager| = {int((spec[:, :n] != eager[:, :n]).sum())} differing tokens vs HF generate")
    print(f"speculative == plain greedy: {torch.equal(spec, plain)}; {stats.accepted_per_verify:.2f} tokens per "
          f"verify step over {stats.verify_steps} verify and {stats.plain_steps} plain steps ({executor} executor)")
    assert torch.equal(spec, plain)


if __name__ == "__main__":
    main()
