# The README's two commands: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
# The full guest suite runs on these; the exact-count suite (tests marked exact) on the
# rest of the kernel matrix: 5.10, our lockdep 6.1 and 7.x. See README, "Kernel support".
DISTROS ?= bookworm trixie
EXACT_GUESTS ?= bullseye lockdep trixie-backports
# Guests at once: each is single-threaded TCG, one host core.
GUEST_JOBS ?= 2
# One guest run: a full@ part takes 11 to 14 min warm, 21 to 25 cold (beside image and kernel builds).
GUEST_TIMEOUT ?= 3900
# No single test may hang a run: pytest-timeout fails it after this many seconds.
TEST_TIMEOUT ?= 600
VM := tests/vm/run

.PHONY: test run setup host-tools guest-tools lint unit integration guest images clean bench deb deb-tools

test: setup lint unit guest

# Only what the demo needs: the guest's tools and a bare venv (`top` is the standard
# library's), not the test tools.
run: $(VENV)/bin/python guest-tools
	scripts/run-exporter

# Host prerequisites (QEMU, mmdebstrap, ...) and the Python tools.
setup: $(VENV)/.installed host-tools guest-tools

guest-tools:
	$(PYTHON) tests/vm/image.py ensure

# Host tools of the integration and deploy tests: prometheus and promtool, openssl
# (test certificates), systemd-analyze (the systemd unit), tmux (a terminal for `top`).
HOST_TOOLS := prometheus:prometheus promtool:prometheus openssl:openssl systemd-analyze:systemd tmux:tmux
host-tools:
	@missing=; for t in $(HOST_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	scripts/apt-install $$missing

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements-dev.txt | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

unit: $(VENV)/.installed host-tools
	TRACER_REQUIRE_TOOLS=1 PYTHONPATH=. $(VENV)/bin/pytest -q tests/unit

# The Debian package, built with Debian's tools from a copy of the checkout (what git
# ignores stays out), then checked by lintian (overrides in debian/, with reasons).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
DEB := build/deb/tracer-exporter_$(VERSION)_all.deb
DEB_TOOLS := debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel lintian
DEB_PATH := /usr/sbin:/usr/bin:/sbin:/bin
deb-tools:
	@missing=; for p in $(DEB_TOOLS); do \
		dpkg-query -W -f '$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; done; \
	scripts/apt-install $$missing

deb: deb-tools
	rm -rf build/deb
	mkdir -p build/deb/src
	tar --exclude=./build --exclude=./.venv --exclude-vcs --exclude-vcs-ignores -cf - . | tar -C build/deb/src -xf -
	git rev-parse HEAD >build/deb/src/tracer_exporter/REVISION 2>/dev/null || echo unknown >build/deb/src/tracer_exporter/REVISION
	# Debian's python3, not one earlier on PATH (pyenv, a venv): the package is for its interpreter.
	cd build/deb/src && PATH=$(DEB_PATH) dpkg-buildpackage --build=binary --no-sign
	PATH=$(DEB_PATH) lintian --fail-on error,warning $(DEB)
	@echo "built $(DEB)"

# A real Prometheus on the host scraping the exporter in a guest over TLS with basic
# auth: PromQL values, the dashboard's queries, staleness (about a minute per distro).
INTEGRATION_DISTROS ?= $(DISTROS)
integration: setup
	@set -e; for d in $(INTEGRATION_DISTROS); do \
		echo "== integration tests on $$d =="; \
		tests/vm/in-image --distro $$d -- sh tests/workload/prebuild.sh; \
		TRACER_REQUIRE_TOOLS=1 TRACER_IT_DISTRO=$$d PYTHONPATH=. \
			$(VENV)/bin/pytest -q -p no:cacheprovider --timeout $(TEST_TIMEOUT) tests/integration; \
	done

# Every kernel-facing test, in QEMU guests (images and the lockdep kernel built on first
# use): the full suite on $(DISTROS), the exact-count suite on $(EXACT_GUESTS), the
# package of `make deb` and the venv route installed on $(INSTALL_GUESTS) (run --overlay),
# and the integration tests on $(INTEGRATION_DISTROS), $(GUEST_JOBS) guests at once. A
# guest that dies (status 125) gets one rerun.
INSTALL_GUESTS ?= $(DISTROS)
# bookworm:full@1/2 trixie:full@2/2: each runs every exact-count test and its part of
# the rest (tests/guest/conftest.py, TRACER_SHARD). The longest runs go first.
FULL_SUITES := $(join $(DISTROS),$(foreach i,$(shell seq $(words $(DISTROS))),:full@$(i)/$(words $(DISTROS))))
guest: setup deb
	tests/vm/matrix --jobs $(GUEST_JOBS) --timeout $(GUEST_TIMEOUT) --test-timeout $(TEST_TIMEOUT) \
		--pytest $(VENV)/bin/pytest \
		$(FULL_SUITES) $(addsuffix :installed,$(INSTALL_GUESTS)) $(addsuffix :exact,$(EXACT_GUESTS)) \
		$(addsuffix :integration,$(INTEGRATION_DISTROS))

# The performance benchmark (bench/README.md): one guest boot per distro, every
# configuration interleaved; writes bench/results/<kernel>.md, and the exporter's own
# start-up time, RSS and scrape CPU to bench/results/<kernel>-exporter.md. Not part of `make test`.
BENCH_DISTROS ?= $(DISTROS)
BENCH_REPS ?= 9
bench: setup
	@set -e; for d in $(BENCH_DISTROS); do \
		echo "== benchmark on $$d =="; \
		tests/vm/in-image --distro $$d -- sh tests/workload/prebuild.sh; \
		tests/vm/in-image --distro $$d -- sh bench/extras.sh; \
		$(VM) --distro $$d --timeout 7200 -- sh -c 'python3 bench/run.py --reps $(BENCH_REPS) && python3 bench/footprint.py'; \
	done

images: setup
	@set -e; for d in $(sort $(DISTROS) $(filter-out lockdep,$(EXACT_GUESTS))); do \
		$(PYTHON) tests/vm/image.py build --distro $$d; done
	$(if $(filter lockdep,$(EXACT_GUESTS)),$(PYTHON) tests/vm/kernel.py build)

clean:
	rm -rf $(VENV) build
