# django-dbkeepalive developer tasks (GNU make). `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DRIVERS := mysqlclient pymysql connector connector-cext
comma := ,
PYTEST_ARGS ?=
APT_PACKAGES := mariadb-server libmariadb-dev pkg-config
# mariadbd lives in /usr/sbin, often not on a normal user's PATH.
export PATH := $(PATH):/usr/sbin:/usr/local/sbin

.PHONY: help deps venv test ha demo bench soak lint docs matrix corners clean

help: ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-7s %s\n", $$1, $$2}'
	@echo "  PYTEST_ARGS='-k kill -x' make test   passes arguments to pytest"

PY_OK := import sys; sys.exit(sys.version_info < (3, 10))

deps: ## check (as root: install) what the build and the tests need from the system
	@$(PYTHON) -c '$(PY_OK)' 2>/dev/null || { \
	  echo "$(PYTHON) is $$($(PYTHON) -V 2>&1 || echo missing): Python >= 3.10 is needed;" \
	    "run with PYTHON=/path/to/python3.10-or-newer (e.g. make test PYTHON=python3.12)"; \
	  exit 1; }
	@missing=""; pkgs=""; \
	for cmd in mariadbd mariadb-install-db pkg-config; do \
	  command -v $$cmd >/dev/null || { missing="$$missing $$cmd"; pkgs="$$pkgs $(APT_PACKAGES)"; }; \
	done; \
	pkg-config --exists libmariadb 2>/dev/null || mysql_config --version >/dev/null 2>&1 \
	  || { missing="$$missing libmariadb-headers"; pkgs="$$pkgs libmariadb-dev"; }; \
	command -v cc >/dev/null || { missing="$$missing cc"; pkgs="$$pkgs gcc"; }; \
	command -v redis-server >/dev/null || { missing="$$missing redis-server"; pkgs="$$pkgs redis-server"; }; \
	command -v haproxy >/dev/null || { missing="$$missing haproxy"; pkgs="$$pkgs haproxy"; }; \
	command -v mariadb >/dev/null || { missing="$$missing mariadb"; pkgs="$$pkgs mariadb-client"; }; \
	ls /usr/lib/galera/libgalera_smm.so /usr/lib/libgalera_smm.so >/dev/null 2>&1 \
	  || { missing="$$missing galera"; pkgs="$$pkgs galera-4"; }; \
	pg_ok() { { command -v initdb && command -v postgres; } >/dev/null 2>&1 \
	  || ls /usr/lib/postgresql/*/bin/initdb /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; }; \
	pg_ok || { missing="$$missing postgres"; pkgs="$$pkgs postgresql"; }; \
	$(PYTHON) -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
	  || { missing="$$missing Python.h"; pkgs="$$pkgs python3-dev"; }; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null \
	  || { missing="$$missing python3-venv"; pkgs="$$pkgs python3-venv"; }; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	pkgs=$$(echo $$pkgs | tr ' ' '\n' | sort -u | tr '\n' ' '); \
	echo "missing:$$missing"; \
	if [ "$$(id -u)" != 0 ]; then echo "run: sudo apt-get install -y $$pkgs"; exit 1; fi; \
	apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y $$pkgs || exit 1; \
	for cmd in mariadbd mariadb-install-db pkg-config cc redis-server haproxy mariadb; do \
	  command -v $$cmd >/dev/null || { echo "still missing after apt-get: $$cmd"; exit 1; }; \
	done; \
	pg_ok || { echo "still missing after apt-get: postgres (initdb, postgres)"; exit 1; }
# haproxy and galera-4 (with the mariadb client, which Galera's mysqldump state transfer
# calls) are for make ha: tests/haproxy.py, tests/galera.py start their own instances.
# Installing mariadb-server, redis-server (the Celery tests' broker) or postgresql may
# start the system service (postgresql: the system cluster on port 5432): harmless, the
# tests always start their own private servers on free ports and never use it. Debian
# puts initdb and postgres in /usr/lib/postgresql/<version>/bin, off PATH: the tests
# look there too (tests/postgres.py).

venv: $(VENV)/.installed ## create .venv and install the package with test, lint and docs extras

$(VENV)/.installed: setup.cfg pyproject.toml
	@$(MAKE) --no-print-directory deps
	@# A .venv left by an older or unsupported Python is made again.
	@if [ -x $(PY) ] && ! $(PY) -c '$(PY_OK)' 2>/dev/null; then \
	  echo "$(VENV) has $$($(PY) -V 2>&1): making it again with $(PYTHON)"; rm -rf $(VENV); fi
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e '.[test,lint,docs]'
	touch $@

# The sessions of tests/sessions.py: per driver the whole suite (Connector/Python: the
# guard's core), then the guard's core again with the guarded ENGINE and nothing
# patched; three at a time by default (each starts its own private servers; the suite
# mostly waits on sleeps and the network: measured on 2 cores, 3 at a time end about a
# minute sooner than 2, the two long sessions running beside the short ones).
# SERIAL=1 runs one after the other, with live output. Each MySQL driver's session also
# takes one PostgreSQL driver (mysqlclient's psycopg 3, PyMySQL's psycopg2). Coverage of
# the package (branches) is reported for all sessions combined.
SERIAL ?=
JOBS ?= $(if $(SERIAL),1,3)

test: venv ## run the tests with mysqlclient, PyMySQL, Connector/Python; coverage (SERIAL=1: one by one)
	$(PY) -m tests.sessions --jobs $(JOBS) --drivers $(subst $(eval) ,$(comma),$(DRIVERS)) -- $(PYTEST_ARGS)

HA_DRIVERS ?= mysqlclient pymysql
# Once per driver (HA_DRIVERS): tests/test_failover.py goes through Django, which uses DBK_DRIVER's.
# tests/test_topology_infra.py runs in the first pass only (it takes both drivers itself).
# Exit status 5 (no test selected, e.g. PYTEST_ARGS='-k' of infrastructure tests) is no failure.
ha: venv ## the topology tests with each driver: replication failover, HAProxy, a 3-node Galera cluster
	@status=0; skip=; for d in $(HA_DRIVERS); do \
	  DBK_DRIVER=$$d $(PY) -m pytest -m ha $$skip $(PYTEST_ARGS); rc=$$?; \
	  [ $$rc = 0 ] || [ $$rc = 5 ] || status=1; \
	  skip=--ignore=tests/test_topology_infra.py; \
	done; exit $$status

demo: venv ## run the demo (testproject/demo.py)
	$(PY) -m testproject.demo

bench: venv ## run the benchmarks
	$(PY) benchmarks/run.py

SOAK_SECONDS ?= 150
SOAK_DRIVERS ?= mysqlclient pymysql connector
# Then SOAK_FAILOVERS failovers of a replicated pair (soak/failover.py), with the app and
# with plain Django; 0 skips them. SOAK_FAILOVER_ARGS='--endpoint haproxy --json F' ...
SOAK_FAILOVERS ?= 5
SOAK_FAILOVER_ARGS ?=
soak: venv ## soak under faults SOAK_SECONDS (150) s, then SOAK_FAILOVERS (5) failovers, app and plain, per driver; not in make test
	@status=0; for d in $(SOAK_DRIVERS); do \
	  DBK_DRIVER=$$d $(PY) -m soak.run --seconds $(SOAK_SECONDS) $(SOAK_ARGS) || status=1; \
	  [ "$(SOAK_FAILOVERS)" = 0 ] || for m in app plain; do \
	    DBK_DRIVER=$$d $(PY) -m soak.failover --failovers $(SOAK_FAILOVERS) --mode $$m \
	      $(SOAK_FAILOVER_ARGS) || status=1; \
	  done; \
	done; exit $$status

# pyenv's interpreters, so tox finds python3.10 ... python3.13 (Django 6.x needs >= 3.12).
PYENV_BINS := $(subst $(eval) ,:,$(wildcard $(HOME)/.pyenv/versions/3.1[0-3]*/bin))

matrix: venv ## the tox matrix: Django 4.2-6.1 x Python 3.10-3.13 x both drivers
	$(PY) -m pip install -q "tox>=4.11"
	PATH="$(PYENV_BINS):$$PATH" $(VENV)/bin/tox run-parallel --parallel 2 --parallel-no-spinner $(TOX_ARGS)

# The corners of the matrix, run by .ci/run: the oldest and the newest Python x Django,
# each with each driver, and the lowest versions promised (env "minimum": Django 4.2.0,
# mysqlclient 1.4.3, PyMySQL 1.1.0, Connector/Python 8.3.0).
CORNERS := py310-django42-mysqlclient,py310-django42-pymysql,py313-django61-mysqlclient,py313-django61-pymysql,py310-minimum-mysqlclient,py310-minimum-pymysql,py310-minimum-connector

corners: venv ## the matrix's corners: oldest and newest Python x Django, lowest versions, each driver
	@for v in 3.10 3.13; do PATH="$(PYENV_BINS):$$PATH" command -v python$$v >/dev/null || { \
	  echo "python$$v is missing: the corners need Python 3.10 and 3.13 on PATH" \
	    "(e.g. pyenv install 3.10 3.13, or Debian/deadsnakes packages python3.10, python3.13)"; \
	  exit 1; }; done
	@$(MAKE) --no-print-directory matrix TOX_ARGS="-e $(CORNERS) $(TOX_ARGS)"

lint: venv ## ruff and mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy django_dbkeepalive

docs: venv ## build the documentation into docs/_build/html (warnings are errors)
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

clean: ## remove caches and build artifacts (keeps .venv)
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .tox docs/_build
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +
