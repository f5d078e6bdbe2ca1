"""Side by side: braze's KV-cache compression selection against NVIDIA kvpress (the reference implementation).

Same model (SmolLM2-135M, real K/V and queries of every layer over the shipped text), same context, same budget,
same press: kvpress's presses are run through their own `compress()` on the real HF attention module and inputs,
and their kept indices recovered; braze's come from `braze.kvcompress.select_keep`. For each difference the script
also reruns braze's code with kvpress's parameter (its window, its pooling, no per-head cap, its chunk rule) to show
that the difference is that parameter and nothing else: those rows must match exactly.

kvpress is loaded install-free (it declares transformers<5.3, braze pins 5.24): pass the unpacked wheel with
`--kvpress PATH`; its imports of `datasets`, `fire` and `peft` (used only by unrelated presses) are stubbed.

    .venv/bin/python benchmarks/kvpress_side_by_side.py --kvpress /tmp/kvp/src --out results/FILE.md
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.metadata
import importlib.util
import os
import platform
import sys
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GET_KVPRESS = ("kvpress is not importable: get it install-free with `pip download --no-deps kvpress==0.5.5 "
               "cachetools==5.5.2`, unzip both wheels into one folder and pass --kvpress FOLDER")
STUBBED = ("datasets", "fire", "peft")  # imported by kvpress only for presses not compared here
BUDGETS = (0.5, 0.25, 0.125)  # share of the context kept: compression_ratio = 1 - budget
BRAZE_WINDOW = 16  # braze's CompileConfig.kv_window default


def load_kvpress(path: str | None) -> types.ModuleType:
    """Import kvpress (from `path` if given) with throwaway stubs for its unrelated optional imports; the stubs
    leave sys.modules afterwards, because transformers' find_spec checks choke on a stub without __spec__."""
    if path is not None:
        sys.path.insert(0, str(Path(path).resolve()))
    stubs = [n for n in STUBBED if n not in sys.modules and importlib.util.find_spec(n) is None]
    for name in stubs:
        stub = types.ModuleType(name)
        stub.load_dataset = stub.Fire = None  # type: ignore[attr-defined]
        sys.modules[name] = stub
    try:
        return importlib.import_module("kvpress")
    except ImportError as exc:
        raise SystemExit(f"{GET_KVPRESS} ({exc})") from None
    finally:
        for name in stubs:
            sys.modules.pop(name, None)


@dataclass
class Layer:
    """What kvpress's forward hook hands to compress(): the attention module, its input hidden states, the
    forward's kwargs (position_embeddings) and the cache's keys/values after prefill."""

    module: Any
    hidden: torch.Tensor
    kwargs: dict
    keys: torch.Tensor
    values: torch.Tensor


@torch.no_grad()
def capture(model: Any, ids: torch.Tensor, layers: list[int]) -> dict[int, Layer]:
    """One prefill with forward hooks on the chosen attention modules. kvpress's own hook cannot run here: it reads
    kwargs['past_key_values'] and kwargs['cache_position'], which transformers 5.24 renamed (`cache`) and dropped,
    so this hook records the same inputs and compress() is called on them directly."""
    from transformers import DynamicCache

    out: dict[int, Layer] = {}
    lm = model.model

    def hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        cache = kwargs["cache"].layers[module.layer_idx]
        out[module.layer_idx] = Layer(module, kwargs["hidden_states"].detach(),
                                      {"position_embeddings": kwargs["position_embeddings"]},
                                      cache.keys.detach().clone(), cache.values.detach().clone())

    hooks = []
    for i in layers:
        attn = lm.layers[i].self_attn
        attn.rotary_emb = lm.rotary_emb  # as kvpress's BasePress.__call__ does
        hooks.append(attn.register_forward_hook(hook, with_kwargs=True))
    try:
        model(ids[None], cache=DynamicCache(config=model.config), use_cache=True)
    finally:
        for h in hooks:
            h.remove()
    return out


def rows_to_mask(kept_keys: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """bool [H, P]: which of `keys` [1, H, P, D] appear among `kept_keys` [1, H, n, D] (compress() returns the
    gathered keys, not indices; the rows are bitwise copies, so they are matched by their bytes)."""
    _, h, p, _ = keys.shape
    mask = torch.zeros(h, p, dtype=torch.bool)
    for head in range(h):
        index = {keys[0, head, i].numpy().tobytes(): i for i in range(p)}
        assert len(index) == p, "duplicate key rows: indices cannot be recovered from compress()"
        for row in kept_keys[0, head]:
            mask[head, index[row.numpy().tobytes()]] = True
    return mask


@torch.no_grad()
def kvpress_mask(kvpress: types.ModuleType, press: str, ratio: float, layer: Layer) -> torch.Tensor:
    """bool [H, P]: the tokens kvpress keeps, from the press's own compress() on the real module and inputs."""
    snap = kvpress.SnapKVPress(compression_ratio=ratio)  # kvpress defaults: window_size=64, kernel_size=5
    obj = {"keydiff": kvpress.KeyDiffPress(compression_ratio=ratio), "snapkv": snap,
           "adakv": kvpress.AdaKVPress(press=snap), "chunkkv": kvpress.ChunkKVPress(press=snap)}[press]
    keys, values = layer.keys.clone(), layer.values.clone()
    kept, _ = obj.compress(layer.module, layer.hidden, keys, values, None, layer.kwargs)
    if press != "adakv":
        return rows_to_mask(kept, layer.keys)
    # Ada-KV keeps every key and records the pruned (batch, head, position) for its attention patch
    _, heads, pos = layer.module.masked_key_indices
    layer.module.masked_key_indices = None
    mask = torch.ones(layer.keys.shape[1], layer.keys.shape[2], dtype=torch.bool)
    mask[heads, pos] = False
    return mask


@contextlib.contextmanager
def avg_pool_in_braze() -> Iterator[None]:
    """Run braze's snapkv_scores with kvpress's pooling: its one max_pool1d call becomes avg_pool1d (same kernel,
    stride, padding; avg_pool1d counts the zero padding at the edges, as kvpress's call does). Nothing else in
    braze's code changes."""
    import braze.kvcompress.scores as scores

    shim = types.SimpleNamespace(**{k: getattr(F, k) for k in dir(F) if not k.startswith("__")})
    shim.max_pool1d = F.avg_pool1d
    saved = scores.F
    scores.F = shim  # type: ignore[assignment]
    try:
        yield
    finally:
        scores.F = saved


def window_queries(layer: Layer, w: int) -> torch.Tensor:
    """q_win [1, Hq, W, D] as braze's kv_compress op builds it: the layer's queries of the last W positions with
    RoPE applied (the prefill graph's q, recomputed here from the same hidden states)."""
    from braze.ops.library import rope_reference

    m, h = layer.module, layer.hidden
    q = m.q_proj(h).view(1, h.shape[1], -1, m.head_dim).transpose(1, 2)
    cos, sin = layer.kwargs["position_embeddings"]
    p = h.shape[1]
    return rope_reference(q[:, :, p - w:], cos[:, p - w:], sin[:, p - w:])


@dataclass(frozen=True)
class Variant:
    """One way of running braze's selection: its defaults, or with some of kvpress's parameters."""

    label: str
    window: int
    avg_pool: bool = False
    no_cap: bool = False  # adakv: no per-head slot cap (kvpress lets one head keep up to the whole context)
    kvpress_chunks: bool = False  # chunkkv: kvpress's window pad and whole-chunk budget (see braze_mask)
    why: str = ""


VARIANTS = {
    "keydiff": [
        Variant("braze defaults (kv_window=16)", BRAZE_WINDOW,
                why="braze always keeps the last kv_window tokens; KeyDiffPress has no window"),
        Variant("window=0 (none, as kvpress)", 0, why="same code, no window: must match"),
    ],
    "snapkv": [
        Variant("braze defaults (kv_window=16, max-pool)", BRAZE_WINDOW,
                why="observation window 16 vs kvpress window_size=64; max- vs avg-pooling"),
        Variant("window=64, max-pool", 64, why="pooling only: braze max-pools (SnapKV paper), kvpress avg-pools"),
        Variant("window=16, avg-pool", BRAZE_WINDOW, avg_pool=True, why="window only: 16 vs 64 queries vote"),
        Variant("window=64, avg-pool (kvpress's)", 64, avg_pool=True, why="kvpress's parameters: must match"),
    ],
    "adakv": [
        Variant("braze defaults (kv_window=16, max-pool, cap 2x)", BRAZE_WINDOW,
                why="SnapKV's window and pooling, plus braze's per-head cap of 2x the mean budget"),
        Variant("window=64, avg-pool, cap 2x (braze's)", 64, avg_pool=True,
                why="cap only: it binds only on a head kvpress gives > 2x the mean budget; kvpress's largest "
                    "head here: {share:.2f}x"),
        Variant("window=64, avg-pool, no cap (kvpress's)", 64, avg_pool=True, no_cap=True,
                why="kvpress's parameters: must match"),
    ],
    "chunkkv": [
        Variant("braze defaults (kv_window=16, max-pool)", BRAZE_WINDOW,
                why="SnapKV's window and pooling, plus the window and budget rules below"),
        Variant("window=64, avg-pool, braze's chunk rules", 64, avg_pool=True,
                why="chunk rules only: braze keeps exactly the budget (the last chunk cut) and the window token "
                    "by token; kvpress ranks the window's chunks first and keeps whole chunks"),
        Variant("window=64, avg-pool, kvpress's chunk rules", 64, avg_pool=True, kvpress_chunks=True,
                why="kvpress's parameters: must match"),
    ],
}


@torch.no_grad()
def braze_mask(press: str, layer: Layer, n_kept: int, ratio: float, v: Variant) -> torch.Tensor:
    """bool [H, P]: the tokens braze keeps, from select_keep (or, for kvpress's chunk rule, from braze's own scores,
    chunk_scores and keep_mask) with the variant's parameters."""
    from braze.kvcompress import chunk_scores, keep_mask, select_keep, snapkv_scores
    from braze.kvcompress.policy import CHUNK, POOL_KERNEL

    keys = layer.keys
    _, _, p, _ = keys.shape
    valid = torch.ones(1, p, dtype=torch.bool)
    keep = torch.tensor([n_kept])
    end = torch.tensor([p if v.no_cap else min(p, 2 * n_kept)])  # runtime: min(P, capacity - max_new_tokens)
    q_win = window_queries(layer, v.window) if press != "keydiff" else None
    pool = avg_pool_in_braze() if v.avg_pool else contextlib.nullcontext()
    with pool:
        if not v.kvpress_chunks:
            return select_keep(press, keys, valid, keep, end, v.window, q_win, layer.module.scaling)[0]
        scores = snapkv_scores(q_win, keys, valid, layer.module.scaling, POOL_KERNEL)
    # kvpress: the window scored max + 1 (one value over all heads) before the chunk means, so the chunks that
    # hold it rank first; then int(chunks * (1 - ratio)) whole chunks, however many tokens that is
    w = v.window
    scores[..., p - w:] = scores[..., : p - w].max() + 1
    chunked = chunk_scores(scores, valid, CHUNK)
    n_chunks = -(-p // CHUNK)
    top = max(1, int(n_chunks * (1 - ratio)))
    per_chunk = chunked[0, 0, ::CHUNK]
    chosen = torch.topk(per_chunk, top).indices
    count = sum(min(CHUNK, p - int(c) * CHUNK) for c in chosen)
    return keep_mask(chunked, torch.tensor(count).expand(1, keys.shape[1]))[0]


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """Per-head Jaccard of two kept-set masks [N, P] (N heads over all layers), exact-match share, kept counts."""
    inter = (a & b).sum(-1).float()
    union = (a | b).sum(-1).float()
    jac = inter / union
    return {"jmean": jac.mean().item(), "jmin": jac.min().item(), "exact": (a == b).all(-1).float().mean().item(),
            "ka": a.sum(-1), "kb": b.sum(-1), "only_a": (a & ~b).sum(-1).float().mean().item(),
            "only_b": (b & ~a).sum(-1).float().mean().item()}


def counts(k: torch.Tensor) -> str:
    lo, hi = int(k.min()), int(k.max())
    return str(lo) if lo == hi else f"{lo}-{hi}"


PRESS_NAMES = {"keydiff": "KeyDiffPress", "snapkv": "SnapKVPress (window_size=64, kernel_size=5)",
               "adakv": "AdaKVPress(SnapKVPress), alpha_safeguard=0.2",
               "chunkkv": "ChunkKVPress(SnapKVPress), chunk_length=20"}

NOTES = """\
## What matches

The scoring and selection themselves: KeyDiff's anchor and cosine, SnapKV's causal window softmax, its mean over
the window's queries and over each GQA group, Ada-KV's safeguard and joint top-k over a layer's heads, ChunkKV's
chunk boundaries and chunk means. Every "must match" row keeps kvpress's exact set in every head.

## Differences and why

Every difference below is a parameter or rule choice, not a scoring error: with kvpress's choice plugged into
braze's own code (the rows marked "must match") braze keeps exactly kvpress's tokens, head for head.

- **Window (all presses).** braze always keeps the last `kv_window` tokens (default 16) and, for the
  attention-based policies, uses those same tokens as SnapKV's observation window. kvpress's KeyDiffPress keeps no
  window at all; SnapKVPress observes and keeps the last `window_size=64`. At the same budget braze therefore spends
  16 slots on the recent tokens where KeyDiffPress spends none, and 48 fewer than SnapKVPress; and the SnapKV
  scores are averaged over 16 instead of 64 queries. KeyDiff with window 0 and SnapKV with window 64 (plus the
  pooling below) match exactly.
- **SnapKV pooling.** braze max-pools the window attention over 5 neighbouring keys (the SnapKV paper's
  clustering, `braze/kvcompress/scores.py`); kvpress average-pools (`F.avg_pool1d`, zero padding counted at the
  edges). Max-pooling keeps the neighbours of every attention peak, average-pooling favours runs of moderately
  attended keys. Swapping braze's one `max_pool1d` call for `avg_pool1d` (and window 64) gives kvpress's set.
- **Ada-KV per-head cap.** Both allocate the budget jointly over a layer's heads after protecting each head's top
  `int(0.2 * mean budget)` tokens (kvpress's alpha_safeguard; braze raises it to at least the window, which both
  score above everything else anyway, so the protected sets agree). braze's static decode cache gives a head at
  most 2x the mean budget (`ADAKV_HEAD_SLOTS`); kvpress has no cap (it masks pruned keys in a full-size cache).
  Where kvpress gives one head more than 2x the mean, braze would cut it and hand the surplus to the other heads'
  next best tokens; the "cap 2x" rows give kvpress's largest head share, and below 2x the cap cannot bind, so
  those rows match as well as the uncapped ones. (The cap can bind on braze's own default scores: compare the
  kept/head columns.)
- **ChunkKV chunk rules.** Chunks are the same (20 tokens from the first token, a short last chunk) and scored the
  same (sum over heads of the SnapKV scores, mean over the chunk). Two rules differ: (1) kvpress gives the window
  `max + 1` before taking chunk means, so the chunks that hold the window rank first and are kept whole
  (including the non-window tokens of the chunk that straddles it); braze ranks chunks by their real scores and
  keeps the window token by token. (2) kvpress keeps `int(n_chunks * (1 - ratio))` whole chunks, which is not the
  token budget (fewer tokens here, since the short last chunk is one of them and the count rounds down); braze
  keeps exactly the budget and cuts the last chunk it reaches (its earliest tokens first). With both kvpress
  rules applied to braze's scores the sets match exactly.
- **Ties.** braze ranks with a stable sort (earlier token first); kvpress uses `torch.topk`, whose order among
  equal scores is unspecified. Ties only occur inside the protected window (every window token gets the same
  score) and between chunks that all hold window tokens; at these budgets all of them are kept, so ties never
  change a kept set here.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kvpress", default=None, help="folder holding an unpacked kvpress 0.5.5 (default: import it)")
    ap.add_argument("--context", type=int, default=768,
                    help="context tokens (> 64 / 0.125 = 512, so kvpress's 64-token window fits every budget)")
    ap.add_argument("--layers", default="all", help="comma-separated layer indices, or 'all'")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    args = ap.parse_args()

    start = time.perf_counter()
    kvpress = load_kvpress(args.kvpress)
    import transformers

    from braze.eval import eval_text
    from braze.models import load_smollm2

    model, tok = load_smollm2()
    ids = torch.tensor(tok(eval_text()).input_ids[: args.context], dtype=torch.long)
    p = ids.numel()
    n_layers = model.config.num_hidden_layers
    layers = list(range(n_layers)) if args.layers == "all" else [int(x) for x in args.layers.split(",")]
    captured = capture(model, ids, layers)

    lines = []
    for press, variants in VARIANTS.items():
        lines += [f"### {press}: kvpress {PRESS_NAMES[press]} vs braze `{press}`", "",
                  "| budget | braze run | kept/head kvpress | kept/head braze | Jaccard mean | Jaccard min | "
                  "heads exact | kvpress-only / braze-only tokens per head | what differs |", "|---" * 9 + "|"]
        for budget in BUDGETS:
            ratio = 1 - budget
            n_kept = kvpress.utils.compute_n_kept(p, ratio)
            ref = torch.cat([kvpress_mask(kvpress, press, ratio, captured[i]) for i in layers])
            for v in variants:
                got = torch.cat([braze_mask(press, captured[i], n_kept, ratio, v) for i in layers])
                c = compare(ref, got)
                lines.append(f"| {budget:.1%} ({n_kept}) | {v.label} | {counts(c['ka'])} | {counts(c['kb'])} | "
                             f"{c['jmean']:.3f} | {c['jmin']:.3f} | {c['exact']:.0%} | "
                             f"{c['only_a']:.1f} / {c['only_b']:.1f} | "
                             f"{v.why.format(share=c['ka'].max().item() / n_kept)} |")
        lines.append("")

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    heads = len(layers) * model.config.num_key_value_heads
    head = [
        f"# braze KV-cache compression vs kvpress {importlib.metadata.version('kvpress')}, side by side", "",
        f"- kvpress: {kvpress.__file__} (loaded install-free: the wheel unpacked with cachetools, no dependencies "
        f"installed, `{'`, `'.join(STUBBED)}` stubbed while importing; it declares transformers<5.3)",
        f"- torch {torch.__version__}, transformers {transformers.__version__}",
        f"- model: SmolLM2-135M-Instruct (braze.models.load_smollm2, fp32), {model.config.num_attention_heads} "
        f"query / {model.config.num_key_value_heads} KV heads",
        f"- context: the first {p} tokens of braze/data/eval_text.txt; layers: "
        f"{'all ' + str(n_layers) if len(layers) == n_layers else ', '.join(map(str, layers))} "
        f"({heads} KV heads compared per row)",
        f"- budgets: {', '.join(f'{b:.1%}' for b in BUDGETS)} of the context (kvpress compression_ratio = 1 - "
        "budget; braze keep = kvpress's compute_n_kept; adakv cap = min(P, 2 * keep), as the runtime with no "
        "decode slots)",
        f"- date: {datetime.date.today().isoformat()}; machine: {cpu}, {os.cpu_count()} cores, CPU only; "
        f"run time {{seconds:.0f}} s",
        "- kvpress's presses run through their own `compress()` on the real attention module, hidden states, "
        "position embeddings and cached K/V of each layer (its forward hook reads `past_key_values` / "
        "`cache_position`, which transformers 5.24 no longer passes, so the script's hook captures the same "
        "inputs); kept indices are recovered from the gathered keys (Ada-KV: from `masked_key_indices`). braze's "
        "come from `select_keep`, with kvpress's parameters plugged in where a row says so.",
        "- Jaccard = |kept_kvpress & kept_braze| / |kept_kvpress | kept_braze| per head; mean and min over heads.", "",
    ]
    text = "\n".join(head + lines) + "\n" + NOTES
    text = text.replace("{seconds:.0f}", f"{time.perf_counter() - start:.0f}")
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
