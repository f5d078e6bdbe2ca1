"""A plan is kernels only: no host syncs and no stray torch ops inside PlanExecutor.run.

Every plan (forward, prefill, decode, verify of a tiny Llama and Qwen2, and the df11 / int6 modes) runs under a
TorchDispatchMode on CPU that sees every ATen op the executor and the family launchers issue (ops inside the
Triton interpreter, which copies kernel arguments to and from the host, are not the plan's and are skipped). It
asserts:

* no host sync: no `aten._local_scalar_dense` (`.item()`, `int(t)`, `bool(t)`) and no copy to the host;
* nothing outside the declared kernels: the only ops allowed without a declaration are the executor's allocations
  (`ALLOCATIONS`) and views (`VIEWS`); any other op a launcher issues (a memset, a cast copy) must be declared
  through `braze.kernels.device_op` right after it, so it is counted as a launch (`DEVICE_OPS` lists what each
  declaration may stand for), and the declared ones are listed per mode.

The device-length forms of the cached-attention kernels that make prefill and decode pure (prefill reads the cache
length on device instead of slicing the cache on the host; decode adds 1 to cache_len in the kernel instead of a
torch op) are checked against the host-length forms at the end.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import braze
from braze.kernels import INTERPRETER, LAUNCH_HOOKS
from braze.kernels.attention import (
    AttentionSpec,
    DecodeAttentionSpec,
    flash_attention,
    render_attention,
    render_decode_attention,
    split_kv_decode,
)
from braze.models import tiny_causal_lm
from braze.runtime.executor import PlanExecutor
from braze.runtime.kernel_loader import load_kernel_module

aten = torch.ops.aten

# What the executor and the launchers may issue without declaring it: arena / output allocations ...
ALLOCATIONS = {aten.empty.memory_format, aten.empty_strided.default}
# ... and views (arena slices reinterpreted as a dtype and shape, strided views of kernel arguments).
VIEWS = {
    aten.view.default, aten.view.dtype, aten.slice.Tensor, aten.select.int, aten.as_strided.default,
    aten.expand.default, aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.alias.default, aten.detach.default,
}
# (Tensor.tolist reads the data without dispatching an ATen op: PlanOps records it by wrapping the method)
HOST_SYNCS = {aten._local_scalar_dense.default, aten.item.default, "Tensor.tolist"}
# device_op(name) -> the ATen ops it may stand for (the op is issued right before its declaration).
DEVICE_OPS = {
    "memset": {aten.zero_.default, aten.fill_.Scalar},
    "fill": {aten.zero_.default, aten.fill_.Scalar, aten.copy_.default},
    "cast": {aten.copy_.default},
}


def _inside_triton_interpreter(depth: int = 2) -> bool:
    frame = sys._getframe(depth)
    while frame is not None:
        name = frame.f_code.co_filename
        if "triton" in name and name.endswith("interpreter.py"):
            return True
        frame = frame.f_back
    return False


class PlanOps(TorchDispatchMode):
    """Records ("op", OpOverload, args) for every ATen op outside the Triton interpreter and ("declared", name)
    for every device_op, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple] = []

    def __enter__(self):
        tolist, events = torch.Tensor.tolist, self.events

        def recorded_tolist(t):
            if not _inside_triton_interpreter(depth=1):
                events.append(("op", "Tensor.tolist", (t,)))
            return tolist(t)

        self._tolist = tolist
        torch.Tensor.tolist = recorded_tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _inside_triton_interpreter():
            self.events.append(("op", func, args))
        return func(*args, **(kwargs or {}))

    def hook(self, launch) -> None:
        if launch.kind == "torch":
            self.events.append(("declared", launch.name))


def _to_host(func, args) -> bool:
    """A copy whose destination is the host while its source is not (never true on a CPU-only run, kept for GPUs)."""
    if func is aten.copy_.default and len(args) >= 2:
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False  # (a _to_copy to the host is a stray op anyway)


def classify(events) -> tuple[list[str], list[str], list[str], int]:
    """(host syncs, stray ops, declared device ops, ATen ops seen) of one run."""
    syncs, declared = [], []
    pending: list[object] = []  # ops that are neither allocations nor views, waiting for a declaration
    for event in events:
        if event[0] == "declared":
            name = event[1]
            allowed = DEVICE_OPS.get(name, set())
            match = next((i for i in range(len(pending) - 1, -1, -1) if pending[i] in allowed), None)
            if match is None:
                pending.append(f"device_op({name!r}) declared with no matching op")
            else:
                pending.pop(match)
                declared.append(name)
            continue
        _, func, args = event
        if func in HOST_SYNCS or _to_host(func, args):
            syncs.append(str(func))
        elif func not in ALLOCATIONS and func not in VIEWS:
            pending.append(func)
    return syncs, [str(p) for p in pending], declared, sum(e[0] == "op" for e in events)


@pytest.fixture
def purity(monkeypatch):
    """plan name -> list of (host syncs, stray ops, declared device ops), one per PlanExecutor.run."""
    seen: dict[str, list] = defaultdict(list)
    run = PlanExecutor.run

    def observed(self, inputs):
        mode = PlanOps()
        LAUNCH_HOOKS.append(mode.hook)
        try:
            with mode:
                out = run(self, inputs)
        finally:
            LAUNCH_HOOKS.remove(mode.hook)
        seen[self.plan.name].append(classify(mode.events))
        return out

    monkeypatch.setattr(PlanExecutor, "run", observed)
    return seen


def _prompt(n=10, reps=3, seed=0):
    base = torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([base] * reps)[None]


class FixedDrafter:
    """Always drafts the same path (the plans, not the drafter, are under test: every step runs the verify plan)."""

    def start_request(self, req, ids):
        pass

    def observe(self, req, ids):
        pass

    def finish_request(self, req):
        pass

    def draft(self, req, max_spec_tokens, **_):
        from braze.runtime.suffix_tree import Draft

        n = min(3, max_spec_tokens)
        return Draft(tokens=[5, 6, 7][:n], parents=list(range(-1, n - 1)), probs=[1.0] * n, score=float(n))


def _exercise(cm) -> None:
    """Forward, prefill + decode, and speculative verify."""
    from braze.runtime.speculate import SpeculativeRunner

    ids = _prompt()
    cm(ids)
    cm.generate(ids, max_new_tokens=3)
    cm.generator.spec = SpeculativeRunner(cm.generator, adaptive=False)
    cm.generator.spec.drafter = FixedDrafter()
    cm.generate(ids, max_new_tokens=6, speculate=True)


def _check(seen, plans=("prefill", "decode", "verify")) -> Counter:
    """No host sync and no stray op in any run; returns the declared device ops per call, by plan."""
    assert set(seen) >= set(plans) and len(seen) == len(plans) + 1, sorted(seen)  # + the forward plan
    listed: Counter = Counter()
    for name, runs in seen.items():
        for syncs, stray, _, n_ops in runs:
            assert n_ops > 0, f"{name}: the dispatch mode saw nothing (not even the executor's allocations)"
            assert not syncs, f"{name}: host syncs {syncs}"
            assert not stray, f"{name}: ops outside the declared kernels {Counter(stray)}"
        listed.update({f"{name}:{op}": n for op, n in Counter(runs[-1][2]).items()})
    return listed


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_plans_are_pure(purity, arch):
    cm = braze.compile(tiny_causal_lm(arch, layers=2), max_seq=64, max_batch=2)
    _exercise(cm)
    assert _check(purity) == Counter()  # float plans issue no device ops at all


@pytest.mark.parametrize("quant", [dict(quant="df11", cast_bf16=True),
                                   dict(quant="df11", cast_bf16=True, df11_strategy="fused"),
                                   dict(quant="int6", int6_act="a16", int6_method="rtn"),
                                   dict(quant="int6", int6_act="a8", int6_method="rtn")],
                         ids=["df11-scratch", "df11-fused", "int6-a16", "int6-a8"])
def test_quant_plans_are_pure(purity, quant):
    """df11 / int6 plans: pure too; the device ops their launchers declare (the fused-df11 / split-K int6
    accumulator memset, the fp32 -> output cast) are the only non-kernel work, and are listed here."""
    cm = braze.compile(tiny_causal_lm("llama", layers=1), max_seq=64, max_batch=2, **quant)
    _exercise(cm)
    listed = _check(purity)
    assert set(op.split(":")[1] for op in listed) <= set(DEVICE_OPS), listed
    print(quant, dict(listed))


def test_deterministic_decode_and_verify_plans_are_pure(purity):
    """deterministic=True: decode and verify (the tree form of the decode kernel) read lengths and the draft tree
    on device, so both are CUDA-graph capturable. Prefill reads kv_start on the host by design (flash_per_row: one
    flash launch per row, so a request's tiles start at its first token) and is not captured."""
    cm = braze.compile(tiny_causal_lm("llama", layers=2), max_seq=64, max_batch=2, deterministic=True)
    _exercise(cm)
    assert purity["decode"] and purity["verify"]
    for name in ("decode", "verify"):
        for syncs, stray, _, n_ops in purity[name]:
            assert n_ops > 0 and not syncs and not stray, (name, syncs, Counter(stray))


def test_moe_plans_are_pure(purity):
    """Mixture-of-experts plans (tiny Mixtral) are kernels only, as Llama's are: the expert matmuls run the
    grouped_matmul kernel, which reads the experts' row offsets on device (torch's reference read them on the
    host, a sync per expert matmul), and the router's top-k, the sort by expert and the expert counts the topk
    and moe_routing kernels (eager torch ops before)."""
    cm = braze.compile(tiny_causal_lm("mixtral", layers=1), max_seq=64, max_batch=2)
    _exercise(cm)
    assert not [s for s in cm.extra_plans["decode"].steps if s.kind == "eager"]
    assert _check(purity) == Counter()


def test_classify_flags_host_reads_and_undeclared_ops():
    mode = PlanOps()
    t = torch.arange(4)
    LAUNCH_HOOKS.append(mode.hook)
    try:
        with mode:
            int(t.reshape(-1)[0])  # the old prefill host read
            t.tolist()  # the MoE experts' old host read of their offsets (no ATen op of its own)
            (t + 1).expand(4).contiguous()  # the old decode seq_lens
            acc = torch.empty(4)
            acc.zero_()
            braze.kernels.device_op("memset")
    finally:
        LAUNCH_HOOKS.remove(mode.hook)
    syncs, stray, declared, _ = classify(mode.events)
    assert syncs == ["aten._local_scalar_dense.default", "Tensor.tolist"]
    assert stray == ["aten.add.Tensor"]  # expand is a view; contiguous of a contiguous tensor issues nothing
    assert declared == ["memset"]


# ---- the device-length kernel forms equal the host-length forms ------------------------------------------------
def _caches(batch, hkv, s_max, dim):
    return (torch.randn(batch, s_max, hkv, dim).transpose(1, 2), torch.randn(batch, s_max, hkv, dim).transpose(1, 2))


@pytest.mark.parametrize("past, sq, per_row", [(0, 9, False), (13, 5, False), (20, 3, True)])
def test_prefill_device_len_matches_host_slice(past, sq, per_row):
    torch.manual_seed(3)
    batch, hq, hkv, s_max, dim = 2, 4, 2, 48, 16
    kc, vc = _caches(batch, hkv, s_max, dim)
    q = torch.randn(batch, hq, sq, dim)
    kv_start = torch.tensor([0, 4], dtype=torch.int32)
    plain = load_kernel_module(render_attention(AttentionSpec("a", has_kv_start=True, out_dtype="float32"))).a
    on_dev = load_kernel_module(render_attention(AttentionSpec("d", has_kv_start=True, device_len=True,
                                                               out_dtype="float32"))).d
    want = torch.empty(batch, hq, sq, dim)
    flash_attention(plain, q, kc[:, :, : past + sq], vc[:, :, : past + sq], want, dim**-0.5, INTERPRETER,
                    kv_start=kv_start)
    got = torch.full_like(want, float("nan"))
    lens = torch.full((batch,) if per_row else (1,), past, dtype=torch.int64)
    flash_attention(on_dev, q, kc, vc, got, dim**-0.5, INTERPRETER, kv_start=kv_start, past=lens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits, per_row", [(1, False), (3, False), (2, True)])
def test_decode_from_cache_len_matches_seq_lens(splits, per_row):
    torch.manual_seed(4)
    batch, hq, hkv, s_max, dim = 2, 4, 2, 40, 16
    kc, vc = _caches(batch, hkv, s_max, dim)
    q = torch.randn(batch, hq, dim)
    kv_start = torch.tensor([0, 5], dtype=torch.int32)
    cache_len = torch.tensor([30, 17] if per_row else [30], dtype=torch.int64)
    seq_lens = (cache_len + 1).expand(batch).to(torch.int32).contiguous()
    plain = load_kernel_module(render_decode_attention(DecodeAttentionSpec("p", True, out_dtype="float32")))
    on_dev = load_kernel_module(render_decode_attention(DecodeAttentionSpec("c", True, out_dtype="float32",
                                                                            from_cache_len=True)))
    want, got = torch.empty(batch, hq, dim), torch.full((batch, hq, dim), float("nan"))
    split_kv_decode(plain, "p", q, kc, vc, want, seq_lens, kv_start, dim**-0.5, INTERPRETER, splits=splits)
    split_kv_decode(on_dev, "c", q, kc, vc, got, cache_len, kv_start, dim**-0.5, INTERPRETER, splits=splits,
                    from_cache_len=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
