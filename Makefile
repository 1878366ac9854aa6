# Two commands do all the set-up on a fresh clone:
#   make paper   -- create .venv if missing, install, regenerate every notebook/figure/table on the toy world
#   make test    -- create .venv if missing, install, run the gates (make lint), then the test suite (.ci/run runs exactly this)
#   make lint    -- the gates alone: import layers, ruff lint and format, basedpyright basic
#   make browser -- headless Chromium + the viewer's JS libraries, for the graph-viewer test and figure
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install lint test paper toy bench browser clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned, so pip never pulls a newer (CUDA) build through a dependency range
	$(PY) -m pip install -q --disable-pip-version-check "torch==2.13.0"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,llm]"
	# circuit-tracer's viewer for `pie graph --serve`: its frontend needs only the standard library and
	# pydantic, and --no-deps keeps it from pulling its transformers<=4.57.3 pin
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "circuit-tracer==0.5.0"
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

install: $(STAMP)

# the gates of .ci/run: import layers (pyproject [tool.importlinter]), ruff lint, ruff format,
# basedpyright basic (zero errors; no baseline)
lint: $(STAMP)
	$(VENV)/bin/lint-imports
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/basedpyright

test: lint
	$(PY) -m pytest -q

paper: $(STAMP)
	$(PY) -m pie_lib.experiments.paper

toy: $(STAMP)
	$(PY) -m pie_lib.toy.build

# Chromium from Debian (needs root), and the viewer page's CDN libraries from npm into
# ~/.cache/pie_lib/viewer-js (PIE_VIEWER_JS overrides), for offline headless viewing
VIEWER_JS ?= $(or $(PIE_VIEWER_JS),$(HOME)/.cache/pie_lib/viewer-js)
browser: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	mkdir -p $(VIEWER_JS)
	npm install --prefix $(VIEWER_JS) --no-audit --no-fund --silent $$($(PY) -c "from pie_lib.graph.browser import NPM_PACKAGES; print(' '.join(NPM_PACKAGES))")

bench: $(STAMP)
	$(PY) benchmarks/prune_speed.py

clean:
	rm -rf $(VENV) .pytest_cache
