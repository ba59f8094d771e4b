# The project's commands. README: `make bench` runs the benchmark suite, `make test`
# runs the tests. Both create .venv, install torch==2.13.0 (the CPU wheel; never an
# unpinned torch, which pulls GBs of CUDA packages), and build the extension with
# --no-build-isolation against that torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# Triton for the triton backend; without a GPU its kernels run under the interpreter.
TRITON ?= triton==3.9.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)
# cmake from the machine, else from PyPI into the virtualenv.
CMAKE := $(shell command -v cmake 2>/dev/null || echo $(VENV)/bin/cmake)

.PHONY: install test bench bench-quick cmake-build check clean

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)" "$(TRITON)" numpy pytest pytest-benchmark ninja "setuptools>=64" wheel
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

$(VENV)/bin/cmake: $(VENV)/.deps
	$(PIP) install -q cmake

build/cmake/liblipkernels.so: $(VENV)/.deps $(CMAKE) CMakeLists.txt $(SOURCES)
	@mkdir -p build
	$(CMAKE) -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" > build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	$(CMAKE) --build build/cmake -j 2 >> build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)

cmake-build: build/cmake/liblipkernels.so

test: install cmake-build
	LIPKERNELS_REQUIRE_CMAKE=1 $(PY) -m pytest tests -q
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -m triton -p no:cacheprovider
	$(PY) -m pytest bench -q --bench-quick -p no:cacheprovider

bench: install
	$(PY) -m pytest bench -q -p no:cacheprovider

check: install
	$(VENV)/bin/lipkernels check

clean:
	rm -rf build $(VENV) lipkernels/_C*.so *.egg-info
