"""`braze cache [--clear]`: the compile cache's entries (key, model, size, last used) against its size cap, or
delete them all.

The cache itself (keys, the BRAZE_CACHE_MAX_GB cap, least-recently-used eviction) is braze/compiler/cache.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

KEY_CHARS = 12


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("cache", parents=parents, help="list or clear the compile cache",
                       description="List the compile cache's entries (key prefix, model, size, last used) and their "
                       "total against the BRAZE_CACHE_MAX_GB cap (default 10; least recently used entries are "
                       "evicted past it). The cache is $BRAZE_CACHE_DIR/compiled, else "
                       "$XDG_CACHE_HOME/braze/compiled, else ~/.cache/braze/compiled.")
    p.add_argument("--clear", action="store_true", help="delete every entry and say how much that freed")
    p.set_defaults(func=main)


def _model_name(entry: Path) -> str:
    """The model an entry was compiled from, as its manifest records it ('?' if the manifest is unreadable)."""
    try:
        return str(json.loads((entry / "manifest.json").read_text()).get("model") or "?")
    except (OSError, ValueError, AttributeError):
        return "?"


def _list(root: Path, entries: list[Any], cap_gb: float, on: bool) -> None:
    from braze.compiler.cache import MAX_GB_VAR, entries_word, format_gb

    state = "" if on else " (off: BRAZE_CACHE=0)"
    if not entries:
        print(f"compile cache {root}{state}: empty (cap {MAX_GB_VAR}={cap_gb:g})")
        return
    print(f"compile cache {root}{state}:")
    rows = [(e.key[:KEY_CHARS], _model_name(e.path), format_gb(e.size),
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))) for e in reversed(entries)]
    width = max(len("model"), *(len(r[1]) for r in rows))
    print(f"  {'key':<{KEY_CHARS}s}  {'model':<{width}s}  {'size':>9s}  last used")
    for key, model, size, used in rows:
        print(f"  {key:<{KEY_CHARS}s}  {model:<{width}s}  {size:>9s}  {used}")
    total = sum(e.size for e in entries)
    print(f"{len(entries)} {entries_word(len(entries))}, {format_gb(total)} of {MAX_GB_VAR}="
          f"{cap_gb:g} ({format_gb(cap_gb * 10**9)}); least recently used entries are evicted past it")


def _clear(root: Path, entries: list[Any]) -> None:
    from braze.compiler.cache import entries_word, format_gb, remove_entry, remove_stale_leftovers

    if not entries:
        print(f"compile cache {root}: empty, nothing to delete")
        return
    removed = [e for e in entries if remove_entry(e.path)]
    remove_stale_leftovers(root)
    freed = format_gb(sum(e.size for e in removed))
    print(f"deleted {len(removed)} {entries_word(len(removed))} ({freed}) from {root}")


def main(args: argparse.Namespace) -> int:
    from braze.compiler.cache import enabled, entries_dir, list_entries, max_gb

    root = entries_dir()
    if args.clear:  # needs no cap: clearing works whatever BRAZE_CACHE_MAX_GB says
        _clear(root, list_entries(root))
    else:
        cap_gb = max_gb()  # a bad BRAZE_CACHE_MAX_GB is a one-line error here too
        _list(root, list_entries(root), cap_gb, enabled())
    return 0
