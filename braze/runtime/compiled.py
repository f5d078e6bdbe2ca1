"""The object braze.compile returns: the model's call signature in front of a compiled plan.

Executors: `interpret` / `cuda` run the plan's generated kernels (PlanExecutor); `reference` runs the rewritten
graph's torch reference implementations (for golden checks and long CPU runs). Never report reference-executor
timings as kernel performance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch.utils import _pytree as pytree

from braze.runtime.executor import PlanExecutor
from braze.runtime.plan import Plan


@dataclass
class CausalLMOutput:
    """Mirrors the `.logits` and `.loss` (with labels) fields of HF's CausalLMOutputWithPast and its ModelOutput
    access: by position as HF's tuple form ((loss, logits) with a loss, else (logits,)), by key ("logits",
    "loss"), keys() and to_tuple()."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None

    def keys(self) -> list[str]:
        return ["logits"] if self.loss is None else ["loss", "logits"]

    def to_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, k) for k in self.keys())

    def __getitem__(self, i: int | str | slice) -> Any:
        if isinstance(i, str):
            if i not in self.keys():
                raise KeyError(f"{i!r}: this output has {', '.join(self.keys())}")
            return getattr(self, i)
        return self.to_tuple()[i]


# HF forward arguments that leave the logits as they are at these values
_INERT = {"use_cache": None, "return_dict": None, "past_key_values": (None,), "cache_position": (None,),
          "output_hidden_states": (None, False), "output_attentions": (None, False), "logits_to_keep": None}


def _check_forward_kwargs(kwargs: dict[str, Any]) -> None:
    from braze.runtime.errors import InputMismatchError

    for name, value in kwargs.items():
        if name == "logits_to_keep" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InputMismatchError(f"logits_to_keep must be an int >= 0 (the last N positions; 0: all), got "
                                     f"{type(value).__name__}")
        allowed = _INERT.get(name, ())
        if name in _INERT and (allowed is None or any(value is a or value == a for a in allowed)):
            continue
        shown = f"a {tuple(value.shape)} tensor" if isinstance(value, torch.Tensor) else repr(value)[:40]
        raise InputMismatchError(f"the compiled forward does not take {name}= ({shown}): it computes the logits of "
                                 "input_ids (and the loss with labels=); generate() runs the KV cache")


def _token_ids(input_ids: Any, hf_kwargs: dict[str, Any]) -> torch.Tensor:
    """The causal-LM forward's input_ids as the plan takes them: [batch, seq] int64 (int32 ids widened, as HF's
    embedding takes both); anything else a one-line error."""
    from braze.runtime.errors import InputMismatchError
    from braze.runtime.generate import check_token_ids

    if input_ids is None:
        given = " (got inputs_embeds=: the plan starts from token ids)" if "inputs_embeds" in hf_kwargs else ""
        raise InputMismatchError(f"the compiled forward needs input_ids [batch, seq]{given}")
    check_token_ids(input_ids, (2,), "[batch, seq]")
    return input_ids.long()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """HF's causal-LM loss: token t predicts label t + 1; labels of -100 are ignored; mean over the rest, fp32."""
    shift = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    target = labels[:, 1:].to(logits.device).reshape(-1)
    return torch.nn.functional.cross_entropy(shift, target, ignore_index=-100)


def weights_version(module: torch.nn.Module) -> tuple:
    """Which tensors the module's parameters and buffers are, and how often each parameter was written in place:
    changed by `load_state_dict`, `p.data = ...`, a replaced Parameter, buffer or submodule, an in-place edit
    (torch's version counter). Plans read weights as they were at compile time (merged Q/K/V, transposed,
    quantized copies), so a change means a recompile. (Buffers count by identity only: a model's own state
    buffers are written on every call.)"""
    return (tuple((p.data_ptr(), p._version) for p in module.parameters()),
            tuple(b.data_ptr() for b in module.buffers()))


class CompiledModel:
    """A compiled forward. Call it like the original module."""

    def __init__(self, plan: Plan, weights: dict[str, torch.Tensor], device: torch.device, executor: str,
                 report: Any = None, out_spec: Any = None, in_spec: Any = None, causal_lm: bool = False,
                 graph_module: Any = None, config: Any = None, model_config: Any = None):
        self.plan = plan
        self.weights = weights
        self.device = device
        self.executor_name = executor
        self.report = report
        self.out_spec = out_spec
        self.in_spec = in_spec
        self.causal_lm = causal_lm
        self.graph_module = graph_module
        self.config = config
        self.model_config = model_config
        # why a causal LM has no generation plans (attention braze could not put over a KV cache); None otherwise
        self.generation_missing: str | None = None
        # with generation_missing: {max_seq, max_batch, eos_token_id, pad_token_id} for recompute generation
        self.recompute: dict[str, Any] | None = None
        # buffers the forward writes in place (plan inputs fed from here) and, per leading plan output, where that
        # write lands: ("state", name) or ("input", user input name); see braze.compiler.capture.Captured
        self.state: dict[str, torch.Tensor] = {}
        self.mutations: list[tuple[str, str]] = []
        # the (args, kwargs) structure and non-tensor values the plan was captured with (runtime/call_signature.py);
        # None: not known (a package, a causal LM), not checked
        self.call_signature: Any = None
        # a causal LM braze.compile compiled in this process: a weakref to the module (its `training` flag is
        # checked per forward call: the plans are eval-mode inference plans); None: a package, a generic module
        self.source_module: Any = None
        self.source_weights: tuple | None = None  # weights_version(source module) at compile time
        self._warned_training = False
        if executor == "reference":
            if graph_module is None:
                raise RuntimeError("the reference executor needs the rewritten graph; packages hold plans only")
            from braze.runtime.executor import GraphExecutor

            self.executor: Any = GraphExecutor(graph_module, weights, plan)
        else:
            self.executor = PlanExecutor(plan, weights, device)
        self._cuda_graphs: Any = None
        if executor == "cuda" and (config is None or getattr(config, "cuda_graphs", True)):
            from braze.runtime.cuda_graphs import CudaGraphRunner

            self._cuda_graphs = CudaGraphRunner(self.executor)

    # ---- running --------------------------------------------------------------------------------------
    def run_flat(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        self.executor.check_index_inputs(inputs)
        if self._cuda_graphs is not None:
            return self._cuda_graphs.run(inputs)
        return self.executor.run(inputs)

    def _run_with_writes(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run the plan with the model's state buffers added to the caller's tensors, then land the in-place
        writes the model makes (state buffers, tensor arguments) as eager PyTorch would; returns the outputs."""
        if not self.mutations and not self.state:
            return self.run_flat(tensors)
        names = [i.name for i in self.plan.inputs if i.kind == "user" and i.name not in self.state]
        if len(tensors) != len(names):
            from braze.runtime.errors import InputMismatchError

            raise InputMismatchError(f"expected {len(names)} tensor inputs ({', '.join(names)}), got {len(tensors)}")
        given = dict(zip(names, tensors))
        outs = self.run_flat([given[i.name] if i.name in given else self.state[i.name]
                              for i in self.plan.inputs if i.kind == "user"])
        for (kind, name), value in zip(self.mutations, outs):
            target = self.state[name] if kind == "state" else given[name]
            if target.data_ptr() != value.data_ptr():
                target.copy_(value)
        return outs[len(self.mutations):]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.causal_lm:
            return self._call_causal_lm(*args, **kwargs)
        if self.call_signature is not None:
            from braze.runtime.call_signature import call_signature, signature_difference

            called = call_signature(args, kwargs)
            if called != self.call_signature:
                from braze.runtime.errors import InputMismatchError

                raise InputMismatchError(f"{signature_difference(self.call_signature, called)}: the plan computes "
                                         "the call it was compiled for (braze.compile(module) compiles once per "
                                         "such call)")
        flat, _ = pytree.tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        with torch.no_grad():
            outs = self._run_with_writes(tensors)
        if self.out_spec is not None:
            return pytree.tree_unflatten(outs, self.out_spec)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _call_causal_lm(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                        position_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                        **hf_kwargs: Any) -> CausalLMOutput:
        self._check_mode()
        input_ids = _token_ids(input_ids, hf_kwargs)
        _check_forward_kwargs(hf_kwargs)
        if position_ids is None:  # as HF's forward: 0..S-1 whatever the mask (generate derives them from it)
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        kv_start = None if attention_mask is None else self._left_padding(input_ids, attention_mask)
        with torch.no_grad():
            if kv_start is None:
                (logits,) = self._run_with_writes([input_ids, position_ids.contiguous()])
            else:  # the prefill plan into a scratch KV cache, whose kv_start masks each row's pads
                gen = self.generator
                logits = gen.forward(gen.prefill, input_ids.to(self.device), position_ids.to(self.device), 0,
                                     kv_start, gen.new_caches(input_ids.shape[0]))
        loss = None if labels is None else causal_lm_loss(logits, labels)
        keep = hf_kwargs.get("logits_to_keep") or 0
        return CausalLMOutput(logits[:, -keep:] if keep else logits, loss)

    def _check_mode(self) -> None:
        """A causal LM's plans are captured in eval mode (braze.compiler.capture.capture_causal_lm) and compute
        without autograd: called after `model.train()`, they still compute eval mode's forward. Warned once each
        time the source model is found training (not an error: a model built from a config starts in train mode)."""
        model = self.source_module() if self.source_module is not None else None
        if model is not None and self.source_weights is not None and weights_version(model) != self.source_weights:
            from braze.runtime.errors import ConfigError

            raise ConfigError(f"the weights of {type(model).__name__} changed after braze.compile (load_state_dict, "
                              "a replaced or edited parameter): the plans hold the weights they were compiled "
                              "from; compile the model again")
        training = model is not None and any(m.training for m in model.modules())
        if training and not self._warned_training:
            import warnings

            warnings.warn(f"braze: {type(model).__name__} is in training mode, but braze plans are inference plans, "
                          "captured in eval mode: the compiled forward computes model.eval()'s (no dropout) without "
                          "gradients; call model.eval(), or run the model itself to train", stacklevel=4)
        self._warned_training = training

    def _left_padding(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Each row's count of leading pads (kv_start) when the batch is left-padded, else None: no padding, or
        right padding, which needs no mask (under causal attention no real token sees the pads after it), so the
        forward plan serves it. Logits at padded positions are finite values no one should read."""
        from braze.runtime.errors import InputMismatchError

        mask = attention_mask.to(input_ids.device).long()
        if mask.shape != input_ids.shape:
            raise InputMismatchError(f"attention_mask has shape {tuple(mask.shape)}, input_ids "
                                     f"{tuple(input_ids.shape)}")
        if not bool((mask[:, 1:] > mask[:, :-1]).any()):  # every row: ones, then zeros (or no padding)
            return None
        gen = getattr(self, "generator", None)
        left = not bool((mask[:, 1:] < mask[:, :-1]).any())
        if not left or gen is None or gen.compression is not None or getattr(self, "generation_missing", None):
            why = ("a row's padding is neither all before nor all after its tokens" if not left else
                   "this model has no prefill plan over a KV cache to mask left padding with")
            raise InputMismatchError(f"the compiled forward takes unpadded, right-padded or left-padded batches: "
                                     f"{why}")
        return (mask == 0).sum(-1).to(torch.int32)

    # ---- generation -----------------------------------------------------------------------------------
    def attach_generation(self, prefill: Plan, decode: Plan, kv_inputs: list, max_seq: int, max_batch: int,
                          eos_token_id: Any = None, pad_token_id: Any = None, graphs: tuple | None = None,
                          verify: Plan | None = None) -> None:
        """`graphs` (prefill, decode graph modules) enables the reference executor for generation."""
        from braze.runtime.executor import GraphExecutor
        from braze.runtime.generate import Generator

        self.extra_plans = {"prefill": prefill, "decode": decode}
        if verify is not None:
            self.extra_plans["verify"] = verify
        self.kv_inputs = kv_inputs
        if self.executor_name == "reference":
            if graphs is None:
                raise RuntimeError("the reference executor needs the rewritten generation graphs")
            prefill_exec = GraphExecutor(graphs[0], self.weights, prefill)
            decode_exec = GraphExecutor(graphs[1], self.weights, decode)
            verify_exec = GraphExecutor(graphs[2], self.weights, verify) if verify is not None else None
        else:
            prefill_exec = PlanExecutor(prefill, self.weights, self.device)
            decode_exec = PlanExecutor(decode, self.weights, self.device)
            verify_exec = PlanExecutor(verify, self.weights, self.device) if verify is not None else None
        self.generator = Generator(prefill_exec, decode_exec, kv_inputs, max_seq, max_batch,
                                   self.device, eos_token_id, pad_token_id,
                                   cuda_graphs=self.executor_name == "cuda" and getattr(self.config, "cuda_graphs",
                                                                                         True))
        self.generator.verify = verify_exec

    def generate(self, input_ids: torch.Tensor, **options: Any) -> torch.Tensor:
        """HF-style generate: prompt + new token ids [B, S + n] (see runtime/generate.py for the options)."""
        from braze.runtime.errors import ConfigError
        from braze.runtime.generate import check_generate_options, hf_length_and_copies

        if getattr(self, "generator", None) is None:
            if self.generation_missing and self.recompute is not None:
                self.generator = self._recompute_generator()
            elif self.generation_missing:
                raise ConfigError(f"generate() is not available for this model: {self.generation_missing}")
            else:
                raise ConfigError("generate() needs a causal LM compiled by braze.compile (no generation plans here)")
        check_generate_options(options)
        self._check_mode()
        input_ids, options = hf_length_and_copies(input_ids, options,
                                                  bool(getattr(self.generator, "keyed_sampling", False)),
                                                  getattr(self.generator, "max_batch", None))
        return self.generator.generate(input_ids, **options)

    def _recompute_generator(self) -> Any:
        """A causal LM without KV-cache plans generates by re-running the forward plan (runtime/recompute.py)."""
        from braze.runtime.recompute import RecomputeGenerator

        r = self.recompute
        gen = RecomputeGenerator(self.executor, lambda ids, pos: self._run_with_writes([ids, pos])[0],
                                 r["max_seq"], r["max_batch"], self.device, self.generation_missing,
                                 r.get("eos_token_id"), r.get("pad_token_id"))
        gen.keyed_sampling = bool(getattr(self.config, "deterministic", False))  # as attach_generation's callers
        return gen

    def generate_text(self, tokenizer: Any, prompts: Any, chat: bool = True, **options: Any) -> list[str]:
        """Prompt strings in, completions out; uses the tokenizer's chat template when it has one."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        if chat and getattr(tokenizer, "chat_template", None):
            prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True) for p in prompts]
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        enc = tokenizer(prompts, return_tensors="pt", padding=True)
        tokenizer.padding_side = side
        options.setdefault("eos_token_id", tokenizer.eos_token_id)
        options.setdefault("pad_token_id", tokenizer.pad_token_id)
        out = self.generate(enc.input_ids, attention_mask=enc.attention_mask, **options)
        texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        return texts

    @property
    def generation_stats(self) -> Any:
        return self.generator.stats if getattr(self, "generator", None) else None

    # ---- introspection --------------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        return dict(self.executor.stats)

    def __repr__(self) -> str:
        return f"CompiledModel({self.plan.name}, executor={self.executor_name}, launches={self.plan.launches})"

    # ---- packages -------------------------------------------------------------------------------------
    # braze.runtime.package reads and writes CompiledModels, so it imports this module and not the other way
    # round: importing it (which `import braze` does) installs its writer here.
    package_writer: ClassVar[Callable[..., Any] | None] = None

    def save(self, path: Any, tokenizer: Any = None) -> Any:
        """Write this model as a self-contained kernel package directory (see braze.runtime.package)."""
        writer = CompiledModel.package_writer
        if writer is None:
            raise RuntimeError("no package writer installed: import braze.runtime.package (import braze does)")
        return writer(self, path, tokenizer=tokenizer)
