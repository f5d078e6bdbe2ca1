"""Held-out HF causal LMs (not in braze/models.py's ARCHITECTURES): does braze.compile take each, is its forward
exact, and does greedy generation give HF's tokens? CPU only (Triton interpreter), one subprocess per model type.

    .venv/bin/python benchmarks/held_out_architectures.py [TYPE ...] [--out FILE] [--timeout S]

Each type gets a tiny seeded config (hidden 64, 2 layers, 4 heads, vocab 256, fp32; OVERRIDES where a type's own
dims must agree, or a hybrid's layer pattern must hold an attention layer) from AutoConfig.for_model, its all-zero
matrices (zero-initialized routers) drawn from N(0, 0.02); a type HF itself cannot build or run at that size is
listed as skipped with HF's reason. Per type: the largest |logit| difference of the compiled forward vs eager (fp32:
reassociation only), then 6 greedy tokens vs HF generate (through the KV-cache plans, or, where the compile built
none, by re-running the forward plan each step, with the reason; or through the Dynamo fallback where torch.export
refused the model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TYPES = ("olmo3 granite granitemoe starcoder2 qwen2_moe qwen3_moe glm glm4 exaone4 helium smollm3 arcee apertus "
         "ministral seed_oss hunyuan_v1_dense ernie4_5 biogpt codegen xglm gpt_bigcode gpt_neo phimoe jetmoe "
         "internlm3 cohere2 gpt_oss olmoe llama4_text deepseek_v3 minicpm3 vaultgemma nanochat bitnet doge diffllama "
         "dbrx lfm2 exaone openai-gpt ctrl granite_swa dots1 mellum ministral3 deepseek_v2 glm4_moe hunyuan_v1_moe "
         "mamba recurrent_gemma falcon_h1 qwen3_next "
         # the second wave: the other decoder-only text types of the pinned transformers
         "afmoe apertus1p5_text axk1 axk2 bailing_hybrid bamba blt cohere2_moe cohere_compass_text cwm deepseek_v32 "
         "deepseek_v4 dory dots3_note_text ernie4_5_moe exaone_moe falcon_mamba flex_olmo flint gemma3n_text "
         "gemma4_text glm4_moe_lite glm_moe_dsa granitemoe_swa granitemoehybrid granitemoeshared hrm_text hy_v3 hy_v4 "
         "hyperclovax inkling2_text inkling_text iquestcoder jais2 jamba kimi_linear kolibri1 laguna lara_mini "
         "lfm2_moe lfm3 longcat_flash mamba2 mimo_v2_flash minimax minimax_m2 modernbert-decoder nemotron_h olmo "
         "olmo_hybrid qwen3_5_text qwen3_5_moe_text qwen4_exp_text rwkv sarvam_mla sarvam_moe solar_open xlstm youtu "
         "zamba zamba2 zaya gpt_neox_japanese cpmant").split()
COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, head_dim=16, pad_token_id=0)
# Types whose defaults do not fit COMMON: MLA (DeepSeek V2 / V3, MiniCPM3) derives its head dims from the latent
# ranks and repeats no KV heads; CodeGen rotates rotary_dim (64 by default) of each head.
MLA = dict(head_dim=8, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, kv_lora_rank=32, q_lora_rank=32,
           num_key_value_heads=4)
# Hybrids (linear attention, Mamba or short-conv layers between attention layers): their default layer pattern puts
# the first attention layer past layer 2, and HF's generate cannot run a cache without one, so the 2 layers (3 for
# Zamba, which ties its shared block across hybrid layers) are one of each kind.
LINEAR_ATTENTION = dict(layer_types=["linear_attention", "full_attention"])
HYBRIDS: dict[str, dict] = {
    "bamba": dict(attn_layer_indices=[1]),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1),
    "granitemoehybrid": LINEAR_ATTENTION,
    "lfm3": dict(layer_types=["conv", "full_attention"]),
    # (its default layer_types is None: HF cannot build it without one; layer 1 past num_dense_layers is MoE)
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1, num_experts=4,
                     num_experts_per_tok=2, moe_intermediate_size=32),
    # (the names the configs store: the harness sets each key again after building the config)
    "zamba": dict(num_hidden_layers=3, layers_block_type=["linear_attention", "hybrid", "hybrid"],
                  layer_types=["linear_attention", "hybrid", "hybrid"]),
    "zamba2": dict(hybrid_layer_ids=[1], layers_block_type=["linear_attention", "hybrid"],
                   layer_types=["linear_attention", "hybrid"]),
    "bailing_hybrid": dict(MLA, **LINEAR_ATTENTION, mlp_layer_types=["dense", "dense"], linear_num_heads=4,
                           linear_head_dim=16),
    "kimi_linear": dict(MLA, **LINEAR_ATTENTION, mlp_layer_types=["dense", "sparse"], linear_num_heads=4,
                        linear_head_dim=16),
    **{t: LINEAR_ATTENTION for t in ("qwen3_5_text", "qwen3_5_moe_text", "qwen4_exp_text", "qwen3_next")}}
OVERRIDES = {"deepseek_v2": dict(MLA, num_experts_per_tok=2, n_routed_experts=4, moe_intermediate_size=32),
             "codegen": dict(rotary_dim=16),
             "mamba2": dict(num_heads=8, n_groups=2, state_size=16),  # heads * head_dim = hidden * expand
             **{t: MLA for t in ("deepseek_v3", "minicpm3", "deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "axk1",
                                 "axk2", "hy_v4", "longcat_flash", "sarvam_mla", "youtu")},
             **HYBRIDS}


def check(model_type: str) -> dict:
    """One model type, in this process: {"status": ..., "detail": ...}."""
    import warnings

    import torch
    import transformers

    warnings.filterwarnings("ignore")
    try:
        common = dict(COMMON, **OVERRIDES.get(model_type, {}))
        cfg = transformers.AutoConfig.for_model(model_type, **common)
        for k, v in common.items():
            try:
                setattr(cfg, k, v)
            except Exception:  # noqa: BLE001 (a config that derives the attribute)
                pass
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        try:
            model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        except Exception:  # noqa: BLE001 (no SDPA for this architecture)
            cfg._attn_implementation = "eager"
            model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():  # a zero-initialized router (AFMoE) ties every expert: any top-k would be right
            for p in model.parameters():
                if p.dim() >= 2 and not p.any():
                    p.normal_(0, 0.02)
        ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(ids).logits
    except Exception as e:  # noqa: BLE001
        return {"status": "skipped", "detail": f"HF cannot build or run it: {type(e).__name__}: "
                                               f"{str(e).splitlines()[0][:120] if str(e) else ''}"}
    import braze

    try:
        cm = braze.compile(model, max_seq=64, max_batch=2)
    except Exception as e:  # noqa: BLE001
        return {"status": "COMPILE FAILS", "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    try:
        err = (cm(ids).logits.float() - ref.float()).abs().max().item()
    except Exception as e:  # noqa: BLE001
        return {"status": "FORWARD FAILS", "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    fallbacks = len(cm.report.fallbacks)
    via = " (Dynamo fallback: torch.export refused it)" if type(cm).__name__ == "DynamoCompiled" else ""
    detail = ""
    if cm.generation_missing:  # generate() re-runs the forward plan (braze/runtime/recompute.py)
        via, detail = " (recompute: no KV-cache plans)", cm.generation_missing[:160]
    try:
        with torch.no_grad():
            hf = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    except Exception as e:  # noqa: BLE001 (nothing to compare generation with)
        return {"status": "ok (forward only: HF's generate fails)", "err": err, "fallbacks": fallbacks,
                "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"}
    try:
        got = cm.generate(ids, max_new_tokens=6)[0, 7:].tolist()
    except Exception as e:  # noqa: BLE001
        return {"status": "GENERATE FAILS", "err": err, "detail": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {"status": ("ok" if got == hf else "TOKENS DIFFER") + via, "err": err, "fallbacks": fallbacks,
            "detail": detail if got == hf else f"HF {hf}, braze {got}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("types", nargs="*", default=list(TYPES))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(check(args.one)))
        return 0
    env = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1")
    rows = ["| model type | result | forward max abs err | eager fallbacks | detail |", "|---|---|---|---|---|"]
    start = time.perf_counter()
    for t in args.types:
        try:
            done = subprocess.run([sys.executable, __file__, "--one", t], capture_output=True, text=True, env=env,
                                  timeout=args.timeout)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
            r = json.loads(line[7:]) if line else {"status": f"CRASH rc {done.returncode}",
                                                     "detail": (done.stderr.strip().splitlines() or [""])[-1][:200]}
        except subprocess.TimeoutExpired:
            r = {"status": "timeout", "detail": f"> {args.timeout:.0f} s"}
        err = f"{r['err']:.1e}" if "err" in r else "-"
        rows.append(f"| {t} | {r['status']} | {err} | {r.get('fallbacks', '-')} | {r['detail'].replace('|', '/')} |")
        print(rows[-1], flush=True)
    text = "\n".join(rows) + f"\n\n{len(args.types)} model types in {time.perf_counter() - start:.0f} s\n"
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
