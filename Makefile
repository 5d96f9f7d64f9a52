# regionkd: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
EXTRAS ?= train,export,dev,dicom,tensorrt-rtx,batch
DEMO_DIR ?= work/demo

.PHONY: venv demo test clean

# CPU reference environment: torch pinned through constraints.txt, the package editable.
venv: $(VENV)/.installed
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

demo: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh $(DEMO_DIR)

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) work .pytest_cache
