# Two commands on a fresh machine with Python 3.11: `make demo`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench perf-doc fuzz clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vepc demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 tests

bench: $(STAMP)
	$(BIN)/vepc bench

# docs/performance.md is generated from a full run, never edited by hand.
perf-doc: $(STAMP)
	mkdir -p build
	$(BIN)/vepc bench --json > build/bench-run.json
	$(BIN)/vepc bench --from-json build/bench-run.json --markdown > docs/performance.md

fuzz: $(STAMP)
	@$(BIN)/python -m vepc.reliability.fuzz --sequences 1500 --steps 50

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
