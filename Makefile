# Quick start from a bare clone: `make test` (set up, then the tests) and `make bench` (set up, then the
# default benchmark suite). Setup makes .venv; it installs torch==2.13.0 (here a CPU build from a local file)
# only when no torch is importable — on a GPU machine the torch already installed is kept (the venv sees the
# system site-packages).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.t3d-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: setup build test test-fast bench lint cuda-check clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q setuptools wheel ninja pybind11 numpy "triton>=3.0" av tqdm rich matplotlib \
		pytest pytest-benchmark hypothesis ruff scikit-video onnx onnxscript onnxruntime
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $(STAMP)

build: setup
	$(PY) setup.py build_ext --inplace -q

test: setup
	$(PY) -m pytest -q -x tests

test-fast: setup
	$(PY) -m pytest -q -x -m "not slow" tests

bench: setup
	$(PY) -m benchmarks

lint: setup
	$(PY) -m ruff check t3d_kernels t3d benchmarks tests
	$(PY) -m ruff format --check t3d_kernels t3d benchmarks tests

# compile every .cu against torch's headers (object files only: a CPU torch cannot link or run them)
cuda-check: setup
	bash .ci/cuda_check.sh $(PY)

clean:
	rm -rf build *.egg-info t3d_kernels/_C*.so
