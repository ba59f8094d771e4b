# The project's commands. README: `make bench` runs the benchmark suite, `make test`
# runs the tests (after `make cuda-check`, the nvcc compile check of the CUDA kernels).
# Both create .venv, install torch==2.13.0 (the CPU wheel; never an unpinned torch,
# which pulls GBs of CUDA packages), and build the extension with --no-build-isolation
# against that torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
# Triton for the triton backend; without a GPU its kernels run under the interpreter.
TRITON ?= triton==3.9.0
NUMPY ?= numpy
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
SOURCES := $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cpp csrc/cuda/*.h csrc/cuda/*.cuh csrc/cuda/*.cu \
	csrc/cuda/emulation/*.cpp csrc/cuda/emulation/*.h)
# cmake from the machine, else from PyPI into the virtualenv.
CMAKE := $(shell command -v cmake 2>/dev/null || echo $(VENV)/bin/cmake)

.PHONY: install test test-lowest-torch gpu-check gpu-check-rehearsal gpu-wheels bench cmake-build cuda-check cuda-objects check clean emu-test sanitize sanitize-asan sanitize-tsan

$(VENV)/.deps: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH)" "$(TRITON)" "$(NUMPY)" matplotlib scikit-learn tqdm pytest pytest-benchmark hypothesis ninja "setuptools>=64" wheel
	touch $@

$(VENV)/.installed: $(VENV)/.deps setup.py pyproject.toml $(SOURCES)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

install: $(VENV)/.installed

$(VENV)/bin/cmake: $(VENV)/.deps
	$(PIP) install -q cmake

build/cmake/liblipkernels.so: $(VENV)/.deps $(CMAKE) CMakeLists.txt $(SOURCES)
	@mkdir -p build
	$(CMAKE) -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" $(CMAKE_CUDA_ARGS) > build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	$(CMAKE) --build build/cmake -j 2 >> build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)

cmake-build: build/cmake/liblipkernels.so

# ---- CUDA compile check: CI has nvcc but a CPU-only torch and no GPU, so the CUDA
# kernels are compiled here on their own (the .cu files include no torch header) for
# every architecture of NVCC_ARCHS, warnings as errors, with the half-type flags torch
# builds with; each object's per-architecture cubins are kept beside it
# (build/nvcc/<name>.sm_80.cubin, ...; tests/test_cuda.py checks them), and ptxas's
# report of every kernel's registers, spills and shared memory (build/nvcc/<name>.ptxas.txt,
# read by `lipkernels bench --gpu-model`). The binding
# (cuda/bindings.cpp), which needs torch's headers, gets a syntax check against the
# installed torch's headers. No nvcc: skipped with a message, or an error when
# LIPKERNELS_REQUIRE_NVCC=1 (CI sets it).
NVCC ?= $(shell command -v /usr/local/cuda/bin/nvcc 2>/dev/null || command -v nvcc 2>/dev/null)
NVCC_ARCHS ?= 80 90
CUDA_SOURCES := $(wildcard csrc/cuda/*.cu)
CUDA_OBJECTS := $(CUDA_SOURCES:csrc/cuda/%.cu=build/nvcc/%.o)
CUDA_HEADERS := $(wildcard csrc/cuda/*.h csrc/cuda/*.cuh) csrc/epilogue.h
NVCC_FLAGS := -std=c++17 -O3 -lineinfo $(foreach a,$(NVCC_ARCHS),-gencode arch=compute_$(a),code=sm_$(a)) \
	-Werror all-warnings -Xcompiler -Wall,-Wextra,-fPIC --expt-relaxed-constexpr \
	-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
	-D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__

# A CUDA torch's CMake config looks for the toolkit itself (the nvcc on PATH may be a
# wrapper script outside it): the toolkit of NVCC.
# A toolkit without NVRTC (nvcc alone, as here) gets the libnvrtc of torch's CUDA wheels.
CUDA_TOOLKIT := $(if $(NVCC),$(abspath $(dir $(NVCC))..))
CMAKE_CUDA_ARGS = $(if $(NVCC),-DCUDA_TOOLKIT_ROOT_DIR=$(CUDA_TOOLKIT) -DCMAKE_CUDA_COMPILER=$(NVCC) \
	$$(if [ ! -e $(CUDA_TOOLKIT)/lib64/libnvrtc.so ]; then $(PY) -c "import glob, os, torch; \
	d = os.path.dirname(os.path.dirname(torch.__file__)); \
	f = sorted(glob.glob(os.path.join(d, 'nvidia', '*', 'lib', 'libnvrtc.so.*'))); \
	print('-DCUDA_nvrtc_LIBRARY=' + f[0] if torch.version.cuda and f else '')"; fi))

cuda-check:
	@if [ -z "$(NVCC)" ] || ! command -v "$(NVCC)" >/dev/null 2>&1; then \
	  if [ "$$LIPKERNELS_REQUIRE_NVCC" = 1 ]; then \
	    echo "cuda-check: FAILED: nvcc not found (looked for NVCC='$(NVCC)', /usr/local/cuda/bin/nvcc, nvcc on PATH) and LIPKERNELS_REQUIRE_NVCC=1" >&2; \
	    exit 1; \
	  fi; \
	  echo "cuda-check: SKIPPED: nvcc not found (set NVCC=/path/to/nvcc; LIPKERNELS_REQUIRE_NVCC=1 makes this an error)"; \
	else \
	  echo "cuda-check: $(NVCC) ($$($(NVCC) --version | tail -1)) for $(foreach a,$(NVCC_ARCHS),sm_$(a))"; \
	  $(MAKE) --no-print-directory -j 2 cuda-objects; \
	fi

cuda-objects: $(CUDA_OBJECTS) build/nvcc/bindings.syntax-ok

build/nvcc/%.o: csrc/cuda/%.cu $(CUDA_HEADERS)
	@rm -rf build/nvcc/$*.keep build/nvcc/$*.sm_*.cubin && mkdir -p build/nvcc/$*.keep
	$(NVCC) $(NVCC_FLAGS) -Xptxas -v -keep -keep-dir build/nvcc/$*.keep -c $< -o $@.tmp 2> build/nvcc/$*.ptxas.tmp \
	  || (cat build/nvcc/$*.ptxas.tmp; exit 1)
	@grep -v "^ptxas info\|^    [0-9]* bytes stack" build/nvcc/$*.ptxas.tmp >&2 || true
	@mv build/nvcc/$*.ptxas.tmp build/nvcc/$*.ptxas.txt
	@for a in $(NVCC_ARCHS); do \
	  cubin=$$(ls build/nvcc/$*.keep/*_$$a.cubin 2>/dev/null | head -1); \
	  if [ -z "$$cubin" ]; then echo "cuda-check: no sm_$$a cubin from $<" >&2; exit 1; fi; \
	  cp "$$cubin" build/nvcc/$*.sm_$$a.cubin; \
	done
	@rm -rf build/nvcc/$*.keep
	@mv $@.tmp $@

# The c10/cuda headers of a CPU-only torch lack the generated cuda_cmake_macros.h: a
# stand-in with its one definition.
build/nvcc/bindings.syntax-ok: csrc/cuda/bindings.cpp csrc/cuda/kernels.h csrc/bindings_common.h csrc/binding_utils.h csrc/epilogue.h $(VENV)/.deps
	@mkdir -p build/nvcc/stub/c10/cuda/impl
	@printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > build/nvcc/stub/c10/cuda/impl/cuda_cmake_macros.h
	$(CXX) -std=c++20 -fsyntax-only -Wall -Wextra -Werror \
	  $$($(PY) -c 'from torch.utils.cpp_extension import include_paths; print(" ".join("-isystem " + p for p in include_paths()))') \
	  -isystem build/nvcc/stub -isystem "$$(dirname "$$(command -v $(NVCC))")/../include" csrc/cuda/bindings.cpp
	@touch $@

# -rs: every skipped test is listed with its reason (the GPU-only ones say they need CUDA).
# ---- The CUDA kernels emulated on the CPU (csrc/cuda/emulation/; README "The CUDA kernels
# without a GPU"): the same csrc/cuda/*.cu sources built as host C++ by CMake, as the
# `cuda` backend for CPU tensors, in three variants:
#   build/emu       plain (-O2), with the memory-access hooks that count traffic
#   build/emu-asan  AddressSanitizer + UndefinedBehaviorSanitizer
#   build/emu-tsan  ThreadSanitizer (every lane a TSan fiber: a missing __syncthreads is a race)
# A test run loads one with LIPKERNELS_LIBRARY (emu-test: testing only the cuda backend,
# LIPKERNELS_TEST_BACKENDS=cuda); a sanitizer's runtime is preloaded (python is not
# instrumented), and any report fails the run.
comma := ,
emu_sanitize = $(if $(filter emu-asan,$(1)),address$(comma)undefined,$(if $(filter emu-tsan,$(1)),thread,))
EMU_LIBS := build/emu/liblipkernels.so build/emu-asan/liblipkernels.so build/emu-tsan/liblipkernels.so
$(EMU_LIBS): build/%/liblipkernels.so: $(VENV)/.deps $(CMAKE) CMakeLists.txt $(SOURCES)
	@mkdir -p build
	$(CMAKE) -S . -B build/$* -DLIPKERNELS_CUDA_EMULATION=ON -DLIPKERNELS_SANITIZE="$(call emu_sanitize,$*)" \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" $(CMAKE_CUDA_ARGS) > build/$*.log 2>&1 || (cat build/$*.log; exit 1)
	$(CMAKE) --build build/$* -j 2 >> build/$*.log 2>&1 || (cat build/$*.log; exit 1)

emu_env = LIPKERNELS_LIBRARY=$(CURDIR)/build/$(1)/liblipkernels.so LIPKERNELS_TEST_BACKENDS=cuda
ASAN_RUNTIME = $$($(CXX) -print-file-name=libasan.so)
TSAN_RUNTIME = $$($(CXX) -print-file-name=libtsan.so)

# The CUDA suite and every per-backend suite, on the emulated kernels.
emu-test: install build/emu/liblipkernels.so
	$(call emu_env,emu) $(PY) -m pytest tests -q -rs -p no:cacheprovider

# ---- Sanitizers (CI runs `make sanitize` after `make test`). The build/emu-asan and
# build/emu-tsan libraries hold the CPU kernels and the output cache too, built with the
# same sanitizers.
# libstdc++ is preloaded with the runtime: python does not link it, and ASan's __cxa_throw
# interceptor, set up before a C++ extension loads it, would abort on the first C++ throw.
STDCXX_RUNTIME = $$($(CXX) -print-file-name=libstdc++.so)
ASAN_ENV = LD_PRELOAD="$(ASAN_RUNTIME) $(STDCXX_RUNTIME)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# Triton's own tests do not touch the library; the CUDA suite runs in the CUDA step.
CPU_SUITE_SKIP = --ignore=tests/test_cuda.py --ignore=tests/test_triton.py --ignore=tests/test_triton_compile.py

# AddressSanitizer + UndefinedBehaviorSanitizer: the whole CUDA suite on the emulated
# kernels, then the CPU test suite on the CPU kernels and the output cache.
# --capture=sys: a sanitizer writes its report to file descriptor 2 and ends the process,
# before pytest could print what it captured there; the report must reach the log.
SAN_PYTEST = -m pytest -q -rs -p no:cacheprovider --capture=sys
sanitize-asan: install build/emu-asan/liblipkernels.so
	$(ASAN_ENV) $(call emu_env,emu-asan) $(PY) $(SAN_PYTEST) tests/test_cuda.py
	$(ASAN_ENV) LIPKERNELS_LIBRARY=$(CURDIR)/build/emu-asan/liblipkernels.so LIPKERNELS_TEST_BACKENDS=cpu \
	  $(PY) $(SAN_PYTEST) tests $(CPU_SUITE_SKIP)

# ThreadSanitizer on a subset (-m tsan_subset): every CUDA kernel once with several blocks
# and a partial last block, and the CPU and emulated CUDA kernels called from several
# Python threads at once. OpenMP is not TSan-aware: torch and the CPU kernels run with one
# OpenMP thread (the concurrency comes from the Python threads).
sanitize-tsan: install build/emu-tsan/liblipkernels.so
	LD_PRELOAD=$(TSAN_RUNTIME) TSAN_OPTIONS=halt_on_error=1:exitcode=66 OMP_NUM_THREADS=1 \
	  LIPKERNELS_LIBRARY=$(CURDIR)/build/emu-tsan/liblipkernels.so \
	  $(PY) $(SAN_PYTEST) tests/test_cuda.py tests/test_concurrency.py -m tsan_subset

sanitize: sanitize-asan sanitize-tsan

test: cuda-check install cmake-build emu-test
	LIPKERNELS_REQUIRE_CMAKE=1 $(PY) -m pytest tests -q -rs
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -rs -m triton -p no:cacheprovider
	$(VENV)/bin/lipkernels bench --quick --no-save
	$(PY) -m pytest bench -q -rs --benchmark-disable -p no:cacheprovider

# ---- The lowest torch we declare (pyproject.toml), tested too: the GPU image's versions
# (Python 3.12, torch 2.11, Triton 3.6; README "Tested versions"). `make test` on a copy of
# this tree (build/lowest-torch/src: its own in-place extension, build/ and virtualenv),
# with the nvcc compile check's outputs copied in (they do not depend on torch). torch
# 2.11's PyPI wheel has CUDA (a few GB of CUDA libraries, about a minute to fetch), so
# this also builds the real CUDA kernels with setup.py and CMake against its headers, as
# the GPU machine will. numpy < 2.4: Triton 3.6's interpreter converts 1-element arrays to
# Python ints, an error since numpy 2.4 (Triton 3.9 no longer does).
# Python 3.12: on PATH, or pyenv's (whose shim fails unless 3.12 is selected); else python3.
LOWEST_PYTHON ?= $(shell for p in python3.12 $$(ls -d "$$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12 2>/dev/null); do \
	"$$p" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && { echo "$$p"; break; }; done)
LOWEST_TORCH ?= torch==2.11.0
LOWEST_TRITON ?= triton==3.6.0
LOWEST_NUMPY ?= numpy<2.4
LOWEST_DIR := build/lowest-torch
test-lowest-torch: cuda-check
	@if [ -z "$(LOWEST_PYTHON)" ]; then echo "test-lowest-torch: no Python 3.12 found (set LOWEST_PYTHON=...)" >&2; exit 1; fi
	@echo "test-lowest-torch: $(LOWEST_TORCH), $(LOWEST_TRITON), $$($(LOWEST_PYTHON) --version) ($(LOWEST_PYTHON))"
	@mkdir -p $(LOWEST_DIR)/src/build
	git ls-files -co --exclude-standard -z | tar --null -T - -cf - | tar -xf - -C $(LOWEST_DIR)/src
	@if [ -d build/nvcc ]; then rm -rf $(LOWEST_DIR)/src/build/nvcc && cp -a build/nvcc $(LOWEST_DIR)/src/build/; fi
	$(if $(NVCC),CUDA_HOME="$$(dirname "$$(dirname "$(NVCC)")")") \
	$(MAKE) --no-print-directory -C $(LOWEST_DIR)/src test PYTHON="$(LOWEST_PYTHON)" VENV="$(CURDIR)/$(LOWEST_DIR)/venv" \
	  TORCH="$(LOWEST_TORCH)" TRITON="$(LOWEST_TRITON)" NUMPY="$(LOWEST_NUMPY)"

# ---- make gpu-check: the first run of both GPU backends on a bare GPU machine, at most
# 7 minutes (tools/gpu_check.py; README "Checking the GPU backends"), with the machine's
# own Python and torch (GPU_PYTHON). Results: bench/results/gpu-check-<gpu>-<date>/, or
# GPU_CHECK_OUT. Rehearsed without a GPU by make gpu-check-rehearsal.
# make gpu-wheels: the test modules as Python 3.12 wheels in .device/wheels, for a GPU
# machine without network (the device tool carries .device/wheels).
GPU_PYTHON ?= python3
GPU_CHECK_OUT ?=
GPU_WHEELS := pytest hypothesis "numpy<2.4" setuptools wheel ninja tqdm matplotlib
gpu-check:
	$(GPU_PYTHON) tools/gpu_check.py $(if $(GPU_CHECK_OUT),--out "$(GPU_CHECK_OUT)")

# The rehearsal without a GPU: a virtualenv with the GPU image's torch, Triton and Python
# only (the test modules come from .device/wheels, as there), then make gpu-check with it.
REHEARSAL_VENV := build/gpu-rehearsal/venv
gpu-check-rehearsal: gpu-wheels
	@if [ -z "$(LOWEST_PYTHON)" ]; then echo "gpu-check-rehearsal: no Python 3.12 found" >&2; exit 1; fi
	@[ -x $(REHEARSAL_VENV)/bin/python ] || { $(LOWEST_PYTHON) -m venv $(REHEARSAL_VENV) && \
	  $(REHEARSAL_VENV)/bin/python -m pip install -q "$(LOWEST_TORCH)" "$(LOWEST_TRITON)"; }
	$(MAKE) --no-print-directory gpu-check GPU_PYTHON=$(REHEARSAL_VENV)/bin/python

gpu-wheels:
	$(PYTHON) -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  --platform any -d .device/wheels $(GPU_WHEELS)
	@du -sh .device/wheels

# The benchmark suite: prints the table, writes bench/results/<device>-<date>.json and .png.
bench: install
	$(VENV)/bin/lipkernels bench

check: install
	$(VENV)/bin/lipkernels check

clean:
	rm -rf build $(VENV) lipkernels/_C*.so *.egg-info
