# make run: set up .venv and serve the built-in demo models on :50051
# make test: set up .venv and run the test suite
# make docs: the docs site from docs/ into docs/_build/html (reference pages generated from the code)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint proto proto-check check image-check deploy-configs docs

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/torchwire serve

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/mypy

proto: install
	PYTHON=$(BIN)/python scripts/proto.sh

# deploy/kubernetes-admission/nginx.conf from deploy/nginx/torchwire.conf (tests check it is current).
deploy-configs: install
	$(BIN)/python scripts/admission_conf.py

proto-check: install
	PYTHON=$(BIN)/python scripts/proto.sh --check

# The reference pages from the code, then the site; a broken link or anchor fails the build.
docs: install
	$(BIN)/python scripts/docs_reference.py
	$(BIN)/sphinx-build -q -W --keep-going -n -b html docs docs/_build/html

check: proto-check lint test

# Build the Dockerfile with podman, run it read-only as non-root, check health, a request, SIGTERM.
image-check: install
	scripts/image-check.sh
