# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export WANDB_MODE ?= offline
export MUJOCO_GL ?= egl
export PYOPENGL_PLATFORM ?= egl
DEMO_DIR ?= runs/demo

.PHONY: venv test test-all demo lint clean

venv: $(VENV)/.installed

# torch first and pinned: on CPU machines this takes the local CPU wheel instead of a CUDA build.
$(VENV)/.installed: setup.py
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,sim]"
	bash tools/ensure_system_deps.sh
	touch $@

test: venv
	$(PY) -m pytest -q tests --durations=15

# Also the slow tests (reference TFRecord writer, long multi-rank runs).
test-all: venv
	$(PY) -m pytest -q tests --runslow

demo: venv
	$(PY) tools/demo.py --out $(DEMO_DIR)

lint: venv
	$(PY) -m ruff check lapa_dist launch tools tests

clean:
	rm -rf $(VENV) runs .pytest_cache
