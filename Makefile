# The README's two commands: `make demo` and `make test`. Both create .venv on first use and
# install instar with the CPU torch pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test setup clean bench-pipeline

setup: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/instar run recipes/tiny/pipeline.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs

# Times `make demo` in a fresh clone, a cold and a cached `instar run`; writes bench/RESULTS.md.
bench-pipeline: $(STAMP)
	$(BIN)/python bench/pipeline.py --make-demo
