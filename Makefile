# Two entry points. Each creates .venv when missing (torch pinned to 2.13.0: it installs
# from local disk in seconds, while an unpinned torch pulls a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test docs lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[test,report,notebooks,docs]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/matfn demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --benchmark-disable -q --nbmake tests matfn optim notebooks

# The API reference from the docstrings (mkdocs.yml); --strict: any warning fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	$(PY) -m pytest tests/bench -q --benchmark-only

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .benchmarks site
