# The two commands of the README: `make demo` and `make test`.
# Both bootstrap .venv and install the project (idempotently) on a machine with only Python 3.11+.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint contracts types pytest chaos-quick chaos install bench stack-down clean browser

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
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
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium (apt) for the page test"; \
	    apt-get install -y -q chromium >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; }; \
	  else echo "chromium not found: install it (apt install chromium) for the page test"; fi; }

# pytest's exit code 5 means "no tests ran": that is a failure here, never a pass.
pytest: $(STAMP) browser
	@$(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

# The fault suite (docs/RELIABILITY.md) against the embedded stack, started if needed and
# stopped again if it started it: `make test` runs the short set, `make chaos` all of it
# (about half an hour) and rewrites the results in docs/RELIABILITY.md.
chaos-quick: $(STAMP)
	$(BIN)/flashsale chaos --quick

chaos: $(STAMP)
	$(BIN)/flashsale chaos --json chaos.json

test: lint contracts types pytest chaos-quick

# Benchmarks are not part of `make test`: they need a quiet machine and report ratios.
bench: $(STAMP)
	$(BIN)/flashsale dev up
	$(BIN)/flashsale bench all

stack-down: $(STAMP)
	$(BIN)/flashsale dev down

clean:
	-$(BIN)/flashsale dev down
	rm -rf $(VENV) .flashsale .mypy_cache .pytest_cache .ruff_cache
