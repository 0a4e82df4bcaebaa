# The two commands of the README: `make run` and `make test`.
# Both create .venv if it is absent and install the package into it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= smoke
PYTEST_ARGS ?=

.PHONY: run test install lab clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstalled only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/dpo-lab run --profile $(PROFILE)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lab: install
	$(BIN)/python -m pip install --quiet -e ".[lab]"
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf build
