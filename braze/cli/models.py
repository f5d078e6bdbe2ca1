"""MODEL arguments of the braze commands: an HF model directory, a .gguf file, `smollm2`, or `module:factory`.

A factory is called with no arguments and returns one of:
  - an nn.Module;
  - a tuple (model, tokenizer) (what braze.models.load_smollm2 returns);
  - a dict with "model" and optionally "tokenizer" and "example_inputs" (a tuple of tensors, needed to compile a
    module that is not a HF causal LM; a module attribute `example_inputs` works too).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from braze.runtime.errors import BrazeError, first_line

BUILTINS = ("smollm2",)
_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
MODEL_HELP = ("an HF model directory (config.json + *.safetensors), a .gguf file, the built-in example 'smollm2', "
              "or 'module:factory'")


class ModelSpecError(BrazeError):
    """A MODEL argument that names nothing loadable (missing path, unsupported architecture, bad factory)."""


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    example_inputs: tuple | None
    source: str  # the MODEL argument, with paths made absolute (recorded in the package manifest)
    kind: str  # "hf-dir" | "gguf" | "builtin" | "factory"

    @property
    def causal_lm(self) -> bool:
        """braze.compile's own test (GPT-2 / GPT-J's *LMHeadModel included: this one missed them, so the CLI
        refused a saved GPT-2 as "not a HF causal LM")."""
        from braze.compiler.capture import is_causal_lm

        return is_causal_lm(self.model)


def is_package(path: str | os.PathLike) -> bool:
    """A braze package directory, or a tensor-parallel one (shards.json over one package per rank)."""
    return Path(path).is_dir() and any((Path(path) / f).is_file() for f in ("manifest.json", "shards.json"))


def resolve_model(spec: str, dtype: Any = None, device: Any = "cpu") -> LoadedModel:
    """Load the model a MODEL argument names, in eval mode on `device` (dtype: a torch dtype or None: as stored)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with _quiet_progress():
        loaded = _load(spec, dtype)
    model = loaded.model.eval()
    if dtype is not None and loaded.kind == "factory":
        model = model.to(dtype)
    loaded.model = model.to(device)
    if loaded.example_inputs is not None:
        loaded.example_inputs = tuple(t.to(device) if hasattr(t, "to") else t for t in loaded.example_inputs)
    return loaded


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """The commands show no progress when stderr is piped (common.Stages); transformers' own bars ("Loading
    weights") printed there anyway, so they are off for the load and restored after it."""
    if sys.stderr.isatty():
        yield
        return
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _load(spec: str, dtype: Any) -> LoadedModel:
    path = Path(spec).expanduser()
    if spec in BUILTINS and not path.exists():
        loaded = _builtin(spec, dtype)
    elif path.exists():
        if path.is_dir():
            loaded = _hf_dir(path, dtype)
        elif path.suffix.lower() == ".gguf":
            loaded = _gguf(path, dtype)
        else:
            raise ModelSpecError(f"{path}: not a model directory or a .gguf file (MODEL is {MODEL_HELP})")
    elif _FACTORY.match(spec):
        loaded = _factory(spec)
    else:
        raise ModelSpecError(f"{spec}: no such file or directory (MODEL is {MODEL_HELP})")
    return loaded


def _dtype_kwargs(dtype: Any) -> dict[str, Any]:
    if dtype is None:
        return {}
    import transformers

    major_minor = tuple(int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return {"dtype": dtype} if major_minor >= (4, 56) else {"torch_dtype": dtype}


def _builtin(name: str, dtype: Any) -> LoadedModel:
    import torch

    from braze.models import load_smollm2

    try:
        model, tok = load_smollm2(dtype or torch.float32)
    except FileNotFoundError as e:
        raise ModelSpecError(f"{name}: {e}") from None
    return LoadedModel(model, tok, None, name, "builtin")


def _unsupported(where: Path, config: dict, err: Exception) -> ModelSpecError:
    arch = ", ".join(config.get("architectures") or []) or config.get("model_type") or "unknown"
    first = first_line(err)
    return ModelSpecError(f"{where}: unsupported architecture {arch!r} (not a causal LM transformers can load: "
                          f"{first})")


def _hf_dir(path: Path, dtype: Any) -> LoadedModel:
    if is_package(path):
        raise ModelSpecError(f"{path} is a braze package, not a model (MODEL is {MODEL_HELP})")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; for a GGUF file pass it directly, e.g. {ggufs[0]}" if ggufs else ""
        raise ModelSpecError(f"{path}: no config.json, not an HF model directory{hint}")
    if not list(path.glob("*.safetensors")):
        raise ModelSpecError(f"{path}: no *.safetensors weights (braze loads safetensors checkpoints, never pickle)")
    try:
        config = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelSpecError(f"{cfg_file}: unreadable config ({e})") from None
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="sdpa", **_dtype_kwargs(dtype))
    except ValueError:  # an architecture without an SDPA path (Gemma 2): the eager attention, which braze
        # recognizes as well
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager",
                                                         **_dtype_kwargs(dtype))
        except (ValueError, KeyError) as e:
            raise _unsupported(path, config, e) from None
    except KeyError as e:
        raise _unsupported(path, config, e) from None
    return LoadedModel(model, _tokenizer(str(path)), None, str(path.resolve()), "hf-dir")


def _gguf(path: Path, dtype: Any) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **_dtype_kwargs(dtype))
    except (ValueError, KeyError) as e:
        raise _unsupported(path, {}, e) from None
    return LoadedModel(model, _tokenizer(str(path.parent), gguf_file=path.name), None, str(path.resolve()), "gguf")


# what an HF directory holds when it ships a tokenizer (without one, AutoTokenizer may still build an empty one from
# the config's tokenizer class: a Qwen directory gave a 1-token tokenizer that decoded every id to "")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "tokenizer_config.json")


def _tokenizer(where: str, **kwargs: Any) -> Any:
    if "gguf_file" not in kwargs and not any((Path(where) / f).is_file() for f in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(where, **kwargs)
    except Exception:  # a model without a tokenizer still compiles; `run` then needs --prompt-ids
        return None


def _factory(spec: str) -> LoadedModel:
    import torch

    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:  # like `python -m`: modules next to the current directory resolve
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ModelSpecError(f"{spec}: cannot import module {module_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelSpecError(f"{spec}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelSpecError(f"{spec}: {attr!r} is not callable")
    result = obj()
    tokenizer = example = None
    if isinstance(result, dict):
        model, tokenizer, example = result.get("model"), result.get("tokenizer"), result.get("example_inputs")
    elif isinstance(result, tuple) and len(result) == 2:
        model, tokenizer = result
    else:
        model = result
    if not isinstance(model, torch.nn.Module):
        raise ModelSpecError(f"{spec}: the factory returned {type(model).__name__}, not an nn.Module")
    example = example if example is not None else getattr(model, "example_inputs", None)
    if isinstance(example, torch.Tensor):
        example = (example,)
    return LoadedModel(model, tokenizer, tuple(example) if example is not None else None, spec, "factory")
