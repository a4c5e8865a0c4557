# The README's two commands: `make demo` and `make test`. Both create .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel by default; for CUDA: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= all

.PHONY: install demo test test-slow bench clean pipeline kind-demo

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

# training.overwrite=true: a re-run replaces the previous demo (a run dir with checkpoints is otherwise refused)
demo: install
	$(PY) -m vishwamai.training_v2 +experiment=demo hydra.run.dir=outputs/demo training.overwrite=true

test: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# Every benchmark script (bench/_*.py are shared helpers); each appends to bench/RESULTS.md.
bench: install
	for b in $(filter-out bench/_%,$(wildcard bench/*.py)); do $(PY) $$b || exit 1; done

# Kubeflow: the compiled pipeline, and the PyTorchJob on a local kind cluster (needs Docker, kind, kubectl).
pipeline: install
	$(VENV)/bin/vishwamai-pipeline compile --output outputs/vishwamai-pipeline.yaml

kind-demo:
	scripts/kind-demo.sh

clean:
	rm -rf outputs .pytest_cache
