"""Tiny models for the CLI tests, named as `tests.tiny_factory:NAME` (the CLI's module:factory form)."""

import torch


def char_tokenizer():
    """A character-level tokenizer built offline (ids: <unk>=0, <eos>=1, printable ASCII from 2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for i, c in enumerate(chr(x) for x in range(32, 127)):
        vocab[c] = i + 2
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def tiny_llama():
    """A 1-layer seeded Llama (vocab 256) with a character tokenizer."""
    from braze.models import tiny_causal_lm

    return {"model": tiny_causal_lm("llama", layers=1), "tokenizer": char_tokenizer()}


class TinyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)


def tiny_mlp():
    """A small MLP; not a causal LM, so it brings example inputs."""
    torch.manual_seed(1)
    return {"model": TinyMLP(), "example_inputs": (torch.randn(3, 8),)}


class ScaledMLP(TinyMLP):
    def forward(self, x, scale: float = 1.0):
        return self.net(x) * scale


def scaled_mlp():
    """An MLP whose example call passes a float (part of what the plan is compiled for)."""
    torch.manual_seed(1)
    return {"model": ScaledMLP(), "example_inputs": (torch.randn(3, 8), 2.5)}


def tiny_bert():
    """A one-layer BERT encoder and a padded batch for it: (model, input_ids, attention_mask)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=64)).eval()
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    return bert, ids, mask


def not_a_module():
    return 42


def tiny_llama_other():
    """The same architecture with other weights (a `braze check` that must fail)."""
    from braze.models import tiny_causal_lm

    return {"model": tiny_causal_lm("llama", seed=1, layers=1), "tokenizer": char_tokenizer()}


class Branchy(torch.nn.Module):
    def forward(self, x):
        return x + 1 if x.sum() > 0 else x - 1  # data-dependent: torch.export refuses it


def branchy():
    """A module only the Dynamo fallback compiles (so it has no package)."""
    return {"model": Branchy(), "example_inputs": (torch.ones(2, 3),)}
