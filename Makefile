# Set-up and the two jobs of the README. Everything installs into .venv from this repo's files;
# torch is pinned through constraints.txt (any other version would download gigabytes here).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install demo test clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml constraints.txt
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,md,cueq]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python train.py --config demo

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
