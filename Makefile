# Forseti: the two set-up commands are `make demo` and `make test`. Both create .venv/ here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test typecheck lint bench clean native native-deps test-native

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

# The native data plane (`forseti serve --data-plane native|auto`, docs/native.md): Debian's
# gRPC C++ and protobuf, pybind11 from PyPI; the extension is built in build/native and copied
# into the virtual environment. Optional: without it every data plane falls back to Python.
NATIVE_SO = $(shell $(PY) -c 'import sysconfig; print(sysconfig.get_paths()["platlib"])' 2>/dev/null)
native-deps:
	apt-get install -y -q libgrpc++-dev libprotobuf-dev protobuf-compiler cmake g++ pkg-config

native: $(VENV)/.installed-dev
	$(PIP) install -q 'pybind11>=2.12'  # pyproject.toml's `native` extra, without reinstalling
	cmake -S native -B build/native -DPython_EXECUTABLE=$(abspath $(PY)) \
		-Dpybind11_DIR=$$($(PY) -m pybind11 --cmakedir) $(NATIVE_CMAKE_ARGS)
	cmake --build build/native -j$${NATIVE_JOBS:-2}
	cp build/native/forseti_native*.so $(NATIVE_SO)/
	$(PY) -c 'import forseti_native; print("native data plane built:", forseti_native.__file__)'

# The protocol, stream, fuzz, swap, TLS, restricted-protocol, health and fault tests against the
# native data plane (the same files `make test` runs against the Python one): about 5 minutes.
NATIVE_TESTS = tests/test_native_dataplane.py tests/test_protocol.py tests/test_protocol_aio.py \
	tests/test_fuzz.py tests/test_swap_under_load.py tests/test_restricted_protocol.py \
	tests/test_tls.py tests/test_health.py tests/test_faults.py
test-native: native
	FORSETI_DATA_PLANE=native $(PY) -m pytest -q $(NATIVE_TESTS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
