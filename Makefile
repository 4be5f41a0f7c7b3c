# `make demo` and `make test` are the README's two commands: each sets up what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
# Pinned: on these machines it is a local CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
# torch is not a dependency of the package: the training process brings its own.
TORCH ?= torch==2.13.0

.PHONY: setup system-deps demo test check lint pytest bench clean

# Two distributions: the agent (agent/, what a training job installs) and the viewer, which
# depends on it. The agent's editable install compiles its C kernel in place: rebuild when it changes.
# `make demo` needs only these; `make test` adds the test extra (transformers, Lightning, linters).
# Quiet: pip's -q, and no build-backend warnings (setuptools boxes every editable install).
PIP := PYTHONWARNINGS=ignore $(PY) -m pip install -q --disable-pip-version-check
$(VENV)/.base: pyproject.toml agent/pyproject.toml agent/setup.py agent/icsmon_agent/_fused.c
	@echo "icsmon: setting up $(VENV) (CPU torch, the agent, the viewer; a minute or two the first time)"
	@python3 -m venv $(VENV)
	@$(PIP) --upgrade pip
	@# An old build would hide a kernel that no longer compiles (the extension is optional).
	@rm -f agent/icsmon_agent/_fused.*.so
	@$(PIP) "$(TORCH)" -e ./agent
	@$(PIP) -e .
	@touch $@

$(VENV)/.ready: $(VENV)/.base pyproject.toml
	@echo "icsmon: adding the test extra (transformers, Lightning, pytest, linters)"
	@$(PIP) -e ".[test]"
	@touch $@

setup: $(VENV)/.ready

system-deps:
	./scripts/install-system-deps

demo: $(VENV)/.base
	@echo "icsmon: the command is $(VENV)/bin/icsmon (after \`. $(VENV)/bin/activate\`: icsmon)"
	@$(VENV)/bin/icsmon demo

lint: setup
	$(VENV)/bin/ruff check agent icsmon tests benchmarks
	$(VENV)/bin/ruff format --check agent icsmon tests benchmarks
	$(VENV)/bin/mypy

# A file's tests stay on one worker (--dist loadfile): module fixtures such as the sshd start once.
pytest: setup system-deps
	$(PY) -m pytest -n auto --dist loadfile

test: lint pytest

# The quick loop while changing the code: lint and the tests not marked slow.
check: lint
	$(PY) -m pytest -n auto --dist loadfile -m "not slow" -q

bench: setup
	$(PY) benchmarks/overhead.py
	$(PY) benchmarks/viewer.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis build dist *.egg-info \
		agent/build agent/*.egg-info agent/icsmon_agent/_fused.*.so
