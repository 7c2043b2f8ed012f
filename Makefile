# a3mailer-exporter: `make run` starts the exporter, `make test` runs every test.
# Both set up what they need on a fresh Debian machine (venv, Python packages;
# `make test` also the Debian packages of the real components).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LISTEN ?= 127.0.0.1:10587
STATE_DIR ?= .state

.PHONY: all install system-deps run test test-unit test-integration reliability bench bench-instructions generate lint clean

all: test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 needed"'
	@$(PYTHON) -m venv --help >/dev/null 2>&1 && $(PYTHON) -c 'import ensurepip' 2>/dev/null \
		|| bash scripts/install-system-deps.sh --python-only
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

run: $(STAMP)
	$(VENV)/bin/a3mailer-exporter run --listen $(LISTEN) --state-dir $(STATE_DIR)

test: $(STAMP) system-deps
	$(VENV)/bin/a3mailer-exporter generate --check
	$(PY) -m pytest -q -p no:cacheprovider

test-unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

test-integration: $(STAMP) system-deps
	$(PY) -m pytest -q tests/integration

reliability: $(STAMP) system-deps
	RELIABILITY_MODE=long $(PY) -m pytest -q -p no:cacheprovider tests/reliability
	$(PY) benchmarks/reliability_report.py

bench: $(STAMP) system-deps
	$(PY) benchmarks/run.py

bench-instructions: $(STAMP) system-deps
	$(PY) benchmarks/bench_instructions.py

generate: $(STAMP)
	$(VENV)/bin/a3mailer-exporter generate

lint: $(STAMP)
	$(VENV)/bin/ruff check exporter security tests benchmarks
	$(VENV)/bin/mypy exporter security

clean:
	rm -rf $(VENV) $(STATE_DIR) .pytest_cache .mypy_cache .ruff_cache
