# rankbench: `make demo` runs the default job, `make test` the test suite; both build .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that lies on this kind of machine; on a GPU cluster: make TORCH=torch==<cuda build>
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	WANDB_SILENT=true $(PY) run.py method=randlora task=clip

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
