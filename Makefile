# rankbench: `make demo` runs the default job, `make test` the test suite; both build .venv first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch that lies on this kind of machine; on a GPU cluster: make TORCH=torch==<cuda build>
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-all test-deps lint clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	WANDB_SILENT=true $(PY) run.py method=randlora task=clip

# `make test`: the default run, tests marked slow deselected (under 10 minutes on 2 cores); `make test-all`: every
# test, slow ones included (what CI runs). MARKERS selects others, e.g. make test MARKERS="not slow and not slurm".
MARKERS ?= not slow
test: setup test-deps
	$(PY) -m pytest -q -m "$(MARKERS)" $(PYTEST_ARGS)

test-all: setup test-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The browser test (report/index.html in headless Chromium) needs Debian's chromium: installed here when it is
# missing and we are root with apt-get; never fails the build, the test then skips and says why.
test-deps:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && export DEBIAN_FRONTEND=noninteractive && \
	  { apt-get install -y -qq chromium >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }; }; } || \
	echo "make: chromium is missing and apt-get as root is unavailable or failed; the browser test will skip"
	@# trainer.compile on the CPU builds C++ kernels (inductor): g++ as above; without it the compile test skips
	@command -v g++ >/dev/null 2>&1 || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && export DEBIAN_FRONTEND=noninteractive && \
	  { apt-get install -y -qq g++ >/dev/null 2>&1 || \
	    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq g++ >/dev/null 2>&1; }; }; } || \
	echo "make: g++ is missing and apt-get as root is unavailable or failed; the torch.compile test will skip"

# `make lint`: ruff's rule set and mypy's scope are in pyproject.toml ([tool.ruff.lint], [tool.mypy]).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
