# ws_d2's entry points. Every target sets up the environment it needs (`.venv`, see tools/setup_env.py).
# Use an existing interpreter (e.g. with a full detectron2 build) instead of .venv: make test PYTHON=/path/to/python
# The suite against another detectron2 in front of the environment's: make test-d2main D2_DIR=/dir/holding/detectron2
VENV := .venv
ifdef PYTHON
ENV_STAMP := .env-$(subst /,_,$(PYTHON)).stamp
SETUP_ARGS := --python $(PYTHON)
else
PYTHON := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.ws_d2-setup.stamp
SETUP_ARGS := --venv $(VENV)
endif

.PHONY: env test test-quick test-d2main lint format quickstart benchmark cuda-check clean

# the suite in TEST_WORKERS processes (pytest-xdist; each test file on one, each on one thread: tests/conftest.py);
# TEST_WORKERS=0 runs it in make's own pytest process
TEST_WORKERS ?= 2
PYTEST = $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# test-d2main: D2_DIR holds a `detectron2` package (e.g. a source checkout built in place); when it has none,
# detectron2 main is built there with its compiled ops (~2 min on 2 cores) from D2_SRC
D2_SRC ?= ../shared/detectron2-main-02b5c4e2.tar.gz
D2_DIR ?= $(or $(TMPDIR),/tmp)/ws_d2-detectron2-main

env: $(ENV_STAMP)

$(ENV_STAMP): requirements.txt setup.py tools/setup_env.py
	python3 tools/setup_env.py $(SETUP_ARGS)
	touch $@

lint: env
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

format: env
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

test: env lint
	$(PYTEST) tests

test-d2main: env
	test -d $(D2_DIR)/detectron2 || { test -f $(D2_SRC) || { echo "no detectron2 in $(D2_DIR), no $(D2_SRC)" >&2; \
		exit 1; }; MAX_JOBS=2 $(PYTHON) -m pip install -q --no-build-isolation --no-deps --target $(D2_DIR) $(D2_SRC); }
	PYTHONPATH=$(D2_DIR):$(CURDIR) $(PYTHON) -c "import detectron2; print('detectron2 from', detectron2.__path__[0])"
	PYTHONPATH=$(D2_DIR):$(CURDIR) $(PYTEST) tests

test-quick: env
	$(PYTEST) -m "not slow" tests

quickstart: env
	$(PYTHON) tools/quickstart.py

benchmark: env
	mkdir -p output
	$(PYTHON) tools/benchmark.py --output output/benchmark.json

# on a GPU machine: the CUDA tests, the benchmark at fp32/fp16/bf16, AMP training via torchrun, export (< 10 min)
cuda-check: env
	$(PYTHON) tools/cuda_check.py

clean:
	rm -rf $(VENV) .env-*.stamp output
