"""`braze inspect PKG`: a package's digest, manifest, plans, kernels and the graph nodes they cover, sizes.

Reads JSON and the safetensors header only: nothing is imported from the package, no weights are loaded.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import Any

from .common import EXIT_RUNTIME, UsageError, add_sha256, plural


def register(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inspect", parents=parents, help="show a package's digest, plan, kernels and sizes",
                       description="Show a package's sha256 digest, manifest, plan steps, kernels and the graph nodes "
                       "they cover, launches per forward, weight bytes and the bytes-per-token estimate. Verifies "
                       "file hashes (exit 1 if one differs).")
    p.add_argument("package", metavar="PKG", help="package directory")
    p.add_argument("--steps", action="store_true", help="list every plan step in order")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    add_sha256(p)
    p.set_defaults(func=main)


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file too short")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000:
            raise ValueError("header too large")
        return json.loads(f.read(n))


def summarize_package(path: str, sha256: str | None = None) -> dict[str, Any]:
    """Everything `braze inspect` shows, as plain data (reads JSON and the safetensors header only)."""
    from braze.runtime.errors import PackageError
    from braze.runtime.package import manifest_digest, read_manifest, verify_package
    from braze.runtime.plan import Plan

    root = Path(path)
    manifest = read_manifest(root, sha256=sha256)
    digest = manifest_digest(root)
    try:
        verify_package(root, manifest)
        integrity = f"ok ({plural(len(manifest['files']), 'file')}, sha256)"
    except PackageError as e:
        integrity = f"FAILED: {e}"
    plans = {}
    for name, rel in manifest["plans"].items():
        try:
            plan = Plan.from_json((root / rel).read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PackageError(f"{root / rel}: not a readable plan ({type(e).__name__}: {e}); integrity: "
                               f"{integrity}") from None
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
    gpu_targets = _gpu_targets(root, manifest)
    return {
        "path": str(root), "sha256": digest, "format_version": manifest["format_version"],
        "versions": manifest.get("versions", {}),
        "model": manifest.get("model"), "causal_lm": manifest.get("causal_lm"), "target": manifest["target"],
        "compile_options": manifest.get("compile_options", {}), "metadata": manifest.get("metadata", {}),
        "integrity": integrity, "plans": plans,
        "weights": {"tensors": n_tensors, "aliases": len(manifest["weights"].get("aliases", {})),
                    "bytes": weight_bytes, "by_dtype": by_dtype},
        "bytes_per_token_decode": weight_bytes if manifest.get("causal_lm") else None,
        "tokenizer": bool(manifest.get("tokenizer")),
        "gpu_targets": gpu_targets,
    }


def _gpu_targets(root: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Per cross-compiled target: its index (triton version, limit, issues) and per kernel the maxima over its
    specializations (registers, spill bytes, shared memory) and MMA kinds."""
    out: dict[str, Any] = {}
    for name, info in (manifest.get("gpu_targets") or {}).items():
        try:
            index = json.loads((root / info["index"]).read_text())
        except (OSError, ValueError, KeyError, TypeError) as e:
            out[name] = {"error": f"unreadable index ({e})"}
            continue
        kernels: dict[str, dict[str, Any]] = {}
        for e in index.get("kernels", []):
            k = kernels.setdefault(e["kernel"], {"family": e.get("family"), "specializations": 0, "regs": 0,
                                                 "spills": 0, "smem": 0, "mma": [], "warps": []})
            k["specializations"] += 1
            k["regs"] = max(k["regs"], e.get("regs", 0))
            k["spills"] = max(k["spills"], e.get("spill_stores", 0) + e.get("spill_loads", 0))
            k["smem"] = max(k["smem"], e.get("smem", 0))
            for key, value in (("mma", e.get("mma")), ("warps", e.get("num_warps"))):
                if value not in k[key]:
                    k[key].append(value)
        out[name] = {"triton": index.get("triton"), "smem_per_block": index.get("smem_per_block"),
                     "issues": index.get("issues", []), "kernels": kernels}
    return out


def main(args: argparse.Namespace) -> int:
    from braze.runtime.sharded_package import is_sharded, read_index
    from braze.runtime.units import format_bytes

    if is_sharded(args.package):  # a tensor-parallel package: one ordinary package per rank
        index = read_index(Path(args.package))
        dirs = ", ".join(f"{args.package}/{e['dir']}" for e in index["ranks"])
        raise UsageError(f"{args.package} is a tp={index['tp']} package (shards.json); inspect a rank's shard: {dirs}")
    info = summarize_package(args.package, sha256=args.sha256)
    if args.json:
        if not args.steps:
            for p in info["plans"].values():
                p.pop("step_list")
        print(json.dumps(info, indent=1))
        return 0 if info["integrity"].startswith("ok") else EXIT_RUNTIME
    v = info["versions"]
    print(f"package {info['path']}: format {info['format_version']}, braze {v.get('braze')}, torch {v.get('torch')}, "
          f"triton {v.get('triton')}")
    print(f"sha256: {info['sha256']} (of manifest.json, which hashes every other file; pin with --sha256)")
    tgt = info["target"]
    print(f"model: {info['model']}{' (causal LM)' if info['causal_lm'] else ''}; target {tgt.get('device')}"
          f"{' ' + tgt['device_name'] if tgt.get('device_name') else ''} (compiled with executor "
          f"{tgt.get('executor')}); source: {info['metadata'].get('source', 'unknown')}")
    opts = dict(info["compile_options"])
    if "kv_dtype" in opts and opts["kv_dtype"] is None:
        opts["kv_dtype"] = "auto"  # the model's dtype (float32 in deterministic mode)
    if opts.get("kv_compression") is None:
        opts.pop("kv_budget", None)  # meaningful only with a compression policy
        opts.pop("kv_window", None)
    quant_keys = {"int6": ("int6_act", "int6_method"), "df11": ("df11_strategy",)}.get(opts.get("quant"), ())
    shown = ", ".join(f"{k}={opts[k]}" for k in ("quant", *quant_keys, "speculate", "deterministic", "kv_dtype",
                                                 "kv_compression", "kv_budget", "kv_window", "tp", "max_batch",
                                                 "max_seq")
                      if opts.get(k) is not None)
    print(f"compile options: {shown}")
    print(f"integrity: {info['integrity']}")
    for name, plan in info["plans"].items():
        dims = ", ".join(f"{s['label']} in [{s['lower']}, {'inf' if s['upper'] is None else s['upper']}]"
                         for s in plan["symbols"])
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(plan["step_kinds"].items()))
        print(f"\nplan {name}: {plural(plan['steps'], 'step')} ({kinds}); "
              f"{plural(plan['launches'], 'kernel launch', 'kernel launches')} per call; dims: {dims}")
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
    print(f"\nweights: {plural(w['tensors'], 'tensor')} (+{plural(w['aliases'], 'alias', 'aliases')}), "
          f"{format_bytes(w['bytes'])} ({dt})")
    if info["bytes_per_token_decode"] is not None:  # (a causal LM's decode step)
        print(f"bytes per token (decode step, batch 1): ~{format_bytes(info['bytes_per_token_decode'])} "
              f"(every weight read once; KV cache and activations not counted)")
    print(f"tokenizer: {'yes' if info['tokenizer'] else 'no'}")
    for name, t in info["gpu_targets"].items():
        if "error" in t:
            print(f"\nGPU target {name}: {t['error']}")
            continue
        print(f"\nGPU target {name} (cubins cross-compiled with triton {t['triton']}; shared memory limit "
              f"{t['smem_per_block']:,} B per block; verified by sha256, not executed without a GPU): "
              f"{plural(len(t['kernels']), 'kernel')}, max over each kernel's specializations")
        width = max([len(k) for k in t["kernels"]] + [6])
        print(f"    {'kernel':{width}s}  {'family':<22s} {'specs':>5s} {'regs':>5s} {'spills B':>9s} {'smem B':>9s}  "
              f"{'mma':<9s} warps")
        for kname, k in t["kernels"].items():
            print(f"    {kname:{width}s}  {k['family'] or '?':<22s} {k['specializations']:>5d} {k['regs']:>5d} "
                  f"{k['spills']:>9,} {k['smem']:>9,}  {'/'.join(map(str, k['mma'])):<9s} "
                  f"{'/'.join(map(str, k['warps']))}")
        for issue in t["issues"]:
            print(f"    {issue}")
    return 0 if info["integrity"].startswith("ok") else EXIT_RUNTIME


