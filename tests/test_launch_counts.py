"""One truth for launch counts: what each kernel family predicts (Plan.launch_count, the report,
generation_stats) equals what actually launches, counted at the one launch path every family goes through
(braze.kernels.family.launch_kernel / device_op), for the forward, prefill, decode and verify plans."""

import pytest
import torch

import braze
from braze.kernels import INTERPRETER, TARGETS, launch_count, recording_launches
from braze.models import tiny_causal_lm
from braze.runtime.executor import PlanExecutor


def _repetitive_prompt(n=10, reps=3, seed=0):
    base = torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([base] * reps)[None]


@pytest.fixture
def observed(monkeypatch):
    """Every PlanExecutor.run: (plan, dynamic dims, launches counted by the executor, launches seen by a hook)."""
    calls = []
    run = PlanExecutor.run

    def recorded(self, inputs):
        before = self.stats["launches"]
        with recording_launches() as seen:
            out = run(self, inputs)
        calls.append((self.plan, self.bind(inputs), self.stats["launches"] - before, len(seen)))
        return out

    monkeypatch.setattr(PlanExecutor, "run", recorded)
    return calls


def _exercise(cm, ids):
    """Forward, plain generation (prefill + decode), speculative generation (verify); returns the plain stats."""
    from braze.runtime.speculate import SpeculativeRunner
    from tests.test_plan_purity import FixedDrafter

    cm(ids)
    cm.generate(ids, max_new_tokens=3)
    stats = cm.generation_stats
    cm.generator.spec = SpeculativeRunner(cm.generator, adaptive=False)
    cm.generator.spec.drafter = FixedDrafter()  # every step drafts, so every step runs the verify plan
    cm.generate(ids, max_new_tokens=6, speculate=True)
    return stats


def _check(calls, plans):
    assert {plan.name for plan, *_ in calls} >= set(plans)
    for plan, sizes, counted, hooked in calls:
        assert counted == hooked, plan.name
        assert counted == launch_count(plan, INTERPRETER, sizes), (plan.name, sizes)
        # the GPU description adds the split-KV combine to decode attention, nothing is ever fewer
        assert launch_count(plan, TARGETS["sm_90"], sizes) >= counted


# qwen3: q / k norms in the decode attention block; mixtral: the MoE families (experts, routing, top-k)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral"])
def test_every_plan_launches_what_it_predicts(observed, arch):
    cm = braze.compile(tiny_causal_lm(arch, layers=2), max_seq=64, max_batch=2)
    ids = _repetitive_prompt()
    stats = _exercise(cm, ids)
    _check(observed, (cm.plan.name, "prefill", "decode", "verify"))
    decode = cm.generator.decode.plan
    assert stats.launches_per_decode_step == decode.launches  # batch 1: the plan's smallest shape
    assert f"decode {decode.launches} launches per step" in cm.report.extra["generation"]


@pytest.mark.parametrize("quant", [dict(quant="df11", cast_bf16=True), dict(quant="df11", cast_bf16=True,
                                                                              df11_strategy="fused"),
                                   dict(quant="int6", int6_act="a16", int6_method="rtn"),
                                   dict(quant="int6", int6_act="a8", int6_method="rtn")],
                         ids=["df11-scratch", "df11-fused", "int6-a16", "int6-a8"])
def test_quant_plans_launch_what_they_predict(observed, quant):
    cm = braze.compile(tiny_causal_lm("llama", layers=1), max_seq=64, max_batch=2, **quant)
    _exercise(cm, _repetitive_prompt())
    _check(observed, (cm.plan.name, "prefill", "decode", "verify"))


def test_smollm2_decode_step_launches_what_it_predicts(observed):
    """The real model, a 2-token prompt and one decode step (the interpreter is slow on its 49152-row lm_head)."""
    from braze.models import load_smollm2

    model, _ = load_smollm2(torch.float32)
    cm = braze.compile(model, max_seq=16)
    cm.generate(torch.tensor([[1, 2]]), max_new_tokens=2)
    _check(observed, plans=("prefill", "decode"))
    assert cm.generation_stats.launches_per_decode_step == cm.generator.decode.plan.launches
    assert f"decode {cm.generator.decode.plan.launches} launches per step" in cm.report.extra["generation"]
