# Two commands do all the set-up on a fresh Debian machine:
#   make demo   - namespaces as hosts, the guest protected, a client, a failover drill, the report
#   make test   - the test suite (real QEMU guests, daemons as separate processes)
#   make test-kernel - the soft-dirty and sch_plug tests inside a VM with Debian's kernel (the kernel lab)
PYTHON ?= python3
VENV ?= .venv
REMUS_CACHE ?= $(HOME)/.cache/remus
export REMUS_CACHE

VBIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PREFIX ?= /opt/remus
UNITDIR ?= /etc/systemd/system
OCF_ROOT ?= /usr/lib/ocf

.PHONY: all deps venv guest test test-kernel unit mutants demo bench install clean

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

# The tests this host's kernel skips (no soft-dirty, no sch_plug), run in a VM booted with
# Debian's cloud kernel; exit 1 = tests failed, 3 = the lab itself failed (see common/kernel_lab.py).
test-kernel: venv
	$(VBIN)/python -m remus.common.kernel_lab

unit: venv
	$(VBIN)/pytest -q -ra -m "not integration"

# Mutation testing of the pure core against the unit tests: score per module, table saved in bench/results/.
mutants: venv
	$(VBIN)/pip install -q -e '.[test,mutants]'
	$(VBIN)/python scripts/mutants.py

demo: guest
	$(VBIN)/python scripts/demo.py

bench: guest
	$(VBIN)/python bench/checkpoint_bench.py
	$(VBIN)/python bench/net_bench.py
	$(VBIN)/python bench/disk_bench.py
	$(VBIN)/python bench/failover_bench.py
	$(VBIN)/python bench/tls_bench.py

# The daemons in their own virtualenv, their commands on PATH, the systemd units.
install: deps
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q .
	for cmd in remus-primary remus-backup remusctl; do ln -sf $(PREFIX)/bin/$$cmd /usr/local/bin/$$cmd; done
	install -D -m 0644 systemd/remus-primary@.service $(UNITDIR)/remus-primary@.service
	install -D -m 0644 systemd/remus-backup@.service $(UNITDIR)/remus-backup@.service
	install -d $(OCF_ROOT)/resource.d/remus
	sed 's#@PYTHON@#$(PREFIX)/bin/python#' ocf/remus > $(OCF_ROOT)/resource.d/remus/remus
	chmod 0755 $(OCF_ROOT)/resource.d/remus/remus
	install -D -m 0644 README.md /usr/local/share/doc/remus/README.md
	install -d -m 0750 /etc/remus
	-systemctl daemon-reload

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
