"""`braze bench MODEL|PKG`: one forward of braze, eager PyTorch and torch.compile on the same inputs, side by side;
with --decode N, also the decode step of generation (what an LLM user waits on), timed the same way for all three."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from braze.runtime.errors import first_line

from .common import (
    CPU_NOTICE,
    DTYPES,
    UsageError,
    add_executor,
    add_sha256,
    braze_forward,
    compile_model,
    device_for,
    eager_forward,
    example_inputs,
    load_package,
    nonneg_int,
    plural,
    positive_int,
    shape_limits,
    torch_dtype,
)
from .models import MODEL_HELP

BATCH, SEQ = 1, 16  # --batch / --seq defaults


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("bench", parents=parents, help="time braze vs eager vs torch.compile",
                       description="Time one forward of braze, eager PyTorch and torch.compile (inductor) on the "
                       "same inputs, in one run, and print a table.", epilog=f"MODEL is {MODEL_HELP}.")
    p.add_argument("target", metavar="MODEL|PKG", help="a model (compiled here) or a package directory")
    p.add_argument("--model", metavar="MODEL", help="PKG only: eager model to compare with (default: the model it "
                   "was compiled from, if the manifest records one)")
    p.add_argument("--batch", type=positive_int, default=None, metavar="B",
                   help=f"causal LMs: batch size (default {BATCH}; other models run on their example inputs)")
    p.add_argument("--seq", type=positive_int, default=None, metavar="S",
                   help=f"causal LMs: sequence length (default {SEQ})")
    p.add_argument("--iters", type=positive_int, default=5, metavar="N", help="timed iterations (default 5)")
    p.add_argument("--warmup", type=nonneg_int, default=1, metavar="N",
                   help="untimed warm-up iterations (default 1)")
    add_executor(p)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="MODEL only: model dtype (default auto: float32 "
                   "on CPU, bfloat16 on a GPU); a package keeps the dtype it was compiled with")
    p.add_argument("--decode", type=positive_int, default=None, metavar="N",
                   help="causal LMs: also time decoding N new tokens (N >= 2) after the --seq prompt, greedy, at "
                   "--batch; a step is (t(N) - t(1)) / (N - 1), so the prefill cancels. Eager and torch.compile "
                   "run HF generate over a static KV cache")
    p.add_argument("--no-torch-compile", action="store_true", help="skip the torch.compile row")
    add_sha256(p)
    p.set_defaults(func=main)


def _seconds(call: Any, cuda: bool) -> float:
    """Wall seconds of call() (on a GPU, from an idle device to the end of its work)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    call()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _time(fn: Any, inputs: tuple, iters: int, warmup: int, cuda: bool) -> tuple[float, float]:
    """(first call seconds, median seconds per call)."""
    from tqdm import tqdm

    def once() -> float:
        return _seconds(lambda: fn(*inputs), cuda)

    first = once()
    for _ in range(max(0, warmup - 1)):
        once()
    times = [once() for _ in tqdm(range(iters), desc="timing", file=sys.stderr, disable=None, leave=False)]
    times.sort()
    return first, times[len(times) // 2]


def _decode_step(generate: Any, new_tokens: int, iters: int, cuda: bool) -> float | None:
    """Seconds per decode step: best t(N) minus best t(1) over `iters` rounds, over N - 1 steps (both warmed).
    None when the difference is not positive: N - 1 steps of a small model are lost in the timer's noise."""

    def once(n: int) -> float:
        return _seconds(lambda: generate(n), cuda)

    once(new_tokens)
    once(1)
    best = {n: min(once(n) for _ in range(iters)) for n in (new_tokens, 1)}
    diff = best[new_tokens] - best[1]
    return diff / (new_tokens - 1) if diff > 0 else None


def _hf_generate(model: Any, ids: Any, compiled_forward: bool, cuda: bool) -> Any:
    """HF generate of exactly n greedy tokens over a static KV cache; compiled_forward: torch.compile'd through
    generate's compile_config (reduce-overhead on a GPU, inductor's default mode on a CPU)."""
    import torch
    from transformers import CompileConfig

    if compiled_forward:
        config = CompileConfig(mode="reduce-overhead" if cuda else None, fullgraph=False)
        config._compile_all_devices = True  # HF compiles on CUDA only unless told otherwise
        opts: dict[str, Any] = {"compile_config": config}
    else:
        opts = {"disable_compile": True}

    def gen(n: int) -> Any:
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, cache_implementation="static", **opts)

    return gen


def _decode_rows(args: argparse.Namespace, compiled: Any, loaded: Any, label: str, cuda: bool, notes: list[str]
                 ) -> list[tuple[str, str, float | None]]:
    """(engine, backend, seconds per step or None: not measurable) for each engine that could decode."""
    ids = example_inputs(compiled, args.batch, args.seq)[0]
    rows: list[tuple[str, str, float | None]] = []
    if loaded is not None:
        engines = [("eager", "HF generate", False)]
        if not args.no_torch_compile:
            engines.append(("torch.compile", "HF generate", True))
        for name, backend, compiled_forward in engines:
            try:
                rows.append((name, backend, _decode_step(_hf_generate(loaded.model, ids, compiled_forward, cuda),
                                                         args.decode, args.iters, cuda)))
            except Exception as e:  # a model HF cannot decode over a static cache, or no C++ toolchain
                notes.append(f"{name} decode unavailable: {type(e).__name__}: {first_line(e)[:200]}")
    step = _decode_step(lambda n: compiled.generate(ids, max_new_tokens=n, eos_token_id=None), args.decode,
                        args.iters, cuda)
    rows.append((label, compiled.executor_name, step))
    return rows


def _check_decode(args: argparse.Namespace, compiled: Any) -> None:
    if args.decode is None:
        return
    if not compiled.causal_lm or getattr(compiled, "generator", None) is None:
        why = getattr(compiled, "generation_missing", None)
        raise UsageError("--decode times generation; " + (f"this model has no KV-cache plans: {why}" if why else
                                                          "the target is not a causal LM"))
    max_seq = compiled.generator.max_seq
    if args.seq + args.decode > max_seq:
        raise UsageError(f"--seq {args.seq} + --decode {args.decode} exceeds the package's max seq {max_seq}")


def _shape_flags(args: argparse.Namespace) -> list[str]:
    """The --batch / --seq flags the user gave (then both take their defaults where left out)."""
    given = [f"{flag} {value}" for flag, value in (("--batch", args.batch), ("--seq", args.seq)) if value is not None]
    args.batch = BATCH if args.batch is None else args.batch
    args.seq = SEQ if args.seq is None else args.seq
    return given


def _refuse_shape_flags(args: argparse.Namespace, given: list[str], causal_lm: bool, model: str) -> None:
    """--batch / --seq shape a causal LM's input_ids; another model runs on its example inputs, so they would be
    ignored in silence."""
    if given and not causal_lm:
        raise UsageError(f"{' '.join(given)}: --batch / --seq shape a causal LM's input_ids; {args.target} holds a "
                         f"{model}, not a causal LM, which bench runs on its example inputs: drop them")


def main(args: argparse.Namespace) -> int:
    import torch

    from .models import is_package, resolve_model

    if args.decode is not None and args.decode < 2:
        raise UsageError("--decode N needs N >= 2 (a step is (t(N) - t(1)) / (N - 1))")
    package = is_package(args.target)
    if package and args.dtype is not None:
        raise UsageError("--dtype applies to a MODEL target; a package keeps the dtype it was compiled with")
    if not package and args.model is not None:
        raise UsageError("--model applies to a package target (the eager model to compare with); here the target "
                         "is already a model")
    if not package and args.sha256 is not None:
        raise UsageError("--sha256 pins a package; the target is a model")
    given = _shape_flags(args)
    device = device_for(args.executor)
    cuda = device == "cuda"
    rows: list[tuple[str, str, str, float | None, float | None]] = []
    notes: list[str] = []
    loaded = None
    compile_s: float | None = None
    if package:
        t0 = time.perf_counter()
        compiled = load_package(args.target, args.executor, sha256=args.sha256)
        compile_s = time.perf_counter() - t0
        _refuse_shape_flags(args, given, compiled.causal_lm, str(compiled.manifest.get("model") or "model"))
        braze_label = "braze (package)"
        source = args.model or compiled.manifest.get("metadata", {}).get("source")
        if source:
            dtype_name = compiled.manifest.get("metadata", {}).get("dtype", "float32")
            loaded = resolve_model(source, dtype=getattr(torch, dtype_name), device=str(compiled.device))
        else:
            notes.append("no eager model: the package records no source model; pass --model MODEL")
    else:
        loaded = resolve_model(args.target, dtype=torch_dtype(args.dtype or "auto", device), device=device)
        _refuse_shape_flags(args, given, loaded.causal_lm, type(loaded.model).__name__)
        t0 = time.perf_counter()
        compiled = compile_model(loaded, dict(executor=args.executor, max_batch=max(args.batch, 8),
                                               max_seq=max(args.seq + (args.decode or 0), 64)))
        compile_s = time.perf_counter() - t0
        braze_label = "braze"
    batch_limit, seq_limit = shape_limits(compiled)
    if compiled.causal_lm and ((batch_limit and args.batch > batch_limit) or (seq_limit and args.seq > seq_limit)):
        raise UsageError(f"--batch {args.batch} --seq {args.seq} is outside the package's range (batch <= "
                         f"{batch_limit}, seq <= {seq_limit})")
    _check_decode(args, compiled)
    if loaded is not None and loaded.example_inputs is not None and not compiled.causal_lm:
        inputs = loaded.example_inputs
    else:
        inputs = example_inputs(compiled, args.batch, args.seq)
    tokens = args.batch * args.seq if compiled.causal_lm else None

    if loaded is not None:
        eager = eager_forward(loaded.model, compiled.causal_lm)
        first, med = _time(eager, inputs, args.iters, args.warmup, cuda)
        rows.append(("eager", "PyTorch", f"{first:.3f}", med, None))
        if args.no_torch_compile:
            notes.append("torch.compile skipped (--no-torch-compile)")
        else:
            try:
                tc_model = torch.compile(loaded.model)
                first, med = _time(eager_forward(tc_model, compiled.causal_lm), inputs, args.iters, args.warmup,
                                   cuda)
                rows.append(("torch.compile", "inductor (default)", f"{first:.3f}", med, None))
            except Exception as e:  # inductor needs a C++ toolchain on CPU; report instead of failing the bench
                msg = first_line(e)
                notes.append(f"torch.compile unavailable: {type(e).__name__}: {msg[:200]}")
    first, med = _time(braze_forward(compiled), inputs, args.iters, args.warmup, cuda)
    setup = f"load {compile_s:.2f} s" if braze_label.endswith("(package)") else f"compile {compile_s:.2f} s"
    rows.append((braze_label, compiled.executor_name, f"{first:.3f}", med, None))

    eager_med = rows[0][3] if rows and rows[0][0] == "eager" else None
    shape = ", ".join("x".join(str(d) for d in t.shape) for t in inputs if hasattr(t, "shape"))
    print(f"bench: {args.target}; inputs {shape}; {plural(args.iters, 'timed iteration')} (median), "
          f"{args.warmup} warm-up; device {device}")
    header = f"{'engine':18s} {'backend/executor':20s} {'first call s':>12s} {'median ms':>10s} "
    header += f"{'tokens/s':>10s} {'vs eager':>9s}"
    print(header)
    print("-" * len(header))
    for name, backend, first_s, med_s, _ in rows:
        tps = f"{tokens / med_s:10.1f}" if tokens and med_s else f"{'-':>10s}"
        ratio = f"{eager_med / med_s:8.2f}x" if eager_med and med_s else f"{'-':>9s}"
        print(f"{name:18s} {backend:20s} {first_s:>12s} {med_s * 1e3:10.2f} {tps} {ratio}")
    print(f"braze {setup}; launches per forward: {compiled.plan.launches}")
    if args.decode is not None:
        decode_rows = _decode_rows(args, compiled, loaded, braze_label, cuda, notes)
        eager_step = decode_rows[0][2] if decode_rows[0][0] == "eager" else None
        print(f"\ndecode: {args.decode} new tokens after the {args.seq}-token prompt, batch {args.batch}, greedy; "
              f"step = (t(N) - t(1)) / (N - 1), best of {args.iters}")
        header = f"{'engine':18s} {'backend/executor':20s} {'step ms':>10s} {'tokens/s':>10s} {'vs eager':>9s}"
        print(header)
        print("-" * len(header))
        for name, backend, step in decode_rows:
            if step is None:
                print(f"{name:18s} {backend:20s} {'-':>10s} {'-':>10s} {'-':>9s}")
                steps = args.decode - 1
                notes.append(f"{name}: t({args.decode}) - t(1) <= 0, the {plural(steps, 'step')} "
                             f"{'is' if steps == 1 else 'are'} within the timer's noise (best of {args.iters}): no "
                             "step time; raise --decode or --iters")
                continue
            ratio = f"{eager_step / step:8.2f}x" if eager_step else f"{'-':>9s}"
            print(f"{name:18s} {backend:20s} {step * 1e3:10.2f} {args.batch / step:10.1f} {ratio}")
        launches = compiled.generator.decode.plan.launches
        print(f"braze: {plural(launches, 'launch', 'launches')} per decode step")
    for note in notes:
        print(f"note: {note}")
    if compiled.executor_name == "interpret" or not cuda:
        print(CPU_NOTICE)
    return 0


