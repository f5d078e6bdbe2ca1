"""`braze check PKG MODEL`: the package's outputs against the eager model's, with braze.testing's tolerances."""

from __future__ import annotations

import argparse
from typing import Any

from .common import (
    CheckFailed,
    UsageError,
    add_executor,
    add_sha256,
    braze_forward,
    eager_forward,
    example_inputs,
    first_tensor,
    load_package,
    nonneg_float,
    package_tokenizer,
    plural,
    positive_int,
    shape_limits,
)
from .models import MODEL_HELP

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4, 5,", "Once upon a time",
           "Water boils at"]


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", parents=parents, help="golden check of a package against the eager model",
                       description="Compare a package's outputs with the eager model's on a few prompts; exit 1 on "
                       "a mismatch. |package - eager| <= atol + rtol * |eager| elementwise, with the per-dtype "
                       "tolerances of braze.testing (the golden fixture's) unless --atol / --rtol are given.",
                       epilog=f"MODEL is {MODEL_HELP}.")
    p.add_argument("package", metavar="PKG", help="package directory")
    p.add_argument("model", metavar="MODEL", help="the eager model to compare with")
    p.add_argument("--prompts", type=positive_int, default=3, metavar="N", help="number of prompts (default 3)")
    p.add_argument("--atol", type=nonneg_float, default=None,
                   help="absolute tolerance (default: braze.testing.default_tolerances() for the package's dtype)")
    p.add_argument("--rtol", type=nonneg_float, default=None,
                   help="relative tolerance (default: braze.testing.default_tolerances() for the package's dtype)")
    add_executor(p)
    add_sha256(p)
    p.set_defaults(func=main)


def _cases(compiled: Any, loaded: Any, n: int) -> list[tuple[str, tuple]]:
    import torch

    cases: list[tuple[str, tuple]] = []
    if compiled.causal_lm:
        tokenizer = package_tokenizer(compiled) or loaded.tokenizer
        _, max_seq = shape_limits(compiled)
        vocab = getattr(compiled.model_config, "vocab_size", None) or loaded.model.config.vocab_size
        g = torch.Generator().manual_seed(0)
        for i in range(n):
            if tokenizer is not None:
                text = PROMPTS[i % len(PROMPTS)]
                ids = tokenizer(text).input_ids
                label = repr(text)
            else:
                length = [5, 11, 16, 3, 8][i % 5]
                ids = torch.randint(0, vocab, (length,), generator=g).tolist()
                label = f"random ids x{length}"
            if max_seq is not None:
                ids = ids[:max_seq]
            cases.append((label, (torch.tensor([ids], device=compiled.device),)))
    else:
        if loaded.example_inputs is not None:
            cases.append(("example inputs", loaded.example_inputs))
        for i in range(len(cases), n):
            cases.append((f"random inputs #{i}", _like(loaded.example_inputs,
                                                       example_inputs(compiled, 2 + i, 8, seed=i))))
    return cases


def _like(example: Any, tensors: tuple) -> tuple:
    """The example call with its tensors replaced, in order, by `tensors`: its other arguments (a float, a flag)
    are part of what the plan was compiled for (runtime/call_signature.py)."""
    import torch
    from torch.utils import _pytree as pytree

    if example is None:
        return tensors
    leaves, spec = pytree.tree_flatten(tuple(example))
    if sum(isinstance(leaf, torch.Tensor) for leaf in leaves) != len(tensors):
        return tensors
    fresh = iter(tensors)
    return pytree.tree_unflatten([next(fresh) if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec)


def _lossy(options: dict[str, Any]) -> str | None:
    """Why a package's outputs are not expected to match the eager model's within rounding, or None."""
    if options.get("quant") == "int6":
        return (f"int6 weights{'' if options.get('int6_act', 'a16') == 'a16' else ' and activations'} are lossy and "
                "the eager model is not quantized: the default tolerance is for rounding, not quantization error; "
                "braze eval measures the loss, --atol / --rtol set the tolerance to hold the package to")
    return None


def _check_kinds(args: argparse.Namespace, compiled: Any, loaded: Any) -> None:
    """A causal-LM package checked against another kind of model (or the reverse) cannot share inputs: say so
    rather than fail inside the model's forward."""
    if compiled.causal_lm == loaded.causal_lm:
        return
    ours = compiled.manifest.get("model") or "model"

    def kind(lm: bool) -> str:
        return "a causal LM" if lm else "not a causal LM"

    raise UsageError(f"{args.package} holds a {ours} ({kind(compiled.causal_lm)}) but {args.model} is a "
                     f"{type(loaded.model).__name__} ({kind(loaded.causal_lm)}); check a package against the "
                     "model it was compiled from")


def main(args: argparse.Namespace) -> int:
    import torch

    from braze.testing import compare, tolerance_for

    from .models import resolve_model

    compiled = load_package(args.package, args.executor, sha256=args.sha256)
    dtype = getattr(torch, compiled.manifest.get("metadata", {}).get("dtype", "float32"))
    rtol, atol = tolerance_for(dtype, args.rtol, args.atol)
    loaded = resolve_model(args.model, dtype=dtype, device=str(compiled.device))
    _check_kinds(args, compiled, loaded)
    eager = eager_forward(loaded.model, compiled.causal_lm)
    ours = braze_forward(compiled)
    cases = _cases(compiled, loaded, args.prompts)
    lossy = _lossy(compiled.manifest.get("compile_options", {}))
    source = "given" if args.atol is not None or args.rtol is not None else "braze.testing's"
    print(f"check {args.package} against {args.model} ({str(dtype).removeprefix('torch.')}, executor "
          f"{compiled.executor_name}; tolerance |a-b| <= {atol:g} + {rtol:g}*|b|, {source})")
    if lossy:
        print(f"  note: {lossy}")
    worst: tuple[float, str] | None = None
    for label, inputs in cases:
        ref = first_tensor(eager(*inputs))
        got = first_tensor(ours(*inputs))
        if ref is None or got is None or ref.shape != got.shape:
            raise CheckFailed(f"output shapes differ on {label}: eager {getattr(ref, 'shape', None)}, package "
                              f"{getattr(got, 'shape', None)}")
        ref, got = ref.float(), got.float()
        problem = compare(label, got, ref, rtol=rtol, atol=atol)
        max_err = float((got - ref).abs().nan_to_num(float("inf")).max()) if got.numel() else 0.0
        extra = ""
        if compiled.causal_lm:
            agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
            extra = f", argmax agreement {agree:.0%}"
        print(f"  {'ok  ' if problem is None else 'FAIL'} {label}: max abs error {max_err:.3e}{extra}")
        if problem is not None:
            for line in problem.splitlines()[1:]:
                print(f"       {line.strip()}")
            if worst is None or max_err > worst[0]:
                worst = (max_err, label)
    if worst is not None:
        raise CheckFailed(f"check failed: package outputs differ from the eager model (max abs error {worst[0]:.3e} "
                          f"on {worst[1]}; tolerance atol {atol:g}, rtol {rtol:g})"
                          + (f"; {lossy}" if lossy else ""))
    print(f"check passed: {plural(len(cases), 'input')} {'matches' if len(cases) == 1 else 'match'} the eager "
          "model")
    return 0
