# statemesh-node: build, lint, test and demonstrate the package.
# `make demo` and `make check` each work as the first command on a fresh Debian 12 machine.

PYTHON      := /usr/bin/python3
CLEAN_ENV   := env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=$(HOME) LC_ALL=C.UTF-8
BUILD       := build
VERSION     := $(shell dpkg-parsechangelog -S Version 2>/dev/null)
DEB         := $(BUILD)/statemesh-node_$(VERSION)_all.deb
PYTEST      := $(CLEAN_ENV) $(PYTHON) -m pytest

# Everything the build, the tests, the VM harness and the benchmarks need, from Debian's archive.
DEPS := debhelper dh-python python3-all python3-setuptools lintian \
        python3-apt python3-debian python3-cryptography python3-tpm2-pytss python3-dbus-next \
        python3-jeepney python3-psutil python3-openssl python3-pytest python3-pytest-xdist python3-hypothesis \
        cryptsetup-bin ufw swtpm swtpm-tools tpm2-tools dbus util-linux e2fsprogs fdisk \
        mmdebstrap apt-utils qemu-system-x86 qemu-utils git

.PHONY: deps deb lint test test-jammy vm-test bench check demo clean images host-parts

deps:
	@missing=""; for p in $(DEPS); do \
	   dpkg-query -W -f='$${db:Status-Abbrev}' $$p 2>/dev/null | grep -q '^ii' || missing="$$missing $$p"; \
	 done; \
	 if [ -n "$$missing" ]; then \
	   echo "installing:$$missing"; \
	   apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	 fi

deb: $(DEB)

$(DEB): $(shell git ls-files 2>/dev/null)
	rm -rf $(BUILD)/statemesh && mkdir -p $(BUILD)/statemesh
	git ls-files -z | tar --null -T - -cf - | tar -xf - -C $(BUILD)/statemesh
	cd $(BUILD)/statemesh && $(CLEAN_ENV) dpkg-buildpackage -us -uc -b
	@ls -l $@

lint: $(DEB)
	$(CLEAN_ENV) lintian --fail-on error,warning --display-info --pedantic --tag-display-limit 0 \
	    $(BUILD)/statemesh_$(VERSION)_amd64.changes

# pytest exits 5 when it collected no test: that is a broken suite, said plainly.
NO_TESTS := || { rc=$$?; [ $$rc -ne 5 ] || echo "pytest collected no tests: failing"; exit $$rc; }

# The tests that reach a TPM or D-Bus run a second time as on Ubuntu 22.04, which has
# neither tpm2-pytss nor dbus-next: on the pure-Python TPM backend (statemesh/attest/tpm.py)
# and on jeepney (statemesh/dbusconn.py).
TPM_TESTS  := tests/test_tpm.py tests/test_atls.py tests/test_verifier.py
DBUS_TESTS := tests/test_systemd.py tests/test_agents.py tests/test_install.py \
              tests/test_leftrunning.py tests/test_lockdown.py tests/test_memory.py \
              tests/test_planted.py tests/test_preflight.py
AS_ON_JAMMY := STATEMESH_TPM_BACKEND=direct STATEMESH_DBUS_BACKEND=jeepney

# The host tests spend most of their time waiting (ufw and iptables in a private network
# namespace, dbus-daemon, swtpm, a watchdog's grace): four workers on two cores halve the
# wall time (README, "make check").
HOST_WORKERS := -n 4

test:
	$(PYTEST) $(HOST_WORKERS) tests --ignore=tests/vm $(NO_TESTS)
	$(CLEAN_ENV) $(AS_ON_JAMMY) $(PYTHON) -m pytest $(HOST_WORKERS) -m "not esapi" $(TPM_TESTS) $(DBUS_TESTS) $(NO_TESTS)

# The host tests again on Ubuntu 22.04's Python (3.10) and library versions, in a test-only
# virtual environment (tests/jammy-requirements.txt says where each version comes from):
# code that needs more than jammy offers fails here first. There is no tpm2-pytss, as on
# jammy: the TPM tests run on the pure-Python backend (those marked esapi, which compare the
# two backends, are left to `make test`), and the D-Bus client runs on jeepney (dbus-next is
# installed only for the tests' stand-in services), and the stand-in systemd and logind
# behave as jammy's systemd 249 (tests/fakebus: without the D-Bus members added after it).
# PyPI's cryptography carries its own OpenSSL, so the tests that open a TLS connection
# (marked system_libssl) are left to `make test`, and so are those that read apt's
# configuration with python3-apt (marked system_apt: PyPI has no build of it; jammy's
# python3-apt 2.4 has the same read_config_file; without it, python-debian reads dpkg's
# database with its own parser and warns, as it should on a node, which has python3-apt).
# Python 3.10 is pyenv's on this project's machines.
JAMMY_VENV   := $(BUILD)/jammy-venv
JAMMY_PYTHON := $(firstword $(wildcard /usr/bin/python3.10 $(HOME)/.pyenv/versions/3.10*/bin/python3.10))

test-jammy:
	@[ -n "$(JAMMY_PYTHON)" ] || { echo "test-jammy: no Python 3.10 here (pyenv install 3.10 gives one)"; exit 1; }
	rm -rf $(JAMMY_VENV)
	$(CLEAN_ENV) $(JAMMY_PYTHON) -m venv $(JAMMY_VENV)
	$(CLEAN_ENV) PIP_DISABLE_PIP_VERSION_CHECK=1 \
	    $(JAMMY_VENV)/bin/pip install -q -r tests/jammy-requirements.txt
	$(CLEAN_ENV) STATEMESH_DBUS_BACKEND=jeepney $(JAMMY_VENV)/bin/python -m pytest -p no:cacheprovider $(HOST_WORKERS) \
	    --systemd-version 249 -m "not system_libssl and not system_apt and not esapi" \
	    -W "ignore:Parsing of Deb822 data with python3-apt:UserWarning" tests --ignore=tests/vm $(NO_TESTS)

# The VM suite, one run for every release: the whole suite on Debian 12, the tests marked
# every_release on Debian 13 too, from the same .deb built on Debian 12 (--suites).
# Two guests run at once, the most expensive tests first (each declares its cost). Under TCG
# a guest computes most of the time, and two at once do little better than two in a row
# (README, "make check"); the second worker wins where a guest waits (frozen boots, grace
# periods, polls). Each guest test's duration is printed, and each release's share of the
# workers' time: where the suite's time goes.
comma       := ,
SUITES      := bookworm,trixie
VM_WORKERS  := 2
VM_PYTEST   := $(PYTEST) -n $(VM_WORKERS) --durations=0 tests/vm --deb $(DEB) --suites $(SUITES)

vm-test: $(DEB)
	$(VM_PYTEST) $(NO_TESTS)

bench: $(DEB)
	$(CLEAN_ENV) $(PYTHON) -m bench --deb $(DEB)

# Every part timed; the table at the end says where make check's time went. The guest
# images (mmdebstrap: the archive's network and dpkg) are built beside lintian and the host
# tests (one core), so that the VM suite's workers start with them ready; their time is
# shown, not added to the total. Their build runs in a session of its own (setsid: its pid
# names its process group), ended on the host parts' failure or an interrupt: a background
# job of a shell ignores Ctrl-C.
TIMES  := $(BUILD)/check-times
IMAGES := $(BUILD)/images.log
timed  = @start=$$(date +%s); $(MAKE) --no-print-directory $(1) || exit $$?; \
         echo "$(2) $$(( $$(date +%s) - start ))" >> $(TIMES)

images:
	$(CLEAN_ENV) $(PYTHON) -m harness.vm.image $(subst $(comma), ,$(SUITES))

host-parts:
	$(call timed,lint,lintian)
	$(call timed,test,host-tests)
	$(call timed,test-jammy,host-jammy)

check:
	@mkdir -p $(BUILD) && : > $(TIMES) && : > $(TIMES).beside
	$(call timed,deps,deps)
	$(call timed,deb,build)
	@rm -f $(IMAGES).rc; \
	 setsid sh -c 'start=$$(date +%s); $(MAKE) --no-print-directory images > $(IMAGES) 2>&1; \
	   echo $$? > $(IMAGES).rc; echo "images $$(( $$(date +%s) - start ))" >> $(TIMES).beside' & \
	 images=$$!; trap 'kill -TERM -$$images 2>/dev/null; exit 130' HUP INT TERM; \
	 $(MAKE) --no-print-directory host-parts || { rc=$$?; kill -TERM -$$images 2>/dev/null; \
	   wait; exit $$rc; }; \
	 wait; \
	 [ "$$(cat $(IMAGES).rc)" = 0 ] || { echo "building the guest images failed:"; cat $(IMAGES); exit 1; }
	$(call timed,vm-test,vm-suite)
	@echo "make check, wall time by part:"; \
	 awk '{ printf "  %-11s %5d s %6.1f min\n", $$1, $$2, $$2 / 60; sum += $$2 } \
	      END { printf "  %-11s %5d s %6.1f min\n", "total", sum, sum / 60 }' $(TIMES); \
	 awk '{ printf "  (%s: %d s, beside lintian and the host tests)\n", $$1, $$2 }' $(TIMES).beside

demo: deps deb
	$(CLEAN_ENV) $(PYTHON) -m harness.vm.demo --deb $(DEB)

clean:
	rm -rf $(BUILD) .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
