# decisionflow: `make demo` and `make test` work on a fresh machine; every target installs what it needs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
DATA   ?= .data
JARS   := $(DATA)/jars
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=
# The system tests (one chain on one stack) run on one worker while the other takes unit + integration.
TEST_WORKERS ?= 2

export DECISIONFLOW_HOME := $(CURDIR)
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: help install system-deps jars demo up down status logs env settings test test-unit test-integration \
        test-system test-pending lock bench clean

help: ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

install: system-deps $(STAMP) jars ## venv from requirements.lock, provider installed editable, Maven jars

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install -q uv
	$(BIN)/uv pip install -q -p $(BIN)/python -r requirements.lock
	$(BIN)/uv pip install -q -p $(BIN)/python --no-deps -e .
	@touch $@

system-deps: ## Java 17, Maven, the PostgreSQL server and Redis (tests and the benchmark only) from apt when missing
	@missing=""; \
	command -v java >/dev/null || missing="$$missing openjdk-17-jre-headless"; \
	command -v mvn  >/dev/null || missing="$$missing maven"; \
	{ command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; } || missing="$$missing postgresql"; \
	command -v psql >/dev/null || missing="$$missing postgresql-client"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

jars: $(JARS)/.fetched ## Kafka broker and Spark connector jars from Maven Central (skipped when present)

$(JARS)/.fetched: jars/pom.xml
	rm -rf $(JARS)/kafka $(JARS)/spark
	mvn -q -B -f jars/pom.xml -P kafka-broker dependency:copy-dependencies -DoutputDirectory=$(abspath $(JARS))/kafka
	mvn -q -B -f jars/pom.xml -P spark-connectors dependency:copy-dependencies -DoutputDirectory=$(abspath $(JARS))/spark
	@touch $@

up: install ## start the local stack (idempotent) and wait for every component's health
	$(BIN)/decisionflow up

down: ## stop exactly what `make up` started
	@if [ -x $(BIN)/decisionflow ]; then $(BIN)/decisionflow down; else echo "nothing installed, nothing to stop"; fi

status: ## each component, its URL, health and memory
	@$(BIN)/decisionflow status

logs: ## last lines of every component's log (make logs C=kafka for one)
	@$(BIN)/decisionflow logs $(C)

env: ## shell exports for the airflow CLI against the local stack (eval them)
	@$(BIN)/decisionflow env

settings: ## reload airflow_settings.yaml into the running Airflow (no restart)
	$(BIN)/decisionflow settings load

demo: up ## install, start the stack and run the whole loop: seeded events -> ... -> decisions, summary + report
	$(BIN)/decisionflow demo $(DEMO_ARGS)

test: install ## unit, integration and system tests against real services (TEST_WORKERS pytest processes)
	$(BIN)/pytest tests -n $(TEST_WORKERS) --durations=25 $(PYTEST_ARGS)

test-unit: install
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test-integration: install
	$(BIN)/pytest tests/integration $(PYTEST_ARGS)

test-system: install
	$(BIN)/pytest tests/system $(PYTEST_ARGS)

test-pending: install ## tests written but not yet part of `make test` (see the `pending` marker)
	$(BIN)/pytest tests -m pending $(PYTEST_ARGS)

lock: ## re-resolve requirements.txt into requirements.lock
	@test -x $(BIN)/uv || $(BIN)/python -m pip install -q uv
	$(BIN)/uv pip compile -q -p $(BIN)/python requirements.txt -o requirements.lock

bench: install ## benchmarks (ratios measured side by side)
	@for b in bench/*.py; do [ -e "$$b" ] && $(BIN)/python $$b; done; true

clean: down ## remove all local state (databases, lake, logs) but keep the venv and jars
	find $(DATA) -mindepth 1 -maxdepth 1 ! -name jars -exec rm -rf {} +
