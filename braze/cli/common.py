"""What the braze commands share: the parser class, value types, errors and exit codes, progress display, and
small adapters over the library (device choice, package loading, model forwards).

Nothing here re-implements the library: packages load with `braze.runtime.package.load_package`, generation is
`CompiledModel.generate`, sampling is `braze.runtime.sampling`, tolerances are `braze.testing`'s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

EXIT_RUNTIME = 1
EXIT_USAGE = 2
CPU_NOTICE = ("NOTICE: no CUDA GPU: braze ran its kernels under the Triton interpreter on CPU (executor "
              "'interpret'). Interpreter timings measure the interpreter, not kernel performance.")
DTYPES = ("auto", "float32", "float16", "bfloat16")
EXECUTORS = ("auto", "cuda", "interpret")
EXECUTOR_HELP = ("auto: CUDA kernels on a GPU, else the Triton interpreter on CPU; cuda; interpret (CPU, also runs "
                 "a CUDA-compiled package)")
SHA256_HELP = ("refuse the package unless the sha256 of its manifest.json (which holds the sha256 of every other "
               "file; 'braze inspect' and 'braze compile' print it) is DIGEST; checked before anything else is read")


class UsageError(Exception):
    """A bad argument or combination of arguments found after parsing (exit code 2)."""


class CheckFailed(Exception):
    """`braze check` found a mismatch (exit code 1)."""


# ---- argument parsing --------------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default prints the usage block too)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def int_at_least(lowest: int, what: str) -> Callable[[str], int]:
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


positive_int = int_at_least(1, "a positive integer")
nonneg_int = int_at_least(0, "an integer >= 0")


def nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def add_executor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=EXECUTORS, default="auto", help=EXECUTOR_HELP)


def add_sha256(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sha256", metavar="DIGEST", default=None, help=SHA256_HELP)


# ---- shared helpers ------------------------------------------------------------------------------------------------
def err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def plural(n: int, noun: str, many: str | None = None) -> str:
    """'1 token' / '2 tokens': counts in messages read as English ("1 tokens" did not)."""
    return f"{n} {noun if n == 1 else many or noun + 's'}"


def article(n: int) -> str:
    """'a' or 'an' before the number n spoken aloud ('an 8-token', 'an 11-token', 'a 12-token')."""
    lead = abs(int(n))
    while lead >= 1000:
        lead //= 1000
    return "an" if str(lead).startswith("8") or lead in (11, 18) else "a"


def secondary_rank() -> bool:
    """True on ranks 1.. of a torchrun launch (a tp package runs on every rank; rank 0 speaks for them)."""
    return os.environ.get("RANK", "0") not in ("", "0") and "WORLD_SIZE" in os.environ


class Stages:
    """Progress over a command's long steps (a tqdm bar on a terminal, nothing when piped)."""

    def __init__(self, names: list[str]):
        from tqdm import tqdm

        self.bar = tqdm(total=len(names), file=sys.stderr, disable=None, leave=False,
                        bar_format="{desc} [{n_fmt}/{total_fmt}] {elapsed}")
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

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def torch_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, name)


def device_for(executor: str) -> str:
    import torch

    if executor == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("--executor cuda needs a CUDA GPU and none is available; use --executor interpret")
        return "cuda"
    if executor == "interpret":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def executor_words(name: str, device: Any) -> str:
    if name == "interpret":
        return "interpret (Triton interpreter on CPU: not kernel performance)"
    if name == "reference":
        return "reference (torch reference ops: not kernel performance)"
    return f"{name} (Triton kernels on {device})"


def load_package(path: str, executor: str, sha256: str | None = None) -> Any:
    """braze.load with the CLI's checks first: `--executor cuda` without a GPU is a usage error."""
    import braze

    if executor == "cuda":
        device_for(executor)
    return braze.load(path, executor=executor, sha256=sha256)


def package_tokenizer(compiled: Any) -> Any:
    """The tokenizer stored in a loaded package (verified with the package), or None."""
    where = getattr(compiled, "tokenizer_path", None)
    if where is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(where))


def shape_limits(compiled: Any) -> tuple[int | None, int | None]:
    """(max batch, max seq) of a compiled model's forward plan (None where the plan has no such dim)."""
    batch = seq = None
    for s in compiled.plan.symbols:
        if s.label == "batch":
            batch = s.upper
        elif s.label == "seq":
            seq = s.upper
    return batch, seq


def example_inputs(compiled: Any, batch: int, seq: int, seed: int = 0, vocab: int | None = None) -> tuple:
    """Random inputs that fit a plan: batch/seq symbols take the given sizes, other dims their lower bound."""
    import torch

    from braze.runtime.executor import DTYPES as PLAN_DTYPES

    g = torch.Generator().manual_seed(seed)
    if compiled.causal_lm:
        vocab = vocab or getattr(compiled.model_config, "vocab_size", None) or 2
        return (torch.randint(0, vocab, (batch, seq), generator=g).to(compiled.device),)
    syms: dict[str, int] = {}
    for s in compiled.plan.symbols:
        want = batch if s.label == "batch" or s.label.startswith("dim 0") else seq if s.label == "seq" else s.lower
        want = max(s.lower, want if s.upper is None else min(s.upper, want))
        syms[s.name] = want
    out = []
    for spec in compiled.plan.inputs:
        if spec.kind != "user":
            continue
        shape = [int(eval(e, {"__builtins__": {}, "max": max, "min": min}, dict(syms))) for e in spec.shape]
        dtype = PLAN_DTYPES[spec.dtype]
        if dtype.is_floating_point:
            t = torch.randn(shape, generator=g).to(dtype)
        elif dtype == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        else:
            t = torch.randint(0, 2, shape, generator=g).to(dtype)
        out.append(t.to(compiled.device))
    return tuple(out)


def eager_forward(model: Any, causal_lm: bool) -> Callable[..., Any]:
    """The eager model's forward on the inputs a compiled forward takes (causal LMs: logits of input_ids)."""
    import torch

    def run(*inputs: Any) -> Any:
        with torch.no_grad():
            if causal_lm:
                ids = inputs[0]
                pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
                return model(input_ids=ids, position_ids=pos, use_cache=False).logits
            return model(*inputs)

    return run


def braze_forward(compiled: Any) -> Callable[..., Any]:
    def run(*inputs: Any) -> Any:
        out = compiled(*inputs)
        return out.logits if compiled.causal_lm else out

    return run


def first_tensor(out: Any) -> Any:
    import torch

    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        for o in out:
            t = first_tensor(o)
            if t is not None:
                return t
    return None


def compile_model(loaded: Any, options: dict[str, Any]) -> Any:
    """braze.compile a resolved model; a plain module compiles on a call with its example inputs."""
    import braze

    with warnings.catch_warnings():  # the refusal below says it in one line
        warnings.filterwarnings("ignore", message=".*compiling through Dynamo instead")
        compiled = braze.compile(loaded.model, **options)
        if not loaded.causal_lm:
            if loaded.example_inputs is None:
                raise UsageError(f"{loaded.source}: not a HF causal LM, so braze needs example inputs to compile "
                                 f"it: return {{'model': m, 'example_inputs': (x,)}} from the factory or set "
                                 "model.example_inputs")
            compiled(*loaded.example_inputs)
            compiled = compiled.compiled
    refusal = getattr(compiled, "package_refusal", None)  # the Dynamo fallback: no whole-model plan
    if refusal:
        raise UsageError(f"{loaded.source}: {refusal}; the braze commands work on one whole-model plan "
                         "(braze.compile(model) in Python runs it as it is)")
    return compiled
