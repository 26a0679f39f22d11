# `make repro` and `make test` set up .venv themselves: a fresh clone needs only Python and make.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed
# Stage commands in dvc.yaml call `python`: make it the virtual environment's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv repro test test-fast lint format bench mutants promote report stack clean

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	touch $@

repro: $(INSTALLED)
	dvc repro

test: $(INSTALLED)
	pytest --durations=0 --durations-min=1.0

test-fast: $(INSTALLED)
	pytest -m "not slow"

lint: $(INSTALLED)
	ruff format --check .
	ruff check .

format: $(INSTALLED)
	ruff format .
	ruff check --fix .

bench: $(INSTALLED)
	dvc repro preprocess
	python -m pipeline.bench

# Mutation testing of the maths, the evaluation and the training step (config: pyproject.toml).
mutants: $(INSTALLED)
	rm -rf mutants
	mutmut run --max-children 2 || true
	mutmut results

promote: $(INSTALLED)
	python -m pipeline promote

# Markdown for a pull request: params and metrics against REV, the lab's curve, the registry.
REV ?= HEAD
report: $(INSTALLED)
	python -m pipeline report --rev $(REV) --check

# PostgreSQL, SeaweedFS (S3) and an MLflow server on 127.0.0.1, state in .stack/; Ctrl-C stops them.
stack: $(INSTALLED)
	python -m pipeline stack

clean:
	rm -rf checkpoints mutants .pytest_cache .ruff_cache
