# Two commands do everything (see README.md):
#   make run    install into .venv (when needed) and run the whole pipeline on the teaching toy
#   make tiny   the same on params/tiny.yaml (random weights: a smoke run of every code path)
#   make test   install into .venv (when needed) and run the test suite
#   make fast   the fast loop while developing: every test but notebooks and toy runs (< 1 minute)
#   make lock   refresh requirements.lock (exact versions of every dependency but torch) with pip-tools
# Any Python >= 3.10 works; set PYTHON=python3.11 to choose one.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is pinned for local installs (a CPU wheel where one is available); never torchvision.
TORCH  ?= torch==2.13.0
PARAMS ?= params/toy.yaml
STAMP  := $(VENV)/.hsr-installed

export HF_HUB_OFFLINE ?= 1
# tiny models on a few cores: one OpenMP thread avoids threads spinning against each other
run tiny test fast: export OMP_NUM_THREADS ?= 1

.PHONY: install run tiny test fast lock clean-runs

install: $(STAMP)

# The locked versions first (requirements.lock: every dependency but torch), then the project itself.
$(STAMP): pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "hsr needs Python >= 3.10, found " + sys.version.split()[0])'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

run: install
	$(BIN)/hsr run $(PARAMS)

tiny: install
	$(BIN)/hsr run params/tiny.yaml

test: install
	$(BIN)/python -m pytest

fast: install
	$(BIN)/python -m pytest -q -m "not notebooks and not slow"

lock: install
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip-tools
	$(BIN)/pip-compile --quiet --no-emit-index-url --no-emit-find-links --strip-extras --annotation-style=line \
		-o requirements.lock requirements.in

clean-runs:
	rm -rf runs
