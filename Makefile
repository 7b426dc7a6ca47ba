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
GUEST_TIMEOUT ?= 2700
# No single test may hang a run: pytest-timeout fails it after this many seconds.
TEST_TIMEOUT ?= 600
VM := tests/vm/run

.PHONY: test run setup host-tools lint unit integration guest images clean bench

test: setup lint unit integration guest

run: setup
	scripts/run-exporter

# Host prerequisites (QEMU, debootstrap, ...) and the Python tools.
setup: $(VENV)/.installed host-tools
	$(PYTHON) tests/vm/image.py ensure

# Host tools of the integration and deploy tests: prometheus and promtool, openssl
# (test certificates), systemd-analyze (the systemd unit).
HOST_TOOLS := prometheus:prometheus promtool:prometheus openssl:openssl systemd-analyze:systemd
host-tools:
	@missing=; for t in $(HOST_TOOLS); do command -v $${t%%:*} >/dev/null || missing="$$missing $${t#*:}"; done; \
	if [ -n "$$missing" ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	fi

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

unit: $(VENV)/.installed host-tools
	TRACER_REQUIRE_TOOLS=1 PYTHONPATH=. $(VENV)/bin/pytest -q tests/unit

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
# use): the full suite on $(DISTROS), the exact-count suite on $(EXACT_GUESTS),
# $(GUEST_JOBS) guests at once. A guest that dies (status 125) gets one rerun.
guest: setup
	tests/vm/matrix --jobs $(GUEST_JOBS) --timeout $(GUEST_TIMEOUT) --test-timeout $(TEST_TIMEOUT) \
		$(addsuffix :full,$(DISTROS)) $(addsuffix :exact,$(EXACT_GUESTS))

# The performance benchmark (bench/README.md): one guest boot per distro, every
# configuration interleaved; writes bench/results/<kernel>.md. Not part of `make test`.
BENCH_DISTROS ?= $(DISTROS)
BENCH_REPS ?= 9
bench: setup
	@set -e; for d in $(BENCH_DISTROS); do \
		echo "== benchmark on $$d =="; \
		tests/vm/in-image --distro $$d -- sh tests/workload/prebuild.sh; \
		tests/vm/in-image --distro $$d -- sh bench/extras.sh; \
		$(VM) --distro $$d --timeout 7200 -- python3 bench/run.py --reps $(BENCH_REPS); \
	done

images: setup
	@set -e; for d in $(sort $(DISTROS) $(filter-out lockdep,$(EXACT_GUESTS))); do \
		$(PYTHON) tests/vm/image.py build --distro $$d; done
	$(if $(filter lockdep,$(EXACT_GUESTS)),$(PYTHON) tests/vm/kernel.py build)

clean:
	rm -rf $(VENV) build
