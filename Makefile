# The two commands a newcomer runs are `make demo` and `make test`.
# Both install what they need when it is missing.

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
DEMO_LOG = .demo-converge.log
# Molecule's working directory for the scenario (its inventory, the test CA):
# a known place, so that `make demo`'s script, run outside Molecule, finds it.
export MOLECULE_EPHEMERAL_DIRECTORY ?= $(abspath .molecule-state)
# molecule and ansible-lint run ansible-playbook & co. from the virtualenv
IN_VENV = PATH="$(abspath $(VENV))/bin:$$PATH"
ANSIBLE_LINT = $(IN_VENV) ansible-lint roles playbooks

.PHONY: test demo demo-down chaos soak scenario-up molecule lint-ansible packages venv bench bench-oracle \
	bench-smtp bench-session bench-intake bench-flood bench-memory clean

# ruff, the unit tests, ansible-lint, then the two-host deployment in containers.
test: packages venv
	$(VENV)/bin/ruff check relay tests bench molecule
	$(PY) -m pytest
	$(ANSIBLE_LINT)
	$(MOLECULE_TEST)

# The scenario's four containers (edge, edge2, home, internet) deployed by the real
# playbooks, left running; then one message from Postfix on `internet` to the
# mailbox at home, each hop printed (molecule/default/demo.py).
demo: packages venv
	./scripts/ensure-docker
	./scripts/build-base-image
	@echo "Deploying the edges, home and internet with the playbooks (molecule converge, a few minutes; log: $(DEMO_LOG))"
	@$(IN_VENV) molecule converge --scenario-name default >$(DEMO_LOG) 2>&1 || \
	  { tail -n 40 $(DEMO_LOG); echo "molecule converge failed; the whole log: $(DEMO_LOG)"; exit 1; }
	$(PY) molecule/default/demo.py

# Whole-path faults, full size: MESSAGES messages from Postfix on `internet`
# (some to several mailboxes, some of a few MB) while faults chosen from a
# seed come and go (kills, the tunnel, packet loss, full disks, clock jumps);
# then every message must be in its mailboxes exactly once and nothing left
# on the way (molecule/default/stress.py, tests/chaos.py). SEED= replays a run.
SEED ?=
MESSAGES ?= 300
chaos: scenario-up
	$(PY) molecule/default/stress.py chaos $(if $(SEED),--seed $(SEED)) --messages $(MESSAGES)

# Not in `make test`: SOAK_MINUTES of steady mail, then 1,000 concurrent SMTP
# sessions at the edge; the memory and open fds of every YesTLS service
# before and after each, as `value ...` lines.
SOAK_MINUTES ?= 60
soak: scenario-up
	$(PY) molecule/default/stress.py soak --minutes $(SOAK_MINUTES)

# The scenario deployed: reused when its four containers run (`make demo`
# left them), `molecule converge` otherwise.
scenario-up: packages venv
	./scripts/ensure-docker
	./scripts/build-base-image
	@if docker inspect edge edge2 home internet >/dev/null 2>&1; then \
	  echo "Reusing the running scenario (make demo-down removes it)"; \
	else \
	  echo "Deploying the edges, home and internet with the playbooks (molecule converge; log: $(DEMO_LOG))"; \
	  $(IN_VENV) molecule converge --scenario-name default >$(DEMO_LOG) 2>&1 || \
	    { tail -n 40 $(DEMO_LOG); echo "molecule converge failed; the whole log: $(DEMO_LOG)"; exit 1; }; \
	fi

# Removes the demo's containers and networks.
demo-down: venv
	./scripts/ensure-docker
	$(IN_VENV) molecule destroy --scenario-name default

# The Molecule scenario alone (molecule/default): build or reuse the base
# image, then molecule test: create, prepare, converge, idempotence, check,
# verify, destroy (molecule/default/molecule.yml).
molecule: packages venv
	$(MOLECULE_TEST)

# ansible-lint alone (production profile, .ansible-lint)
lint-ansible: venv
	$(ANSIBLE_LINT)

define MOLECULE_TEST
./scripts/ensure-docker
./scripts/build-base-image
$(IN_VENV) molecule test --scenario-name default
endef

packages:
	./scripts/install-packages

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/test.txt requirements/deploy.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements/test.txt -r requirements/deploy.txt -e .
	touch $@

bench: packages venv
	$(PY) bench/tls_handshake.py

bench-oracle: packages venv
	$(PY) bench/oracle.py

# Postfix is the reference: installed (unconfigured, not started) only for this target.
bench-smtp: packages venv
	./scripts/install-packages bench
	$(PY) bench/smtp.py

# The edge's session layers and its shared spool, each against the simplest thing doing the same job, in one
# process (no network, no disk): steadier than bench-smtp for changes of a few percent.
bench-session: packages venv
	$(PY) bench/session.py

# The intake against Dovecot's own LMTP fed directly (Dovecot: installed by `packages`).
bench-intake: packages venv
	$(PY) bench/intake.py

# A ClientHello flood from one address while a genuine sender delivers over STARTTLS.
bench-flood: packages venv
	$(PY) bench/handshake_flood.py

# Mail plaintext left in the edge's memory after the 250 (reads /proc/PID/mem: root).
bench-memory: packages venv
	$(PY) bench/plaintext_memory.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
