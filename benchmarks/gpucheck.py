"""`make gpucheck`: cross-compile the test models' plans for every GPU target and check they fit.

Models: tiny Llama, tiny Qwen2 (braze.models.tiny_causal_lm, 1 layer), the Llama-3.2-1B shape with one layer
(transformers LlamaConfig, seeded random weights; vocab 128256, hidden 2048, MLP 8192, 32 heads / 8 KV heads) and
Gemma-2-2B's attention shape with one layer (softcap 50, sliding window 4096, head dim 256, 8 heads / 4 KV heads,
hidden 2304, MLP 9216; vocab cut to 32000: bf16 and bf16-det only) and Qwen3-30B-A3B's shape with one layer
(128 experts of 768 columns, top 8, hidden 2048; vocab cut to 32000: bf16 and bf16-det only).
GPT-2 small's shape with one layer (LayerNorm, biases, plain MLP; bf16 and bf16-det), tiny GPT-2 and StableLM.
Variants: bf16 base, bf16 df11, bf16 int6, fp32 base, fp32 int6 (fp32 not on tiny Qwen2), bf16 deterministic
(LayerCast matmuls, batch-invariant tiles, fp32 KV cache). Every plan (forward,
prefill, decode, verify) at the corners of its compiled range (batch 1..8, seq 1..512) is enumerated per target
(sm_80, sm_86, sm_89, sm_90) and compiled with triton for that target (braze/compiler/targets.py). Fails (exit 1)
on a compile error, a spill in a 16-bit model, or a kernel over a target's shared-memory / register limit; fp32
spills are listed as warnings.

    .venv/bin/python benchmarks/gpucheck.py [--only tiny-llama] [--variants bf16,bf16-df11] [--out FILE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import braze  # noqa: E402
from braze.compiler.targets import TargetBuild, build_targets  # noqa: E402
from braze.kernels import TARGETS  # noqa: E402

MODELS = ("tiny-llama", "tiny-qwen2", "tiny-mistral-swa", "tiny-olmo2", "tiny-gpt2", "tiny-stablelm", "tiny-bloom",
          "tiny-mpt", "llama-3.2-1b-1layer", "gemma2-2b-1layer", "qwen3-moe-1layer", "gpt2-1layer",
          "olmo2-7b-1layer", "persimmon-8b-1layer", "cohere-qknorm-1layer")
# fp32 runs on tiny Llama and the 1B shape only: tiny Qwen2 adds the QKV bias, which the bf16 variants cover;
# Gemma 2 adds the attention kernels' softcap / window forms and Qwen3-MoE the grouped expert matmuls
# (quantization touches neither); tiny Mistral with a sliding window, the decode attention block's window form;
# tiny OLMo 2, the MLP block without a pre-norm; tiny GPT-2 (every variant: int6 and df11 split its LayerNorm
# prologues out), the LayerNorm matmul prologue, the plain-MLP block with biases, o_proj's bias in the attention
# block; tiny StableLM, the LayerNorm before a SwiGLU block; tiny Bloom / MPT, the attention kernels' ALiBi form
# (flash, split-KV decode, the decode attention block, the tree form under bf16-det); GPT-2 small's shape (hidden
# 768, MLP 3072, 12 heads); OLMo-2-7B's (32 heads of 128, MHA), the attention block's q / k norms over the whole
# projection; Persimmon-8B's (64 heads of 64, q / k LayerNorms with biases) and a Cohere layer with q / k norms
# (Command R+'s heads: 128 wide, GQA 4; hidden cut to 4096), the block's per-head LayerNorm forms
SKIP = {("tiny-qwen2", "fp32"), ("tiny-qwen2", "fp32-int6"),
        *((m, v) for m in ("gemma2-2b-1layer", "qwen3-moe-1layer", "tiny-mistral-swa", "tiny-olmo2", "tiny-stablelm",
                           "gpt2-1layer", "tiny-bloom", "tiny-mpt", "olmo2-7b-1layer", "persimmon-8b-1layer",
                           "cohere-qknorm-1layer")
          for v in ("bf16-df11", "bf16-int6", "bf16-int6-a8", "fp32", "fp32-int6"))}
VARIANTS = {  # name -> (dtype, compile options)
    "bf16": (torch.bfloat16, {}),
    "bf16-df11": (torch.bfloat16, {"quant": "df11"}),
    "bf16-int6": (torch.bfloat16, {"quant": "int6", "int6_method": "rtn"}),
    "bf16-int6-a8": (torch.bfloat16, {"quant": "int6", "int6_method": "rtn", "int6_act": "a8"}),
    "fp32": (torch.float32, {}),
    "fp32-int6": (torch.float32, {"quant": "int6", "int6_method": "rtn"}),
    # deterministic mode: LayerCast matmuls (16-bit weights, fp32 math), batch-invariant tiles, fp32 KV caches
    "bf16-det": (torch.bfloat16, {"deterministic": True}),
}
MAX_BATCH, MAX_SEQ = 8, 512


def llama_3_2_1b(layers: int = 1, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Llama-3.2-1B's shape (config of meta-llama/Llama-3.2-1B) with `layers` layers and seeded random weights."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        rope_scaling={"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192, "rope_type": "llama3"})
    cfg._attn_implementation = "sdpa"
    return _seeded(transformers.LlamaForCausalLM, cfg, dtype, vector=(0.9, 1.1))


def gemma2_2b(layers: int = 1, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Gemma-2-2B's shape (config of google/gemma-2-2b, vocab cut to 32000) with `layers` layers, seeded weights;
    layer 0 is a sliding-window layer."""
    import transformers

    cfg = transformers.Gemma2Config(
        vocab_size=32000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=layers,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
        max_position_embeddings=8192, attn_implementation="eager")
    return _seeded(transformers.Gemma2ForCausalLM, cfg, dtype, vector=(-0.1, 0.1))


def gpt2_small(layers: int = 1, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """GPT-2 small's shape (config of openai-community/gpt2: hidden 768, 12 heads, MLP 3072, vocab 50257) with
    `layers` layers and seeded random weights: LayerNorm prologues, biased projections, the plain gelu MLP."""
    import transformers

    cfg = transformers.GPT2Config(n_layer=layers, n_positions=1024, n_embd=768, n_head=12)
    cfg._attn_implementation = "sdpa"
    return _seeded(transformers.GPT2LMHeadModel, cfg, dtype, vector=(0.9, 1.1))


def olmo2_7b(layers: int = 1, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """OLMo-2-7B's shape (config of allenai/OLMo-2-1124-7B: hidden 4096, 32 heads of 128, MHA, MLP 11008; vocab cut
    to 32000) with `layers` layers and seeded weights: post-norms, q / k norms over the whole projections."""
    import transformers

    cfg = transformers.Olmo2Config(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rope_theta=500000.0,
        rms_norm_eps=1e-6)
    cfg._attn_implementation = "sdpa"
    return _seeded(transformers.Olmo2ForCausalLM, cfg, dtype, vector=(0.9, 1.1))


def persimmon_8b(layers: int = 1, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Persimmon-8B's shape (config of adept/persimmon-8b-base: hidden 4096, 64 heads of 64, MLP 16384, partial
    rotary 0.5, q / k LayerNorms; vocab cut to 32000) with `layers` layers and seeded weights."""
    import transformers

    cfg = transformers.PersimmonConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=16384, num_hidden_layers=layers,
        num_attention_heads=64, max_position_embeddings=16384, partial_rotary_factor=0.5, qk_layernorm=True)
    cfg._attn_implementation = "sdpa"
    return _seeded(transformers.PersimmonForCausalLM, cfg, dtype, vector=(0.9, 1.1))


def cohere_qknorm(layers: int = 1, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A Cohere layer with q / k norms (use_qk_norm, as Command R+: heads of 128, 8 kv heads) at hidden 4096, 32
    heads, MLP 14336, vocab 32000, with `layers` layers and seeded weights."""
    import transformers

    cfg = transformers.CohereConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, use_qk_norm=True,
        logit_scale=0.125)
    cfg._attn_implementation = "sdpa"
    return _seeded(transformers.CohereForCausalLM, cfg, dtype, vector=(0.9, 1.1))


def _seeded(model_class, cfg, dtype: torch.dtype, vector: tuple[float, float]) -> torch.nn.Module:
    """The model with seeded small random weights (HF's init leaves some at exactly 0 / 1): matrices N(0, 0.02),
    vectors (norm weights, biases) uniform in `vector`."""
    torch.manual_seed(0)
    model = model_class(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.uniform_(*vector)
    return model.eval()


def qwen3_moe(layers: int = 1, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Qwen3-30B-A3B's shape (config of Qwen/Qwen3-30B-A3B: 128 experts of 768, top 8; vocab cut to 32000) with
    `layers` layers and seeded random weights."""
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=layers, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6)
    cfg._attn_implementation = "sdpa"
    return _seeded(transformers.Qwen3MoeForCausalLM, cfg, dtype, vector=(0.9, 1.1))


# the tiny seeded models: name -> (braze.models.tiny_causal_lm arch, its config overrides). MPT builds its ALiBi for
# config.max_seq_len positions (and refuses that many): widened
TINY = {"tiny-llama": ("llama", {}), "tiny-qwen2": ("qwen2", {}), "tiny-mistral-swa": ("mistral_swa", {}),
        "tiny-olmo2": ("olmo2", {}), "tiny-gpt2": ("gpt2", {}), "tiny-stablelm": ("stablelm", {}),
        "tiny-bloom": ("bloom", {}), "tiny-mpt": ("mpt", {"max_seq_len": 2 * MAX_SEQ})}
# real models' shapes, one layer: name -> builder(layers, dtype)
SHAPES = {"gpt2-1layer": gpt2_small, "llama-3.2-1b-1layer": llama_3_2_1b, "gemma2-2b-1layer": gemma2_2b,
          "qwen3-moe-1layer": qwen3_moe, "olmo2-7b-1layer": olmo2_7b, "persimmon-8b-1layer": persimmon_8b,
          "cohere-qknorm-1layer": cohere_qknorm}


def build_model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    from braze.models import tiny_causal_lm

    if name in TINY:
        arch, config = TINY[name]
        return tiny_causal_lm(arch, layers=1, dtype=dtype, **config)
    if name in SHAPES:
        return SHAPES[name](1, dtype)
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(MODELS), help="comma-separated models")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated variants")
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--sizes", default="corners", choices=("corners", "full"))
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--out", default=None, help="results file (default: print only)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    t0 = time.perf_counter()
    builds: list[tuple[str, TargetBuild]] = []
    lines: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    for model_name in args.only.split(","):
        for variant in args.variants.split(","):
            if (model_name, variant) in SKIP:
                continue
            dtype, options = VARIANTS[variant]
            t1 = time.perf_counter()
            model = build_model(model_name, dtype)
            cm = braze.compile(model, max_batch=MAX_BATCH, max_seq=MAX_SEQ, **options)
            t2 = time.perf_counter()
            build = build_targets(cm, args.targets, sizes=args.sizes, workers=args.workers)
            fresh = sum(not r.cached for r in build.results)
            say(f"{model_name} {variant}: compile {t2 - t1:.0f} s; {len(build.results)} specializations "
                f"({fresh} compiled, {len(build.results) - fresh} cached) in {build.seconds:.0f} s; "
                f"{len(build.errors)} errors, {len(build.issues) - len(build.errors)} warnings")
            for issue in build.issues:
                print(f"    {issue.severity}: {issue}", flush=True)
            builds.append((f"{model_name} {variant}", build))
            del cm, model

    all_results = [r for _, b in builds for r in b.results]
    total = TargetBuild(tuple(args.targets.split(",")), all_results, builds[0][1].triton if builds else "?")
    elapsed = time.perf_counter() - t0
    out: list[str] = [
        "# braze gpucheck: cross-compiled kernels per family x target",
        f"date: {time.strftime('%Y-%m-%d')}; machine: {os.cpu_count()}-core CPU, no GPU (triton {total.triton} "
        "cross-compiling, bundled ptxas -v)",
        f"models: {args.only}; variants: {args.variants}; plans forward/prefill/decode/verify at the corners of "
        f"batch 1..{MAX_BATCH} x seq 1..{MAX_SEQ}; sizes={args.sizes}",
        f"full run: {elapsed / 60:.1f} min wall ({len(all_results)} specializations, "
        f"{sum(not r.cached for r in all_results)} compiled, the rest from the cache)",
        "",
        "## per model",
        *lines,
        "",
        "## per target",
    ]
    for t in total.targets:
        rs = [r for r in all_results if r.spec.target == t]
        issues = [i for r in rs for i in _issues(r)]
        out.append(f"{t}: {len(rs)} specializations; compile errors "
                   f"{sum(1 for r in rs if r.error)}; spills (16-bit) "
                   f"{sum(1 for i in issues if i.severity == 'error' and i.what.startswith('spills'))}; spills "
                   f"(fp32, accepted) {sum(1 for i in issues if i.severity == 'warning')}; limit overflows "
                   f"{sum(1 for i in issues if 'shared memory' in i.what or 'registers >' in i.what)}")
    out += ["", "## per family x target (max over every model, variant, plan and size)",
            "regs: max registers per thread; spills: max spill bytes (stores + loads); smem: max shared memory per "
            "block a launch requests; mma: tensor-core instructions in the PTX", "", total.table(), ""]
    issues = total.issues
    out += decode_grids(builds)
    out.append(f"## issues ({len(total.errors)} errors, {len(issues) - len(total.errors)} warnings)")
    out += [f"{i.severity}: {i}" for i in issues] or ["none"]
    text = "\n".join(out) + "\n"
    print("\n".join(out[-(len(issues) + 4 + len(total.summary()) + 3):]))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    return 1 if total.errors else 0


GEMV_FAMILIES = ("matmul", "int6_matmul", "df11_gemv", "mlp_block", "attention_block")


def decode_grids(builds: list[tuple[str, TargetBuild]]) -> list[str]:
    """Programs per decode launch of the linear families at batch 1 on the 1B shape (and of the expert matmuls on
    the Qwen3-MoE shape), against each target's SMs: a bandwidth-bound GEMV with fewer programs than SMs leaves
    bandwidth unused."""
    out = ["## decode linears of the Llama-3.2-1B shape (and the Qwen3-MoE experts) at batch 1: programs per launch "
           "vs SMs", ""]
    rows = []
    for label, build in builds:
        moe = label.startswith("qwen3-moe")
        if not (label.startswith("llama-3.2-1b") or moe):
            continue
        for r in build.results:
            s = r.spec
            if s.family not in (("grouped_matmul",) if moe else GEMV_FAMILIES):
                continue
            for use, programs in s.programs.items():
                if use.startswith("decode ") and all(part.endswith("=1") for part in use.split()[1:2]):
                    sms = TARGETS[s.target].sm_count
                    rows.append(f"{label:<32} {s.target:<6} {s.family:<15} {s.module:<28} {programs:>8} {sms:>4} "
                                f"{'ok' if programs >= sms else 'BELOW'}")
    out += [f"{'model variant':<32} {'target':<6} {'family':<15} {'kernel':<28} {'programs':>8} {'SMs':>4}",
            *sorted(set(rows)), ""]
    return out


def _issues(r):  # noqa: ANN001, ANN202
    from braze.compiler.targets import check_result

    return check_result(r)


if __name__ == "__main__":
    sys.exit(main())
