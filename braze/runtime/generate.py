"""The generation loop: prefill, then decode steps over the static KV cache, sampling on device.

HF-compatible semantics: returns prompt + new tokens ([B, S + n]); rows that hit EOS are filled with the pad
token until every row is done; left-padded batches via attention_mask; a streamer gets put()/end() calls.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from braze.runtime.errors import ConfigError, InputMismatchError, ShapeOutOfRangeError
from braze.runtime.executor import PlanExecutor, zeros_for
from braze.runtime.generation_stats import GenerationStats
from braze.runtime.sampling import KeyedNoise, LogitsRules, check_sampling, check_seed, select_next

DEFAULT = object()  # "use the model's generation_config value" (an explicit None means "none", as in HF)

GENERATE_OPTIONS = ("attention_mask", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed",
                    "eos_token_id", "pad_token_id", "streamer", "speculate", "max_spec_tokens", "spec_tree",
                    "stop_strings", "tokenizer", "output_logits", "repetition_penalty", "min_new_tokens")


# HF generate arguments that are spelled in terms of the others (hf_length_and_copies, hf_generation_config)
DERIVED_OPTIONS = ("max_length", "num_return_sequences", "generation_config")

def check_generate_options(options: dict[str, Any]) -> None:
    """An option generate does not take is a one-line error naming the valid ones (HF would ignore or warn)."""
    unknown = sorted(set(options) - set(GENERATE_OPTIONS) - set(DERIVED_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown generate option(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(GENERATE_OPTIONS + DERIVED_OPTIONS)}")


def check_token_ids(input_ids: Any, dims: tuple[int, ...], shape: str) -> None:
    """Token ids are an integer tensor with one of `dims` dimensions; anything else a one-line error."""
    if (not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype.is_complex
            or input_ids.dtype == torch.bool or input_ids.dim() not in dims):
        what = (f"a {input_ids.dim()}-dim {str(input_ids.dtype).removeprefix('torch.')} tensor"
                if isinstance(input_ids, torch.Tensor) else f"a {type(input_ids).__name__}")
        raise InputMismatchError(f"input_ids must be an integer tensor of token ids {shape}, got {what}")


# GenerationConfig fields that do not change what generate computes
_INERT_GENERATION_FIELDS = {"transformers_version", "_from_model_config", "bos_token_id", "use_cache",
                            "return_dict_in_generate", "output_scores", "output_attentions", "output_hidden_states"}


def hf_generation_config(options: dict[str, Any]) -> dict[str, Any]:
    """HF's generation_config=: the fields it sets (to_diff_dict: those that differ from GenerationConfig's
    defaults) become options, keyword arguments winning as in HF; a field braze's generate does not take (beam
    search, other logits processors) is a one-line error instead of being dropped."""
    options = dict(options)
    config = options.pop("generation_config", None)
    if config is None:
        return options
    if not hasattr(config, "to_diff_dict"):
        raise ConfigError(f"generation_config must be a transformers GenerationConfig, got {type(config).__name__}")
    fields = {k: v for k, v in config.to_diff_dict().items() if k not in _INERT_GENERATION_FIELDS}
    unknown = sorted(set(fields) - set(GENERATE_OPTIONS) - set(DERIVED_OPTIONS))
    if unknown:
        takes = [k for k in GENERATE_OPTIONS + DERIVED_OPTIONS if k != "generation_config"]
        raise ConfigError(f"generation_config sets {', '.join(unknown)}, which braze's generate does not take; "
                          f"it takes {', '.join(takes)}")
    return {**fields, **options}


def hf_length_and_copies(input_ids: Any, options: dict[str, Any], keyed: bool,
                         max_batch: int | None = None) -> tuple[Any, dict[str, Any]]:
    """HF's max_length (prompt + new tokens; max_new_tokens wins when both are given, as in HF) and
    num_return_sequences (each prompt repeated n times, consecutive rows, sampled independently: with keyed
    sampling copy j of a prompt draws with its seed + j, so copy 0 is what the prompt alone would give)."""
    options = hf_generation_config(options)
    max_length = options.pop("max_length", None)
    copies = options.pop("num_return_sequences", 1)
    prompt_len = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) and input_ids.dim() else 0
    if max_length is not None and "max_new_tokens" not in options:
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length <= prompt_len:
            raise ConfigError(f"max_length={max_length!r} leaves no room for new tokens after the {prompt_len}-token "
                              "prompt (max_length counts the prompt, as in HF; or give max_new_tokens)")
        options["max_new_tokens"] = max_length - prompt_len
    if not isinstance(copies, int) or isinstance(copies, bool) or copies < 1:
        raise ConfigError(f"num_return_sequences must be a positive integer, got {copies!r}")
    if copies == 1:
        return input_ids, options
    if not options.get("do_sample"):
        raise ConfigError(f"num_return_sequences={copies} needs do_sample=True: greedy decoding would return the same "
                          "sequence each time (HF refuses it too)")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
        return input_ids, options  # generate names the problem with input_ids
    rows = input_ids.reshape(-1, input_ids.shape[-1])
    if max_batch is not None and rows.shape[0] * copies > max_batch:
        n = rows.shape[0] * copies
        raise ShapeOutOfRangeError(f"{rows.shape[0]} prompt(s) x num_return_sequences={copies} = {n} rows exceeds "
                                   f"max_batch={max_batch}; compile with braze.compile(model, max_batch={n}) or more")
    if options.get("attention_mask") is not None:
        options["attention_mask"] = options["attention_mask"].reshape(rows.shape).repeat_interleave(copies, 0)
    if keyed:
        seed = check_seed(options.get("seed"), rows.shape[0], keyed)
        seeds = [seed] * rows.shape[0] if isinstance(seed, int) else seed
        options["seed"] = [s + j for s in seeds for j in range(copies)]
    return rows.repeat_interleave(copies, 0), options


class GenerateOutput(tuple):
    """generate(..., output_logits=True): (sequences, logits), also as attributes. logits [B, n, V] holds, for each
    new token, the logits it was chosen from (prefill's last position for the first token, then the decode step's
    or, with speculation, the verify node's); positions a row did not generate (EOS, or past a budget) are 0."""

    def __new__(cls, sequences: torch.Tensor, logits: torch.Tensor) -> GenerateOutput:
        return super().__new__(cls, (sequences, logits))

    @property
    def sequences(self) -> torch.Tensor:
        return self[0]

    @property
    def logits(self) -> torch.Tensor:
        return self[1]


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


@dataclass
class Prefilled:
    """What prefill leaves for decode and verify: the caches they write from slot `base` on, their further inputs
    (kv_compression's per-head starts or query rings) and, under kv_compression, the call's counts."""

    logits: torch.Tensor
    caches: dict[str, torch.Tensor]
    base: int
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    call: Any = None  # braze.runtime.kv_compression.CompressedCall
    uncompressed_bytes: int = 0  # kv_compression: the transient full cache prefill wrote


def _records_draft_queries(verify: Any) -> bool:
    """Whether a verify executor's plan records the draft nodes' queries (rkv speculation: plans from before it did
    not); an executor without a plan object runs the compiled graph, which does."""
    plan = getattr(verify, "plan", None)
    from braze.runtime.kv_compression import records_queries

    return plan is None or any("kv_record_query" in (s.target or "") or records_queries(s) for s in plan.steps)


class Generator:
    """Runs the prefill and decode plans of one compiled causal LM."""

    # decode inputs a CUDA graph captures by identity: allocated once per batch bucket (see _buffers)
    STATE_PREFIXES = ("kv_cache_", "conv_cache_", "scan_state_", "kv_start", "kvc_start", "kvq_")

    def __init__(self, prefill: PlanExecutor, decode: PlanExecutor, kv_inputs: list, max_seq: int, max_batch: int,
                 device: torch.device, eos_token_id: Any = None, pad_token_id: Any = None, cuda_graphs: bool = False):
        self.prefill = prefill
        self.decode = decode
        self.kv_inputs = kv_inputs
        self.max_seq = max_seq
        self.max_batch = max_batch
        # a learned position table (GPT-2's wpe) bounds the positions; the plans do not bound-check their gathers
        self.position_rows = next((i.index_bound for i in decode.user_inputs if i.name == "position_ids"), None)
        self.device = device
        self.default_eos = eos_token_id
        self.default_pad = pad_token_id
        self.stats = GenerationStats()
        self.speculate_default = False
        # deterministic compiles sample with KeyedNoise (runtime/sampling.py): a request's sample does not depend on
        # its batch, and speculative decoding emits plain decoding's sampled tokens
        self.keyed_sampling = False
        self.tp_world = 1  # tensor parallelism: this rank's shard; speculation drafts on rank 0 (runtime/speculate.py)
        self.graphs = None
        self.verify: Any = None  # tree-verify executor (draft trees); path drafts verify through the prefill plan
        self.compression: Any = None  # braze.runtime.kv_compression.CompressionSpec when compiled with kv_compression
        # CUDA graphs are captured per batch bucket (1, 2, 4, ... max_batch): a batch is padded up to its bucket with
        # dummy rows that own their own cache rows, start finished, and are sliced off the result
        self.bucket_batches = cuda_graphs
        if cuda_graphs:
            from braze.runtime.cuda_graphs import CudaGraphRunner

            self.graphs = CudaGraphRunner(decode, static_prefixes=self.STATE_PREFIXES)
        self._state: dict[int, dict[str, torch.Tensor]] = {}

    @functools.cached_property
    def static_decode_batch(self) -> int | None:
        """Rows the decode plan takes when its batch is fixed (a graph that pins the batch when re-traced at one
        token is compiled at max_batch; compiler/generation.py): generate pads a smaller batch up to it."""
        spec = next(i for i in self.decode.user_inputs if i.name == "input_ids")
        rows = str(spec.shape[0])
        return int(rows) if rows.isdigit() and int(rows) > 1 else None

    def _ordered(self, executor: PlanExecutor, values: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [values[i.name] for i in executor.user_inputs]

    def new_caches(self, batch: int) -> dict[str, torch.Tensor]:
        return zeros_for(self.kv_inputs, batch, self.device)

    def _buffers(self, batch: int) -> dict[str, torch.Tensor]:
        """The decode state of a batch: kv_start and the decode caches (with kv_compression, the compressed caches,
        their starts and query rings; the full prefill cache stays transient). Fresh tensors, or, when decode replays
        CUDA graphs (which capture state by identity), the same tensors for every request of this batch bucket.
        Nothing needs zeroing: attention masks every slot a request has not written (below kv_start, past
        cache_len)."""
        if self.bucket_batches and batch in self._state:
            return self._state[batch]
        state = {"kv_start": torch.zeros(batch, dtype=torch.int32, device=self.device)}
        if self.compression is None:
            state.update(self.new_caches(batch))
        else:
            from braze.runtime.kv_compression import compressed_buffers

            state.update(compressed_buffers(self.compression, batch, self.device))
        if self.bucket_batches:
            self._state[batch] = state
        return state

    @functools.cached_property
    def compression_kernels(self) -> Any:
        """kv_compression: the prefill plan's kv_compress kernels, which R-KV's re-compression launches too (None
        under the reference executor)."""
        from braze.runtime.kv_compression import compression_kernels

        return compression_kernels(self.prefill)

    @property
    def recurrent_layers(self) -> int:
        """Layers whose past is one recurrent state (gated DeltaNet / SSD scans), not slots: no speculation."""
        return sum(name.startswith("scan_state_") for name, _, _ in self.kv_inputs)

    @property
    def cache_slots(self) -> int:
        """Slots per row of the cache decode and verify write: the compressed capacity under kv_compression."""
        return self.compression.capacity if self.compression is not None else self.max_seq

    def _check_compressed_speculation(self) -> None:
        from braze.kvcompress.policy import DURING_DECODE

        why = None
        if self.verify is None:
            why = "speculative decoding over a compressed KV cache needs the verify plan, which this package lacks"
        elif self.compression.policy in DURING_DECODE and not _records_draft_queries(self.verify):
            why = (f"kv_compression={self.compression.policy!r}: this package's verify plan does not record the "
                   "draft queries its re-compression scores with (built by an older braze); rebuild it to speculate")
        if why is not None:
            raise InputMismatchError(f"{why}; generate without it (speculate=False; braze run: drop --speculate)")

    def run_prefill(self, ids: torch.Tensor, positions: torch.Tensor, kv_start: torch.Tensor,
                    state: dict[str, torch.Tensor], max_new_tokens: int) -> Prefilled:
        """Prefill a batch into its decode state (`_buffers`). Under kv_compression the prompt goes through a
        transient full cache and is compacted into the state's compressed caches (dropped on return), and kv_start
        becomes each row's start there."""
        if self.compression is None:
            caches = {name: state[name] for name, _, _ in self.kv_inputs}
            return Prefilled(self.forward(self.prefill, ids, positions, 0, kv_start, caches), caches, ids.shape[1])
        from braze.runtime.kv_compression import decode_state, plan_call, prefill_inputs

        call = plan_call(self.compression, ids.shape[1], max_new_tokens, self.max_seq, state,
                         self.compression_kernels)
        full = self.new_caches(ids.shape[0])
        logits = self.forward(self.prefill, ids, positions, 0, kv_start, full, extra=prefill_inputs(call, self.device))
        _, extra = decode_state(self.compression, call, kv_start)
        return Prefilled(logits, call.caches, call.end, extra, call, _nbytes(full))

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, slot: int, kv_start: torch.Tensor,
                    state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits [B, 1, V] after `tokens` [B] at positions `pos` [B, 1], written into cache slot `slot`."""
        values = {"input_ids": tokens[:, None], "position_ids": pos,
                  "cache_len": torch.tensor([slot], dtype=torch.int64, device=self.device),
                  "kv_start": kv_start, **state}
        inputs = self._ordered(self.decode, values)
        (logits,) = self.graphs.run(inputs) if self.graphs else self.decode.run(inputs)
        return logits

    def forward(self, executor: Any, ids: torch.Tensor, positions: torch.Tensor, cache_len: int,
                kv_start: torch.Tensor, caches: dict[str, torch.Tensor], tree_mask: torch.Tensor | None = None,
                extra: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [B, S, V] for `ids` at `positions`, written into the cache from `cache_len` on (`extra`: further
        plan inputs, such as kv_compression's)."""
        values = {"input_ids": ids, "position_ids": positions.contiguous(),
                  "cache_len": torch.tensor([cache_len], dtype=torch.int64, device=self.device),
                  "kv_start": kv_start, "tree_mask": tree_mask, **caches, **(extra or {})}
        (logits,) = executor.run(self._ordered(executor, values))
        return logits

    def speculative(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                    do_sample: bool, temperature: float, top_k: int, top_p: float, generator: Any,
                    eos_ids: torch.Tensor, pad: int, max_spec_tokens: int, tree: bool = False,
                    output_logits: bool = False, streamer: Any = None, rule_options: dict[str, Any] | None = None,
                    stops: tuple[Any, list[str]] | None = None) -> Any:
        """Speculative decoding, one batched verify forward per step (rows without the verify plan, as in packages,
        run one at a time); HF output layout. A streamer (batch 1) gets each step's accepted tokens at once.
        `rule_options`: repetition_penalty / min_new_tokens, applied at every verify node (LogitsRules); `stops`:
        (tokenizer, stop_strings), a row ends after the token that completes one."""
        from braze.runtime.speculate import SpeculativeRunner

        if getattr(self, "spec", None) is None:
            self.spec = SpeculativeRunner(self)
        if tree and self.verify is None:
            raise InputMismatchError("tree drafts need the verify plan (compile with braze.compile, not a package)")
        self.spec.max_spec_tokens = max_spec_tokens
        self.spec.tree = tree
        self.spec.record_logits = output_logits
        self.spec.recorded = []
        self.spec.streamer = streamer
        self.spec.rule_options = dict(rule_options or {})
        self.spec.stops = stops
        if streamer is not None:
            streamer.put(input_ids[0].cpu())
        mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).to(self.device)
        before = self.spec.stats.snapshot()
        try:
            if self.verify is not None:
                rows = self.spec.generate_batch(input_ids.to(self.device), mask, max_new_tokens, do_sample,
                                                temperature, top_k, top_p, generator, eos_ids)
            else:
                rows = [self.spec.generate_row(input_ids[b][mask[b].bool()][None].to(self.device), max_new_tokens,
                                               do_sample, temperature, top_k, top_p, generator, eos_ids)
                        for b in range(input_ids.shape[0])]
        finally:
            self.spec.streamer = None  # never kept for a later request, even after an error or Ctrl-C
        if streamer is not None:
            streamer.end()
        self.stats = self.spec.generation_stats(before)  # per-step host overhead under extra["speculation"]
        width = max(len(r) for r in rows)
        if len(eos_ids) == 0 and stops is None:  # (rows that stop end the batch where plain decoding ends it)
            width = max_new_tokens
        tail = torch.full((len(rows), width), pad, dtype=input_ids.dtype, device=self.device)
        for b, r in enumerate(rows):
            tail[b, : len(r)] = torch.tensor(r, dtype=input_ids.dtype, device=self.device)
        sequences = torch.cat([input_ids.to(self.device), tail], dim=1)
        if not output_logits:
            return sequences
        seen = self.spec.recorded
        logits = torch.zeros((len(rows), width, seen[0].shape[-1]), dtype=seen[0].dtype, device=self.device)
        for b, row in enumerate(seen):
            logits[b, : min(len(row), width)] = row[:width]
        return GenerateOutput(sequences, logits)

    def check(self, batch: int, prompt_len: int, max_new_tokens: int) -> None:
        if batch == 0:
            raise InputMismatchError("empty batch: input_ids has no rows (shape [0, seq])")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if prompt_len == 0:
            raise InputMismatchError("empty prompt: generate needs at least one prompt token")
        if batch > self.max_batch:
            raise ShapeOutOfRangeError(f"a batch of {batch} prompts exceeds max_batch={self.max_batch}; compile "
                                       f"with braze.compile(model, max_batch={batch}) or more")
        if prompt_len > self.max_seq:
            raise ShapeOutOfRangeError(f"prompt of {prompt_len} tokens exceeds max_seq={self.max_seq}; compile "
                                       f"with braze.compile(model, max_seq={prompt_len + max_new_tokens}) or more")
        if prompt_len + max_new_tokens > self.max_seq:
            raise ShapeOutOfRangeError(
                f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} exceeds "
                f"the KV cache (max_seq={self.max_seq}); compile with braze.compile(model, "
                f"max_seq={prompt_len + max_new_tokens}) or more")
        rows = self.position_rows
        if rows is not None and prompt_len + max_new_tokens > rows:
            raise ShapeOutOfRangeError(
                f"prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} tokens "
                f"exceeds the model's learned position table ({rows} positions)")

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | list[int] | None = None, eos_token_id: Any = DEFAULT, pad_token_id: Any = DEFAULT,
                 streamer: Any = None, speculate: bool | None = None, max_spec_tokens: int = 8,
                 spec_tree: bool = False, stop_strings: Any = None, tokenizer: Any = None,
                 output_logits: bool = False, repetition_penalty: float = 1.0, min_new_tokens: int = 0) -> Any:
        check_token_ids(input_ids, (1, 2), "[batch, seq] (or [seq])")
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        batch, prompt_len = input_ids.shape
        self.check(batch, prompt_len, max_new_tokens)
        if stop_strings is not None and tokenizer is None:
            raise InputMismatchError("stop_strings needs tokenizer= to read the generated text (as in HF generate)")
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if stops and not (hasattr(tokenizer, "decode") and hasattr(tokenizer, "batch_decode")):
            raise InputMismatchError(f"stop_strings needs a tokenizer with decode / batch_decode (an HF tokenizer), "
                                     f"got {type(tokenizer).__name__}")
        temperature, top_k, top_p = check_sampling(do_sample, temperature, top_k, top_p)
        ids = input_ids.to(self.device, torch.long)  # int32 ids too, as HF's embedding takes them
        self.prefill.check_index_inputs([ids if i.name == "input_ids" else None for i in self.prefill.user_inputs])
        if attention_mask is None:
            attention_mask = torch.ones_like(ids)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.reshape(ids.shape[0], -1).shape != ids.shape:
            what = (f"shape {list(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor)
                    else f"a {type(attention_mask).__name__}")
            raise InputMismatchError(f"attention_mask must be a tensor shaped like input_ids {list(ids.shape)}, got "
                                     f"{what}")
        mask = attention_mask.to(self.device).reshape(ids.shape).long()
        if bool((mask[:, 1:] < mask[:, :-1]).any()):
            row = int((mask[:, 1:] < mask[:, :-1]).any(-1).nonzero()[0])
            kind = "right padding" if bool((mask[row].cummin(-1).values == mask[row]).all()) else "a gap"
            raise InputMismatchError(f"attention_mask row {row} has {kind} (a 0 after a 1); generate takes "
                                     "left-padded batches (tokenizer.padding_side = 'left')")
        kv_start = (mask == 0).sum(-1).to(torch.int32)
        if bool((kv_start >= prompt_len).any()):
            raise InputMismatchError("a prompt in the batch is all padding (empty prompt)")
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        eos = self.default_eos if eos_token_id is DEFAULT else eos_token_id
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=self.device, dtype=torch.long)
        pad = self.default_pad if pad_token_id is DEFAULT else pad_token_id
        if pad is None:
            pad = int(eos_ids[0]) if len(eos_ids) else 0
        seed = check_seed(seed, batch, self.keyed_sampling)
        generator: Any = None
        if do_sample and self.keyed_sampling:
            generator = KeyedNoise(seed)
        elif do_sample:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed)
        static = self.static_decode_batch
        for name, flag in (("speculate", speculate), ("spec_tree", spec_tree), ("output_logits", output_logits)):
            if flag is not None and not isinstance(flag, bool):
                raise ConfigError(f"{name} must be True or False, got {flag!r}")
        speculating = self.speculate_default if speculate is None else speculate
        if spec_tree and not speculating:
            raise ConfigError("spec_tree=True drafts trees for speculative decoding: give speculate=True too (or "
                              "compile with speculate='suffix')")
        if speculating and static and static != batch:
            if speculate:
                raise InputMismatchError(f"speculative decoding needs a decode plan for any batch; this model's "
                                         f"takes exactly {static} rows (see the report's 'decode batch'), got {batch}")
            speculating = False  # the compile's default: decode plainly
        if speculating and self.recurrent_layers:
            raise InputMismatchError(f"speculative decoding: this model's {self.recurrent_layers} recurrent layers "
                                     "(gated DeltaNet / SSD scans) keep one recurrent state, which verifying drafts "
                                     "would advance past rejected tokens; generate without it (speculate=False; "
                                     "braze run: drop --speculate)")
        rules = LogitsRules(ids, mask, repetition_penalty, min_new_tokens, eos_ids)
        if speculating:
            if self.compression is not None:
                self._check_compressed_speculation()
            if streamer is not None and batch > 1:
                raise InputMismatchError(f"a streamer with speculative decoding takes one prompt, got a batch of "
                                         f"{batch} (rows accept different numbers of tokens per step)")
            rule_options = ({"repetition_penalty": repetition_penalty, "min_new_tokens": min_new_tokens}
                            if rules.active else {})
            return self.speculative(ids, mask, max_new_tokens, do_sample, temperature, top_k, top_p, generator,
                                    eos_ids, pad, max_spec_tokens, spec_tree, output_logits, streamer, rule_options,
                                    (tokenizer, stops) if stops else None)
        real = batch
        if self.bucket_batches or static:
            bucket = static or min(self.max_batch, 1 << (batch - 1).bit_length())
            if bucket > batch:
                extra = bucket - batch
                ids, mask = torch.cat([ids, ids[:1].expand(extra, -1)]), torch.cat([mask, mask[:1].expand(extra, -1)])
                kv_start = torch.cat([kv_start, kv_start[:1].expand(extra)])
                positions = torch.cat([positions, positions[:1].expand(extra, -1)])
                batch = bucket
        state = self._buffers(batch)
        kv_start = state["kv_start"].copy_(kv_start)
        if streamer is not None:
            streamer.put(ids[:real].cpu())

        start = time.perf_counter()
        pre = self.run_prefill(ids, positions, kv_start, state, max_new_tokens)
        logits, caches, base, extra_inputs, comp = pre.logits, pre.caches, pre.base, pre.extra, pre.call
        self.stats = GenerationStats(kv_cache_bytes=_nbytes(caches))
        if comp is not None:
            self.stats.extra["kv_cache_bytes_uncompressed"] = pre.uncompressed_bytes
        next_tok = select_next(rules(logits[:, -1], 0), do_sample, temperature, top_k, top_p, generator,
                               positions[:, -1] + 1)
        seen = [logits[:, -1].clone()] if output_logits else None  # (clones: plans and graphs reuse outputs)
        live: list[torch.Tensor] = []  # per new token: whether the row was still generating (with EOS / stops)
        self.stats.time_to_first_token_s = time.perf_counter() - start
        unfinished = torch.ones(batch, dtype=torch.bool, device=self.device)
        unfinished[real:] = False  # bucket padding rows
        out = [ids]
        pos = positions[:, -1:]
        slot = base  # the cache slot the next decode step writes
        launches0 = self.decode.stats["launches"]
        decode_start = time.perf_counter()
        for step in range(max_new_tokens):
            if len(eos_ids) or stops:
                next_tok = torch.where(unfinished, next_tok, torch.full_like(next_tok, pad))
                if seen is not None:
                    live.append(unfinished.clone())
            out.append(next_tok[:, None])
            rules.add(next_tok)
            if streamer is not None:
                streamer.put(next_tok[:real].cpu())
            if len(eos_ids):
                unfinished &= ~torch.isin(next_tok, eos_ids)
            if stops:
                new_text = tokenizer.batch_decode(torch.cat(out[1:], dim=1)[:real])
                hit = torch.tensor([any(st in t for st in stops) for t in new_text], device=self.device)
                unfinished[:real] &= ~hit
            if len(eos_ids) or stops:
                if not bool(unfinished.any()):  # the one host sync per step: the stop check
                    break
            if step == max_new_tokens - 1:
                break
            pos = pos + 1
            if comp is not None:  # rkv: a full cache is compressed back to the budget first
                from braze.runtime.kv_compression import next_slot

                slot = next_slot(self.compression, comp, slot, kv_start)
            logits = self.decode_step(next_tok, pos, slot, kv_start, {**caches, **extra_inputs})
            next_tok = select_next(rules(logits[:, -1], step + 1), do_sample, temperature, top_k, top_p, generator,
                                   pos[:, 0] + 1)
            if seen is not None:
                seen.append(logits[:, -1].clone())
            self.stats.decode_steps += 1
            slot += 1
        took = time.perf_counter() - decode_start
        if comp is not None and comp.recompressions:
            self.stats.extra["kv_recompressions"] = comp.recompressions
        if streamer is not None:
            streamer.end()
        steps = max(1, self.stats.decode_steps)
        self.stats.decode_tokens_per_s = real * self.stats.decode_steps / took if took > 0 else 0.0
        self.stats.launches_per_decode_step = (self.decode.stats["launches"] - launches0) / steps
        sequences = torch.cat(out, dim=1)[:real]
        if seen is None:
            return sequences
        logits = torch.stack(seen, dim=1)[:real]
        if live:  # positions after a row finished hold pad: zero their logits
            logits = logits.masked_fill(~torch.stack(live, dim=1)[:real, :, None], 0)
        return GenerateOutput(sequences, logits)
