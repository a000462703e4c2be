# Two commands a fresh machine needs: `make demo` (set up, convert SmolLM2, print dense vs MoE)
# and `make test` (set up, fetch the real assets, run the suite). CI runs `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
MOEIFY  = $(VENV)/bin/moeify
OUT    ?= out

.PHONY: setup demo test test-unit bench-mlpmoe bench-cmoe bench-speed clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(MOEIFY) pull
	$(MOEIFY) convert --method mlpmoe --branches 8 -o $(OUT)/smollm2-mlpmoe-b8 --overwrite --json $(OUT)/smollm2-mlpmoe-b8.json

test: setup
	$(MOEIFY) pull
	$(PY) -m pytest -q -p no:cacheprovider --timeout 900

test-unit: setup
	$(PY) -m pytest -q -m "not integration"

bench-mlpmoe: setup
	$(MOEIFY) pull
	$(PY) benchmarks/mlpmoe_pruning.py --json benchmarks/results/mlpmoe_pruning.json

bench-cmoe: setup
	$(MOEIFY) pull
	$(PY) benchmarks/cmoe_layouts.py --runs moeify,prune,paper --json benchmarks/results/cmoe_layouts.json

bench-speed: setup
	$(MOEIFY) pull
	$(PY) benchmarks/bench_speed.py

clean:
	rm -rf $(OUT) .pytest_cache
