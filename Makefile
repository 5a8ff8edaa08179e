# Two entry points that work on a fresh machine: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch is pinned here (not in pyproject.toml) so this machine takes the CPU wheel on disk.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=
# make mutate: which part of realflow with which tests (a target of benchmarks/mutate.py:
# algorithms, interfaces, losses, master), how many mutants run at once, and which (mutmut name
# globs; empty = the whole target, e.g. MUTANTS='realflow.algorithms.kl.*').
MUTATE_TARGET ?= algorithms
MUTATE_CHILDREN ?= 2
MUTANTS ?=

.PHONY: install demo test lint bench mutate clean gpu-wheels

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

# Mutation testing (not in CI; docs/testing.md): mutate the code, rerun the tests that cover it.
mutate: install
	$(PY) benchmarks/mutate.py $(MUTATE_TARGET) run --max-children $(MUTATE_CHILDREN) $(MUTANTS)
	$(PY) benchmarks/mutate.py $(MUTATE_TARGET) results

# Wheels that benchmarks/gpu/run.sh installs on a GPU machine without an index (it has torch and
# transformers but no omegaconf); carry benchmarks/gpu/wheels there with the repository.
gpu-wheels:
	python3 -m pip wheel --no-deps -w benchmarks/gpu/wheels omegaconf==2.3.0 antlr4-python3-runtime==4.9.3

clean:
	rm -rf $(VENV) runs .pytest_cache build mutants realflow/parallel/_interval_ops*.so
