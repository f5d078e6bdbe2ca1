"""The `braze` command: compile a model into a kernel package, run, inspect, benchmark and check packages.

    braze compile MODEL -o pkg/ [--quant df11|int6] [--speculate suffix] [--deterministic] [--max-seq N] ...
    braze run pkg/ --prompt "..." [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--stream]
    braze inspect pkg/
    braze bench MODEL|pkg/ [--batch B] [--seq S] [--iters N]
    braze check pkg/ MODEL

Errors print one line on stderr (`--debug` shows the traceback); exit code 2 for usage errors, 1 for runtime ones.
Heavy imports (torch, transformers) happen inside the commands, so `--help` and argument errors are instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from braze.cli_models import MODEL_HELP
from braze.runtime.units import format_bytes

EXIT_RUNTIME = 1
EXIT_USAGE = 2
CPU_NOTICE = ("NOTICE: no CUDA GPU: braze ran its kernels under the Triton interpreter on CPU (executor "
              "'interpret'). Interpreter timings measure the interpreter, not kernel performance.")


class UsageError(Exception):
    """A bad argument found after parsing (exit code 2)."""


class CheckFailed(Exception):
    """`braze check` found a mismatch (exit code 1)."""


# ---- argument parsing --------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default prints the usage block too)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _int_at_least(lowest: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= `lowest`, else a one-line error naming `what` was expected."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_nonneg_int = _int_at_least(0, "an integer >= 0")


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


DTYPES = ("auto", "float32", "float16", "bfloat16")
EXECUTOR_HELP = ("auto: CUDA kernels on a GPU, else the Triton interpreter on CPU; cuda; interpret (CPU, also runs "
                 "a CUDA-compiled package)")


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors")
    parser = _Parser(prog="braze", description="braze: an LLM-inference compiler. Compile a PyTorch model into a "
                     "self-contained Triton kernel package, then run, inspect, benchmark and check it.",
                     epilog=f"MODEL is {MODEL_HELP}. Run 'braze COMMAND --help' for a command's options.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"braze {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("compile", parents=[debug], help="compile MODEL into a kernel package",
                       description="Compile MODEL into a kernel package directory (Triton sources, plan, weights, "
                       "tokenizer, manifest).", epilog=f"MODEL is {MODEL_HELP}.")
    p.add_argument("model", metavar="MODEL", help="the model to compile")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="package directory to write (replaced if "
                   "it is an existing package)")
    p.add_argument("--max-seq", type=_positive_int, default=512, metavar="N",
                   help="longest sequence the package accepts (default 512)")
    p.add_argument("--max-batch", type=_positive_int, default=8, metavar="N",
                   help="largest batch the package accepts (default 8)")
    p.add_argument("--executor", choices=("auto", "cuda", "interpret"), default="auto", help=EXECUTOR_HELP)
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="model dtype (auto: float32 on CPU, bfloat16 on a GPU)")
    p.add_argument("--quant", choices=("df11", "int6"), default=None,
                   help="weight compression: df11 (lossless DFloat11) or int6 (FlexQ-style)")
    p.add_argument("--df11-strategy", choices=("auto", "scratch", "fused"), default=None,
                   help="--quant df11 decode: scratch (decode a block, then matmul), fused (decode inside the GEMV), "
                   "auto (default: fused in the decode plan)")
    p.add_argument("--int6-act", choices=("a16", "a8", "a6", "mixed"), default=None,
                   help="--quant int6 activations: a16 (weight-only, default), a8, a6, or mixed (A6/A8 per linear "
                   "by a sensitivity pass on the shipped calibration text)")
    p.add_argument("--int6-method", choices=("auto", "rtn", "awq", "gptq"), default=None,
                   help="--quant int6 weight rounding (default auto: activation-aware smoothing when the model has "
                   "a tokenizer, else round to nearest)")
    p.add_argument("--speculate", choices=("suffix",), default=None, help="speculative decoding drafts (suffix)")
    p.add_argument("--deterministic", action="store_true", help="FP32 math, batch-invariant kernels")
    p.add_argument("--report", action="store_true", help="print the full compile report")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run", parents=[debug], help="generate text with a package",
                       description="Generate a continuation of a prompt with a causal-LM package.")
    p.add_argument("package", metavar="PKG", help="package directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT", help="prompt text (tokenized with the package's tokenizer)")
    src.add_argument("--prompt-ids", metavar="IDS", help="prompt as token ids, e.g. '1 2 3' (packages without a "
                     "tokenizer)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N", help="tokens to generate "
                   "(default 32)")
    p.add_argument("--temperature", type=_nonneg_float, default=0.0, metavar="T",
                   help="sampling temperature; 0 (default) is greedy")
    p.add_argument("--top-k", type=_positive_int, default=None, metavar="K", help="sample from the K likeliest tokens")
    p.add_argument("--top-p", type=_probability, default=None, metavar="P", help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="sampling seed (default 0)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--executor", choices=("auto", "cuda", "interpret"), default="auto", help=EXECUTOR_HELP)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("inspect", parents=[debug], help="show a package's plan, kernels and sizes",
                       description="Show a package's manifest, plan steps, kernels and the graph nodes they cover, "
                       "launches per forward, weight bytes and the bytes-per-token estimate. Verifies file hashes.")
    p.add_argument("package", metavar="PKG", help="package directory")
    p.add_argument("--steps", action="store_true", help="list every plan step in order")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", parents=[debug], help="time braze vs eager vs torch.compile",
                       description="Time one forward of braze, eager PyTorch and torch.compile (inductor) on the "
                       "same inputs, in one run, and print a table.", epilog=f"MODEL is {MODEL_HELP}.")
    p.add_argument("target", metavar="MODEL|PKG", help="a model (compiled here) or a package directory")
    p.add_argument("--model", metavar="MODEL", help="eager model for a package (default: the model it was "
                   "compiled from, if the manifest records one)")
    p.add_argument("--batch", type=_positive_int, default=1, metavar="B", help="batch size (default 1)")
    p.add_argument("--seq", type=_positive_int, default=16, metavar="S", help="sequence length (default 16)")
    p.add_argument("--iters", type=_positive_int, default=5, metavar="N", help="timed iterations (default 5)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed warm-up iterations (default 1)")
    p.add_argument("--executor", choices=("auto", "cuda", "interpret"), default="auto", help=EXECUTOR_HELP)
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="model dtype for MODEL (auto: float32 on "
                   "CPU, bfloat16 on a GPU)")
    p.add_argument("--no-torch-compile", action="store_true", help="skip the torch.compile row")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("check", parents=[debug], help="golden check of a package against the eager model",
                       description="Compare a package's outputs with the eager model's on a few prompts; exit 1 on "
                       "a mismatch.", epilog=f"MODEL is {MODEL_HELP}.")
    p.add_argument("package", metavar="PKG", help="package directory")
    p.add_argument("model", metavar="MODEL", help="the eager model to compare with")
    p.add_argument("--prompts", type=_positive_int, default=3, metavar="N", help="number of prompts (default 3)")
    p.add_argument("--atol", type=_nonneg_float, default=None, help="absolute tolerance (default by dtype: "
                   "fp32 1e-3, fp16 2e-2, bf16 5e-2)")
    p.add_argument("--rtol", type=_nonneg_float, default=None, help="relative tolerance (default: same as atol)")
    p.add_argument("--executor", choices=("auto", "cuda", "interpret"), default="auto", help=EXECUTOR_HELP)
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("eval", parents=[debug], help="perplexity of FP vs df11 vs int6 variants",
                       description="Perplexity of a causal LM on braze's shipped evaluation text (or --text FILE), "
                       "FP vs DFloat11 vs INT6, as a table. Compiled variants run on the reference executor by "
                       "default (torch ops: quick on a CPU; the figures are the same math as the kernels).",
                       epilog=f"MODEL is {MODEL_HELP}.")
    p.add_argument("model", metavar="MODEL", help="a causal LM")
    p.add_argument("--quant", nargs="+", default=["df11", "int6"],
                   choices=("df11", "int6", "int6-rtn", "int6-gptq", "int6-a8", "int6-a6", "int6-mixed"),
                   help="variants besides FP (default: df11 int6)")
    p.add_argument("--text", default=None, help="a UTF-8 text file (default: braze/data/eval_text.txt)")
    p.add_argument("--window", type=_positive_int, default=256, help="tokens per window (default 256)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="evaluate only the first N tokens")
    p.add_argument("--agreement-tokens", type=_nonneg_int, default=0, metavar="N",
                   help="also compare N greedy tokens of each variant with FP on a chat prompt (default 0: off)")
    p.add_argument("--executor", choices=("reference", "interpret", "cuda"), default="reference",
                   help="executor for the compiled variants (default reference)")
    p.set_defaults(func=cmd_eval)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("braze")
    except Exception:
        return "0.1.0"


# ---- shared helpers ------------------------------------------------------------------------------------------------
def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Stages:
    """Progress over a command's long steps (a tqdm bar on a terminal, nothing when piped)."""

    def __init__(self, names: list[str]):
        from tqdm import tqdm

        self.bar = tqdm(total=len(names), file=sys.stderr, disable=None, leave=False,
                        bar_format="{desc} [{n_fmt}/{total_fmt}] {elapsed}")
        self.names = names
        self.times: dict[str, float] = {}
        self._start = time.perf_counter()
        self._current: str | None = None

    def start(self, name: str) -> None:
        self._finish()
        self._current = name
        self._start = time.perf_counter()
        self.bar.set_description_str(name + " ...")

    def _finish(self) -> None:
        if self._current is not None:
            self.times[self._current] = time.perf_counter() - self._start
            self.bar.update(1)
            self._current = None

    def close(self) -> None:
        self._finish()
        self.bar.close()

    def __enter__(self) -> _Stages:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def _device_for(executor: str) -> str:
    import torch

    if executor == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--executor cuda needs a CUDA GPU and none is available; use --executor interpret")
        return "cuda"
    if executor == "interpret":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _executor_words(name: str, device: Any) -> str:
    if name == "interpret":
        return "interpret (Triton interpreter on CPU: not kernel performance)"
    if name == "reference":
        return "reference (torch reference ops: not kernel performance)"
    return f"{name} (Triton kernels on {device})"


def _load_package(path: str, executor: str) -> Any:
    from braze.runtime.package import load_package

    return load_package(path, executor=executor)


def _seq_limit(compiled: Any) -> tuple[int | None, int | None]:
    """(max batch, max seq) of a causal-LM package's forward plan."""
    batch = seq = None
    for s in compiled.plan.symbols:
        if s.label == "batch":
            batch = s.upper
        elif s.label == "seq":
            seq = s.upper
    return batch, seq


def _example_inputs(compiled: Any, batch: int, seq: int, seed: int = 0, vocab: int | None = None) -> tuple:
    """Random inputs that fit a plan: batch/seq symbols take the given sizes, other dims their lower bound."""
    import torch

    g = torch.Generator().manual_seed(seed)
    if compiled.causal_lm:
        vocab = vocab or getattr(compiled.model_config, "vocab_size", None) or 2
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(compiled.device)
        return (ids,)
    syms: dict[str, int] = {}
    for s in compiled.plan.symbols:
        want = batch if s.label == "batch" or s.label.startswith("dim 0") else seq if s.label == "seq" else s.lower
        want = max(s.lower, want if s.upper is None else min(s.upper, want))
        syms[s.name] = want
    out = []
    from braze.runtime.executor import DTYPES

    for spec in compiled.plan.inputs:
        if spec.kind != "user":
            continue
        shape = [int(eval(e, {"__builtins__": {}, "max": max, "min": min}, dict(syms))) for e in spec.shape]
        dtype = DTYPES[spec.dtype]
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        else:
            t = torch.randint(0, 2, shape, generator=g).to(dtype)
        out.append(t.to(compiled.device))
    return tuple(out)


def _eager_forward(model: Any, causal_lm: bool) -> Any:
    import torch

    def run(*inputs: Any) -> Any:
        with torch.no_grad():
            if causal_lm:
                ids = inputs[0]
                pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
                return model(input_ids=ids, position_ids=pos, use_cache=False).logits
            return model(*inputs)

    return run


def _braze_forward(compiled: Any) -> Any:
    def run(*inputs: Any) -> Any:
        out = compiled(*inputs)
        return out.logits if compiled.causal_lm else out

    return run


def _first_tensor(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            t = _first_tensor(o)
            if t is not None:
                return t
    return None


def _compile_model(loaded: Any, options: dict[str, Any]) -> Any:
    """braze.compile a resolved model; a plain module compiles on a call with its example inputs."""
    import braze

    compiled = braze.compile(loaded.model, **options)
    if loaded.causal_lm:
        return compiled
    if loaded.example_inputs is None:
        raise UsageError(f"{loaded.source}: not a HF causal LM, so braze needs example inputs to compile it: return "
                         f"{{'model': m, 'example_inputs': (x,)}} from the factory or set model.example_inputs")
    compiled(*loaded.example_inputs)
    return compiled.compiled


# ---- compile -------------------------------------------------------------------------------------------------------
def cmd_compile(args: argparse.Namespace) -> int:
    from braze.cli_models import resolve_model

    if args.quant != "int6" and (args.int6_act or args.int6_method):
        raise UsageError("--int6-act / --int6-method apply to --quant int6 only")
    if args.quant != "df11" and args.df11_strategy:
        raise UsageError("--df11-strategy applies to --quant df11 only")
    device = _device_for(args.executor)
    with _Stages(["load model", "compile", "save package"]) as stages:
        stages.start(f"loading {args.model}")
        dtype = _torch_dtype(args.dtype, device)
        loaded = resolve_model(args.model, dtype=dtype, device=device)
        stages.start("compiling")
        options = dict(executor=args.executor, max_seq=args.max_seq, max_batch=args.max_batch)
        for key in ("quant", "speculate", "df11_strategy", "int6_act", "int6_method"):
            if getattr(args, key, None) is not None:
                options[key] = getattr(args, key)
        if args.deterministic:
            options["deterministic"] = True
        compiled = _compile_model(loaded, options)
        stages.start(f"saving {args.output}")
        from braze.runtime.package import save_package

        meta = {"source": loaded.source, "source_kind": loaded.kind, "dtype": str(dtype).removeprefix("torch."),
                "example_inputs": _describe_inputs(loaded.example_inputs)}
        path = save_package(compiled, args.output, tokenizer=loaded.tokenizer, metadata=meta)
    t = stages.times
    plan = compiled.plan
    weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    if args.report and compiled.report is not None:
        print(compiled.report)
    print(f"compiled {type(loaded.model).__name__} from {args.model} -> {path}")
    plans = {"forward": plan, **(getattr(compiled, "extra_plans", None) or {})}
    sources = {src for p in plans.values() for src in p.kernels.values()}
    print(f"  plans: {', '.join(plans)}; {len(sources)} distinct kernels; {plan.launches} launches per forward, "
          f"{sum(1 for s in plan.steps if s.kind == 'eager')} eager fallbacks; weights {format_bytes(weight_bytes)}; "
          f"tokenizer: {'yes' if loaded.tokenizer is not None else 'no'}")
    print(f"  load {t.get(f'loading {args.model}', 0):.1f} s, compile {t.get('compiling', 0):.1f} s, "
          f"save {t.get(f'saving {args.output}', 0):.1f} s; executor {compiled.executor_name}")
    return 0


def _describe_inputs(inputs: tuple | None) -> list | None:
    if inputs is None:
        return None
    return [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in inputs
            if hasattr(t, "shape")]


# ---- run -----------------------------------------------------------------------------------------------------------
class _Streamer:
    """Prints decoded text as tokens arrive (HF streamer protocol: put(tensor) / end(); also callable)."""

    def __init__(self, tokenizer: Any, prompt: Any):
        self.tokenizer = tokenizer
        self.prompt = prompt
        self.tokens: list[int] = []
        self.printed = ""
        self.first = True

    def put(self, value: Any) -> None:
        ids = [int(x) for x in value.reshape(-1).tolist()] if hasattr(value, "reshape") else [int(value)]
        if self.first and len(ids) == self.prompt.shape[-1] and ids == self.prompt.reshape(-1).tolist():
            self.first = False  # HF generate puts the prompt first
            return
        self.first = False
        self.tokens += ids
        self._flush()

    __call__ = put

    def _flush(self) -> None:
        text = _decode(self.tokenizer, self.tokens)
        if text.startswith(self.printed) and not text.endswith("\ufffd"):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text

    def end(self) -> None:
        text = _decode(self.tokenizer, self.tokens)
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.printed = text


def _decode(tokenizer: Any, ids: list[int]) -> str:
    if tokenizer is None:
        return " ".join(str(i) for i in ids)
    return tokenizer.decode(ids, skip_special_tokens=True)


def _sample(logits: Any, temperature: float, top_k: int | None, top_p: float | None, gen: Any) -> Any:
    import torch

    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p
        sorted_logits = sorted_logits.masked_fill(drop, -math.inf)
        logits = torch.full_like(logits, -math.inf).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


def _greedy_loop(compiled: Any, ids: Any, args: argparse.Namespace, eos: set[int], streamer: Any) -> Any:
    """Generation by full forwards (until CompiledModel.generate exists): correct, not fast."""
    import torch
    from tqdm import tqdm

    gen = torch.Generator().manual_seed(args.seed)
    out = ids
    for _ in tqdm(range(args.max_new_tokens), desc="generating", file=sys.stderr, disable=None, leave=False):
        logits = compiled(out).logits[:, -1]
        nxt = _sample(logits, args.temperature, args.top_k, args.top_p, gen)
        out = torch.cat([out, nxt[:, None].to(out.dtype)], dim=1)
        if streamer is not None:
            streamer.put(nxt)
        if int(nxt[0]) in eos:
            break
    return out


def cmd_run(args: argparse.Namespace) -> int:
    import torch

    from braze.runtime.package import load_tokenizer, read_manifest

    manifest = read_manifest(args.package)
    if not manifest.get("causal_lm"):
        raise UsageError(f"{args.package}: 'run' needs a causal-LM package; this one holds "
                         f"{manifest.get('model')} (use 'braze check' or 'braze bench')")
    with _Stages(["load package", "load tokenizer"]) as stages:
        stages.start("loading package")
        t0 = time.perf_counter()
        compiled = _load_package(args.package, args.executor)
        load_s = time.perf_counter() - t0
        stages.start("loading tokenizer")
        tokenizer = load_tokenizer(args.package)
    if args.prompt_ids is not None:
        try:
            prompt = [int(x) for x in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise UsageError(f"--prompt-ids: expected integers separated by spaces, got {args.prompt_ids!r}") from None
        if not prompt:
            raise UsageError("--prompt-ids is empty")
    else:
        if tokenizer is None:
            raise UsageError(f"{args.package} has no tokenizer; pass token ids with --prompt-ids")
        if args.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise UsageError(f"{args.package}: the tokenizer has no chat template; drop --chat")
            text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                                 add_generation_prompt=True, tokenize=False)
            prompt = tokenizer(text, add_special_tokens=False).input_ids
        else:
            prompt = tokenizer(args.prompt).input_ids
    vocab = getattr(compiled.model_config, "vocab_size", None)
    if vocab is not None and any(not 0 <= t < vocab for t in prompt):
        raise UsageError(f"prompt token ids must be in [0, {vocab})")
    ids = torch.tensor([prompt], dtype=torch.long, device=compiled.device)
    _, max_seq = _seq_limit(compiled)
    max_new = args.max_new_tokens
    if max_seq is not None:
        if len(prompt) > max_seq:
            raise UsageError(f"the prompt has {len(prompt)} tokens; the package accepts at most {max_seq} "
                             f"(recompile with a larger --max-seq)")
        if len(prompt) + max_new > max_seq:
            max_new = max_seq - len(prompt)
            _err(f"[braze] note: --max-new-tokens reduced to {max_new} (the package's max seq is {max_seq})")
    args.max_new_tokens = max_new
    eos = _eos_ids(tokenizer, compiled.model_config)
    streamer = _Streamer(tokenizer, ids) if args.stream else None
    start = time.perf_counter()
    if max_new == 0:
        out = ids
    elif hasattr(compiled, "generate") and getattr(compiled, "generator", True) is not None:
        out = compiled.generate(ids, max_new_tokens=max_new, do_sample=args.temperature > 0,
                                temperature=args.temperature or 1.0, top_k=args.top_k, top_p=args.top_p,
                                seed=args.seed, eos_token_id=sorted(eos) if eos else None, streamer=streamer)
        how = "generate"
    else:
        out = _greedy_loop(compiled, ids, args, eos, streamer)
        how = "full forward per token (no KV cache)"
    seconds = time.perf_counter() - start
    if max_new == 0:
        how = "nothing to generate"
    out = out if out.dim() == 2 else out[None]
    if out.shape[1] >= ids.shape[1] and torch.equal(out[:, : ids.shape[1]].cpu(), ids.cpu()):
        new = out[0, ids.shape[1]:].tolist()
    else:
        new = out[0].tolist()
    if streamer is not None:
        streamer.end()
    else:
        print(_decode(tokenizer, new))
    rate = len(new) / seconds if seconds > 0 else float("inf")
    _err(f"[braze] {len(new)} tokens in {seconds:.2f} s ({rate:.2f} tokens/s) via {how}; executor: "
         f"{_executor_words(compiled.executor_name, compiled.device)}; package loaded in {load_s:.2f} s")
    return 0


def _eos_ids(tokenizer: Any, model_config: Any) -> set[int]:
    eos: set[int] = set()
    for source in (getattr(tokenizer, "eos_token_id", None), getattr(model_config, "eos_token_id", None)):
        if isinstance(source, int):
            eos.add(source)
        elif isinstance(source, (list, tuple)):
            eos.update(int(x) for x in source)
    return eos


# ---- inspect -------------------------------------------------------------------------------------------------------
def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file too short")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError("header too large")
        return json.loads(f.read(n))


def summarize_package(path: str) -> dict[str, Any]:
    """Everything `braze inspect` shows, as plain data (reads JSON and the safetensors header only)."""
    from braze.runtime.errors import PackageError
    from braze.runtime.package import read_manifest, verify_package
    from braze.runtime.plan import Plan

    root = Path(path)
    manifest = read_manifest(root)
    try:
        verify_package(root, manifest)
        integrity = f"ok ({len(manifest['files'])} files, sha256)"
    except PackageError as e:
        integrity = f"FAILED: {e}"
    plans = {}
    for name, rel in manifest["plans"].items():
        plan = Plan.from_json((root / rel).read_text())
        kinds: dict[str, int] = {}
        for s in plan.steps:
            kinds[s.kind] = kinds.get(s.kind, 0) + 1
        launches: dict[str, dict[str, Any]] = {}
        for s in plan.steps:
            if s.kind in ("fused", "template"):
                entry = launches.setdefault(s.kernel, {"family": "fused" if s.kind == "fused" else s.launcher,
                                                       "launches": 0, "nodes": [], "file": plan.kernels.get(s.kernel)})
                entry["launches"] += 1
                entry["nodes"] += s.nodes
        plans[name] = {
            "steps": len(plan.steps), "step_kinds": kinds, "launches": plan.launches, "kernels": launches,
            "eager": [{"target": s.target, "nodes": s.nodes} for s in plan.steps if s.kind == "eager"],
            "step_list": [{"kind": s.kind, "kernel": s.kernel or s.target, "inputs": s.inputs, "outputs": s.outputs,
                           "nodes": s.nodes} for s in plan.steps],
            "symbols": [{"label": s.label, "lower": s.lower, "upper": s.upper} for s in plan.symbols],
        }
    wfile = root / manifest["weights"]["file"]
    by_dtype: dict[str, int] = {}
    n_tensors = 0
    try:
        header = _safetensors_header(wfile)
        for key, info in header.items():
            if key == "__metadata__":
                continue
            n_tensors += 1
            lo, hi = info["data_offsets"]
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + (hi - lo)
    except (OSError, ValueError, KeyError) as e:
        by_dtype = {"unreadable": 0}
        integrity += f"; weights header unreadable ({e})"
    weight_bytes = sum(by_dtype.values())
    return {
        "path": str(root), "format_version": manifest["format_version"], "versions": manifest.get("versions", {}),
        "model": manifest.get("model"), "causal_lm": manifest.get("causal_lm"), "target": manifest["target"],
        "compile_options": manifest.get("compile_options", {}), "metadata": manifest.get("metadata", {}),
        "integrity": integrity, "plans": plans,
        "weights": {"tensors": n_tensors, "aliases": len(manifest["weights"].get("aliases", {})),
                    "bytes": weight_bytes, "by_dtype": by_dtype},
        "bytes_per_token_decode": weight_bytes, "tokenizer": bool(manifest.get("tokenizer")),
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    info = summarize_package(args.package)
    if args.json:
        if not args.steps:
            for p in info["plans"].values():
                p.pop("step_list")
        print(json.dumps(info, indent=1))
        return 0 if info["integrity"].startswith("ok") else EXIT_RUNTIME
    v = info["versions"]
    print(f"package {info['path']}: format {info['format_version']}, braze {v.get('braze')}, torch {v.get('torch')}, "
          f"triton {v.get('triton')}")
    tgt = info["target"]
    print(f"model: {info['model']}{' (causal LM)' if info['causal_lm'] else ''}; target {tgt.get('device')}"
          f"{' ' + tgt['device_name'] if tgt.get('device_name') else ''} (compiled with executor "
          f"{tgt.get('executor')}); source: {info['metadata'].get('source', 'unknown')}")
    opts = info["compile_options"]
    shown = ", ".join(f"{k}={opts[k]}" for k in ("quant", "speculate", "deterministic", "max_batch", "max_seq")
                      if k in opts)
    print(f"compile options: {shown}")
    print(f"integrity: {info['integrity']}")
    for name, plan in info["plans"].items():
        dims = ", ".join(f"{s['label']} in [{s['lower']}, {'inf' if s['upper'] is None else s['upper']}]"
                         for s in plan["symbols"])
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(plan["step_kinds"].items()))
        print(f"\nplan {name}: {plan['steps']} steps ({kinds}); {plan['launches']} kernel launches per call; "
              f"dims: {dims}")
        print(f"  kernels ({len(plan['kernels'])} distinct):")
        width = max([len(k) for k in plan["kernels"]] + [6])
        for kname, k in plan["kernels"].items():
            nodes = k["nodes"]
            shown = ", ".join(nodes[:5]) + (f", ... (+{len(nodes) - 5})" if len(nodes) > 5 else "")
            print(f"    {kname:{width}s}  {k['family']:<16s} x{k['launches']:<3d} {shown}")
        if plan["eager"]:
            print(f"  eager fallbacks ({len(plan['eager'])}):")
            for e in plan["eager"]:
                print(f"    {e['target']}  ({', '.join(e['nodes'][:3])})")
        else:
            print("  eager fallbacks: none")
        if args.steps:
            print("  steps:")
            for i, s in enumerate(plan["step_list"]):
                print(f"    {i:4d} {s['kind']:8s} {s['kernel'] or '':28s} {', '.join(s['inputs'][:4])} -> "
                      f"{', '.join(o or '-' for o in s['outputs'])}")
    w = info["weights"]
    dt = ", ".join(f"{k} {format_bytes(b)}" for k, b in sorted(w["by_dtype"].items()))
    print(f"\nweights: {w['tensors']} tensors (+{w['aliases']} aliases), {format_bytes(w['bytes'])} ({dt})")
    print(f"bytes per token (decode step, batch 1): ~{format_bytes(info['bytes_per_token_decode'])} "
          f"(every weight read once; KV cache and activations not counted)")
    print(f"tokenizer: {'yes' if info['tokenizer'] else 'no'}")
    return 0 if info["integrity"].startswith("ok") else EXIT_RUNTIME


# ---- bench ---------------------------------------------------------------------------------------------------------
def _time(fn: Any, inputs: tuple, iters: int, warmup: int, cuda: bool) -> tuple[float, float]:
    """(first call seconds, median seconds per call)."""
    import torch
    from tqdm import tqdm

    def once() -> float:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(*inputs)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t

    first = once()
    for _ in range(max(0, warmup - 1)):
        once()
    times = [once() for _ in tqdm(range(iters), desc="timing", file=sys.stderr, disable=None, leave=False)]
    times.sort()
    return first, times[len(times) // 2]


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from braze.cli_models import is_package, resolve_model

    device = _device_for(args.executor)
    cuda = device == "cuda"
    rows: list[tuple[str, str, str, float | None, float | None]] = []
    notes: list[str] = []
    loaded = None
    compile_s: float | None = None
    if is_package(args.target):
        t0 = time.perf_counter()
        compiled = _load_package(args.target, args.executor)
        compile_s = time.perf_counter() - t0
        braze_label = "braze (package)"
        source = args.model or compiled.manifest.get("metadata", {}).get("source")
        if source:
            dtype_name = compiled.manifest.get("metadata", {}).get("dtype", "float32")
            loaded = resolve_model(source, dtype=getattr(torch, dtype_name), device=str(compiled.device))
        else:
            notes.append("no eager model: the package records no source model; pass --model MODEL")
    else:
        loaded = resolve_model(args.target, dtype=_torch_dtype(args.dtype, device), device=device)
        t0 = time.perf_counter()
        compiled = _compile_model(loaded, dict(executor=args.executor, max_batch=max(args.batch, 8),
                                               max_seq=max(args.seq, 64)))
        compile_s = time.perf_counter() - t0
        braze_label = "braze"
    batch_limit, seq_limit = _seq_limit(compiled)
    if compiled.causal_lm and ((batch_limit and args.batch > batch_limit) or (seq_limit and args.seq > seq_limit)):
        raise UsageError(f"--batch {args.batch} --seq {args.seq} is outside the package's range (batch <= "
                         f"{batch_limit}, seq <= {seq_limit})")
    if loaded is not None and loaded.example_inputs is not None and not compiled.causal_lm:
        inputs = loaded.example_inputs
    else:
        inputs = _example_inputs(compiled, args.batch, args.seq)
    tokens = args.batch * args.seq if compiled.causal_lm else None

    if loaded is not None:
        eager = _eager_forward(loaded.model, compiled.causal_lm)
        first, med = _time(eager, inputs, args.iters, args.warmup, cuda)
        rows.append(("eager", "PyTorch", f"{first:.3f}", med, None))
        if args.no_torch_compile:
            notes.append("torch.compile skipped (--no-torch-compile)")
        else:
            try:
                tc_model = torch.compile(loaded.model)
                first, med = _time(_eager_forward(tc_model, compiled.causal_lm), inputs, args.iters, args.warmup,
                                   cuda)
                rows.append(("torch.compile", "inductor (default)", f"{first:.3f}", med, None))
            except Exception as e:  # inductor needs a C++ toolchain on CPU; report instead of failing the bench
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                notes.append(f"torch.compile unavailable: {type(e).__name__}: {msg[:200]}")
    first, med = _time(_braze_forward(compiled), inputs, args.iters, args.warmup, cuda)
    setup = f"load {compile_s:.2f} s" if braze_label.endswith("(package)") else f"compile {compile_s:.2f} s"
    rows.append((braze_label, compiled.executor_name, f"{first:.3f}", med, None))

    eager_med = rows[0][3] if rows and rows[0][0] == "eager" else None
    shape = ", ".join("x".join(str(d) for d in t.shape) for t in inputs if hasattr(t, "shape"))
    print(f"bench: {args.target}; inputs {shape}; {args.iters} timed iterations (median), {args.warmup} warm-up; "
          f"device {device}")
    header = f"{'engine':18s} {'backend/executor':20s} {'first call s':>12s} {'median ms':>10s} "
    header += f"{'tokens/s':>10s} {'vs eager':>9s}"
    print(header)
    print("-" * len(header))
    for name, backend, first_s, med_s, _ in rows:
        tps = f"{tokens / med_s:10.1f}" if tokens and med_s else f"{'-':>10s}"
        ratio = f"{eager_med / med_s:8.2f}x" if eager_med and med_s else f"{'-':>9s}"
        print(f"{name:18s} {backend:20s} {first_s:>12s} {med_s * 1e3:10.2f} {tps} {ratio}")
    print(f"braze {setup}; launches per forward: {compiled.plan.launches}")
    for note in notes:
        print(f"note: {note}")
    if compiled.executor_name == "interpret" or not cuda:
        print(CPU_NOTICE)
    return 0


# ---- check ---------------------------------------------------------------------------------------------------------
_TOLERANCES = {"float32": 1e-3, "float64": 1e-6, "float16": 2e-2, "bfloat16": 5e-2}
_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4, 5,", "Once upon a time",
            "Water boils at"]


def cmd_eval(args: argparse.Namespace) -> int:
    from braze.cli_models import resolve_model
    from braze.eval import format_table, quant_perplexity_table

    loaded = resolve_model(args.model)
    if loaded.tokenizer is None:
        raise UsageError(f"{args.model}: eval needs a model that comes with a tokenizer")
    text = Path(args.text).read_text() if args.text else None
    variants = ["eager", "braze"] + (["eager-bf16"] if "df11" in args.quant else []) + list(args.quant)
    rows = quant_perplexity_table(loaded.model, loaded.tokenizer, text=text, window=args.window,
                                  executor=args.executor, variants=tuple(variants), max_tokens=args.max_tokens,
                                  agreement_tokens=args.agreement_tokens)
    print(format_table(rows))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    import torch

    from braze.cli_models import resolve_model
    from braze.runtime.package import load_tokenizer

    compiled = _load_package(args.package, args.executor)
    meta = compiled.manifest.get("metadata", {})
    dtype = getattr(torch, meta.get("dtype", "float32"))
    loaded = resolve_model(args.model, dtype=dtype, device=str(compiled.device))
    eager = _eager_forward(loaded.model, compiled.causal_lm)
    ours = _braze_forward(compiled)
    cases: list[tuple[str, tuple]] = []
    if compiled.causal_lm:
        tokenizer = load_tokenizer(args.package) or loaded.tokenizer
        _, max_seq = _seq_limit(compiled)
        vocab = getattr(compiled.model_config, "vocab_size", None) or loaded.model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        for i in range(args.prompts):
            if tokenizer is not None:
                text = _PROMPTS[i % len(_PROMPTS)]
                ids = tokenizer(text).input_ids
                label = repr(text)
            else:
                n = [5, 11, 16, 3, 8][i % 5]
                ids = torch.randint(0, vocab, (n,), generator=g).tolist()
                label = f"random ids x{n}"
            if max_seq is not None:
                ids = ids[:max_seq]
            cases.append((label, (torch.tensor([ids], device=compiled.device),)))
    else:
        if loaded.example_inputs is not None:
            cases.append(("example inputs", loaded.example_inputs))
        for i in range(len(cases), args.prompts):
            cases.append((f"random inputs #{i}", _example_inputs(compiled, 2 + i, 8, seed=i)))
    atol = args.atol if args.atol is not None else _TOLERANCES.get(str(dtype).removeprefix("torch."), 1e-3)
    rtol = args.rtol if args.rtol is not None else atol
    print(f"check {args.package} against {args.model} ({str(dtype).removeprefix('torch.')}, executor "
          f"{compiled.executor_name}; tolerance |a-b| <= {atol:g} + {rtol:g}*|b|)")
    worst: tuple[float, str] | None = None
    for label, inputs in cases:
        ref = _first_tensor(eager(*inputs))
        got = _first_tensor(ours(*inputs))
        if ref is None or got is None or ref.shape != got.shape:
            raise CheckFailed(f"output shapes differ on {label}: eager {getattr(ref, 'shape', None)}, package "
                              f"{getattr(got, 'shape', None)}")
        ref, got = ref.float(), got.float()
        err = (got - ref).abs()
        max_err = float(err.max()) if err.numel() else 0.0
        ok = bool((err <= atol + rtol * ref.abs()).all()) and bool(torch.isfinite(got).eq(torch.isfinite(ref)).all())
        extra = ""
        if compiled.causal_lm:
            agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
            extra = f", argmax agreement {agree:.0%}"
        print(f"  {'ok  ' if ok else 'FAIL'} {label}: max abs error {max_err:.3e}{extra}")
        if not ok and (worst is None or max_err > worst[0]):
            worst = (max_err, label)
    if worst is not None:
        raise CheckFailed(f"check failed: package outputs differ from the eager model (max abs error {worst[0]:.3e} "
                          f"on {worst[1]}; tolerance atol {atol:g}, rtol {rtol:g})")
    print(f"check passed: {len(cases)} inputs match the eager model")
    return 0


# ---- entry point ---------------------------------------------------------------------------------------------------
def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if not text:
        return type(e).__name__
    lines = text.splitlines()
    return lines[0] + (" (...; --debug for the rest)" if len(lines) > 1 else "")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("BRAZE_DEBUG") == "1"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not debug:  # library deprecation chatter is not the user's business; --debug shows it
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _err("braze: interrupted")
        return 130
    except Exception as e:
        if debug:
            import traceback

            traceback.print_exc()
        code, prefix = _classify(e)
        _err(f"braze {args.command}: {prefix}{_one_line(e)}")
        return code


def _classify(e: Exception) -> tuple[int, str]:
    from braze.runtime.errors import BrazeError, ConfigError

    if isinstance(e, (UsageError, ConfigError)):
        return EXIT_USAGE, "error: "
    if isinstance(e, CheckFailed):
        return EXIT_RUNTIME, ""
    if isinstance(e, BrazeError):
        return EXIT_RUNTIME, "error: "
    if isinstance(e, NotImplementedError):
        return EXIT_RUNTIME, "not implemented yet: "
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return EXIT_RUNTIME, "error: "
    return EXIT_RUNTIME, f"error: {type(e).__name__}: "


if __name__ == "__main__":
    sys.exit(main())
