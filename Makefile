# `make test` and `make demo` set everything up themselves: a virtual
# environment in .venv with torch 2.14.1, then an editable build of the
# extension (CPU kernels always; CUDA kernels when nvcc is found).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1
export CUDA_HOME ?= /usr/local/cuda
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0
export DENSENET_EFFICIENT_CUDA ?= $(if $(wildcard $(CUDA_HOME)/bin/nvcc),1,0)
export MAX_JOBS ?= $(shell nproc)

# Second environment: the CPU-only torch build, proving the install path
# without CUDA (setup.py must then build the CPU kernels only).
CPU_VENV ?= .venv-cpu
CPU_TORCH ?= torch==2.13.0
CPU_SRC := build/cpu-only-src
# The suites that need nothing beyond torch, numpy and pytest: run against the
# CPU-only build too, since PyTorch versions differ in their operator plumbing.
CPU_TESTS := test_smoke.py test_block_parity.py test_ops.py test_memory.py test_amp.py test_errors.py test_block_gradcheck.py test_launch_plan.py test_operator_count.py test_spatial_dims.py test_fused.py test_info.py test_channels_last.py test_second_order.py

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)

# torch 2.11.0: the oldest torch pyproject.toml admits and the GPU machine's.
# Its wheel (a CUDA build, 530 MB) is downloaded once into MIN_TORCH_DIR and
# serves twice: its headers for check-cxx17, the wheel itself for the
# min-torch-suites environment.
MIN_TORCH ?= torch==2.11.0
MIN_TORCHVISION ?= torchvision==0.26.0
MIN_TORCH_DIR := build/$(subst ==,-,$(MIN_TORCH))
# torch 2.11 builds extensions as C++17; the torch here needs C++20. This
# compiles every C++ source as C++17 against 2.11's headers.
CXX17_DIR := build/cxx17
# Third environment: that torch, running the core suites on the CPU, plus the
# GPU script's CPU rehearsal and (collected, skipped without a GPU) the CUDA
# tests, which catch import and API slips against 2.11.
MIN_TORCH_VENV ?= .venv-min-torch
MIN_TORCH_SRC := build/min-torch-src
MIN_TORCH_TESTS := $(CPU_TESTS) test_gpu_suite.py test_cuda.py

.PHONY: test demo bench build cpu-smoke min-torch-suites min-torch-wheel check-cxx17 check-cuda-arch clean

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "setuptools>=64,<82" wheel
	$(PY) -m pip install -q $(TORCH_PACKAGES) pytest pytest-timeout numpy ninja matplotlib pytest-benchmark scikit-learn timm monai onnx onnxscript onnxruntime
	touch $@

$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q -ra --junitxml=test-results/junit.xml tests

demo: build
	$(PY) -m densenet_efficient bench

# CPU micro-benchmarks (pytest-benchmark); the JSON, with machine info, goes
# to benchmarks/results/.
bench: build
	$(PY) -m pytest -q -p no:cacheprovider -o python_files='bench_*.py' benchmarks \
	  --benchmark-only --benchmark-columns=min,median,max,rounds --benchmark-sort=name \
	  --benchmark-json=benchmarks/results/cpu-microbench-$$(date -u +%Y-%m-%d).json

# $(call installed_suites,VENV,PACKAGES,SRC,BUILD ENV,TESTS): installs
# PACKAGES (torch and test tools) into VENV (created on first use), builds a
# copy of the tree in SRC (so the editable build above is left alone) under
# `env BUILD ENV`, and runs TESTS against the installed package, from outside
# the tree (tests/conftest.py is still found: it sits beside the tests).
define installed_suites
	test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade "setuptools>=64,<82" wheel
	$(1)/bin/python -m pip install -q $(2) pytest numpy ninja
	rm -rf $(3) && mkdir -p $(3)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(3)
	cd $(3) && env $(4) $(abspath $(1))/bin/python -m pip install -q --no-build-isolation --no-deps .
	cd /tmp && $(abspath $(1))/bin/pytest -q -p no:cacheprovider $(addprefix $(abspath tests)/,$(5))
endef

# The smoke test and the core suites against the CPU-only torch, setup.py
# choosing the CPU-only build by itself.
cpu-smoke:
	$(call installed_suites,$(CPU_VENV),$(CPU_TORCH),$(CPU_SRC),-u DENSENET_EFFICIENT_CUDA,$(CPU_TESTS))

# The core suites against the oldest torch we support (the GPU machine's), on
# the CPU: its CUDA build runs there; our CUDA sources are left out of this
# build (check-cxx17 compiles them against its headers).
min-torch-suites: min-torch-wheel
	$(call installed_suites,$(MIN_TORCH_VENV),$(MIN_TORCH_DIR)/torch-*.whl $(MIN_TORCHVISION) pytest-timeout,$(MIN_TORCH_SRC),DENSENET_EFFICIENT_CUDA=0,$(MIN_TORCH_TESTS))

min-torch-wheel:
	ls $(MIN_TORCH_DIR)/torch-*.whl >/dev/null 2>&1 || \
	  $(PYTHON) -m pip download -q --no-deps -d $(MIN_TORCH_DIR) $(MIN_TORCH)

check-cxx17: $(VENV)/.installed min-torch-wheel
	test -d $(CXX17_DIR)/torch/include || \
	  unzip -q -o $(MIN_TORCH_DIR)/torch-*.whl 'torch/include/*' -d $(CXX17_DIR)
	set -e; includes="-I$(CXX17_DIR)/torch/include -I$(CXX17_DIR)/torch/include/torch/csrc/api/include \
	  -I$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])")"; \
	for f in csrc/*.cpp csrc/cpu/*.cpp; do $(CXX) -std=c++17 -fsyntax-only -fopenmp $$includes $$f; done; \
	if [ -x $(CUDA_HOME)/bin/nvcc ]; then \
	  cuda_libraries=$$(ls -d $$($(PY) -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")/nvidia/*/include | sed 's/^/-I/'); \
	  for f in $(wildcard csrc/cuda/*.cu); do \
	  $(CUDA_HOME)/bin/nvcc -std=c++17 -arch=sm_90 -c $$f -o $(CXX17_DIR)/cuda-check.o $$includes $$cuda_libraries; done; fi
	@echo "C++17 against $(MIN_TORCH) headers: ok"

# The built extension must carry machine code for every architecture asked for.
check-cuda-arch: build
	set -e; so=$$(ls densenet_efficient/_C*.so); \
	cuobjdump=$$($(PY) -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))"); \
	elfs=$$($$cuobjdump -lelf $$so); echo "$$elfs"; \
	for arch in $$(echo "$(TORCH_CUDA_ARCH_LIST)" | tr ';' ' ' | tr -d .); do \
	  echo "$$elfs" | grep -q "sm_$$arch" || { echo "sm_$$arch missing from $$so"; exit 1; }; done

clean:
	rm -rf build $(CPU_SRC) densenet_efficient/*.so test-results $(VENV)/.built
