"""Tensor-parallel packages: one ordinary package per rank under one directory, and a shard index.

Layout::

    shards.json     {"format": 1, "tp": N, "ranks": [{"rank": r, "dir": "rank<r>", "manifest_sha256": ...}, ...]}
    rank<r>/        rank r's package (braze/runtime/package.py): its plans, kernels and only its weight shard;
                    its manifest's metadata says {"tp": {"rank": r, "world": N}}

Every rank saves its own directory (`compiled.save(path)` on each rank of a tp > 1 compile); rank 0 writes the
index with each rank's manifest digest. Loading (`braze.load(path)` on each rank of an N-rank process group)
reads only the rank's own directory, pinned to the digest the index lists for that rank, so a rank given another
rank's shard (or a stale one) is refused before any of its files are used.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from braze.runtime.compiled import CompiledModel
from braze.runtime.errors import ConfigError, DigestMismatchError, PackageError
from braze.runtime.package import (
    MANIFEST,
    load_package,
    manifest_digest,
    pinned_digest,
    read_manifest,
    save_package,
)

SHARDS = "shards.json"
FORMAT = 1


def is_sharded(path: str | os.PathLike) -> bool:
    return (Path(path) / SHARDS).is_file()


def save_sharded(compiled: Any, path: str | os.PathLike, tokenizer: Any = None,
                 metadata: dict[str, Any] | None = None) -> Path:
    """Called on every rank of a tp > 1 compile: rank r writes `path`/rank<r>, rank 0 the shard index."""
    world = int(getattr(compiled.config, "tp", 1))
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world:
        raise ConfigError(f"a tp={world} model is saved by each of its {world} ranks, inside their process group")
    rank = dist.get_rank()
    root = Path(path)
    if rank == 0 and root.exists() and any(root.iterdir()) and not (root / SHARDS).exists():
        raise PackageError(f"{root} is a non-empty directory that is not a sharded braze package; refusing to "
                           "overwrite it")
    dist.barrier()
    root.mkdir(parents=True, exist_ok=True)
    sub = f"rank{rank}"
    save_package(compiled, root / sub, tokenizer=tokenizer,
                 metadata={**(metadata or {}), "tp": {"rank": rank, "world": world}})
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, manifest_digest(root / sub))
    if rank == 0:
        index = {"format": FORMAT, "tp": world,
                 "ranks": [{"rank": r, "dir": f"rank{r}", "manifest_sha256": d} for r, d in enumerate(digests)]}
        (root / SHARDS).write_text(json.dumps(index, indent=1) + "\n")
    dist.barrier()
    return root


def _save_any(compiled: Any, path: Any, tokenizer: Any = None, metadata: dict[str, Any] | None = None) -> Path:
    """CompiledModel.save: a sharded package for a tp > 1 compile, an ordinary one otherwise."""
    if int(getattr(getattr(compiled, "config", None), "tp", 1) or 1) > 1:
        return save_sharded(compiled, path, tokenizer=tokenizer, metadata=metadata)
    return save_package(compiled, path, tokenizer=tokenizer, metadata=metadata)


CompiledModel.package_writer = _save_any


_OWN_GROUP = {"started": False}


def _process_group(world: int, root: Path) -> int:
    """This process's rank in the N-rank group the package needs (started here under torchrun's environment)."""
    if not dist.is_initialized() and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        _OWN_GROUP["started"] = True
    if not dist.is_initialized():
        raise ConfigError(f"{root} is a tp={world} package: run it on {world} ranks of a torch.distributed process "
                          f"group (torchrun --nproc-per-node {world})")
    if dist.get_world_size() != world:
        raise ConfigError(f"{root} is a tp={world} package; this process group has {dist.get_world_size()} ranks")
    return dist.get_rank()


def leave_own_process_group(wait: bool) -> None:
    """Tear down the process group braze started for a tp package (left to interpreter exit, gloo's threads can
    abort the process); a group the caller initialised is theirs and stays. `wait`: after every rank is done, so
    none tears down under another's collective."""
    if not _OWN_GROUP["started"] or not dist.is_initialized():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()
    _OWN_GROUP["started"] = False


def read_index(root: Path) -> dict[str, Any]:
    try:
        index = json.loads((root / SHARDS).read_text())
        world = int(index["tp"])
        ranks = index["ranks"]
        if len(ranks) != world or any(e["rank"] != r for r, e in enumerate(ranks)):
            raise ValueError("ranks do not list 0..tp-1 in order")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PackageError(f"{root / SHARDS}: unreadable shard index ({e})") from None
    if index.get("format") != FORMAT:
        raise PackageError(f"{root / SHARDS}: shard index format {index.get('format')!r}; this braze reads {FORMAT}")
    return index


def load_sharded(path: str | os.PathLike, executor: str = "auto", sha256: str | None = None) -> CompiledModel:
    """This rank's shard of a tensor-parallel package, verified against the index before anything else is read.

    sha256: the pinned digest of the package (of its shards.json, which holds every rank's manifest digest)."""
    root = Path(path)
    if sha256 is not None:
        want = pinned_digest(sha256)
        try:
            got = hashlib.sha256((root / SHARDS).read_bytes()).hexdigest()
        except OSError as e:
            raise PackageError(f"{root / SHARDS}: unreadable ({e.strerror or e})") from None
        if got != want:
            raise DigestMismatchError(f"{root}: {SHARDS} sha256 is {got}, not the pinned {want}")
    index = read_index(root)
    rank = _process_group(int(index["tp"]), root)
    entry = index["ranks"][rank]
    sub = root / entry["dir"]
    if Path(entry["dir"]).is_absolute() or ".." in Path(entry["dir"]).parts:
        raise PackageError(f"{root / SHARDS}: rank {rank}'s directory {entry['dir']!r} is outside the package")
    manifest = read_manifest(sub)
    if manifest_digest(sub) != entry["manifest_sha256"]:
        owner = (manifest.get("metadata") or {}).get("tp", {}).get("rank")
        whose = f"it is rank {owner}'s shard" if owner is not None and owner != rank else "not the one indexed"
        raise PackageError(f"rank {rank}: {sub / MANIFEST} is not the shard {SHARDS} lists for rank {rank} ({whose})")
    return load_package(sub, executor=executor, sha256=entry["manifest_sha256"])
