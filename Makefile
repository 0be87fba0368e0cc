# ws_d2's entry points. Every target sets up the environment it needs (`.venv`, see tools/setup_env.py).
# Use an existing interpreter (e.g. with a full detectron2 build) instead of .venv: make test PYTHON=/path/to/python
VENV := .venv
ifdef PYTHON
ENV_STAMP := .env-$(subst /,_,$(PYTHON)).stamp
SETUP_ARGS := --python $(PYTHON)
else
PYTHON := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.ws_d2-setup.stamp
SETUP_ARGS := --venv $(VENV)
endif

.PHONY: env test test-quick lint format quickstart benchmark cuda-check clean

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
	$(PYTHON) -m pytest -q tests

test-quick: env
	$(PYTHON) -m pytest -q -m "not slow" tests

quickstart: env
	$(PYTHON) tools/quickstart.py

benchmark: env
	$(PYTHON) tools/benchmark.py

# on a GPU machine: the CUDA tests, the benchmark at fp32/fp16/bf16, AMP training via torchrun, export (< 10 min)
cuda-check: env
	$(PYTHON) tools/cuda_check.py

clean:
	rm -rf $(VENV) .env-*.stamp output
