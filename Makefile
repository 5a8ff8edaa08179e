# Two entry points that work on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned here (not in pyproject.toml) so this machine takes the CPU wheel on disk.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo test lint bench clean

# --no-build-isolation: setup.py compiles csrc/ against the torch installed just before (an
# isolated build would not see it, and realflow would fall back to its pure-torch interval ops).
$(VENV)/.installed: pyproject.toml setup.py $(wildcard csrc/*)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'setuptools>=77' wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m realflow.quickstart ppo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check realflow tests benchmarks experiments

clean:
	rm -rf $(VENV) runs .pytest_cache build realflow/parallel/_interval_ops*.so
