"""`braze compile MODEL -o DIR`: braze.compile the model, then CompiledModel.save it as a kernel package."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from braze.kvcompress.policy import POLICIES

from .common import (
    DTYPES,
    EXECUTOR_HELP,
    EXECUTORS,
    Stages,
    UsageError,
    compile_model,
    device_for,
    plural,
    positive_int,
)
from .common import torch_dtype as _torch_dtype
from .models import MODEL_HELP


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("compile", parents=parents, help="compile MODEL into a kernel package",
                       description="Compile MODEL into a kernel package directory (Triton sources, plan, weights, "
                       "tokenizer, manifest) and print its sha256 digest.", epilog=f"MODEL is {MODEL_HELP}.")
    p.add_argument("model", metavar="MODEL", help="the model to compile")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="package directory to write (replaced if "
                   "it is an existing package; any other existing file or non-empty directory is refused)")
    p.add_argument("--max-seq", type=positive_int, default=512, metavar="N",
                   help="longest sequence the package accepts (default 512)")
    p.add_argument("--max-batch", type=positive_int, default=8, metavar="N",
                   help="largest batch the package accepts (default 8)")
    p.add_argument("--executor", choices=EXECUTORS, default="auto", help=EXECUTOR_HELP)
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="model dtype (auto: float32 on CPU, bfloat16 on a GPU)")
    p.add_argument("--quant", choices=("df11", "int6"), default=None,
                   help="weight compression: df11 (lossless DFloat11 of BF16 weights: needs --dtype bfloat16 on "
                   "CPU) or int6 (FlexQ-style)")
    p.add_argument("--df11-strategy", choices=("auto", "scratch", "fused"), default=None,
                   help="--quant df11 decode: scratch (decode a block, then matmul), fused (decode inside the GEMV), "
                   "auto (default: fused in the decode plan)")
    p.add_argument("--int6-act", choices=("a16", "a8", "a6", "mixed"), default=None,
                   help="--quant int6 activations: a16 (weight-only, default), a8, a6, or mixed (A6/A8 per linear "
                   "by a sensitivity pass on the shipped calibration text)")
    p.add_argument("--int6-method", choices=("auto", "rtn", "awq", "gptq"), default=None,
                   help="--quant int6 weight rounding (default auto: activation-aware smoothing when the model has "
                   "a tokenizer, else round to nearest)")
    p.add_argument("--speculate", choices=("suffix",), default=None,
                   help="causal LMs: speculative decoding (suffix drafts) by default when the package runs")
    p.add_argument("--deterministic", action="store_true",
                   help="batch-invariant generation: a request's logits and tokens are bitwise the same alone or "
                   "batched with others (fixed kernel tiles, no split-K or atomics, prefill attention per row); "
                   "matmuls compute 16-bit weights in fp32 (LayerCast); the KV cache is fp32 (--kv-dtype), "
                   "activations keep the model dtype; slower")
    p.add_argument("--kv-dtype", choices=("auto", "float32", "float16", "bfloat16"), default=None,
                   help="KV cache dtype (RoPE and attention scores run in it); auto: float32 with --deterministic, "
                   "else the model's dtype")
    p.add_argument("--kv-compression", choices=POLICIES, default=None,
                   help="causal LMs: compress the KV cache after prefill (the package's decode cache holds "
                   "--kv-budget of max_seq per row and head; rkv keeps the budget plus an interval of decode slots "
                   "and compresses again whenever they fill; --speculate works with every policy; "
                   "lossy: see braze eval --kv-compression)")
    p.add_argument("--kv-budget", type=_budget, default=None, metavar="F|N",
                   help="with --kv-compression: the compressed cache's capacity, a share of --max-seq (0 < F <= 1) "
                   "or a token count (default 1.0)")
    p.add_argument("--kv-window", type=positive_int, default=None, metavar="N",
                   help="with --kv-compression: most recent tokens always kept (default 16; also the "
                   "observation window of snapkv/adakv/chunkkv/rkv)")
    p.add_argument("--target", default=None, metavar="SM[,SM...]",
                   help="GPU targets to cross-compile every kernel for (sm_80, sm_86, sm_89, sm_90; no GPU needed): "
                   "the package carries the cubins, 'braze inspect' shows registers/spills/shared memory per target")
    p.add_argument("--target-check", choices=("error", "warn"), default=None,
                   help="with --target: a kernel that spills (bf16/fp16 models) or exceeds a target's limits: error "
                   "(default) or warn (accept it)")
    p.add_argument("--tp", type=positive_int, default=1, metavar="N",
                   help="tensor parallelism: compile N shards on N local ranks (gloo on CPU, NCCL on GPUs) into a "
                   "sharded package (rank<r>/ + shards.json); run it with torchrun --nproc-per-node N -m braze run")
    p.add_argument("--report", action="store_true", help="print the full compile report")
    p.set_defaults(func=main)


def _check_arguments(args: argparse.Namespace, dtype: Any) -> None:
    """Refuse option combinations the compiler would reject or ignore, before loading anything."""
    import torch

    if args.quant != "int6" and (args.int6_act or args.int6_method):
        raise UsageError("--int6-act / --int6-method apply to --quant int6 only")
    if args.quant != "df11" and args.df11_strategy:
        raise UsageError("--df11-strategy applies to --quant df11 only")
    if not args.kv_compression and (args.kv_budget is not None or args.kv_window is not None):
        raise UsageError("--kv-budget / --kv-window apply with --kv-compression only")
    if args.target is None and args.target_check is not None:
        raise UsageError("--target-check applies with --target only (it judges the cross-compiled kernels)")
    if args.target is not None:
        from braze.kernels.device import TARGETS

        names = [t.strip() for t in args.target.split(",")]
        bad = [t for t in names if t.lower().replace("sm", "").lstrip("_") not in {n[3:] for n in TARGETS}]
        if bad:
            raise UsageError(f"--target: unknown GPU target {bad[0]!r}; valid targets: {', '.join(TARGETS)}")
    if args.quant == "df11" and dtype != torch.bfloat16:
        raise UsageError(f"--quant df11 compresses BF16 weights losslessly; the model would be "
                         f"{str(dtype).removeprefix('torch.')}: add --dtype bfloat16")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UsageError(f"-o {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not any((out / f).is_file() for f in ("manifest.json", "shards.json")):
        raise UsageError(f"-o {out}: a non-empty directory that is not a braze package; refusing to overwrite it")
    _check_writable(out)


def _check_writable(out: Path) -> None:
    """-o must be creatable before the compile (minutes) rather than fail after it: the nearest existing directory
    above it (where the package's temporary directory goes) must accept a new directory."""
    import tempfile

    above = out.absolute().parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise UsageError(f"-o {out}: {above} is a file, not a directory")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".braze-probe-", dir=above))
    except OSError as e:
        raise UsageError(f"-o {out}: cannot create the package under {above} ({e.strerror or e})") from None


def main(args: argparse.Namespace) -> int:
    from braze.runtime.package import manifest_digest, save_package
    from braze.runtime.units import format_bytes

    from .models import resolve_model

    device = device_for(args.executor)
    dtype = _torch_dtype(args.dtype, device)
    _check_arguments(args, dtype)
    if args.tp > 1:
        return _main_tp(args, device)
    with Stages(["load model", "compile", "save package"]) as stages:
        stages.start(f"loading {args.model}")
        loaded = resolve_model(args.model, dtype=dtype, device=device)
        if not loaded.causal_lm and args.speculate:
            raise UsageError(f"--speculate applies to causal LMs; {args.model} is a {type(loaded.model).__name__}")
        stages.start("compiling")
        compiled = compile_model(loaded, {**_options(args), **_calibration(args, loaded)})
        stages.start(f"saving {args.output}")
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
    eager = sum(1 for s in plan.steps if s.kind == "eager")
    print(f"  plans: {', '.join(plans)}; {plural(len(sources), 'distinct kernel')}; "
          f"{plural(plan.launches, 'launch', 'launches')} per forward, {plural(eager, 'eager fallback')}; weights "
          f"{format_bytes(weight_bytes)}; tokenizer: {'yes' if loaded.tokenizer is not None else 'no'}")
    print(f"  load {t.get(f'loading {args.model}', 0):.1f} s, compile {t.get('compiling', 0):.1f} s, "
          f"save {t.get(f'saving {args.output}', 0):.1f} s; executor {compiled.executor_name}")
    if compiled.report is not None and "kv compression" in compiled.report.extra:
        print(f"  kv compression: {compiled.report.extra['kv compression']}")
    build = getattr(compiled, "target_build", None)
    if build is not None:
        unfit, warned = len(build.errors), len(build.issues) - len(build.errors)
        print(f"  GPU targets {', '.join(build.targets)}: {plural(len(build.results), 'kernel specialization')} "
              f"cross-compiled in {build.seconds:.1f} s ({unfit} {'does' if unfit == 1 else 'do'} not fit, "
              f"{plural(warned, 'warning')}); cubins in {path}/targets/")
        for issue in build.issues[:10]:
            print(f"    {issue.severity}: {issue}")
        if len(build.issues) > 10:
            print(f"    ... {len(build.issues) - 10} more (braze inspect {path})")
    print(f"  sha256 {manifest_digest(path)} (pin it: braze run {path} --sha256 DIGEST)")
    return 0


def _budget(text: str) -> float | int:
    """--kv-budget: a share of max_seq (0 < F <= 1) or a whole token count (N > 1); braze.compile checks ranges."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return int(value) if value > 1 and value.is_integer() else value


def _options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = dict(executor=args.executor, max_seq=args.max_seq, max_batch=args.max_batch)
    for key in ("quant", "speculate", "df11_strategy", "int6_act", "int6_method", "kv_dtype", "kv_compression",
                "kv_budget", "kv_window"):
        if getattr(args, key, None) is not None:
            options[key] = getattr(args, key)
    if args.deterministic:
        options["deterministic"] = True
    if args.target is not None:
        options.update(targets=args.target, target_check=args.target_check or "error")
    if args.tp > 1:
        options["tp"] = args.tp
    return options


def _calibration(args: argparse.Namespace, loaded: Any) -> dict[str, Any]:
    """--quant int6 rounding that calibrates (auto, awq, gptq; a6 / mixed activations): braze.compile finds a
    tokenizer only next to an HF model's files, so the tokenizer a factory or a .gguf file brought is turned into
    the statistics braze.compile would collect (braze/api.py _with_calibration: Hessians for gptq only)."""
    method = args.int6_method or "auto"
    wanted = method != "rtn" or args.int6_act in ("a6", "mixed")
    if args.quant != "int6" or not wanted or loaded.tokenizer is None or not loaded.causal_lm:
        return {}
    if loaded.kind in ("hf-dir", "builtin"):  # braze.compile finds the tokenizer there (and skips it on a cache hit)
        return {}
    from braze.quant.calibration import collect

    return {"int6_calibration": collect(loaded.model, loaded.tokenizer, hessians=method == "gptq")}


def _compile_rank(rank: int, world: int, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """One rank of `braze compile --tp N`: load the model, compile this rank's shard, save rank<r>/."""
    from braze.runtime.sharded_package import save_sharded

    from .models import resolve_model

    where = f"cuda:{rank}" if device == "cuda" else device
    dtype = _torch_dtype(args.dtype, device)
    loaded = resolve_model(args.model, dtype=dtype, device=where)
    if not loaded.causal_lm:
        raise UsageError(f"--tp applies to causal LMs; {args.model} is a {type(loaded.model).__name__}")
    compiled = compile_model(loaded, {**_options(args), **_calibration(args, loaded)})
    meta = {"source": loaded.source, "source_kind": loaded.kind, "dtype": str(dtype).removeprefix("torch.")}
    save_sharded(compiled, args.output, tokenizer=loaded.tokenizer, metadata=meta)
    return {"model": type(loaded.model).__name__, "executor": compiled.executor_name,
            "weight_bytes": sum(t.nbytes for t in compiled.weights.values()),
            "notes": [n for p in compiled.report.passes if p.name == "shard_tensor_parallel" for n in p.notes]}


def _main_tp(args: argparse.Namespace, device: str) -> int:
    """`braze compile --tp N`: N local ranks (spawned here) each compile and save their shard."""
    import hashlib

    from braze.distributed import spawn
    from braze.runtime.units import format_bytes

    try:
        results = spawn(args.tp, _compile_rank, args, device, backend="nccl" if device == "cuda" else "gloo")
    except RuntimeError as e:  # a rank failed: its traceback's last line (the error) is the message
        lines = str(e).strip().splitlines()
        raise UsageError(f"{lines[0].rstrip(':')}: {lines[-1]}") from None
    path = Path(args.output)
    first = results[0]
    print(f"compiled {first['model']} from {args.model} -> {path} (tp={args.tp}: rank0/ .. rank{args.tp - 1}/, "
          f"shards.json); executor {first['executor']}")
    print(f"  weights per rank: {', '.join(format_bytes(r['weight_bytes']) for r in results)}")
    if args.report:
        for note in first["notes"]:
            print(f"  {note}")
    digest = hashlib.sha256((path / "shards.json").read_bytes()).hexdigest()
    print(f"  sha256 {digest} (pin it: braze run {path} --sha256 DIGEST, under torchrun --nproc-per-node "
          f"{args.tp})")
    return 0


def _describe_inputs(inputs: tuple | None) -> list | None:
    if inputs is None:
        return None
    return [{"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for t in inputs
            if hasattr(t, "shape")]
