"""The GPU suite: one command, one report (issue #14). On a GPU it is sized to finish in <= 8 minutes.

    python benchmarks/gpu_suite.py            # GPU: writes benchmarks/results/<device>-<date>-suite.md
    python benchmarks/gpu_suite.py --smoke    # CPU, seconds: the whole script on a tiny model (reference executor)

Sections, in order (each is timed; one that fails is reported with its error and the suite goes on; once the
`--budget` is spent the remaining sections are reported as skipped):

1. `pytest -m gpu` (its summary line).
2. Copy bandwidth: a large device-to-device copy, (read + write bytes) / time, measured in this run. It is the
   "HBM floor" the decode rows are held to.
3. Decode on the Llama-3.2-1B shape (seeded N(0, 0.02) weights from a transformers LlamaConfig; quant_decode.py's
   model), batch 1 and 16, side by side: HF eager (static cache, auto-compile off), the same static-cache model
   under `torch.compile(mode="reduce-overhead")` (HF generate's compile_config), and braze bf16 / df11 / int6
   W6A16 / W6A8. Step time = (t(N new tokens) - t(1 new token)) / (N - 1), best of `--repeats`: prefill cancels.
   Bytes per step = every weight tensor the decode step reads once (deduplicated; a tied embedding is read whole
   by the lm_head) + the live KV cache at mid-generation. % of floor = (bytes / copy bandwidth) / step time.
   Energy per token from NVML's total-energy counter over the same difference, when `pynvml` (nvidia-ml-py) is
   importable, else "n/a".
4. Speculation on the shipped workloads (braze/data/spec_workloads.json) with SmolLM2-135M-Instruct through
   speculative.py's round-robin runner: tokens per verify step, tokens/s plain vs speculative, exactness.

On a CPU without --smoke the script refuses (interpreter timings are not performance). The smoke run uses
quant_decode.py's 1-layer shape, the reference executor, `torch.compile(backend="eager")` for the compile row and a
tiny seeded Llama with byte-level prompts for the speculation section: it checks the script, not the numbers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
import traceback
from importlib import resources
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules

import quant_decode  # noqa: E402
import speculative  # noqa: E402

import braze  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BRAZE_VARIANTS = {"braze-" + k: v for k, v in quant_decode.VARIANTS.items()}
BRAZE_VARIANTS["braze-bf16-det"] = {"deterministic": True}  # LayerCast + batch-invariant tiles (issue #16)


# ---- helpers ----------------------------------------------------------------------------------------------------
class Clock:
    """Suite time; sections after the budget are skipped, not run."""

    def __init__(self, budget: float) -> None:
        self.t0 = time.perf_counter()
        self.budget = budget

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.elapsed > self.budget


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Energy:
    """NVML's cumulative energy counter (mJ) of the current GPU; `available` is False without pynvml or a GPU."""

    def __init__(self, device: str) -> None:
        self.handle = None
        self.why = "n/a (no GPU)" if device != "cuda" else ""
        if device != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self.read()
        except Exception as e:  # not installed, or the counter is not supported
            self.handle, self.why = None, f"n/a ({type(e).__name__}: nvidia-ml-py energy counter unavailable)"

    @property
    def available(self) -> bool:
        return self.handle is not None

    def read(self) -> float:
        """Joules since the driver loaded."""
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000.0 if self.handle else 0.0


def copy_bandwidth(device: str, smoke: bool) -> float:
    """Bytes/s of a large device-to-device copy (read + write), best of a few."""
    n = (64 if smoke else 2048) << 20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(3 if smoke else 5):
        sync(device)
        t = time.perf_counter()
        for _ in range(5):
            dst.copy_(src)
        sync(device)
        best = min(best, (time.perf_counter() - t) / 5)
    return 2 * n / best


def weight_bytes(tensors: Any) -> int:
    """Bytes of distinct tensors (tied / aliased weights counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.nbytes)
        if key not in seen:
            seen.add(key)
            total += t.nbytes
    return total


def kv_bytes(cfg: dict, batch: int, live: int, itemsize: int) -> int:
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    return 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * live * batch * itemsize


def step_time(generate: Any, new_tokens: int, repeats: int, device: str, energy: Energy,
              warm: bool = True) -> tuple[float, float]:
    """(seconds per decode step, joules per step) from t(N) - t(1): prefill and sampling setup cancel."""
    if warm:  # kernels loaded, graphs captured / compiled at these shapes
        generate(new_tokens)
        generate(1)
    best = {1: (float("inf"), 0.0), new_tokens: (float("inf"), 0.0)}
    for _ in range(repeats):
        for n in (new_tokens, 1):
            sync(device)
            e, t = energy.read(), time.perf_counter()
            generate(n)
            sync(device)
            t, e = time.perf_counter() - t, energy.read() - e
            if t < best[n][0]:
                best[n] = (t, e)
    steps = new_tokens - 1
    return max(best[new_tokens][0] - best[1][0], 1e-9) / steps, (best[new_tokens][1] - best[1][1]) / steps


# ---- sections ---------------------------------------------------------------------------------------------------
def run_pytest(smoke: bool, timeout: float, log: Path, workers: int) -> str:
    """`pytest -m gpu`'s summary line and failures; its whole output goes to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "--tb=short", "-p", "no:cacheprovider",
           "--continue-on-collection-errors", *(["-n", str(workers)] if workers > 1 else [])]
    if smoke:  # a second interpreter importing torch costs more than the rest of the smoke run; CI runs pytest itself
        return "--smoke: not run (" + " ".join(cmd[1:]) + ")"
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        log.write_text((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or "")
        return f"timed out after {timeout:.0f} s"
    log.write_text(r.stdout + r.stderr)
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    summary = next((ln for ln in reversed(lines) if re.search(r"\b(passed|failed|skipped|error|deselected)", ln)),
                   lines[-1] if lines else r.stderr.strip()[-300:])
    failed = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return f"rc {r.returncode}: {summary.strip('= ')}" + "".join(f"\n    {ln}" for ln in failed[:20])


def hf_generate(model: Any, ids: torch.Tensor, compile_config: Any = None) -> Any:
    def gen(n: int) -> Any:
        with torch.no_grad():
            opts = {"compile_config": compile_config} if compile_config is not None else {"disable_compile": True}
            return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, cache_implementation="static", **opts)
    return gen


def decode_section(args: argparse.Namespace, device: str, clock: Clock, energy: Energy, bw: float | None,
                   report: list[str], save: Any) -> None:
    shape = quant_decode.SMOKE if args.smoke else quant_decode.LLAMA_1B
    model = quant_decode.build(shape, torch.bfloat16, device)
    hf_weights = weight_bytes(model.parameters())
    live = args.prompt_len + args.new_tokens // 2
    report += [f"Model: {'smoke (1 layer, hidden 128)' if args.smoke else 'Llama-3.2-1B shape'}, bf16, seeded "
               f"N(0, 0.02) weights; prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy; step time = "
               f"(t(N) - t(1)) / (N - 1), best of {args.repeats}; braze executor `{args.executor}`.", "",
               "| implementation | batch | step ms | tok/s | vs HF eager | vs torch.compile | MB/step | % HBM floor "
               "| J/token |", "|---|---|---|---|---|---|---|---|---|"]
    rows: dict[tuple[str, int], tuple[float, float, int]] = {}  # (impl, batch) -> (step s, J/step, bytes/step)
    notes: list[str] = []  # failed / skipped implementations
    compile_s: dict[str, float] = {}
    table_at = len(report)

    def render() -> None:
        """The table from every row so far (the vs columns fill in whatever order the implementations ran); saved at
        once, so a run cut short by its time limit still leaves its rows."""
        lines = []
        for (impl, batch), (step_s, joules, nbytes) in rows.items():
            eager, comp = rows.get(("hf-eager", batch)), rows.get(("torch.compile", batch))
            floor = f"{100 * nbytes / bw / step_s:.1f}%" if bw else "n/a"
            j = f"{joules / batch:.4f}" if energy.available else energy.why
            lines.append(f"| {impl} | {batch} | {1e3 * step_s:.3f} | {batch / step_s:.1f} | "
                         f"{f'{eager[0] / step_s:.2f}x' if eager else '-'} | "
                         f"{f'{comp[0] / step_s:.2f}x' if comp else '-'} | "
                         f"{nbytes / 1e6:.1f} | {floor} | {j} |")
        report[table_at:] = lines + notes
        if compile_s:
            report.extend(["", "braze.compile wall time (this machine's CPU, kernels' first launch not included): "
                           + ", ".join(f"{k} {v:.1f} s" for k, v in compile_s.items()) + "."])
        save()

    def record(impl: str, batch: int, step_s: float, joules: float, nbytes: int) -> None:
        rows[impl, batch] = (step_s, joules, nbytes)
        print(f"[suite] {impl} batch {batch}: {1e3 * step_s:.3f} ms/step", flush=True)
        render()

    def attempt(impl: str, fn: Any) -> None:
        if clock.over():
            notes.append(f"| {impl} | - | skipped: suite budget {clock.budget:.0f} s spent | | | | | | |")
            return
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # a failing implementation is a row of the report, not the end of the suite
            notes.append(f"| {impl} | - | failed: {type(e).__name__}: {str(e)[:200]} | | | | | | |")
            traceback.print_exc()
        render()
        print(f"[suite] {impl}: {time.perf_counter() - t:.1f} s", flush=True)

    def ids_for(batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(batch)
        return torch.randint(0, shape["vocab_size"], (batch, args.prompt_len), generator=g).to(device)

    def hf_rows(impl: str, compile_config: Any) -> None:
        for batch in args.batches:
            step, joules = step_time(hf_generate(model, ids_for(batch), compile_config), args.new_tokens,
                                     args.repeats, device, energy, warm=not args.smoke)
            record(impl, batch, step, joules, hf_weights + kv_bytes(shape, batch, live, 2))

    def braze_rows(impl: str) -> None:
        t = time.perf_counter()
        cm = braze.compile(model, max_batch=max(args.batches), max_seq=args.prompt_len + args.new_tokens + 8,
                           executor=args.executor, **BRAZE_VARIANTS[impl])
        compile_s[impl] = time.perf_counter() - t
        print(f"[suite] {impl}: compiled in {compile_s[impl]:.1f} s", flush=True)
        nbytes = weight_bytes(cm.generator.decode.weights.values())
        for batch in args.batches:
            ids = ids_for(batch)

            def gen(n: int, ids: torch.Tensor = ids) -> Any:
                return cm.generate(ids, max_new_tokens=n, eos_token_id=None)

            step, joules = step_time(gen, args.new_tokens, args.repeats, device, energy, warm=not args.smoke)
            record(impl, batch, step, joules, nbytes + kv_bytes(shape, batch, live, 2))

    from transformers import CompileConfig

    compile_config = CompileConfig(mode="reduce-overhead", fullgraph=True)
    if args.smoke:  # the path, not the compiler: dynamo with the eager backend, allowed on CPU
        compile_config = CompileConfig(backend="eager", mode=None, fullgraph=True)
        compile_config._compile_all_devices = True
    # braze's plain bf16 row runs second, so a short budget still compares braze with HF eager
    order = ["hf-eager", *args.variants[:1], "torch.compile", *args.variants[1:]]
    for impl in order:
        if impl == "hf-eager":
            attempt(impl, lambda: hf_rows("hf-eager", None))
        elif impl == "torch.compile":
            attempt(impl, lambda: hf_rows("torch.compile", compile_config))
        else:
            attempt(impl, lambda impl=impl: braze_rows(impl))
        if device == "cuda":
            torch.cuda.empty_cache()


def speculation_section(args: argparse.Namespace, device: str, clock: Clock, report: list[str]) -> None:
    work = json.loads(resources.files("braze").joinpath("data/spec_workloads.json").read_text())
    items = [(kind, item) for kind, its in work.items() for item in its]
    if args.smoke:
        from braze.models import tiny_causal_lm

        model, tok, executor = tiny_causal_lm("llama", layers=1), None, "reference"
        items = items[:2]
        what = "tiny seeded Llama (random weights: acceptance means nothing), byte-level prompts"
    else:
        try:
            from braze.models import load_smollm2

            model, tok = load_smollm2(torch.float32)
        except Exception as e:
            report.append(f"n/a: SmolLM2-135M-Instruct is not available here ({type(e).__name__}: {e})")
            return
        executor = "cuda" if device == "cuda" else "reference"
        what = "SmolLM2-135M-Instruct, fp32, chat template"
    model.to(device)
    cm = braze.compile(model, max_seq=512, max_batch=1, executor=executor)
    ns = argparse.Namespace(repeats=args.spec_repeats, max_new_tokens=args.spec_new_tokens, max_spec_tokens=16)

    def ids_of(item: dict) -> torch.Tensor:
        if tok is not None:
            return speculative.prompt_ids(tok, item, device)
        text = item.get("prompt") or " ".join(m["content"] for m in item["messages"])
        return torch.tensor([[3 + b % 253 for b in text.encode()[:48]]], device=device)

    report += [f"{what}; executor `{executor}`; adaptive policy; greedy; up to {args.spec_new_tokens} new tokens; "
               f"best of {args.spec_repeats} round-robin runs (speculative.py's runner).", "",
               "| set | workload | tok/verify | plain tok/s | spec tok/s | speedup | exact |",
               "|---|---|---|---|---|---|---|"]
    for kind, item in items:
        if clock.over():
            report.append(f"| {kind} | {item['name']} | skipped: suite budget spent | | | | |")
            continue
        r = speculative.run_workload(cm, ids_of(item), ns, ["adaptive"])["adaptive"]
        report.append(f"| {kind} | {item['name']} | {r['tpv']:.2f} | {r['plain_tps']:.1f} | {r['spec_tps']:.1f} | "
                      f"{r['speedup']:.2f}x | {r['same']} |")
        print(report[-1], flush=True)


# ---- main -------------------------------------------------------------------------------------------------------
def device_slug(device: str) -> str:
    if device != "cuda":
        return "cpu-smoke"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="the whole script on CPU in seconds (tiny model)")
    ap.add_argument("--out", type=Path, help="report path (default benchmarks/results/<device>-<date>-suite.md)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; later sections are skipped past it")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(BRAZE_VARIANTS), choices=list(BRAZE_VARIANTS))
    ap.add_argument("--executor", default=None, help="braze executor (default: cuda on a GPU, reference in smoke)")
    ap.add_argument("--spec-new-tokens", type=int, default=128)
    ap.add_argument("--spec-repeats", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=["pytest", "bandwidth", "decode", "speculation"])
    ap.add_argument("--pytest-timeout", type=float, default=180.0)
    ap.add_argument("--pytest-workers", type=int, default=4, help="pytest-xdist processes sharing the GPU")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_suite.py needs a CUDA GPU for its figures (run with --smoke to check it on the CPU)")
        return 0
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        args.batches, args.new_tokens, args.prompt_len, args.repeats = [1, 2], 2, 8, 1
        args.spec_new_tokens, args.spec_repeats = 6, 1
    args.executor = args.executor or ("cuda" if device == "cuda" else "reference")
    clock, energy = Clock(args.budget), Energy(device)
    date = datetime.date.today().isoformat()
    out = args.out or ROOT / "benchmarks" / "results" / f"{device_slug(device)}-{date}-suite.md"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    at = (commit.stdout.strip() or "?") + (" + uncommitted changes" if dirty else "")  # a copied tree: not HEAD
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (smoke: checks the script, not performance)"
    report = [f"# braze GPU suite: {name}, {date}", "",
              f"`python benchmarks/gpu_suite.py {' '.join(argv if argv is not None else sys.argv[1:])}` at "
              f"{at}; torch {torch.__version__}, triton "
              f"{__import__('triton').__version__}, braze executor `{args.executor}`; energy: "
              f"{'NVML' if energy.available else energy.why}.", ""]
    bw = None

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(report) + "\n")

    def section(title: str, key: str, fn: Any) -> None:
        report.extend([f"## {title}", ""])
        if key in args.skip:
            report.append("skipped (--skip)")
        elif clock.over():
            report.append(f"skipped: suite budget {clock.budget:.0f} s spent")
        else:
            t = time.perf_counter()
            try:
                fn()
            except Exception as e:
                report.append(f"failed: {type(e).__name__}: {e}")
            report.append(f"\n_{time.perf_counter() - t:.1f} s_")
        report.append("")
        save()
        print(f"[suite] {title}: done at {clock.elapsed:.1f} s", flush=True)

    def pytest_fn() -> None:
        report.append("```\n" + run_pytest(args.smoke, args.pytest_timeout, out.with_suffix(".pytest.log"),
                                             args.pytest_workers) + "\n```")

    def bandwidth_fn() -> None:
        nonlocal bw
        bw = copy_bandwidth(device, args.smoke)
        report.append(f"{bw / 1e9:.1f} GB/s (read + write of a {'64 MiB' if args.smoke else '2 GiB'} "
                      f"{'host' if device == 'cpu' else 'device-to-device'} copy, best of 5): the HBM floor below")

    section("pytest -m gpu", "pytest", pytest_fn)
    section("Copy bandwidth", "bandwidth", bandwidth_fn)
    section("Decode tokens/s and % of the HBM floor", "decode",
            lambda: decode_section(args, device, clock, energy, bw, report, save))
    section("Speculation on the shipped workloads", "speculation",
            lambda: speculation_section(args, device, clock, report))
    report.append(f"Total: {clock.elapsed:.1f} s (budget {clock.budget:.0f} s).")
    save()
    print(f"[suite] wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
