# Two commands on a fresh clone: `make run` (the default job) and `make test` (the whole suite).
# Both create .venv if it is missing and install kdexp with its extras into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -e ".[dev,sweep,onnx,ray]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/kdexp $(ARGS)

# The suite runs on every core, at most 4 workers (pytest-xdist; most tests wait on kdexp
# subprocesses). JOBS=0 runs it in one process.
JOBS ?= auto --maxprocesses 4
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) --dist loadgroup $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check kdexp hydra_plugins tests bench
	$(BIN)/ruff format --check kdexp hydra_plugins tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/distill.py
	$(BIN)/python bench/prune.py
	$(BIN)/python bench/quantize.py
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/study_storage.py
	$(BIN)/python bench/nas.py

clean:
	rm -rf $(VENV) outputs/runs outputs/multirun
