# `make run`: set up (idempotent) and rebuild the model with DVC. `make test`: set up and run the tests.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup run test
setup: $(STAMP)

# Re-installs only when requirements.txt changes; the machine's pip config prints noise about absent mirrors.
$(STAMP): requirements.txt
	test -x $(VENV)/bin/python || python3 -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -r requirements.txt 2>&1 | { grep -v "is ignored: it is neither" || true; }
	touch $@

run: $(STAMP)
	dvc repro
	@echo; echo "== results (outputs/evaluate/summary.txt) =="; cat outputs/evaluate/summary.txt

test: $(STAMP)
	python -m pytest -q tests
