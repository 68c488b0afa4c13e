# The two commands: `make demo` and `make test`. Each installs what is
# missing first (scripts/setup.sh is a no-op once the environment is ready).

PY := .venv/bin/python
export FIFTYONE_DO_NOT_TRACK := true
# the offline MongoDB fallback is 6.0, which FiftyOne accepts with a warning
export FIFTYONE_DATABASE_VALIDATION ?= false
export PYTHONUNBUFFERED := 1

DEMO_ARGS ?=
ifdef APP
DEMO_ARGS += --app
endif

.PHONY: setup demo test test-fast lint format bench bench-scale clean-index

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m prelabel.demo $(DEMO_ARGS)

test: setup
	@bash scripts/setup-browser.sh
	$(PY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# everything but the browser tests
test-fast: setup
	$(PY) -m pytest -p no:cacheprovider -m "not browser" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m black --check -q -l 79 prelabel operators panels tests benchmarks __init__.py

format: setup
	$(PY) -m ruff check --fix -q .
	$(PY) -m black -q -l 79 prelabel operators panels tests benchmarks __init__.py

# QUICK=1: small sizes, one run each (a few minutes); the full run takes
# about half an hour on 2 cores. Writes BENCHMARKS.md.
bench: setup
	@$(PY) -c "import cleanlab, datasets" 2>/dev/null || \
		$(PY) -m pip install -q -c requirements/env.txt -e ".[bench]"
	$(PY) benchmarks/run.py $(if $(QUICK),--quick)

# The whole job in FiftyOne at 100k, 500k and 1M samples, two kinds of
# vectors (hours on 2 cores; QUICK=1: 20,000 samples, minutes). Prints the
# section and writes it to benchmarks/scale_fiftyone.json; SIZES=100000
# and KINDS=mnist narrow it.
bench-scale: setup
	$(PY) benchmarks/scale_fiftyone.py $(if $(QUICK),--quick) \
		$(if $(SIZES),--sizes $(SIZES)) $(if $(KINDS),--kinds $(KINDS)) \
		--json benchmarks/scale_fiftyone.json
