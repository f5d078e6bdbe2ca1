"""The compile cache (braze/compiler/cache.py) and the memory layout it stores (braze/codegen/memory.py)."""

import copy
import dataclasses
import itertools
import json
import os
import shutil
import time

import pytest
import torch

import braze
from braze.cli import main as cli_main
from braze.codegen.memory import ELEMENT_SIZE, plan_memory
from braze.compiler import cache
from braze.compiler.config import CompileConfig
from braze.models import tiny_causal_lm
from braze.runtime.errors import ConfigError
from braze.runtime.plan import Plan

OPTIONS = {"max_seq": 32, "max_batch": 4}


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("braze_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BRAZE_CACHE", "1")
        mp.setenv("BRAZE_CACHE_DIR", str(root))
        yield root


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm("llama", layers=1)


@pytest.fixture(scope="module")
def cold(cache_root, model):
    """The first compile: a miss that stores the entry."""
    return braze.compile(model, **OPTIONS)


def _ids():
    return torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(0))


def _outputs(cm):
    ids = _ids()
    return cm(ids).logits, cm.generate(ids, max_new_tokens=4), cm.generate(ids, max_new_tokens=4, speculate=True,
                                                                            spec_tree=True)


def _key(model, **options):
    key, why = cache.compile_key(model, CompileConfig.from_options(**options), torch.device("cpu"))
    assert key is not None, why
    return key


def test_miss_then_hit_with_identical_outputs(cold, model, cache_root):
    assert cold.report.extra["cache"].startswith("miss; stored as ")
    entry = cache.entry_path(_key(model, **OPTIONS))
    assert entry.parent.parent == cache_root and (entry / "manifest.json").is_file()

    hit = braze.compile(model, **OPTIONS)
    assert hit.report.extra["cache"].startswith("hit: loaded "), hit.report.extra["cache"]
    assert "cache: hit" in str(hit.report)
    for name, plan in [("forward", cold.plan), *cold.extra_plans.items()]:
        cached = hit.plan if name == "forward" else hit.extra_plans[name]
        steps = [(s.kind, s.kernel, s.target) for s in plan.steps]
        assert [(s.kind, s.kernel, s.target) for s in cached.steps] == steps
        assert cached.kernels == plan.kernels and cached.slots == plan.slots
    assert hit.report.launches == cold.report.launches and hit.report.kernels == cold.report.kernels
    for a, b in zip(_outputs(cold), _outputs(hit)):
        assert torch.equal(a, b)
    assert torch.allclose(hit(_ids()).logits, model(_ids()).logits, atol=1e-4, rtol=1e-4)


def test_key_follows_options_versions_and_weights(cache_root, model, monkeypatch):
    base = _key(model, **OPTIONS)
    assert _key(model, **OPTIONS) == base  # deterministic
    assert _key(model, max_seq=64, max_batch=4) != base
    assert _key(model, **OPTIONS, speculate="suffix") != base
    monkeypatch.setattr(torch, "__version__", "0.0.0+other")
    assert _key(model, **OPTIONS) != base
    monkeypatch.undo()
    monkeypatch.setattr(braze, "__version__", "0.0.0+other")
    assert _key(model, **OPTIONS) != base
    monkeypatch.undo()
    monkeypatch.setattr(cache, "_source_digest", "0" * 64)  # any change to braze's sources
    assert _key(model, **OPTIONS) != base
    monkeypatch.undo()
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight[3, 5] += 1e-3
    assert _key(other, **OPTIONS) != base
    assert _key(model, **OPTIONS) == base

    monkeypatch.setenv("BRAZE_CACHE", "0")
    key, why = cache.compile_key(model, CompileConfig.from_options(**OPTIONS), torch.device("cpu"))
    assert key is None and "BRAZE_CACHE=0" in why
    monkeypatch.setenv("BRAZE_CACHE", "1")
    key, why = cache.compile_key(model, CompileConfig.from_options(**OPTIONS, executor="reference"),
                                 torch.device("cpu"))
    assert key is None and "reference" in why


def test_changed_options_miss(cold, model):
    """An entry for other options is never served: a new key, a new compile."""
    cm = braze.compile(model, max_seq=16, max_batch=4)
    assert cm.report.extra["cache"].startswith("miss; stored as ")
    assert cm.generator.max_seq == 16


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("BRAZE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "braze"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "braze"
    monkeypatch.setenv("BRAZE_CACHE_DIR", str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"


@pytest.mark.parametrize("damage", ["kernel", "weights", "other_key"])
def test_corrupt_entry_is_rebuilt(cold, model, damage):
    key = _key(model, **OPTIONS)
    entry = cache.entry_path(key)
    if not (entry / "manifest.json").is_file():  # a previous case rebuilt it already in this module
        braze.compile(model, **OPTIONS)
    if damage == "kernel":
        kernel = sorted((entry / "kernels").iterdir())[0]
        kernel.write_text(kernel.read_text() + "\nraise SystemExit('tampered')\n")
    elif damage == "weights":
        weights = entry / "weights.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:  # a valid entry for other options, copied under this key
        other = cache.entry_path(_key(model, max_seq=16, max_batch=4))
        if not (other / "manifest.json").is_file():
            braze.compile(model, max_seq=16, max_batch=4)
        shutil.rmtree(entry)
        shutil.copytree(other, entry)
    cm = braze.compile(model, **OPTIONS)
    assert cm.report.extra["cache"].startswith("miss (the cached entry was unusable"), cm.report.extra["cache"]
    assert "stored as" in cm.report.extra["cache"]
    for a, b in zip(_outputs(cold), _outputs(cm)):
        assert torch.equal(a, b)
    assert braze.compile(model, **OPTIONS).report.extra["cache"].startswith("hit")


def test_store_failure_does_not_fail_the_compile(cache_root, model, monkeypatch, tmp_path):
    (tmp_path / cache.ENTRIES).write_text("a file where the entries directory should be")
    monkeypatch.setenv("BRAZE_CACHE_DIR", str(tmp_path))
    cm = braze.compile(model, max_seq=8, max_batch=4)
    assert "not stored" in cm.report.extra["cache"], cm.report.extra["cache"]
    assert cm(_ids()).logits.shape == (3, 7, 256)


# ---- size cap, LRU eviction, `braze cache` ---------------------------------------------------------------------
@pytest.fixture
def fresh_cache(monkeypatch, tmp_path):
    """An empty cache directory of this test's own (the entries of the module's cache stay out of its totals)."""
    monkeypatch.setenv("BRAZE_CACHE", "1")
    monkeypatch.setenv("BRAZE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BRAZE_CACHE_MAX_GB", raising=False)
    return tmp_path / cache.ENTRIES


def _fake_entry(root, key, size, used, model="FakeForCausalLM"):
    """An entry as eviction and `braze cache` see one: a manifest (its mtime = last used) and `size` bytes in all."""
    entry = root / key
    entry.mkdir(parents=True)
    manifest = json.dumps({"model": model}).encode()
    (entry / "manifest.json").write_bytes(manifest)
    (entry / "weights.safetensors").write_bytes(b"\0" * (size - len(manifest)))
    os.utime(entry / "manifest.json", (used, used))
    return entry


def _set_cap(monkeypatch, n_bytes):
    monkeypatch.setenv("BRAZE_CACHE_MAX_GB", repr(n_bytes / cache.GB))


def _size(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_eviction_is_least_recently_used_and_a_hit_counts_as_use(cold, model, cache_root, fresh_cache, monkeypatch):
    """The real entry is the oldest written but is hit just before the store: the fake entry used least recently
    goes instead (without the hit the real entry would), and only as many entries go as the cap needs."""
    key = _key(model, **OPTIONS)
    source = cache_root / cache.ENTRIES / key
    if not (source / "manifest.json").is_file():  # a corrupt-entry case may have left it removed
        with monkeypatch.context() as mp:
            mp.setenv("BRAZE_CACHE_DIR", str(cache_root))
            braze.compile(model, **OPTIONS)
    now = time.time()
    real = fresh_cache / key
    shutil.copytree(source, real)
    os.utime(real / "manifest.json", (now - 300, now - 300))
    size = _size(real)
    a = _fake_entry(fresh_cache, "a" * 64, size // 2, now - 200)
    b = _fake_entry(fresh_cache, "b" * 64, size // 2, now - 100)
    _set_cap(monkeypatch, size // 2 + 2 * size + size // 8)  # b, the real entry and the new one (about its size)

    hit, status = cache.load(key, model, CompileConfig.from_options(**OPTIONS), "interpret")
    assert status == "hit" and hit is not None
    assert (real / "manifest.json").stat().st_mtime > now - 10  # the hit refreshed it
    line = cache.store("c" * 64, cold, "miss")

    assert not a.exists() and b.is_dir() and real.is_dir() and (fresh_cache / ("c" * 64) / "manifest.json").is_file()
    assert f"evicted 1 older entry ({cache.format_gb(size // 2)}) to stay under BRAZE_CACHE_MAX_GB=" in line, line
    assert [e.path for e in cache.list_entries()][:1] == [b]  # least recently used first
    assert sum(e.size for e in cache.list_entries()) <= cache.max_gb() * cache.GB


def test_the_entry_just_stored_is_never_evicted(cold, fresh_cache, monkeypatch):
    """A cap smaller than the new entry alone: every other entry goes, the new one stays and the line says the
    cache is still over the cap. Temp dirs of writers at work are neither counted nor deleted; a day-old one is."""
    now = time.time()
    old = _fake_entry(fresh_cache, "a" * 64, 5000, now - 100)
    writing = _fake_entry(fresh_cache, f".{'b' * 64}.tmp-12345678", 10**6, now - 50)  # save_package's, pre-rename
    stale = fresh_cache / f".{'d' * 64}.tmp-87654321"
    stale.mkdir()
    os.utime(stale, (now - 2 * cache.STALE_SECONDS, now - 2 * cache.STALE_SECONDS))
    monkeypatch.setenv("BRAZE_CACHE_MAX_GB", "1e-9")  # 1 byte

    line = cache.store("c" * 64, cold, "miss")
    new = fresh_cache / ("c" * 64)
    assert (new / "manifest.json").is_file() and not old.exists()
    assert writing.is_dir() and not stale.exists()
    assert "evicted 1 older entry (5.0 kB) to stay under BRAZE_CACHE_MAX_GB=1e-09" in line, line
    assert f"the cache holds {cache.format_gb(_size(new))}, over BRAZE_CACHE_MAX_GB=1e-09" in line, line
    assert [e.path for e in cache.list_entries()] == [new]


@pytest.mark.parametrize("value", ["abc", "0", "-1", "nan", "inf", "10GB"])
def test_invalid_max_gb_is_a_one_line_config_error(value, fresh_cache, model, monkeypatch, capsys):
    monkeypatch.setenv("BRAZE_CACHE_MAX_GB", value)
    with pytest.raises(ConfigError) as info:
        cache.max_gb()
    text = str(info.value)
    assert "\n" not in text and f"BRAZE_CACHE_MAX_GB={value!r}" in text and "positive" in text
    with pytest.raises(ConfigError):  # before compiling anything, not after
        cache.compile_key(model, CompileConfig.from_options(**OPTIONS), torch.device("cpu"))
    assert cli_main(["cache"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"BRAZE_CACHE_MAX_GB={value!r}" in err


def test_max_gb_default_and_value(fresh_cache, monkeypatch):
    assert cache.max_gb() == 10
    monkeypatch.setenv("BRAZE_CACHE_MAX_GB", " 2.5 ")
    assert cache.max_gb() == 2.5


def test_cli_cache_lists_and_clears(fresh_cache, monkeypatch, capsys):
    assert cli_main(["cache"]) == 0  # no cache directory yet
    out = capsys.readouterr().out
    assert "empty" in out and str(fresh_cache) in out and not fresh_cache.exists()

    now = time.time()
    older = _fake_entry(fresh_cache, "1234567890ab" + "0" * 52, 3000, now - 3600, model="LlamaForCausalLM")
    newer = _fake_entry(fresh_cache, "ba0987654321" + "0" * 52, 5000, now - 60, model="Qwen2ForCausalLM")
    writing = _fake_entry(fresh_cache, f".{'c' * 64}.tmp-12345678", 7000, now)  # save_package's, pre-rename
    monkeypatch.setenv("BRAZE_CACHE_MAX_GB", "2.5")
    assert cli_main(["cache"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith("  ") and "key" not in line]
    assert [r[:4] for r in rows] == [["ba0987654321", "Qwen2ForCausalLM", "5.0", "kB"],
                                     ["1234567890ab", "LlamaForCausalLM", "3.0", "kB"]]  # most recently used first
    assert time.strftime("%Y-%m-%d %H:%M", time.localtime(now - 3600)) in lines[-2]
    assert lines[-1].startswith("2 entries, 8.0 kB of BRAZE_CACHE_MAX_GB=2.5 (2.5 GB)"), lines[-1]

    assert cli_main(["cache", "--clear"]) == 0
    assert capsys.readouterr().out == f"deleted 2 entries (8.0 kB) from {fresh_cache}\n"
    assert not older.exists() and not newer.exists() and writing.is_dir()  # a write in progress is not an entry
    assert cli_main(["cache", "--clear"]) == 0
    assert "empty, nothing to delete" in capsys.readouterr().out
    assert cli_main(["cache"]) == 0
    assert "empty" in capsys.readouterr().out


def test_cli_cache_help(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["cache", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: braze cache" in out and "--clear" in out and "BRAZE_CACHE_MAX_GB" in out


# ---- memory planning -------------------------------------------------------------------------------------
def _value(expr: str, env: dict[str, int]) -> int:
    return int(eval(expr, {"max": max, "min": min}, dict(env)))  # plan expressions: integer arithmetic only


def _check_layout(plan: Plan) -> int:
    """At shapes across the compiled range: every buffer lies inside the arena, 64-byte aligned, and no two
    buffers that are live at the same step overlap."""
    ranges = [sorted({max(s.lower, 1), 2, 3, (s.upper or 64) // 2 + 1, s.upper or 64}) for s in plan.symbols]
    root: dict[str, str] = {}
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, step in enumerate(plan.steps):
        for o in step.outputs:
            root[o] = root.get(step.inputs[0], step.inputs[0]) if step.kind == "view" and step.inputs else o
            first.setdefault(o, i)
        for x in step.inputs:
            last[root.get(x, x)] = i
    placed = [b for b in plan.buffers if b.slot is not None]
    assert placed and plan.slots
    checked = 0
    for values in itertools.product(*ranges):
        env = dict(zip([s.name for s in plan.symbols], values))
        arena = _value(plan.slots[0], env)
        spans = []
        for b in placed:
            size = ELEMENT_SIZE[b.dtype]
            for d in b.shape:
                size *= _value(d, env)
            offset = _value(b.offset, env)
            assert offset % 64 == 0 and offset + size <= arena, (b.name, env, offset, size, arena)
            if size:
                spans.append((b.name, first[b.name], last.get(b.name, first[b.name]), offset, offset + size))
        for a, c in itertools.combinations(spans, 2):
            live_together = a[1] <= c[2] and c[1] <= a[2]
            assert not (live_together and a[3] < c[4] and c[3] < a[4]), f"{a} and {c} overlap at {env}"
        checked += 1
    return checked


def test_memory_layout_holds_at_every_shape(cold):
    for plan in [cold.plan, *cold.extra_plans.values()]:
        assert _check_layout(plan) > 1


def test_plan_memory_returns_the_layout_without_touching_the_plan(cold):
    plan = cold.plan
    gm = cold.graph_module
    bare = copy.deepcopy(plan)
    for b in bare.buffers:
        b.slot, b.offset = None, None
    bare.slots = []
    for s in bare.steps:
        s.free_after = []
    before = copy.deepcopy(bare)
    layout = plan_memory(bare, gm, bare.symbols)
    assert dataclasses.asdict(bare) == dataclasses.asdict(before)
    layout.apply(bare)
    assert dataclasses.asdict(bare) == dataclasses.asdict(plan)
    assert layout.planned_peak_bytes == cold.report.planned_peak_bytes > 0
    assert 0 < layout.eager_peak_bytes and layout.planned_peak_bytes <= layout.no_reuse_bytes



# ---- capture: one traced layer stamped over the stack ----------------------------------------------------------
def test_stamped_capture_gives_the_plans_of_a_full_trace(monkeypatch):
    """A 4-layer Llama captured by tracing two layers and stamping layer 1 compiles to the same plans (steps,
    kernels, inputs, memory) and the same outputs as tracing all four."""
    import braze.compiler.capture as capture

    monkeypatch.setenv("BRAZE_CACHE", "0")
    model = tiny_causal_lm("llama", layers=4)
    assert capture._decoder_layers(model) is not None
    stamped = []
    real = capture._capture_stamped
    monkeypatch.setattr(capture, "_capture_stamped", lambda *a: stamped.append(real(*a)) or stamped[-1])
    a = braze.compile(model, **OPTIONS)
    assert stamped and stamped[0] is not None
    monkeypatch.setattr(capture, "_capture_stamped", lambda *a: None)
    b = braze.compile(model, **OPTIONS)
    _assert_same_compile(a, b)


def _assert_same_compile(a, b):
    """Same plans (steps, kernel sources, inputs, memory), same weights, same outputs."""

    def body(source):
        return [line for line in source.splitlines() if not line.startswith("#")]  # headers name FX nodes

    assert sorted(a.extra_plans) == sorted(b.extra_plans)
    for name, plan in [("forward", b.plan), *b.extra_plans.items()]:
        got = a.plan if name == "forward" else a.extra_plans[name]
        assert [(s.kind, s.kernel, s.target) for s in got.steps] == [(s.kind, s.kernel, s.target) for s in plan.steps]
        assert {k: body(v) for k, v in got.kernels.items()} == {k: body(v) for k, v in plan.kernels.items()}
        assert [dataclasses.asdict(i) for i in got.inputs] == [dataclasses.asdict(i) for i in plan.inputs]
        assert got.slots == plan.slots
    assert sorted(a.weights) == sorted(b.weights)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
    for x, y in zip(_outputs(a), _outputs(b)):
        assert torch.equal(x, y)


def test_memoized_fake_values_give_the_plans_of_per_node_propagation(monkeypatch):
    """Fake values computed once per distinct (op, input metadata) and shared by the layers that repeat them
    (braze/passes/fake_memo.py) compile a 4-layer Llama to exactly what per-node fake propagation gives."""
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    import braze.compiler.generation as generation
    import braze.passes.graph_utils as graph_utils

    monkeypatch.setenv("BRAZE_CACHE", "0")
    model = tiny_causal_lm("llama", layers=4)
    computed = []
    real = graph_utils.memo_call
    monkeypatch.setattr(graph_utils, "memo_call", lambda memo, *a: computed.append(1) or real(memo, *a))
    a = braze.compile(model, **OPTIONS)
    assert computed
    monkeypatch.setattr(graph_utils, "memo_call", lambda memo, target, fargs, fkwargs, compute: compute())
    monkeypatch.setattr(generation, "MemoFakeTensorProp", FakeTensorProp)
    b = braze.compile(model, **OPTIONS)
    _assert_same_compile(a, b)


def test_fake_memo_keeps_apart_what_changes_an_output():
    from braze.passes.fake_memo import memo_call, memoizable, value_signature

    aten = torch.ops.aten
    assert memoizable(torch.ops.braze.cached_attention.default)  # writes the cache, returns a new tensor
    assert not memoizable(aten.add_.Tensor) and not memoizable(aten.copy_.default)  # return their input
    assert not memoizable(lambda x: x)
    x, y = torch.empty(2, 3), torch.empty(3, 2).t()
    assert value_signature(x) != value_signature(y)  # same shape, different strides
    assert value_signature((x, 1)) != value_signature((x, 1.0)) != value_signature((x, True))
    memo, calls = {}, []
    for t in (x, x.clone(), y):
        memo_call(memo, aten.neg.default, (t,), {}, lambda t=t: calls.append(t) or t.neg())
    assert len(calls) == 2  # the clone shares x's entry; y's strides do not


def test_layers_told_apart_by_the_config_are_traced_whole():
    import braze.compiler.capture as capture

    assert capture._decoder_layers(tiny_causal_lm("llama", layers=2)) is None  # too few to gain anything
    gemma3 = tiny_causal_lm("gemma3_text", layers=7)  # sliding layers with a global one every 6th
    assert len(set(gemma3.config.layer_types)) > 1
    assert capture._decoder_layers(gemma3) is None
