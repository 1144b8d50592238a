# The two commands: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= ./config.toml
# Most tests wait on real engines, servers and terminals rather than compute: with two workers the two cores
# sat idle a third of the run (12 min); four keep them busy (9 min). A test file stays on one worker; each
# worker has its own embedded PostgreSQL. PYTEST_PARALLEL= runs serially.
PYTEST_PARALLEL ?= -n 4 --dist loadfile

.PHONY: run test lint format install clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the package metadata changes (editable install: code changes need nothing).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

# The engine and its dashboard on ./config.toml (sim venue, embedded PostgreSQL).
run: $(VENV)/.installed
	$(BIN)/tsbot-tui --config $(CONFIG)

test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_PARALLEL)

format: $(VENV)/.installed-dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-venv:
	rm -rf $(VENV)
