# Every target sets up its own virtual environment first, so each works on a fresh machine.
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.isstad-installed

.PHONY: install demo test test-docs

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -e ".[export,dev,benchmark]"
	touch $(STAMP)

install: $(STAMP)

# The main job: a tiny ISSTAD trained and tested end to end on the generated demo data set, or on an
# MVTec-layout folder with `make demo DATA_ROOT=path/to/MVTecAD CATEGORY=bottle`.
demo: $(STAMP)
	$(VENV)/bin/isstad-demo $(if $(DATA_ROOT),--data-root $(DATA_ROOT) --category $(or $(CATEGORY),bottle))

test: $(STAMP)
	$(PYTHON) -m pytest tests

# Only the test that runs every shell command of the README, docs/ and the model cards (part of `make test` too).
test-docs: $(STAMP)
	$(PYTHON) -m pytest tests/test_doc_commands.py -m doc_commands -n 0
