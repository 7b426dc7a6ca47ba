# The README's two commands: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
DISTROS ?= bookworm trixie
GUEST_TIMEOUT ?= 1800
VM := tests/vm/run

.PHONY: test run setup lint unit guest images clean

test: setup lint unit guest

run: setup
	scripts/run-exporter

# Host prerequisites (QEMU, debootstrap, ...) and the Python tools.
setup: $(VENV)/.installed
	$(PYTHON) tests/vm/image.py ensure

$(VENV)/.installed: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

unit: $(VENV)/.installed
	PYTHONPATH=. $(VENV)/bin/pytest -q tests/unit

# Every kernel-facing test, in a QEMU guest per distro (images built on first use).
guest: setup
	@set -e; for d in $(DISTROS); do \
		echo "== guest tests on $$d =="; \
		$(VM) --distro $$d --timeout $(GUEST_TIMEOUT) -- \
			python3 -m pytest -q -p no:cacheprovider -m guest tests/guest; \
	done

images: setup
	@set -e; for d in $(DISTROS); do $(PYTHON) tests/vm/image.py build --distro $$d; done

clean:
	rm -rf $(VENV) build
