# Forseti: the two set-up commands are `make demo` and `make test`. Both create .venv/ here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: demo test typecheck lint bench clean lock native native-deps test-native

# Every install comes from requirements.lock: each direct and transitive dependency pinned with
# its sha256 hashes (CPU torch included, from the machine's wheel folder), then the project itself
# without resolving anything. Refresh the lock with `make lock` after changing pyproject.toml.
LOCK_EXTRAS := --extra dev --extra train --extra load --extra native
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --require-hashes --no-deps -r requirements.lock
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

# Kept as names for the targets below and for anyone used to them.
$(VENV)/.installed-dev $(VENV)/.installed-train: $(VENV)/.installed
	touch $@

# pip-tools (pip's own resolver, so it sees the CPU torch wheel on this machine's disk) in a
# throwaway environment; --no-emit-index-url keeps machine paths out of the lock.
lock:
	$(PYTHON) -m venv build/lock-tools
	build/lock-tools/bin/pip install -q pip-tools==7.6.2
	build/lock-tools/bin/pip-compile -q --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --all-build-deps $(LOCK_EXTRAS) -o requirements.lock pyproject.toml

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
