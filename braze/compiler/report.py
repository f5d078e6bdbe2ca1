"""The compile report: per pass what matched, which kernels exist and what they cover, what fell back and why."""

from __future__ import annotations

from dataclasses import dataclass, field

from braze.runtime.units import format_bytes


@dataclass
class PassResult:
    name: str
    phase: str
    rewrites: int
    notes: list[str] = field(default_factory=list)


@dataclass
class CompileReport:
    model: str
    executor: str
    passes: list[PassResult] = field(default_factory=list)
    kernels: list[tuple[str, str, list[str]]] = field(default_factory=list)  # (name, family, nodes)
    fallbacks: list[tuple[str, str]] = field(default_factory=list)
    launches: int = 0
    planned_peak_bytes: int = 0
    eager_peak_bytes: int = 0
    no_reuse_bytes: int = 0
    compile_seconds: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    def pass_count(self, name: str) -> int:
        return next(p.rewrites for p in self.passes if p.name == name)

    def __str__(self) -> str:
        lines = [f"braze compile report: {self.model} (executor: {self.executor}, {self.compile_seconds:.2f} s)"]
        lines.append("passes:")
        for p in self.passes:
            flag = "" if p.rewrites else "   (matched nothing)"
            lines.append(f"  {p.phase:10s} {p.name:28s} {p.rewrites:4d} rewrites{flag}")
            for note in p.notes[:6]:
                lines.append(f"      - {note}")
            if len(p.notes) > 6:
                lines.append(f"      - ... {len(p.notes) - 6} more")
        unique = {k[0] for k in self.kernels}
        lines.append(f"kernels: {len(unique)} distinct, {self.launches} launches per forward")
        for name, family, nodes in self.kernels[:40]:
            shown = ", ".join(nodes[:6]) + (f", ... (+{len(nodes) - 6})" if len(nodes) > 6 else "")
            lines.append(f"  {name:22s} {family:9s} {shown}")
        if len(self.kernels) > 40:
            lines.append(f"  ... {len(self.kernels) - 40} more launches")
        if self.fallbacks:
            lines.append(f"eager fallbacks: {len(self.fallbacks)}")
            for node, reason in self.fallbacks:
                lines.append(f"  {node}: {reason}")
        else:
            lines.append("eager fallbacks: none")
        planned, no_reuse = format_bytes(self.planned_peak_bytes), format_bytes(self.no_reuse_bytes)
        lines.append(
            f"activation memory at the example shape: planned peak {planned} (arena + outputs; no reuse: {no_reuse}) "
            f"vs eager's live-tensor peak {format_bytes(self.eager_peak_bytes)} (ideal allocator)"
        )
        for k, v in self.extra.items():
            lines.append(f"{k}: {v}")
        return "\n".join(lines)
