# Two commands do all set-up on a fresh machine:
#   make demo   - the agent on a built-in simulated DGX Spark node
#   make test   - the whole test suite (installs the Debian tools it needs, then lint, types, tests)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup proto lint bench image
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

demo: setup
	$(VENV)/bin/sriov-rdma-agent demo

test: setup
	scripts/test.sh

proto: setup
	scripts/gen_protos.sh

lint: setup
	$(VENV)/bin/ruff check agent tests bench
	$(VENV)/bin/mypy agent
	$(VENV)/bin/lint-imports

# The image for linux/amd64 and linux/arm64 with buildah (docs/install-talos.md): IMAGE=..., PUSH=1,
# PYTHON_IMAGE=..., CA_BUNDLE=... (scripts/image/build.sh).
image:
	scripts/image/build.sh
