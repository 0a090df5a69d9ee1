# The README's commands. Each target installs what it needs first, idempotently.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
GLANCE_VENV := .glance-venv
GLANCE_VERSION ?= 33.0.0
DEBIAN_PACKAGES := openssh-server openssh-client qemu-utils iproute2 util-linux python3-venv
NEEDED_COMMANDS := /usr/sbin/sshd ssh ssh-keygen qemu-img ip tc unshare
PYTEST_ARGS ?=

.PHONY: deps debian test demo bench clean

deps: debian $(VENV)/.installed $(GLANCE_VENV)/.installed

# Debian packages: installed only when a command they provide is missing.
debian:
	@missing=""; for c in $(NEEDED_COMMANDS); do command -v $$c >/dev/null || missing="$$missing $$c"; done; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  if [ "$$(id -u)" != 0 ]; then echo "need root to apt-get install $(DEBIAN_PACKAGES)" >&2; exit 1; fi; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES) >/dev/null; \
	fi

# The project's virtualenv, with the project installed editable and its test dependencies.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

# Glance pins many oslo packages, so it lives in a virtualenv of its own.
$(GLANCE_VENV)/.installed:
	$(PYTHON) -m venv $(GLANCE_VENV)
	$(GLANCE_VENV)/bin/pip install -q 'glance==$(GLANCE_VERSION)' gunicorn
	touch $@

test: deps
	$(VENV)/bin/pytest $(PYTEST_ARGS)

demo: deps
	$(VENV)/bin/novacache demo

# Distribution benchmark on the shaped testbed (256 MiB, WAN 80 Mbit/s, LAN 800 Mbit/s): figures, not tests.
bench: deps
	$(VENV)/bin/novacache bench distribution --dir $$(mktemp -d /var/tmp/novacache-bench.XXXXXX) \
	    --sites 2 --nodes 4 --image-size 256MiB --json bench-results/distribution-2x4.json
	$(VENV)/bin/novacache bench distribution --dir $$(mktemp -d /var/tmp/novacache-bench.XXXXXX) \
	    --sites 1 --nodes 8 --image-size 256MiB --json bench-results/distribution-1x8.json

clean:
	rm -rf $(VENV) $(GLANCE_VENV) .pytest_cache operator/*.egg-info
