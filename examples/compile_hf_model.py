"""Compile a Hugging Face causal LM with braze and compare its logits with eager.

A tiny seeded Llama is saved to a temporary directory first, so this runs offline in seconds on a CPU; point
`from_pretrained` at any local Llama/Qwen2/Mistral checkpoint directory instead.

    python examples/compile_hf_model.py
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; don't let HF libraries try the network

# Import braze before transformers: `from transformers import ...` imports triton, and on a CPU-only machine
# braze must set TRITON_INTERPRET=1 before triton loads (otherwise kernels fail with "Cannot call @triton.jit'd
# outside of the scope of a kernel"). Exporting TRITON_INTERPRET=1 in the shell works too.
import braze  # noqa: I001

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM


def main() -> None:
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as model_dir:
        LlamaForCausalLM(config).save_pretrained(model_dir)  # config.json + model.safetensors
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: kernels run under the Triton interpreter
    model.to(device)

    # Causal LMs compile at once; max_batch / max_seq bound the dynamic shapes one plan serves.
    cm = braze.compile(model, max_batch=2, max_seq=64)

    input_ids = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(1)).to(device)
    logits = cm(input_ids).logits  # same call signature as the HF model
    with torch.no_grad():
        expected = model(input_ids).logits

    print(cm.report)  # passes and their match counts, kernels and the nodes they cover, fallbacks, memory
    err = (logits - expected).abs().max().item()
    print(f"logits {tuple(logits.shape)}; max |braze - eager| = {err:.2e} (executor: {cm.executor_name})")


if __name__ == "__main__":
    main()
