# Two commands: `make demo` (the main job on the bundled default) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := train,export,eval,dist,serve,dev

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m runtime.demo

test: install
	$(BIN)/python -m pytest

.PHONY: install demo test
