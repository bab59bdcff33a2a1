# Every target is one command on a fresh machine with Python 3.11.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pixloc demo --out outputs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	mkdir -p outputs/bench
	for name in align basin store localize devices; do $(BIN)/pixloc bench $$name --out outputs/bench/$$name.json || exit 1; done

.PHONY: bench-real
bench-real: $(STAMP)  # needs ../shared/data; minutes on a laptop CPU
	mkdir -p outputs/bench
	$(BIN)/pixloc bench real --out outputs/bench/real.json

clean:
	rm -rf $(VENV) outputs .pytest_cache
