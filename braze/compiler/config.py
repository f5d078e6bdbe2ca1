"""CompileConfig: every option braze.compile takes, validated once with errors that name the valid values."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from braze.runtime.errors import ConfigError

EXECUTORS = ("auto", "cuda", "interpret", "reference")
QUANTS = (None, "df11", "int6")
SPECULATE = (None, "suffix")
INT6_ACTS = ("a16", "a8", "mixed")  # mixed: down_proj W6A8, the other linears W6A6 (FlexQ)
INT6_METHODS = ("rtn", "gptq")  # rtn: round to nearest; gptq: Hessian-aware rounding (braze/quant/gptq.py)


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
    int6_act: str = "a16"  # quant="int6": activation precision
    int6_method: str = "rtn"  # quant="int6": how weights are rounded (gptq needs calibration statistics)
    # int6_method="gptq": {weight name -> input Hessian H [K, K]} (braze.quant.gptq.calibrate); braze.compile
    # fills it for HF causal LMs when left None
    int6_calibration: Any = None

    def __post_init__(self) -> None:
        _choice("executor", self.executor, EXECUTORS)
        _choice("quant", self.quant, QUANTS)
        _choice("speculate", self.speculate, SPECULATE)
        _choice("int6_act", self.int6_act, INT6_ACTS)
        _choice("int6_method", self.int6_method, INT6_METHODS)
        if self.int6_calibration is not None and not isinstance(self.int6_calibration, dict):
            raise ConfigError("int6_calibration must be a dict {weight name: Hessian tensor} "
                              f"(braze.quant.gptq.calibrate), got {type(self.int6_calibration).__name__}")
        for name in ("max_batch", "max_seq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

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
