# `make demo` and `make test` each build .venv from nothing (or refresh it when
# the lock changes), so a fresh clone needs no other set-up step.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-from-lock
PORT ?= 8000

.PHONY: venv pgbouncer demo lint test test-sqlalchemy-2.0 soak bench-isolation bench-venv bench mutation clean lock

venv: $(STAMP)

$(STAMP): requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	touch $(STAMP)

# PgBouncer for the pooler tests (tests/faults/pgbouncer.py runs private instances
# of it). Nothing to do when it is installed. Otherwise, as root with apt-get,
# Debian's package; its postinst would start a system-wide pgbouncer on :6432, so a
# policy-rc.d answering 101 ("action forbidden") keeps every service from starting
# during the install, and is removed afterwards only if this target created it.
POLICY_RC_D := /usr/sbin/policy-rc.d
pgbouncer:
	@if command -v pgbouncer >/dev/null 2>&1 || [ -x /usr/sbin/pgbouncer ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "The tests need PgBouncer, which is not installed: on Debian or Ubuntu run" >&2; \
		echo "  sudo apt-get install pgbouncer" >&2; \
		echo "(the tests start private instances; the system service is not needed)," >&2; \
		echo "or put a pgbouncer program on PATH, then run make again." >&2; \
		exit 1; \
	fi; \
	set -e; \
	if [ ! -e $(POLICY_RC_D) ]; then \
		trap 'rm -f $(POLICY_RC_D)' EXIT; trap 'exit 130' INT TERM; \
		printf '#!/bin/sh\n# make pgbouncer: start no service during the install\nexit 101\n' \
			> $(POLICY_RC_D); \
		chmod 755 $(POLICY_RC_D); \
	fi; \
	apt-get update; \
	DEBIAN_FRONTEND=noninteractive apt-get install -y pgbouncer

demo: venv
	$(BIN)/alembic upgrade head
	$(BIN)/uvicorn app.main:app --host 127.0.0.1 --port $(PORT)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app tests migrations benchmarks mutation

# Two xdist workers, each on its own database (and, for tests/faults, its own
# private PostgreSQL cluster and PgBouncer). The whole suite runs on asyncpg, then
# the tiers that touch a database (integration, faults) again on psycopg: the
# driver is chosen by TEST_DRIVER (tests/drivers.py). About 5 + 3.5 minutes of
# pytest on two idle cores (988 and 663 tests); `.ci/run` on a fresh clone, both
# SQLAlchemy series, took 15 minutes (December 2026).
PSYCOPG_TIERS := tests/integration tests/faults
# Run once, in the first run only (asyncpg, the lock's SQLAlchemy): the replica
# harness's own tests, which use neither the driver under test nor SQLAlchemy
# (psql, and a plain asyncpg connection whatever TEST_DRIVER says).
ONCE := --ignore=tests/faults/test_replica_harness.py
test: lint pgbouncer
	$(BIN)/pytest -n 2
	TEST_DRIVER=psycopg $(BIN)/pytest -n 2 $(PSYCOPG_TIERS) $(ONCE)

# The same suite on SQLAlchemy 2.0, in a venv of its own, but for ONCE and the
# Schemathesis run (14 s a driver): it runs on both drivers in `make test`, not
# again here, as nothing it sends depends on the SQLAlchemy series. The schema
# bounds every value that reaches the database (ids within int4, no NUL), so its
# statements are the plain CRUD, conflicts and 404s that tests/integration checks
# on both series; what it adds is the HTTP contract, FastAPI's and pydantic's.
CONTRACT_FUZZ := tests/integration/test_api_contract.py::test_schemathesis_finds_nothing
VENV20 := .venv-sqlalchemy-2.0
$(VENV20)/.installed: requirements.lock requirements-sqlalchemy-2.0.txt
	$(PYTHON) -m venv $(VENV20)
	$(VENV20)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(VENV20)/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-sqlalchemy-2.0.txt
	touch $@

# PSYCOPG_TIERS_20: what runs again on psycopg here; .ci/run narrows it (see there).
PSYCOPG_TIERS_20 ?= $(PSYCOPG_TIERS)
test-sqlalchemy-2.0: $(VENV20)/.installed pgbouncer
	$(VENV20)/bin/pytest -n 2 $(ONCE) --deselect $(CONTRACT_FUZZ)
	TEST_DRIVER=psycopg $(VENV20)/bin/pytest -n 2 $(PSYCOPG_TIERS_20) $(ONCE) \
		--deselect $(CONTRACT_FUZZ)

# The fault scenarios for about a minute each under 50 writers, on a private
# PostgreSQL cluster (initdb into a temporary directory), the same through a private
# PgBouncer in transaction mode plus a minute of 4 services sharing it, then 1,000
# cancellations per style on a database of its own on 127.0.0.1:5432, directly and
# through a PgBouncer: one line of figures per scenario, non-zero exit if a promise
# broke. About 25 minutes; see README, "Reliability".
soak: venv pgbouncer
	$(BIN)/python -m tests.faults.soak
	$(BIN)/python -m tests.faults.soak --pgbouncer
	$(BIN)/python -m tests.faults.cancellation --iterations 1000
	$(BIN)/python -m tests.faults.cancellation --iterations 1000 --pgbouncer

# Per-test cost of each test isolation strategy, side by side (1-3 minutes, PostgreSQL
# from BENCH_DATABASE_URL); prints a Markdown table, see benchmarks/README.md.
bench-isolation: venv
	$(BIN)/python -m benchmarks.isolation

# The request path of one app shape on five session layers (raw driver pools, the
# seed pattern, ours, advanced-alchemy, fastapi-async-sqlalchemy), each on asyncpg and
# psycopg, direct and through a private PgBouncer in transaction mode, side by side:
# about 6-10 minutes on two cores; see benchmarks/README.md. The peers and
# psycopg-pool are benchmark-only, so they get a venv of their own, pinned in
# requirements-bench.txt.
VENVBENCH := .venv-bench
$(VENVBENCH)/.installed: requirements.lock requirements-bench.txt
	$(PYTHON) -m venv $(VENVBENCH)
	$(VENVBENCH)/bin/python -m pip install --quiet --disable-pip-version-check \
		-r requirements.lock -r requirements-bench.txt
	touch $@

bench-venv: $(VENVBENCH)/.installed

bench: bench-venv pgbouncer
	$(VENVBENCH)/bin/python -m benchmarks.request_path

# Mutation testing of app/database/ (issue 15) with cosmic-ray, in a venv of its own
# (the lock plus requirements-mutation.txt); not part of `make test` or CI. After one
# baseline run of tests/unit, tests/integration and tests/sqlite (PostgreSQL, as for
# `make test`), each mutant runs only the tests that reach its lines, in work copies under
# build/mutation/ (the checkout is never mutated); writes build/mutation/report.txt.
# See mutation/run.py. MUTATION_ARGS narrows it, e.g.
#   make mutation MUTATION_ARGS="--rev HEAD app/database/_guards.py"
VENVMUT := .venv-mutation
MUTATION_ARGS ?=
$(VENVMUT)/.installed: requirements.lock requirements-mutation.txt
	$(PYTHON) -m venv $(VENVMUT)
	$(VENVMUT)/bin/python -m pip install --quiet --disable-pip-version-check \
		-r requirements.lock -r requirements-mutation.txt
	touch $@

mutation: $(VENVMUT)/.installed
	$(VENVMUT)/bin/python -m mutation.run $(MUTATION_ARGS)

# Re-pin every dependency to the newest allowed versions (needs the registry).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
		print("\n".join(p["dependencies"] + p["optional-dependencies"]["dev"]))' > .lock-venv/wanted.txt
	.lock-venv/bin/pip install --quiet --disable-pip-version-check -r .lock-venv/wanted.txt
	.lock-venv/bin/pip freeze > requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) $(VENV20) $(VENVBENCH) $(VENVMUT) build/mutation .mypy_cache .pytest_cache .ruff_cache
