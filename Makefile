# NexCompute: `make run` starts everything locally; `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
TEST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/nexcompute
NEXCOMPUTE_SESSION_ENV ?= /var/tmp/nexcompute-session-env
export NEXCOMPUTE_SESSION_ENV
export DJANGO_SETTINGS_MODULE := nexcompute.settings

.PHONY: install run test lint format check-services session-env bench clean dist labextension

$(STAMP): requirements.txt requirements-dev.txt constraints.txt agent/pyproject.toml jupyter_ext/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt -c constraints.txt
	$(PIP) install -q --no-deps -e ./agent
	$(PIP) install -q --no-deps -e ./jupyter_ext
	@touch $(STAMP)

install: $(STAMP)
	@mkdir -p var/static
	@bash scripts/ensure-test-tools.sh

# No test tools (Chromium, xmlsec1, the npm IdP): a newcomer's first run needs none of them.
run: $(STAMP)
	@mkdir -p var/static
	$(PY) scripts/devserver.py

check-services:
	@bash scripts/ensure-services.sh

# The read-only Python environment sessions run Jupyter from (a minute or two the first time).
session-env:
	@scripts/make-session-env.sh $(NEXCOMPUTE_SESSION_ENV)

# The JupyterLab extension's JavaScript (jupyter_ext/js → jupyter_ext/nexcompute_jupyter/
# labextension, committed: installing needs no node). Needs node 18+ and npm; JupyterLab's
# core packages come from the session environment's jupyterlab.
labextension:
	@scripts/build-labextension.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .
	$(VENV)/bin/lint-imports --no-cache
	$(PY) manage.py makemigrations --check --dry-run --skip-checks
	$(VENV)/bin/mypy --strict --config-file agent/pyproject.toml agent/nexcompute_agent
	$(VENV)/bin/hadolint Dockerfile

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: install check-services lint session-env
	DATABASE_URL=$(TEST_DATABASE_URL) $(VENV)/bin/pytest $(PYTEST_ARGS)

bench: install check-services
	DATABASE_URL=$(TEST_DATABASE_URL) $(PY) bench/allocate.py

# The agent's wheel (agent only: it never imports Django) and the session environment's
# nexcompute-jupyter wheel, for lab computers:
#   pip install dist/nexcompute_agent-*.whl &&
#   nexcompute-agent install --jupyter-ext dist/nexcompute_jupyter-*.whl ...
dist: install
	rm -rf dist agent/build agent/*.egg-info jupyter_ext/build jupyter_ext/*.egg-info
	$(PIP) wheel -q --no-deps -w dist ./agent ./jupyter_ext
	rm -rf agent/build agent/*.egg-info jupyter_ext/build jupyter_ext/*.egg-info
	@ls dist/*.whl

clean:
	rm -rf $(VENV) var dist .pytest_cache .mypy_cache .ruff_cache
