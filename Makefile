# fractalfs: `make run` starts a node with an embedded discovery server; `make test` runs
# the whole suite. Both install what is missing first (apt packages and .venv).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MOUNTPOINT ?= /fractal
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc iproute2 nftables util-linux socat chromium etcd-server openssl attr

.PHONY: install system-deps run test lint bench bench-failures cluster install-service clean

install: system-deps $(STAMP)

# Idempotent: installs only the Debian packages that are missing.
system-deps:
	@missing=""; \
	for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || missing="$$missing python3-venv"; \
	inc=$$($(PYTHON) -c 'import sysconfig; print(sysconfig.get_paths()["include"])'); \
	[ -f "$$inc/Python.h" ] || missing="$$missing python3-dev"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

run: install
	mkdir -p $(MOUNTPOINT)
	$(BIN)/fractalfs mount $(MOUNTPOINT)

lint: install
	$(BIN)/ruff check fractalfs tests bench
	$(BIN)/mypy

# Two workers, a test file each at a time (module fixtures, and the tests of one file that
# share daemons, stay on one worker); then the tests that assert a duration, alone.
# `pytest -q` alone runs the whole suite serially.
test: lint
	$(BIN)/pytest -q -n 2 --dist loadfile -m "not serial"
	$(BIN)/pytest -q -m serial

bench: install
	@command -v socat >/dev/null || { SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); $$SUDO apt-get install -y -qq socat >/dev/null; }
	$(BIN)/python bench/bench.py
	$(BIN)/python bench/spill_pages.py
	$(BIN)/python bench/scale.py --edges 1000 --history 100000

# Three hosts (network namespaces) with their own daemons, discovery on the first; Ctrl-C
# tears everything down.
cluster: install
	$(BIN)/python -m fractalfs.cluster up --hosts 3

bench-failures: install
	$(BIN)/python bench/failures.py

# systemd units, a /usr/local/bin/fractalfs link and example configuration (kept if present).
install-service: install
	ln -sf $(CURDIR)/$(BIN)/fractalfs /usr/local/bin/fractalfs
	install -d /etc/fractalfs
	[ -e /etc/fractalfs/fractalfs.toml ] || install -m 644 daemon/fractalfs.toml /etc/fractalfs/
	[ -e /etc/fractalfs/discovery.toml ] || install -m 644 daemon/discovery.toml /etc/fractalfs/
	[ -e /etc/fractalfs/secret ] || (umask 077; $(BIN)/fractalfs new-secret > /etc/fractalfs/secret)
	install -m 644 systemd/fractalfs.service systemd/fractalfs-discovery.service /etc/systemd/system/
	systemctl daemon-reload
	@echo "now: set discovery_url in /etc/fractalfs/fractalfs.toml (empty embeds a discovery of the node's own),"
	@echo "then: systemctl enable --now fractalfs-discovery fractalfs"

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
