# Forseti: the two set-up commands are `make demo` and `make test`. Both create .venv/ here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test typecheck lint bench clean

$(VENV)/.installed-dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q -e '.[dev]'
	touch $@

# The training extra needs torch: install the CPU build first, so that no CUDA build is
# resolved from scratch (several GB) when stable-baselines3 asks for torch.
$(VENV)/.installed-train: $(VENV)/.installed-dev
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,train]'
	touch $@

demo: $(VENV)/.installed-train
	$(PY) examples/demo.py

test: $(VENV)/.installed-train
	$(PY) -m ruff check .
	$(PY) tools/typecheck.py
	$(PY) -m pytest -q

# mypy, with the settings in pyproject.toml's [tool.mypy]. It needs the training extra: the
# trainer and the exporters are checked against torch's and stable-baselines3's types.
typecheck: $(VENV)/.installed-train
	$(PY) tools/typecheck.py

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench: $(VENV)/.installed-dev
	$(PY) -m benchmarks.bench_latency

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
