"""The `braze` command: thin commands over the library, one module per command.

    braze compile MODEL -o pkg/ [--quant df11|int6] [--speculate suffix] [--deterministic] [--max-seq N] ...
    braze run pkg/ --prompt "..." [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                   [--chat] [--stream] [--speculate] [--sha256 DIGEST]
    braze inspect pkg/ [--sha256 DIGEST]
    braze bench MODEL|pkg/ [--batch B] [--seq S] [--iters N]
    braze check pkg/ MODEL
    braze eval MODEL [--quant ...]
    braze cache [--clear]

Errors print one line on stderr (`--debug` or BRAZE_DEBUG=1 shows the traceback). Exit codes: 0 success; 2 a usage
error (a bad argument, a refused combination of arguments, an input outside what the package accepts); 1 a
runtime failure (a missing, corrupted or mismatched package, a failed check, a model that does not load).
Heavy imports (torch, transformers) happen inside the commands.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import warnings

from . import bench, cache, check, compile, eval, inspect, run
from .common import EXIT_RUNTIME, EXIT_USAGE, CheckFailed, Parser, UsageError, err, secondary_rank
from .models import MODEL_HELP

COMMANDS = (compile, run, inspect, bench, check, eval, cache)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("braze")
    except Exception:
        return "0.1.0"


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the full traceback on errors")
    parser = Parser(prog="braze", description="braze: an LLM-inference compiler. Compile a PyTorch model into a "
                    "self-contained Triton kernel package, then run, inspect, benchmark and check it.",
                    epilog=f"MODEL is {MODEL_HELP}. Run 'braze COMMAND --help' for a command's options.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"braze {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub, [debug])
    return parser


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    if not text:
        return type(e).__name__
    lines = text.splitlines()
    return lines[0] + (" (...; --debug for the rest)" if len(lines) > 1 else "")


def classify(e: BaseException) -> tuple[int, str]:
    """(exit code, message prefix) for an error a command raised."""
    from braze.runtime.errors import BrazeError, ConfigError, InputMismatchError, ShapeOutOfRangeError

    if isinstance(e, (UsageError, ConfigError, InputMismatchError, ShapeOutOfRangeError)):
        return EXIT_USAGE, "error: "
    if isinstance(e, CheckFailed):
        return EXIT_RUNTIME, ""
    if isinstance(e, BrazeError):
        return EXIT_RUNTIME, "error: "
    if isinstance(e, NotImplementedError):
        return EXIT_RUNTIME, "not implemented yet: "
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return EXIT_RUNTIME, "error: "
    return EXIT_RUNTIME, f"error: {type(e).__name__}: "


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
        if secondary_rank():  # under torchrun every rank runs the command; rank 0 prints its output
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
                code = int(args.func(args) or 0)
        else:
            code = int(args.func(args) or 0)
        _leave_process_group(wait=True)
        return code
    except KeyboardInterrupt:
        err("braze: interrupted")
        return 130
    except Exception as e:
        if debug:
            import traceback

            traceback.print_exc()
        code, prefix = classify(e)
        err(f"braze {args.command}: {prefix}{_one_line(e)}")
        _leave_process_group(wait=False)
        return code


def _leave_process_group(wait: bool) -> None:
    """Tear down the group a tp package's ranks joined under this command (only one braze started)."""
    import sys

    sharded = sys.modules.get("braze.runtime.sharded_package")
    if sharded is not None:
        sharded.leave_own_process_group(wait)


__all__ = ["build_parser", "main"]
