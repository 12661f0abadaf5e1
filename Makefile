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
CPU_TESTS := test_smoke.py test_block_parity.py test_ops.py test_memory.py test_amp.py test_errors.py test_block_gradcheck.py test_launch_plan.py test_operator_count.py test_spatial_dims.py test_fused.py test_info.py

SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cuda/*.cu csrc/cuda/*.cuh csrc/cuda/*.h)

# torch 2.11 (the GPU machine's) builds extensions as C++17; the torch here
# needs C++20. This compiles every C++ source as C++17 against 2.11's headers.
CXX17_TORCH ?= torch==2.11.0
CXX17_DIR := build/cxx17

.PHONY: test demo bench build cpu-smoke check-cxx17 check-cuda-arch clean

$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "setuptools>=64,<82" wheel
	$(PY) -m pip install -q $(TORCH_PACKAGES) pytest pytest-timeout numpy ninja matplotlib pytest-benchmark scikit-learn timm monai
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

# Builds a copy of the tree (so the editable build above is left alone) and
# runs the smoke test and the core suites against the installed package, from
# outside the tree.
cpu-smoke:
	test -x $(CPU_VENV)/bin/python || $(PYTHON) -m venv $(CPU_VENV)
	$(CPU_VENV)/bin/python -m pip install -q --upgrade "setuptools>=64,<82" wheel
	$(CPU_VENV)/bin/python -m pip install -q $(CPU_TORCH) pytest numpy ninja
	rm -rf $(CPU_SRC) && mkdir -p $(CPU_SRC)
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t $(CPU_SRC)
	cd $(CPU_SRC) && env -u DENSENET_EFFICIENT_CUDA $(abspath $(CPU_VENV))/bin/python -m pip install -q --no-build-isolation --no-deps .
	cd /tmp && $(abspath $(CPU_VENV))/bin/pytest -q -p no:cacheprovider $(addprefix $(abspath tests)/,$(CPU_TESTS))

check-cxx17: $(VENV)/.installed
	test -d $(CXX17_DIR)/torch/include || { \
	  mkdir -p $(CXX17_DIR) && \
	  $(PY) -m pip download -q --no-deps -d $(CXX17_DIR) $(CXX17_TORCH) && \
	  unzip -q -o $(CXX17_DIR)/torch-*.whl 'torch/include/*' -d $(CXX17_DIR); }
	set -e; includes="-I$(CXX17_DIR)/torch/include -I$(CXX17_DIR)/torch/include/torch/csrc/api/include \
	  -I$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['include'])")"; \
	for f in csrc/*.cpp csrc/cpu/*.cpp; do $(CXX) -std=c++17 -fsyntax-only -fopenmp $$includes $$f; done; \
	if [ -x $(CUDA_HOME)/bin/nvcc ]; then \
	  cuda_libraries=$$(ls -d $$($(PY) -c "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))")/nvidia/*/include | sed 's/^/-I/'); \
	  for f in $(wildcard csrc/cuda/*.cu); do \
	  $(CUDA_HOME)/bin/nvcc -std=c++17 -arch=sm_90 -c $$f -o $(CXX17_DIR)/cuda-check.o $$includes $$cuda_libraries; done; fi
	@echo "C++17 against $(CXX17_TORCH) headers: ok"

# The built extension must carry machine code for every architecture asked for.
check-cuda-arch: build
	set -e; so=$$(ls densenet_efficient/_C*.so); \
	cuobjdump=$$($(PY) -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))"); \
	elfs=$$($$cuobjdump -lelf $$so); echo "$$elfs"; \
	for arch in $$(echo "$(TORCH_CUDA_ARCH_LIST)" | tr ';' ' ' | tr -d .); do \
	  echo "$$elfs" | grep -q "sm_$$arch" || { echo "sm_$$arch missing from $$so"; exit 1; }; done

clean:
	rm -rf build $(CPU_SRC) densenet_efficient/*.so test-results $(VENV)/.built
