# Two commands do all the set-up on a fresh clone:
#   make paper   -- create .venv if missing, install, regenerate every notebook/figure/table on the toy world
#   make test    -- create .venv if missing, install, run the test suite
#   make lint    -- the import-layer, lint and format gates (.ci/run runs lint, then test)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install lint test paper toy bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so pip never pulls a newer (CUDA) build through a dependency range
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,llm]"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

# the gates of .ci/run: import layers (pyproject [tool.importlinter]), ruff lint, ruff format
lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP)
	$(PY) -m pytest -q

paper: $(STAMP)
	$(PY) -m pie_lib.experiments.paper

toy: $(STAMP)
	$(PY) -m pie_lib.toy.build

bench: $(STAMP)
	$(PY) benchmarks/prune_speed.py

clean:
	rm -rf $(VENV) .pytest_cache
