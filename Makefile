# The two commands a newcomer needs: `make run` (the local pipeline) and `make test`.
# Both set up the virtual environment first; nothing else needs to be installed by hand.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
POLICY ?= examples/policy.yaml

.PHONY: setup run test lint unit integration clean constraints

setup: $(VENV)/.installed

# The runtime with its dev and train extras, and the tooling (tools/: the simulator, the stress
# scenarios, the benchmarks) that the suite, `qtrader stress` and `qtrader bench` need.
$(VENV)/.installed: pyproject.toml tools/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,train,local]' -e ./tools
	touch $@

run: setup
	$(BIN)/qtrader up --policy $(POLICY)

lint: setup
	$(BIN)/ruff check workloads operator tools tests bench
	$(BIN)/ruff format --check workloads operator tools tests bench
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q tests/unit

integration: setup
	$(BIN)/pytest -q tests/integration

# The suite in two processes (pytest-xdist): most tests wait on servers and subprocesses, so two
# workers on the 2-core machine take about 60% of the time of one.
PYTEST_WORKERS ?= 2

test: lint
	$(BIN)/pytest -q -n $(PYTEST_WORKERS)

# The runtime images' pinned dependency closure (docker/constraints.txt), from a fresh venv.
constraints:
	rm -rf .constraints-venv && $(PYTHON) -m venv .constraints-venv
	.constraints-venv/bin/pip install --quiet .
	(sed -n '1,4p' docker/constraints.txt; .constraints-venv/bin/pip freeze | grep -v '^quantum-trader') > docker/constraints.new
	mv docker/constraints.new docker/constraints.txt && rm -rf .constraints-venv

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
