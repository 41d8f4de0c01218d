# medfed: two commands for a newcomer (see README.md).
#   make demo   set up .venv and run the demo (3 synthetic hospitals on real Flower processes)
#   make test   set up .venv and run the whole test suite (import contract + pytest)

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medfed-installed

.PHONY: demo test test-fast setup bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "medfed needs Python 3.11; found " + sys.version.split()[0]'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medfed demo

# Two pytest workers (pytest-xdist), one test file each at a time: a file's module-scoped
# cluster fixtures stay in one process, and CI's two cores are both busy. TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(BIN)/pytest -m "not integration and not slow"

bench: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,bench]'
	$(BIN)/python benchmarks/dp_epoch.py
	$(BIN)/python benchmarks/deid_throughput.py
	$(BIN)/python benchmarks/federated_overhead.py

clean:
	rm -rf $(VENV) .medfed .pytest_cache .hypothesis
