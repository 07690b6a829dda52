# Two entry points: `make demo` (the main job on the embedded model) and `make test`.
# Each creates what it needs and installs everything it needs, CPU torch first:
# .venv (kvc, ONNX, the newest transformers) for everything, and for the tests of `kvc serve`
# .venv-vllm, because vLLM 0.32 pins transformers < 5.20 (so the suite covers both releases).
PYTHON    ?= python3
VENV      := .venv
PY        := $(VENV)/bin/python
STAMP     := $(VENV)/.kvc-installed
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.kvc-installed

.PHONY: demo test install install-vllm clean

install: $(STAMP)

install-vllm: $(VLLM_STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

$(VLLM_STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VLLM_VENV) WITH_VLLM=1 bash scripts/install.sh
	touch $(VLLM_STAMP)

demo: $(STAMP)
	$(PY) -m kvc.demo

# The suite in one worker per core (up to 4), a test module's tests in one worker (its module
# fixtures built once), the `long` tests started first; then the vLLM tests. Both runs share a
# folder (KVC_TEST_SHARED) where the first to need the embedded model's real profile leaves it for the others.
test: $(STAMP) $(VLLM_STAMP)
	shared=$$(mktemp -d) && trap 'rm -rf "$$shared"' EXIT && export KVC_TEST_SHARED=$$shared && \
	$(PY) -m pytest -q -m "not vllm" -n auto --maxprocesses 4 --dist loadscope --no-loadscope-reorder && \
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache
