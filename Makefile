# The README's two commands: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
DISTROS ?= bookworm trixie
GUEST_TIMEOUT ?= 1500
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

# Every kernel-facing test, in a QEMU guest per distro (images built on first use).
guest: setup
	@set -e; for d in $(DISTROS); do \
		echo "== guest tests on $$d =="; \
		tests/vm/in-image --distro $$d -- sh tests/workload/prebuild.sh; \
		rc=0; $(VM) --distro $$d --timeout $(GUEST_TIMEOUT) -- \
			python3 -m pytest -q -p no:cacheprovider --timeout $(TEST_TIMEOUT) -m guest tests/guest || rc=$$?; \
		if [ $$rc = 125 ]; then \
			echo "== the $$d guest died (status 125, log named above): running its tests once more =="; \
			rc=0; $(VM) --distro $$d --timeout $(GUEST_TIMEOUT) -- \
				python3 -m pytest -q -p no:cacheprovider --timeout $(TEST_TIMEOUT) -m guest tests/guest || rc=$$?; \
		fi; \
		[ $$rc = 0 ] || exit $$rc; \
	done

# The performance benchmark (bench/README.md): one guest boot per distro, every
# configuration interleaved; writes bench/results/<kernel>.md. Not part of `make test`.
BENCH_DISTROS ?= $(DISTROS)
BENCH_REPS ?= 5
bench: setup
	@set -e; for d in $(BENCH_DISTROS); do \
		echo "== benchmark on $$d =="; \
		tests/vm/in-image --distro $$d -- sh tests/workload/prebuild.sh; \
		tests/vm/in-image --distro $$d -- sh bench/extras.sh; \
		$(VM) --distro $$d --timeout 7200 -- python3 bench/run.py --reps $(BENCH_REPS); \
	done

images: setup
	@set -e; for d in $(DISTROS); do $(PYTHON) tests/vm/image.py build --distro $$d; done

clean:
	rm -rf $(VENV) build
