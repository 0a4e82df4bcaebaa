# The two commands of the README: `make run` and `make test`.
# Both create .venv if it is absent and install into it: torch first (the build that suits the
# machine, see scripts/install_torch.py), then the package with every other dependency at the
# version pinned in requirements/lock.txt.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PROFILE ?= smoke
PYTEST_ARGS ?=
# The torch the lock was compiled with and the tests last passed with. After changing it: `make lock`.
TORCH_VERSION ?= 2.13.0
LOCK   := requirements/lock.txt

.PHONY: run test install lab lock clean site site-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstalled only when one of these files changes, so a second `make run` starts at once.
$(VENV)/.installed: pyproject.toml $(LOCK) scripts/install_torch.py | $(BIN)/python
	$(BIN)/python scripts/install_torch.py $(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[test]"
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/dpo-lab run --profile $(PROFILE)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lab: install
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[lab]"
	$(BIN)/jupyter lab notebooks/

# The course site (README "Course site"): lessons + executed notebooks -> $(SITE_OUT)/html, built by
# Sphinx with MyST-NB. The notebooks' outputs come from SITE_NOTEBOOKS (what `make run` / `dpo-lab run`
# wrote); a notebook not there is shown without outputs. `make site-test` opens every page in headless
# Chromium (Debian: apt-get install chromium); it rebuilds first only when an input is newer.
SITE_NOTEBOOKS ?= build/notebooks
SITE_OUT ?= build/site
SITE_FLAGS ?=
SITE_INPUTS = $(wildcard lessons/*.md notebooks/*.ipynb $(SITE_NOTEBOOKS)/*.ipynb site/* site/_static/* \
  dpo_lab/*.py dpo_lab/*/*.py configs/*/*) scripts/build_site.py

$(VENV)/.site-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ".[site]"
	touch $@

$(SITE_OUT)/html/index.html: $(SITE_INPUTS) | $(VENV)/.site-installed
	$(BIN)/python scripts/build_site.py --notebooks $(SITE_NOTEBOOKS) --out $(SITE_OUT) $(SITE_FLAGS)

site: $(VENV)/.site-installed
	$(BIN)/python scripts/build_site.py --notebooks $(SITE_NOTEBOOKS) --out $(SITE_OUT) $(SITE_FLAGS)

site-test: $(SITE_OUT)/html/index.html
	DPO_LAB_SITE=$(SITE_OUT) $(BIN)/python -m pytest -n 0 tests/site $(PYTEST_ARGS)

# Refresh the lock: the newest versions that pyproject.toml allows, for every platform and
# Python >= 3.10 (uv's universal resolution), with torch held at TORCH_VERSION. torch and its CUDA
# wheels (nvidia-*, cuda-*, triton) are then left out: scripts/install_torch.py installs the build
# that suits the machine, and pip keeps it. `make lock LOCK_FLAGS=` keeps the current pins and only
# resolves what changed. uv is installed on demand into build/uv, apart from .venv.
# Afterwards: `make test`, and commit the lock if it passes.
LOCK_FLAGS ?= --upgrade
UV ?= build/uv/bin/uv
build/uv/bin/uv:
	$(PYTHON) -m venv build/uv
	build/uv/bin/python -m pip install --quiet uv

lock: $(UV)
	mkdir -p build/lock
	echo "torch==$(TORCH_VERSION)" > build/lock/torch.txt
	cp $(LOCK) build/lock/all.txt  # uv prefers the pins already in its output file
	$(UV) pip compile pyproject.toml --all-extras --universal --python-version 3.10 \
	  --constraint build/lock/torch.txt --annotation-style line --no-header $(LOCK_FLAGS) \
	  --output-file build/lock/all.txt
	{ echo "# Exact versions for make run, make test, .ci/run and environment.yml. Refresh: make lock."; \
	  echo "# Use as constraints: pip install -c requirements/lock.txt -e \".[test]\""; \
	  echo "# All dependencies of dpo-lab[test,lab], for any platform and Python >= 3.10, resolved with:"; \
	  echo "# torch==$(TORCH_VERSION)"; \
	  echo "# which is not listed below, nor its CUDA wheels (nvidia-*, cuda-*, triton):"; \
	  echo "# scripts/install_torch.py installs it first, as the CPU or CUDA build that suits the machine."; \
	  grep -Ev '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' build/lock/all.txt; } > $(LOCK)

clean:
	rm -rf build
