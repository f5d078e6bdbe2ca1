"""CompileConfig: every option braze.compile takes, validated once with errors that name the valid values."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from braze.runtime.errors import ConfigError

EXECUTORS = ("auto", "cuda", "interpret", "reference")
QUANTS = (None, "df11", "int6")
SPECULATE = (None, "suffix")
# quant="df11": "scratch" decodes each unit into a buffer before the matmuls, "fused" decodes inside the GEMV
# (braze/templates/df11_gemv.py.j2) in every plan, "auto" fuses in the decode plan only (see braze/passes/quantize.py)
DF11_STRATEGIES = ("auto", "scratch", "fused")
# a16: weight-only; a8: every linear W6A8; a6: every linear asks for W6A6 (the sensitivity pass keeps A8 where A6
# hurts, with a warning); mixed: the sensitivity pass picks A6 or A8 per linear (FlexQ)
INT6_ACTS = ("a16", "a8", "a6", "mixed")
# rtn: round to nearest; awq: activation-aware smoothing (braze/quant/smoothing.py) then round to nearest;
# gptq: Hessian-aware rounding (braze/quant/gptq.py); auto: awq when calibration data can be had, else rtn
INT6_METHODS = ("auto", "rtn", "awq", "gptq")
INT6_ACT_BITS = (16, 8, 6)
TARGET_CHECKS = ("error", "warn")
KV_DTYPES = ("auto", "float32", "float16", "bfloat16")
# auto: torch.export, and Dynamo graph by graph when export refuses the model (braze/compiler/dynamo_fallback.py);
# export: refuse such a model with the capture error
CAPTURES = ("auto", "export")


@dataclass
class CompileConfig:
    executor: str = "auto"  # auto: cuda on a GPU model, interpret on CPU
    quant: str | None = None
    speculate: str | None = None
    deterministic: bool = False
    max_batch: int = 8
    max_seq: int = 512
    dynamic_shapes: Any = None  # passed to torch.export for generic modules
    cuda_graphs: bool = True
    cast_bf16: bool = False  # quant="df11": allow casting non-BF16 weights to BF16 before encoding
    df11_strategy: str = "auto"  # quant="df11": where weights are decoded (DF11_STRATEGIES)
    int6_act: str = "a16"  # quant="int6": activation precision
    int6_method: str = "auto"  # quant="int6": how weights are rounded (awq/gptq need calibration statistics)
    # braze.quant.calibration.Calibration (or a dict {weight name -> Hessian} for gptq); braze.compile fills it
    # for HF causal LMs with a tokenizer when left None
    int6_calibration: Any = None
    # {substring of a linear's module path or weight name: 16 | 8 | 6}: activation bits for matching linears
    int6_act_overrides: Any = None
    # the sensitivity pass allows W6A6 on a linear whose calibration output error with A6 is at most this
    int6_a6_tolerance: float = 0.02
    # GPU targets to cross-compile every kernel specialization for ("sm_80", "sm_86", "sm_89", "sm_90"; a list or
    # "sm_80,sm_90"); braze/compiler/targets.py. Packages then carry the cubins per target.
    targets: Any = None
    # a cross-compiled kernel that spills (16-bit models) or exceeds a target limit: "error" or "warn" (accept it)
    target_check: str = "error"
    # tensor parallelism: shard the model over the `tp` ranks of the initialized torch.distributed process group
    # (braze/passes/tensor_parallel.py); 1 = no sharding
    tp: int = 1
    # KV-cache compression after prefill (braze/kvcompress): "keydiff", "snapkv", "adakv", "chunkkv" or None;
    # kv_budget: the compressed cache's capacity, a fraction of max_seq or a token count; kv_window: recent
    # tokens always kept (also SnapKV's observation window)
    kv_compression: str | None = None
    kv_budget: Any = 1.0
    kv_window: int = 16
    # the KV cache's dtype (KV_DTYPES, or a torch.dtype): "auto" (None) is float32 when deterministic=True and the
    # model's dtype otherwise. Attention kernels rotate q and k into it, store the cache in it and compute their
    # scores in it (so "float32" on a 16-bit model means fp32 RoPE, cache and attention math); the attention output
    # is the model's dtype. See kv_cache_dtype.
    kv_dtype: Any = None
    # how the model becomes a graph (CAPTURES): "auto" falls back to Dynamo when torch.export refuses it
    capture: str = "auto"

    def __post_init__(self) -> None:
        _choice("executor", self.executor, EXECUTORS)
        _choice("quant", self.quant, QUANTS)
        _choice("speculate", self.speculate, SPECULATE)
        _choice("df11_strategy", self.df11_strategy, DF11_STRATEGIES)
        _choice("int6_act", self.int6_act, INT6_ACTS)
        _choice("int6_method", self.int6_method, INT6_METHODS)
        _choice("target_check", self.target_check, TARGET_CHECKS)
        _choice("capture", self.capture, CAPTURES)
        self.kv_dtype = _kv_dtype(self.kv_dtype)
        if self.targets is not None:
            from braze.compiler.targets import parse_targets

            self.targets = list(parse_targets(self.targets)) or None
        self._check_int6()
        self._check_flags_and_dependents()
        from braze.kvcompress.policy import CROSS_HEAD_POLICIES, check_options

        check_options(self.kv_compression, self.kv_budget, self.kv_window, self.max_seq)
        for name in ("max_batch", "max_seq", "tp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.tp > 1 and self.kv_compression in CROSS_HEAD_POLICIES:
            raise ConfigError(f"kv_compression={self.kv_compression!r} selects across all kv heads, which tp="
                              f"{self.tp} splits over ranks (each rank would choose differently from tp=1); with "
                              "tp > 1 use 'keydiff', 'snapkv' or 'rkv'")

    def _check_int6(self) -> None:
        from braze.quant.calibration import Calibration

        if self.int6_calibration is not None and not isinstance(self.int6_calibration, (dict, Calibration)):
            raise ConfigError("int6_calibration must be a braze.quant.calibration.Calibration (collect(model, "
                              "tokenizer)) or a dict {weight name: Hessian tensor}, got "
                              f"{type(self.int6_calibration).__name__}")
        overrides = self.int6_act_overrides
        if overrides is not None:
            if not isinstance(overrides, dict) or not all(isinstance(k, str) for k in overrides):
                raise ConfigError("int6_act_overrides must be a dict {layer name pattern: activation bits}, "
                                  f"got {overrides!r}")
            bad = {k: v for k, v in overrides.items() if v not in INT6_ACT_BITS}
            if bad:
                raise ConfigError(f"int6_act_overrides: activation bits must be one of 16, 8, 6, got {bad}")
        tol = self.int6_a6_tolerance
        if not isinstance(tol, (int, float)) or isinstance(tol, bool) or not 0 <= tol < 1:
            raise ConfigError(f"int6_a6_tolerance must be a relative error in [0, 1), got {tol!r}")

    def _check_flags_and_dependents(self) -> None:
        """Flags are bools, and an option that only means something with another one is refused without it (it
        would be silently ignored), as are combinations that break a promise (deterministic mode has no atomics)."""
        for name in ("deterministic", "cuda_graphs", "cast_bf16"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be True or False, got {getattr(self, name)!r}")
        defaults = {f.name: f.default for f in fields(self)}
        needs = {"kv_compression": ("kv_budget", "kv_window"), "quant='df11'": ("df11_strategy", "cast_bf16"),
                 "quant='int6'": ("int6_act", "int6_method", "int6_calibration", "int6_act_overrides",
                                  "int6_a6_tolerance"), "targets": ("target_check",)}
        present = {"kv_compression": self.kv_compression is not None, "quant='df11'": self.quant == "df11",
                   "quant='int6'": self.quant == "int6", "targets": self.targets is not None}
        for what, names in needs.items():
            unused = [n for n in names if getattr(self, n) is not defaults[n] and getattr(self, n) != defaults[n]]
            if unused and not present[what]:
                raise ConfigError(f"{', '.join(f'{n}={getattr(self, n)!r}' for n in unused)} only applies with "
                                  f"{what}, which is not set")
        if self.deterministic and self.df11_strategy == "fused":
            raise ConfigError("df11_strategy='fused' sums with fp32 atomics, which deterministic=True rules out; "
                              "use 'auto' or 'scratch' (deterministic mode decodes DF11 into a scratch buffer)")

    @classmethod
    def from_options(cls, **options: Any) -> CompileConfig:
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(valid))}")
        return cls(**options)


def _choice(name: str, value: Any, valid: tuple) -> None:
    if value not in valid:
        shown = ", ".join(repr(v) for v in valid)
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {shown}")


def _kv_dtype(value: Any) -> str | None:
    """kv_dtype normalized to a KV_DTYPES name (None for "auto"); anything else is a one-line ConfigError."""
    import torch

    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if value is None or value == "auto":
        return None
    if value not in KV_DTYPES:
        shown = ", ".join(repr(v) for v in KV_DTYPES)
        raise ConfigError(f"kv_dtype={value!r} is not valid; choose one of {shown} (or a torch float dtype of those)")
    return value


def kv_cache_dtype(config: Any, model_dtype: Any) -> Any:
    """The KV cache's torch dtype for a model whose keys are `model_dtype`: kv_dtype when set, else float32 under
    deterministic=True, else the model's dtype."""
    import torch

    name = getattr(config, "kv_dtype", None)
    if name is not None:
        return getattr(torch, name)
    return torch.float32 if getattr(config, "deterministic", False) else model_dtype


def tp_rank(config: CompileConfig) -> tuple[int, int]:
    """(rank, world size) of a tp > 1 compile, checked against the torch.distributed process group it runs in."""
    import torch.distributed as dist

    if config.tp == 1:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(f"tp={config.tp} needs an initialized torch.distributed process group "
                          "(torch.distributed.init_process_group, e.g. under torchrun); none is initialized")
    world = dist.get_world_size()
    if world != config.tp:
        raise ConfigError(f"tp={config.tp} must equal the process group's world size ({world})")
    return dist.get_rank(), world
