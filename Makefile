# The two commands a newcomer runs are `make test` and (later) `make demo`.
# Both install what they need when it is missing.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: test packages venv bench bench-oracle bench-smtp clean

test: packages venv
	$(VENV)/bin/ruff check relay tests bench
	$(PY) -m pytest

packages:
	./scripts/install-packages

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/test.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/test.txt -e .
	touch $@

bench: packages venv
	$(PY) bench/tls_handshake.py

bench-oracle: packages venv
	$(PY) bench/oracle.py

# Postfix is the reference: installed (unconfigured, not started) only for this target.
bench-smtp: packages venv
	./scripts/install-packages bench
	$(PY) bench/smtp.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
