"""`braze run PKG --prompt TEXT`: load a causal-LM package and generate with CompiledModel.generate.

Decoding is greedy unless a sampling option is given: --temperature T (> 0), --top-k K and --top-p P may be combined
freely (HF's order: temperature -> top-k -> top-p; temperature 1.0 when only top-k / top-p is given) and the draw is
seeded by --seed (default 0). --temperature 0 is greedy, so it is refused together with --top-k / --top-p, and
--seed without sampling is refused (it would do nothing).

--prompt (or --prompt-ids) repeated generates for every prompt in one left-padded batch (CompiledModel.generate with
an attention mask), and prints each completion under a `==> prompt N: ... <==` line.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from .common import (
    Stages,
    UsageError,
    add_executor,
    add_sha256,
    article,
    err,
    executor_words,
    load_package,
    nonneg_float,
    nonneg_int,
    package_tokenizer,
    plural,
    positive_float,
    positive_int,
    probability,
    secondary_rank,
)


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", parents=parents, help="generate text with a package",
                       description="Generate a continuation of a prompt with a causal-LM package "
                       "(CompiledModel.generate: prefill + decode plans over the KV cache).",
                       epilog="Decoding is greedy unless --temperature (> 0), --top-k or --top-p is given; they "
                       "combine (temperature 1.0 unless given) and --seed seeds the draw.")
    p.add_argument("package", metavar="PKG", help="package directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", action="append",
                     help="prompt text (tokenized with the package's tokenizer); repeat it to generate for several "
                     "prompts in one batch (up to the package's max batch), each completion printed under its prompt")
    src.add_argument("--prompt-ids", metavar="IDS", action="append",
                     help="prompt as token ids, e.g. '1 2 3' (packages without a tokenizer); repeatable like --prompt")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, metavar="N", help="tokens to generate "
                   "(default 32; fewer if the package's max seq leaves less room)")
    p.add_argument("--temperature", type=nonneg_float, default=None, metavar="T",
                   help="sample at temperature T > 0 (0: greedy, the default without sampling options)")
    p.add_argument("--top-k", type=positive_int, default=None, metavar="K",
                   help="sample from the K likeliest tokens")
    p.add_argument("--top-p", type=probability, default=None, metavar="P",
                   help="sample from the smallest set of tokens with probability mass >= P, in (0, 1]")
    p.add_argument("--repetition-penalty", type=positive_float, default=None, metavar="P",
                   help="HF's repetition penalty: each token already in the prompt or the output has its logit "
                   "divided by P when positive, multiplied when negative (1.0: off; greedy, sampled or speculative)")
    p.add_argument("--seed", type=nonneg_int, default=None, metavar="S",
                   help="seed of the sampling draw (default 0); needs a sampling option")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--speculate", action=argparse.BooleanOptionalAction, default=None,
                   help="suffix-tree speculative decoding (lossless); default: what the package was compiled with "
                   "(braze compile --speculate suffix)")
    add_executor(p)
    add_sha256(p)
    p.set_defaults(func=main)


def sampling_options(args: argparse.Namespace) -> dict[str, Any]:
    """The generate() sampling options the arguments ask for; contradictory or idle options are a UsageError."""
    filters = [name for name, value in (("--top-k", args.top_k), ("--top-p", args.top_p)) if value is not None]
    if args.temperature == 0 and filters:
        raise UsageError(f"--temperature 0 means greedy decoding, which {' and '.join(filters)} would not change; "
                         f"drop one, or sample with --temperature T > 0")
    sample = bool(filters) or bool(args.temperature)
    if not sample:
        if args.seed is not None:
            raise UsageError("--seed only affects sampling, and decoding is greedy; add --temperature T (> 0), "
                             "--top-k K or --top-p P")
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature or 1.0, "top_k": args.top_k, "top_p": args.top_p,
            "seed": 0 if args.seed is None else args.seed}


def _check_arguments(args: argparse.Namespace) -> None:
    """Everything about the arguments that can be refused before the package is read."""
    if args.chat and args.prompt_ids is not None:
        raise UsageError("--chat wraps prompt text in the chat template; use it with --prompt, not --prompt-ids")
    if any(not text.strip() for text in args.prompt or ()):
        raise UsageError("--prompt is empty; generation needs at least one prompt token")
    if args.stream and len(args.prompt or args.prompt_ids) > 1:
        raise UsageError(f"--stream prints one completion as it is generated; got "
                         f"{len(args.prompt or args.prompt_ids)} prompts: drop --stream or give one prompt")


def _parse_ids(text: str) -> list[int]:
    try:
        prompt = [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--prompt-ids: expected integers separated by spaces, got {text!r}") from None
    if not prompt:
        raise UsageError("--prompt-ids is empty; generation needs at least one prompt token")
    return prompt


def _tokenize(args: argparse.Namespace, tokenizer: Any, text: str) -> list[int]:
    if args.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UsageError(f"{args.package}: the tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False).input_ids
    else:
        prompt = tokenizer(text).input_ids
    if not prompt:
        raise UsageError(f"--prompt {text!r} tokenizes to no tokens")
    return prompt


def _prompts(args: argparse.Namespace, tokenizer: Any, vocab: int | None) -> list[list[int]]:
    """The token ids of each --prompt / --prompt-ids (repeated: one prompt each, generated as one batch)."""
    if args.prompt_ids is not None:
        prompts = [_parse_ids(text) for text in args.prompt_ids]
    else:
        if tokenizer is None:
            raise UsageError(f"{args.package} has no tokenizer; pass token ids with --prompt-ids")
        prompts = [_tokenize(args, tokenizer, text) for text in args.prompt]
    bad = [t for prompt in prompts for t in prompt if t < 0 or (vocab is not None and t >= vocab)]
    if bad:
        raise UsageError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab if vocab else 'vocab'})")
    return prompts


def _batch(prompts: list[list[int]], pad: int, device: Any) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of the prompts left-padded to the longest (generate's batch layout)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.long, device=device)
    return ids, mask


def _check_batch(prompts: list[list[int]], generator: Any) -> None:
    """Every prompt is a row of one generate call: more than the package's batch range is refused up front."""
    most = getattr(generator, "max_batch", None)
    if most is not None and len(prompts) > most:
        raise UsageError(f"{len(prompts)} prompts; the package generates at most {plural(most, 'row')} at once "
                         f"(recompile with a larger --max-batch)")


def _max_new(args: argparse.Namespace, compiled: Any, width: int, several: bool) -> int:
    """--max-new-tokens, reduced (with a note) to what the package's max seq and compressed cache leave after a
    prompt `width` tokens long (the longest, when several are padded to it)."""
    max_seq = compiled.generator.max_seq
    which = "the longest prompt" if several else "the prompt"
    if width >= max_seq:
        raise UsageError(f"{which} has {plural(width, 'token')}; the package's max seq is {max_seq}, which leaves "
                         f"no room to generate (recompile with a larger --max-seq)")
    max_new = min(args.max_new_tokens, max_seq - width)
    if max_new < args.max_new_tokens:
        err(f"[braze] note: --max-new-tokens reduced to {max_new} ({which} has {plural(width, 'token')}, the "
            f"package's max seq is {max_seq})")
    compression = getattr(compiled.generator, "compression", None)
    if compression is None:
        return max_new
    from braze.runtime.kv_compression import max_new_tokens_for  # the cache holds the kept prompt and new tokens

    fits = max_new_tokens_for(compression, width, max_seq, max_new)
    if fits == 0:
        raise UsageError(f"the compressed KV cache (capacity {compression.capacity}) has no room to generate "
                         f"after {article(width)} {width}-token prompt; recompile with a larger --kv-budget")
    if fits < max_new:
        err(f"[braze] note: --max-new-tokens reduced to {fits} (the compressed KV cache holds "
            f"{plural(compression.capacity, 'token')}, the kept prompt included)")
    return min(fits, max_new)


def _eos_ids(tokenizer: Any, model_config: Any) -> list[int]:
    eos: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(model_config, "eos_token_id", None)):
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, (list, tuple)):
            eos.update(int(x) for x in source)
    return sorted(eos)


class Streamer:
    """Prints decoded text as tokens arrive (HF streamer protocol: put(tensor) / end())."""

    def __init__(self, tokenizer: Any, prompt_len: int):
        self.tokenizer = tokenizer
        self.skip = prompt_len  # generate puts the prompt first
        self.tokens: list[int] = []
        self.printed = ""

    def put(self, value: Any) -> None:
        ids = [int(x) for x in value.reshape(-1).tolist()]
        if self.skip:
            self.skip = 0
            return
        self.tokens += ids
        text = decode(self.tokenizer, self.tokens)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def end(self) -> None:
        text = decode(self.tokenizer, self.tokens)
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.printed = text


def decode(tokenizer: Any, ids: list[int]) -> str:
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    return tokenizer.decode(ids, skip_special_tokens=True)


def _load(args: argparse.Namespace) -> tuple[Any, float, bool]:
    """(the package, its load seconds, whether it generates by re-running the forward plan)."""
    t0 = time.perf_counter()
    compiled = load_package(args.package, args.executor, sha256=args.sha256)
    load_s = time.perf_counter() - t0
    if not compiled.causal_lm:
        raise UsageError(f"{args.package}: 'run' needs a causal-LM package; this one holds "
                         f"{compiled.manifest.get('model')} (use 'braze check' or 'braze bench')")
    recompute = getattr(compiled, "generator", None) is None and bool(getattr(compiled, "recompute", None))
    if recompute:  # no KV-cache plans: each token re-runs the forward plan (runtime/recompute.py)
        compiled.generator = compiled._recompute_generator()
        err(f"[braze] note: the package has no KV-cache plans ({compiled.generation_missing}); each new token "
            "re-runs the forward plan over the whole sequence")
    if getattr(compiled, "generator", None) is None:
        if getattr(compiled, "generation_missing", None):
            raise UsageError(f"{args.package}: the package has no generation plans: {compiled.generation_missing}")
        raise UsageError(f"{args.package}: the package has no generation plans (prefill/decode); recompile it "
                         f"with 'braze compile'")
    return compiled, load_s, recompute


def _completion(row: list[int], eos: list[int], max_new: int) -> tuple[list[int], str]:
    """(a row's new tokens up to its EOS, the stop note or ''): generate pads a row after its EOS."""
    if not eos or not any(t in eos for t in row):
        return row, ""
    row = row[: next(i for i, t in enumerate(row) if t in eos) + 1]
    return row, f" (stopped at end-of-sequence token {row[-1]})" if len(row) < max_new else ""


def _label(args: argparse.Namespace, i: int) -> str:
    text = (args.prompt or args.prompt_ids)[i]
    return repr(text if len(text) <= 60 else text[:57] + "...")


def main(args: argparse.Namespace) -> int:
    sampling = sampling_options(args)
    _check_arguments(args)
    with Stages(["load package", "load tokenizer"]) as stages:
        stages.start("loading package")
        compiled, load_s, recompute = _load(args)
        stages.start("loading tokenizer")
        tokenizer = package_tokenizer(compiled)
    prompts = _prompts(args, tokenizer, getattr(compiled.model_config, "vocab_size", None))
    _check_batch(prompts, compiled.generator)
    width = max(len(p) for p in prompts)
    max_new = _max_new(args, compiled, width, len(prompts) > 1)
    speculate = args.speculate
    penalty = {} if args.repetition_penalty is None else {"repetition_penalty": args.repetition_penalty}
    if speculate is None:
        speculate = getattr(compiled.config, "speculate", None) == "suffix" and not recompute
    eos = _eos_ids(tokenizer, compiled.model_config)
    pad = getattr(tokenizer, "pad_token_id", None)
    ids, mask = _batch(prompts, pad if pad is not None else (eos[0] if eos else 0), compiled.device)
    # a tp package runs on every rank of its group; they all generate the same tokens, rank 0 prints them
    speaks = not secondary_rank()
    streamer = Streamer(tokenizer, width) if args.stream and speaks else None
    start = time.perf_counter()
    out = compiled.generate(ids, attention_mask=mask, max_new_tokens=max_new, eos_token_id=eos or None,
                            streamer=streamer, speculate=speculate, **sampling, **penalty)
    seconds = time.perf_counter() - start
    rows = [_completion(out[i, width:].tolist(), eos, max_new) for i in range(len(prompts))]
    if not speaks:
        return 0
    if streamer is None:
        for i, (new, _) in enumerate(rows):
            if len(rows) > 1:
                print(f"==> prompt {i + 1}: {_label(args, i)} <==")
            print(decode(tokenizer, new))
    total = sum(len(new) for new, _ in rows)
    rate = total / seconds if seconds > 0 else float("inf")
    how = ("greedy" if not sampling["do_sample"] else
           "sampled (" + ", ".join(f"{k}={sampling[k]}" for k in ("temperature", "top_k", "top_p", "seed")
                                   if sampling[k] is not None) + ")")
    how += f", repetition_penalty={args.repetition_penalty}" if penalty else ""
    how += ", speculative (suffix)" if speculate else ""
    if len(rows) == 1:
        what = f"{plural(total, 'token')}{rows[0][1]}"
    else:
        stopped = sum(1 for _, note in rows if note)
        what = (f"{plural(total, 'token')} over {len(rows)} prompts"
                + (f" ({stopped} stopped at end-of-sequence)" if stopped else ""))
    err(f"[braze] {what} in {seconds:.2f} s ({rate:.2f} tokens/s), {how}; executor: "
        f"{executor_words(compiled.executor_name, compiled.device)}; package loaded in {load_s:.2f} s")
    return 0
