# Two entry points: `make demo` (the main job on the embedded model) and `make test`.
# Each creates .venv if missing and installs everything it needs, CPU torch first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.kvc-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) VENV=$(VENV) bash scripts/install.sh
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m kvc.demo

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache
