# Quick start: `make demo`, then `make test`. Everything installs into .venv from requirements-dev.lock
# (the runtime pins of requirements.lock plus the development tools).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.lock requirements-dev.lock pyproject.toml | cksum | cut -d' ' -f1)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo run superuser test test-cluster lint format bench bench-quick soak clean

$(STAMP): requirements.lock requirements-dev.lock pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -r requirements-dev.lock
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

## demo: tickets change, events flow through the outbox and NATS, a listener updates its copy
demo: install
	$(PY) scripts/demo.py

## run: web (admin on 127.0.0.1:8000), relay worker + beat, listeners, with the demo's fallbacks; Ctrl-C stops all
run: install
	$(PY) scripts/run.py

superuser: install
	VAR_DIR=$${VAR_DIR:-var/run} DJANGO_DEV=1 $(PY) manage.py createsuperuser

## test: the whole suite against real PostgreSQL, Redis and NATS JetStream
test: install
	bash scripts/services.sh
	$(PY) -m pytest -q

## test-cluster: only the 3-node NATS cluster tests (they are part of make test too)
test-cluster: install
	bash scripts/services.sh
	$(PY) -m pytest -q tests/test_cluster.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	DJANGO_DEV=1 $(VENV)/bin/mypy
	DJANGO_DEV=1 $(PY) manage.py outbox_schema --check ticketing/contracts.json

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## bench: every benchmark, JSON to benchmarks/results/latest.json, a chart and a table
bench: install
	bash scripts/services.sh
	$(PY) benchmarks/run_all.py

bench-quick: install
	bash scripts/services.sh
	$(PY) benchmarks/run_all.py --quick

## soak: the fault suite with more events and more kills (minutes)
soak: install
	bash scripts/services.sh
	SOAK=1 $(PY) -m pytest -q tests/faults

clean:
	rm -rf var .pytest_cache benchmarks/results/*.tmp
