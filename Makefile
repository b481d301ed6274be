# Two commands do all the set-up on a fresh Debian machine:
#   make demo   - build the demo guest, protect it, kill the primary, watch the backup take over
#   make test   - the test suite (real QEMU guests, daemons as separate processes)
PYTHON ?= python3
VENV ?= .venv
REMUS_CACHE ?= $(HOME)/.cache/remus
export REMUS_CACHE

VBIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all deps venv guest test unit demo bench clean

all: test

deps:
	@scripts/install-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VBIN)/pip install -q --upgrade pip
	$(VBIN)/pip install -q -e '.[test]'
	@touch $@

venv: deps $(STAMP)

guest: venv
	$(VBIN)/remusctl guest build

test: guest
	$(VBIN)/pytest -q -ra

unit: venv
	$(VBIN)/pytest -q -ra -m "not integration"

demo: guest
	$(VBIN)/python scripts/demo.py

bench: guest
	$(VBIN)/python bench/checkpoint_bench.py
	$(VBIN)/python bench/net_bench.py
	$(VBIN)/python bench/disk_bench.py
	$(VBIN)/python bench/failover_bench.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
