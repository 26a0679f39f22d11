# `make repro` and `make test` set up .venv themselves: a fresh clone needs only Python and make.
# .venv is installed from uv.lock (every package, version and hash), by a uv bootstrapped from PyPI.
PYTHON ?= python3
VENV := .venv
INSTALLED := $(VENV)/.installed
UV_VERSION := 0.13.9
UV_BOOTSTRAPPED := .tools/uv-$(UV_VERSION)/bin/uv
# UV=uv uses a uv already on PATH (CI's setup-uv, with its cache) instead of bootstrapping one.
UV ?= $(UV_BOOTSTRAPPED)
UV_NEEDED := $(filter $(UV_BOOTSTRAPPED),$(UV))
# uv finds Python, never downloads one; its cache (~/.cache/uv) makes a second clone's install fast.
export UV_PYTHON_DOWNLOADS := never
# Byte-compile at install: where PYTHONDONTWRITEBYTECODE is set (as in CI's image) every process
# would otherwise compile torch's and MLflow's sources again (`import torch, mlflow` 13.6 s -> 5.3 s).
export UV_COMPILE_BYTECODE := 1
# Stage commands in dvc.yaml call `python`: make it the virtual environment's.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: venv browser qemu repro test test-fast lint format bench mutants promote report stack paper sweep explore serve loadtest drift-power clean lock-check upgrade

venv: $(INSTALLED)

$(UV_BOOTSTRAPPED):
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --target $(dir $(@D)) uv==$(UV_VERSION)

# --locked: refuses, naming uv.lock, when pyproject.toml and the lock disagree (run `$(UV) lock`).
$(INSTALLED): pyproject.toml uv.lock | $(UV_NEEDED)
	$(UV) sync --locked --extra dev --python $(PYTHON) --quiet
	touch $@

lock-check: $(UV_NEEDED)
	$(UV) lock --check

# Newer releases of every dependency within pyproject.toml's ranges, then the whole pipeline again;
# says whether the committed results still reproduce (git diff of dvc.lock, metrics and plots).
upgrade: $(UV_NEEDED)
	$(UV) lock --upgrade
	$(UV) sync --locked --extra dev --python $(PYTHON) --quiet && touch $(INSTALLED)
	dvc repro --force-downstream
	@git diff --quiet -- dvc.lock metrics plots reports \
		&& echo "upgrade: the committed results reproduce with the new lock" \
		|| { git diff --stat -- dvc.lock metrics plots reports; \
		     echo "upgrade: the results changed (above); commit uv.lock with them, or git checkout uv.lock"; }

# --force-downstream: in exact mode a rerun of train often writes the same bytes, and DVC would
# then skip evaluate, whose MLflow side (the run's test metrics, the registry) a fresh store lacks.
repro: $(INSTALLED)
	dvc repro --force-downstream

test: $(INSTALLED) browser qemu lock-check
	pytest --durations=0 --durations-min=1.0

# The explorer's browser test drives Debian's Chromium (Playwright's own download is not reachable).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get install -y -q chromium \
		|| { apt-get update -q && apt-get install -y -q chromium; }; }; } \
		|| echo "no Chromium installed: the explorer's browser test will say so and skip"

# The exact-mode test runs a piece of training on an emulated CPU of the other vendor (Debian's qemu-user).
qemu:
	@command -v qemu-x86_64 >/dev/null || { [ "$$(id -u)" = 0 ] && { apt-get install -y -q qemu-user \
		|| { apt-get update -q && apt-get install -y -q qemu-user; }; }; } \
		|| echo "no qemu-user installed: the exact-mode test will say so and skip"

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
	mnist-vae bench

# Mutation testing of the maths, the evaluation and the training step (config: pyproject.toml).
mutants: $(INSTALLED)
	rm -rf mutants
	mutmut run --max-children 2 || true
	mutmut results

promote: $(INSTALLED)
	mnist-vae promote

# Markdown for a pull request: params and metrics against REV, the lab's curve, the registry.
REV ?= HEAD
report: $(INSTALLED)
	mnist-vae report --rev $(REV) --check

# Burda et al. (2016), Table 1 (86.76 nats): their protocol (pipeline/presets/burda2015.yaml) as a
# DVC experiment (docs/paper.md); run it again to resume.
PAPER_NAME ?= burda2015
PAPER_EPOCHS ?= 3280
PAPER_K ?= 5000
paper: $(INSTALLED)
	mnist-vae paper --name $(PAPER_NAME) --epochs $(PAPER_EPOCHS) --k $(PAPER_K)

# An Optuna study (params.yaml's sweep section); run it on more machines with --storage to share it.
sweep: $(INSTALLED)
	dvc repro preprocess
	mnist-vae sweep

# The latent-space explorer on http://127.0.0.1:7860, for the registry's @champion.
explore: $(INSTALLED)
	mnist-vae explore

# The champion over MLflow's /invocations on 127.0.0.1:5001 (limits: params.yaml's serve section).
serve: $(INSTALLED)
	mnist-vae serve

# A bounded load test of `serve` (a fixed number of requests, then it stops): docs/serving.md.
loadtest: $(INSTALLED)
	mnist-vae loadtest

# The drift monitor's false alarms and power on shifted test digits, for @champion (docs/monitoring.md).
drift-power: $(INSTALLED)
	mnist-vae drift-power

# PostgreSQL, SeaweedFS (S3) and an MLflow server on 127.0.0.1, state in .stack/; Ctrl-C stops them.
stack: $(INSTALLED)
	mnist-vae stack

clean:
	rm -rf checkpoints mutants .pytest_cache .ruff_cache .tools
